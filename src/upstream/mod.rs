//! Providers: one HTTP client per configured upstream, how a request is
//! sent (credentials, timeouts), and how its failures are classified.

pub mod continuation;

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use bytes::Bytes;

use crate::config::{Protocol, UpstreamConfig};

/// A provider and the pooled client that talks to it.
pub struct Upstream {
    pub config: UpstreamConfig,
    client: reqwest::Client,
    /// Parsed once: `/chat/completions` and `/messages` under the base URL.
    openai_url: reqwest::Url,
    anthropic_url: reqwest::Url,
    /// The configured credential as a ready header (marked sensitive).
    credential: Option<(&'static str, HeaderValue)>,
}

/// Why a request to the provider failed before its first event.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach upstream `{upstream}`: {message}")]
    Connect { upstream: String, message: String },
    #[error("upstream `{upstream}` did not answer within {after:?}")]
    Timeout { upstream: String, after: Duration },
    /// The provider answered with an error status; its body is passed on.
    #[error("upstream `{upstream}` answered {status}")]
    Status {
        upstream: String,
        status: StatusCode,
        body: Bytes,
    },
}

/// Client headers worth passing to the provider. Everything else (cookies,
/// hop-by-hop headers, our own) stays behind.
const FORWARDED: &[&str] = &[
    "anthropic-version",
    "anthropic-beta",
    "openai-organization",
    "openai-project",
];

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Result<Upstream, String> {
        let builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024);
        let builder = if config.http2 {
            builder.http2_prior_knowledge()
        } else {
            builder.http1_only()
        };
        let client = builder
            // A provider's redirect is an error to show, not to follow with
            // our credential; and a request is never sent twice.
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .build()
            .map_err(|e| e.to_string())?;
        let url = |path: &str| {
            reqwest::Url::parse(&format!("{}{path}", config.base_url))
                .map_err(|e| format!("invalid base_url: {e}"))
        };
        let openai_url = url("/chat/completions")?;
        let anthropic_url = url("/messages")?;
        let credential = match &config.api_key {
            None => None,
            Some(key) => {
                let (name, text) = match config.protocol {
                    Protocol::OpenAi => ("authorization", format!("Bearer {}", key.0)),
                    Protocol::Anthropic => ("x-api-key", key.0.clone()),
                };
                let mut value = HeaderValue::from_str(&text).map_err(|_| {
                    format!(
                        "the key in {} cannot be sent as an HTTP header (control characters?)",
                        config
                            .api_key_env
                            .as_deref()
                            .unwrap_or("the upstream's key variable")
                    )
                })?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        Ok(Upstream {
            config,
            client,
            openai_url,
            anthropic_url,
            credential,
        })
    }

    pub fn url(&self, protocol: Protocol) -> &reqwest::Url {
        match protocol {
            Protocol::OpenAi => &self.openai_url,
            Protocol::Anthropic => &self.anthropic_url,
        }
    }

    /// Send `body` and wait for the response head (bounded by the
    /// first-byte timeout). The configured credential replaces the client's;
    /// without one, the client's own credential is passed through.
    pub async fn send(
        &self,
        protocol: Protocol,
        body: Bytes,
        client_headers: &HeaderMap,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut request = self
            .client
            .post(self.url(protocol).clone())
            .header("content-type", "application/json")
            .body(body);
        for name in FORWARDED {
            if let Some(v) = client_headers.get(*name) {
                request = request.header(*name, v);
            }
        }
        if protocol == Protocol::Anthropic && !client_headers.contains_key("anthropic-version") {
            request = request.header("anthropic-version", "2023-06-01");
        }
        match &self.credential {
            Some((name, value)) => request = request.header(*name, value.clone()),
            None => {
                for name in ["authorization", "x-api-key"] {
                    if let Some(v) = client_headers.get(name) {
                        request = request.header(name, v.clone());
                    }
                }
            }
        }
        let after = self.config.first_byte_timeout;
        let response = match tokio::time::timeout(after, request.send()).await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    upstream: self.config.name.clone(),
                    after,
                });
            }
            Ok(Err(e)) if e.is_timeout() => {
                return Err(UpstreamError::Timeout {
                    upstream: self.config.name.clone(),
                    after: self.config.connect_timeout,
                });
            }
            Ok(Err(e)) => {
                return Err(UpstreamError::Connect {
                    upstream: self.config.name.clone(),
                    message: error_chain(&e),
                });
            }
            Ok(Ok(r)) => r,
        };
        if !response.status().is_success() {
            let status = response.status();
            // Read a bounded amount of the error body, within the same budget.
            let body = tokio::time::timeout(Duration::from_secs(5), response.bytes())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(UpstreamError::Status {
                upstream: self.config.name.clone(),
                status,
                body: body.slice(..body.len().min(64 * 1024)),
            });
        }
        Ok(response)
    }
}

/// The client headers a pump keeps for its provider call: the forwarded
/// ones and the client's own credential (used only without `api_key_env`).
pub fn forwardable(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED.iter().chain(&["authorization", "x-api-key"]) {
        if let Some(v) = headers.get(*name) {
            out.insert(*name, v.clone());
        }
    }
    out
}

/// `reqwest` errors hide the useful part (connection refused, DNS) in their
/// sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Whether a response head announces an SSE body.
pub fn is_event_stream(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

pub fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
