//! Providers, as transport: one HTTP client per configured upstream, how a
//! request is sent (credentials, timeouts), how its failures are
//! classified, and which upstream serves a model ([`route`]). What the
//! bytes mean is the protocol's business (`crate::protocol`).

pub mod canary;
pub mod h1;
pub mod health;
pub mod rollout;
pub mod route;

pub use route::Upstreams;

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};

use crate::config::UpstreamConfig;
use crate::protocol::Continuation;
use crate::protocol::sse::SseDecoder;

/// A provider and the pooled client that talks to it.
pub struct Upstream {
    pub config: UpstreamConfig,
    client: reqwest::Client,
    /// Parsed once: the protocol's path under the base URL.
    url: reqwest::Url,
    /// The configured credential as a ready header (marked sensitive).
    credential: Option<(HeaderName, HeaderValue)>,
    /// Plain-HTTP/1.1 providers: the connections a pump drives itself
    /// (`h1.rs`); `None` where streams go through reqwest.
    direct: Option<std::sync::Arc<h1::Pool>>,
    /// The breaker and the streak of failures.
    pub health: health::Health,
    /// Per-upstream figures behind `/metrics`.
    pub stats: health::UpstreamStats,
    /// The weight a canary gives it now (f64 bits; NaN: the configured one).
    weight_override: std::sync::atomic::AtomicU64,
    /// `GET base_url + health.path`.
    health_url: reqwest::Url,
    /// Its name as a header value (`x-tidegate-upstream`), made once.
    pub name_header: Option<HeaderValue>,
}

/// A provider's streaming answer whose head said 2xx.
pub struct StreamResponse {
    pub content_type: Option<HeaderValue>,
    /// The provider's headers a client is shown ([`passes_to_client`]).
    pub headers: HeaderMap,
    pub body: StreamBody,
}

/// Where a body's payload goes (the pump's SSE decoder).
pub trait Sink: Send {
    /// About `additional` bytes are coming: a hint to grow once.
    fn reserve(&mut self, _additional: usize) {}
    fn put(&mut self, bytes: &[u8]);
}

impl<F: FnMut(&[u8]) + Send> Sink for F {
    fn put(&mut self, bytes: &[u8]) {
        self(bytes)
    }
}

impl Sink for SseDecoder {
    fn reserve(&mut self, additional: usize) {
        SseDecoder::reserve(self, additional);
    }

    fn put(&mut self, bytes: &[u8]) {
        self.feed(bytes);
    }
}

/// The body of a provider's streaming answer, read by its pump.
pub enum StreamBody {
    Direct(h1::Body),
    Pooled(std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>),
}

impl StreamBody {
    /// Read and drop the rest of the body, within `limit` and up to
    /// [`REST_LIMIT`]: a body read to its end gives its connection back to
    /// the pool.
    pub async fn finish(&mut self, limit: Duration) {
        let mut left = REST_LIMIT;
        let rest = async {
            loop {
                let mut sink = |bytes: &[u8]| left = left.saturating_sub(bytes.len());
                match self.read(&mut sink).await {
                    Ok(false) if left > 0 => {}
                    _ => return,
                }
            }
        };
        let _ = tokio::time::timeout(limit, rest).await;
    }

    /// Wait for more of the body and hand it to `sink`, with whatever else
    /// has already arrived. `Ok(true)`: the body is complete. Cancel-safe:
    /// what was read has been handed over.
    pub async fn read(&mut self, sink: &mut dyn Sink) -> Result<bool, TransportError> {
        match self {
            StreamBody::Direct(body) => body.read(sink).await.map_err(TransportError::Direct),
            StreamBody::Pooled(stream) => {
                match stream.next().await {
                    None => return Ok(true),
                    Some(Err(e)) => return Err(TransportError::Pooled(e)),
                    Some(Ok(chunk)) => {
                        sink.reserve(chunk.len());
                        sink.put(&chunk);
                    }
                }
                // hyper's connection task hands over one HTTP chunk per
                // turn: while a turn brings another, keep taking them (a
                // burst becomes one batch); the first turn that brings
                // nothing ends the read.
                let mut productive = true;
                loop {
                    match stream.next().now_or_never() {
                        Some(None) => return Ok(true),
                        Some(Some(Err(e))) => return Err(TransportError::Pooled(e)),
                        Some(Some(Ok(chunk))) => {
                            sink.reserve(chunk.len());
                            sink.put(&chunk);
                            productive = true;
                        }
                        None if productive => {
                            productive = false;
                            tokio::task::yield_now().await;
                        }
                        None => return Ok(false),
                    }
                }
            }
        }
    }
}

/// Why talking to a provider failed: connecting, sending, or reading its
/// answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// On the pump's own connection.
    #[error(transparent)]
    Direct(h1::H1Error),
    /// Through reqwest, whose errors hide the useful part in their sources.
    #[error("{}", error_chain(.0))]
    Pooled(#[source] reqwest::Error),
}

/// Why an upstream's client could not be built at start-up.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("invalid base_url: {0}")]
    Url(#[source] url::ParseError),
    #[error("the key in {var} cannot be sent as an HTTP header (control characters?)")]
    KeyNotAHeader { var: String },
}

/// Why a request to the provider failed before its first event.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach upstream `{upstream}`: {source}")]
    Connect {
        upstream: String,
        #[source]
        source: TransportError,
    },
    #[error("upstream `{upstream}` did not answer within {after:?}")]
    Timeout {
        upstream: String,
        after: Duration,
        /// Still connecting: the request was never sent.
        connecting: bool,
    },
    /// A non-streaming answer larger than `limits.max_answer_bytes`.
    #[error("upstream `{upstream}` answered with more than {limit} bytes")]
    TooLarge { upstream: String, limit: u64 },
    /// The provider answered with an error status; its body and the
    /// headers a client is shown (`retry-after`, request id) are passed on.
    #[error("upstream `{upstream}` answered {status}")]
    Status {
        upstream: String,
        status: StatusCode,
        body: Bytes,
        headers: Box<HeaderMap>,
    },
    /// The provider's non-streaming answer broke off mid-body.
    #[error("upstream `{upstream}` broke off its answer mid-body: {source}")]
    Body {
        upstream: String,
        #[source]
        source: TransportError,
    },
}

impl UpstreamError {
    /// Whether the provider did not start generating, so that sending the
    /// request again bills nothing twice: it was never sent (no
    /// connection), or the provider answered with a status that says it
    /// did not take it (408, 409, 429, 5xx — the statuses the official SDKs
    /// retry). A timeout after sending, or a connection closed before the
    /// head, may hide a generation: never.
    pub fn not_started(&self) -> bool {
        match self {
            UpstreamError::Connect { source, .. } => source.never_sent(),
            UpstreamError::Timeout { connecting, .. } => *connecting,
            UpstreamError::Status { status, .. } => retry_status(*status),
            UpstreamError::TooLarge { .. } | UpstreamError::Body { .. } => false,
        }
    }

    /// Whether this says something about the provider's health (rather than
    /// about the request): counts toward ejecting it.
    pub fn provider_fault(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => retry_status(*status),
            _ => true,
        }
    }

    /// The provider's `Retry-After`, in seconds, when it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        let UpstreamError::Status { headers, .. } = self else {
            return None;
        };
        let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
        let secs: f64 = v.trim().parse().ok()?;
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
    }
}

/// The error statuses after which a provider has not generated anything.
fn retry_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error()
}

impl TransportError {
    /// The request never left: no connection could be made.
    fn never_sent(&self) -> bool {
        match self {
            TransportError::Direct(e) => matches!(
                e,
                h1::H1Error::Connect { .. } | h1::H1Error::ConnectTimeout { .. }
            ),
            TransportError::Pooled(e) => e.is_connect(),
        }
    }
}

/// Client headers worth passing to the provider. Everything else (cookies,
/// hop-by-hop headers, our own) stays behind.
const FORWARDED: [HeaderName; 4] = [
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
];
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// The client's own credential headers, passed on without `api_key_env`.
const CLIENT_CREDENTIAL: [HeaderName; 2] = [header::AUTHORIZATION, X_API_KEY];

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Result<Upstream, BuildError> {
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
            .map_err(BuildError::Client)?;
        let wire = config.protocol.wire();
        let url = reqwest::Url::parse(&format!("{}{}", config.base_url, wire.path()))
            .map_err(BuildError::Url)?;
        let credential = match &config.api_key {
            None => None,
            Some(key) => {
                let (name, text) = wire.credential(&key.0);
                let mut value =
                    HeaderValue::from_str(&text).map_err(|_| BuildError::KeyNotAHeader {
                        var: config
                            .api_key_env
                            .clone()
                            .unwrap_or_else(|| "the upstream's key variable".into()),
                    })?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        // reqwest honours proxy variables; a process that has one keeps
        // every request on reqwest rather than bypass the proxy.
        let proxied = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
        let direct = if config.http2 || proxied {
            None
        } else {
            h1::Pool::for_url(&url, config.connect_timeout)
        };
        let health_url = reqwest::Url::parse(&format!("{}{}", config.base_url, config.health.path))
            .map_err(BuildError::Url)?;
        Ok(Upstream {
            health: health::Health::new(config.health.clone()),
            stats: health::UpstreamStats::default(),
            weight_override: std::sync::atomic::AtomicU64::new(f64::NAN.to_bits()),
            health_url,
            name_header: HeaderValue::from_str(&config.name).ok(),
            config,
            client,
            url,
            credential,
            direct,
        })
    }

    /// The share of its group's traffic this upstream gets now.
    pub fn weight(&self) -> f64 {
        let bits = self
            .weight_override
            .load(std::sync::atomic::Ordering::Relaxed);
        let w = f64::from_bits(bits);
        if w.is_nan() {
            f64::from(self.config.weight)
        } else {
            w
        }
    }

    /// Set (or, with `None`, clear) the weight a canary gives it.
    pub fn set_weight(&self, weight: Option<f64>) {
        let bits = weight.unwrap_or(f64::NAN).to_bits();
        self.weight_override
            .store(bits, std::sync::atomic::Ordering::Relaxed);
    }

    /// A failure of the provider's: counts toward ejection.
    pub fn failed(&self, why: &str) {
        if self.health.failure() {
            self.ejected(why);
        }
    }

    /// Log and count an ejection.
    pub fn ejected(&self, why: &str) {
        self.stats.ejections.inc();
        tracing::warn!(
            alert = "upstream_ejected",
            upstream = %self.config.name,
            failures = self.config.health.eject_after,
            rest = ?self.config.health.eject_for,
            "{why}: {} failures in a row; the upstream is ejected (no traffic) until its half-open probe answers",
            self.config.health.eject_after
        );
    }

    /// The health check: `GET base_url + health_check_path` with the
    /// upstream's credential, within the connect and first-byte timeouts.
    /// Any answer but a 5xx or 429 means the provider is up (a 401 from a
    /// provider that wants the client's own key still answered).
    pub async fn check(&self) -> bool {
        let mut request = self.client.get(self.health_url.clone());
        for (name, value) in self.request_headers(&HeaderMap::new()) {
            if name != header::CONTENT_TYPE {
                request = request.header(name, value);
            }
        }
        let after = self.config.connect_timeout
            + self.config.first_byte_timeout.min(Duration::from_secs(10));
        match tokio::time::timeout(after, request.send()).await {
            Ok(Ok(r)) => {
                let s = r.status();
                !(s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS)
            }
            _ => false,
        }
    }

    /// The headers a request to this provider carries besides
    /// `content-type`: the forwarded client headers, the protocol's
    /// required ones the client did not send, and the credential — the
    /// configured one, else the client's own.
    fn request_headers(&self, client_headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = vec![(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )];
        let copied = |names: &[HeaderName], out: &mut Vec<_>| {
            for name in names {
                if let Some(v) = client_headers.get(name) {
                    out.push((name.clone(), v.clone()));
                }
            }
        };
        copied(&FORWARDED, &mut out);
        // The client's trace context, or with traces on, the span of this
        // very request (the pump writes it before each send).
        copied(&crate::trace::TRACE_HEADERS, &mut out);
        for (name, value) in self.config.protocol.wire().required_headers() {
            if !client_headers.contains_key(name) {
                out.push((name.clone(), value.clone()));
            }
        }
        match &self.credential {
            Some((name, value)) => out.push((name.clone(), value.clone())),
            None => copied(&CLIENT_CREDENTIAL, &mut out),
        }
        out
    }

    /// The continuation styles for `model`, in the order they are tried.
    pub fn styles(&self, model: &str) -> &[Continuation] {
        self.config
            .continuation_rules
            .iter()
            .find(|rule| rule.models.iter().any(|g| route::glob_match(g, model)))
            .map_or(&self.config.continuation, |rule| &rule.styles)
    }

    /// Whether an interrupted answer of `model` can be continued here.
    pub fn continues(&self, model: &str) -> bool {
        self.styles(model) != [Continuation::None]
    }

    /// Whether an interrupted answer of `model` can be resumed here: by a
    /// continuation, or by re-attaching to the provider's own background
    /// response.
    pub fn resumes(&self, model: &str) -> bool {
        self.config.provider_background || self.continues(model)
    }

    fn timeout(&self, after: Duration) -> UpstreamError {
        UpstreamError::Timeout {
            upstream: self.config.name.clone(),
            after,
            connecting: false,
        }
    }

    fn connect_timeout(&self, after: Duration) -> UpstreamError {
        UpstreamError::Timeout {
            upstream: self.config.name.clone(),
            after,
            connecting: true,
        }
    }

    fn connect_error(&self, source: TransportError) -> UpstreamError {
        UpstreamError::Connect {
            upstream: self.config.name.clone(),
            source,
        }
    }

    /// Send `body` through reqwest and wait for the response head (bounded
    /// by the first-byte timeout); an error status becomes an error with
    /// its body. Non-streaming requests and reqwest-served streams.
    pub async fn send(
        &self,
        body: Bytes,
        client_headers: &HeaderMap,
    ) -> Result<reqwest::Response, UpstreamError> {
        let request = self.client.post(self.url.clone()).body(body);
        self.dispatch(request, client_headers).await
    }

    /// Send `request` with this provider's headers and wait for its head,
    /// as [`Upstream::send`] does.
    async fn dispatch(
        &self,
        mut request: reqwest::RequestBuilder,
        client_headers: &HeaderMap,
    ) -> Result<reqwest::Response, UpstreamError> {
        for (name, value) in self.request_headers(client_headers) {
            request = request.header(name, value);
        }
        let after = self.config.first_byte_timeout;
        let response = match tokio::time::timeout(after, request.send()).await {
            Err(_) => return Err(self.timeout(after)),
            Ok(Err(e)) if e.is_timeout() && e.is_connect() => {
                return Err(self.connect_timeout(self.config.connect_timeout));
            }
            Ok(Err(e)) if e.is_timeout() => return Err(self.timeout(self.config.connect_timeout)),
            Ok(Err(e)) => return Err(self.connect_error(TransportError::Pooled(e))),
            Ok(Ok(r)) => r,
        };
        if !response.status().is_success() {
            let status = response.status();
            let headers = passed_headers(response.headers());
            // Read a bounded amount of the error body, within the same
            // budget; the rest is never read (the connection is dropped).
            let body = read_at_most(response, ERROR_BODY_LIMIT, ERROR_BODY_WAIT)
                .await
                .map(|(body, _)| body)
                .unwrap_or_default();
            return Err(self.status_error(status, body, headers));
        }
        Ok(response)
    }

    fn status_error(&self, status: StatusCode, body: Bytes, headers: HeaderMap) -> UpstreamError {
        UpstreamError::Status {
            upstream: self.config.name.clone(),
            status,
            body: body.slice(..body.len().min(ERROR_BODY_LIMIT)),
            headers: Box::new(headers),
        }
    }

    /// `base_url/responses/{response}` and what follows it: the URL of one
    /// of the provider's own responses (the id is one path segment,
    /// escaped, whatever the provider named it).
    fn response_url(&self, response: &str, tail: &[&str]) -> Option<reqwest::Url> {
        let mut url = reqwest::Url::parse(&self.config.base_url).ok()?;
        url.path_segments_mut()
            .ok()?
            .pop_if_empty()
            .push("responses")
            .push(response)
            .extend(tail);
        Some(url)
    }

    /// Re-attach to the provider's own background response `response`
    /// (Responses API): its events after `starting_after` (all without),
    /// then the live ones. Through reqwest: a rare request, after a cut.
    pub async fn reattach_stream(
        &self,
        response: &str,
        starting_after: Option<u64>,
        client_headers: &HeaderMap,
    ) -> Result<StreamResponse, UpstreamError> {
        let Some(mut url) = self.response_url(response, &[]) else {
            return Err(self.status_error(StatusCode::NOT_FOUND, Bytes::new(), HeaderMap::new()));
        };
        url.query_pairs_mut().append_pair("stream", "true");
        if let Some(n) = starting_after {
            url.query_pairs_mut()
                .append_pair("starting_after", itoa::Buffer::new().format(n));
        }
        let response = self.dispatch(self.client.get(url), client_headers).await?;
        Ok(StreamResponse {
            content_type: response.headers().get(header::CONTENT_TYPE).cloned(),
            headers: passed_headers(response.headers()),
            body: StreamBody::Pooled(Box::pin(response.bytes_stream())),
        })
    }

    /// Cancel the provider's own background response `response`. Whether
    /// it worked is only logged: nobody waits on it.
    pub async fn cancel_response(&self, response: &str, client_headers: &HeaderMap) {
        let Some(url) = self.response_url(response, &["cancel"]) else {
            return;
        };
        let request = self.client.post(url).body("{}");
        match self.dispatch(request, client_headers).await {
            Ok(_) => {
                tracing::info!(upstream = %self.config.name, %response, "cancelled the provider's background response")
            }
            Err(e) => {
                tracing::warn!(upstream = %self.config.name, %response, error = %e, "could not cancel the provider's background response")
            }
        }
    }

    /// Start a streaming request for a pump: on the pump's own connection
    /// for a plain-HTTP/1.1 provider, else through reqwest.
    pub async fn open_stream(
        &self,
        body: Bytes,
        client_headers: &HeaderMap,
    ) -> Result<StreamResponse, UpstreamError> {
        let Some(pool) = &self.direct else {
            let response = self.send(body, client_headers).await?;
            return Ok(StreamResponse {
                content_type: response.headers().get(header::CONTENT_TYPE).cloned(),
                headers: passed_headers(response.headers()),
                body: StreamBody::Pooled(Box::pin(response.bytes_stream())),
            });
        };
        let headers = self.request_headers(client_headers);
        let url = &self.url;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let after = self.config.first_byte_timeout;
        let response = match tokio::time::timeout(after, pool.post(&path, &headers, &body)).await {
            Err(_) => return Err(self.timeout(after)),
            Ok(Err(h1::H1Error::ConnectTimeout { after, .. })) => {
                return Err(self.connect_timeout(after));
            }
            Ok(Err(e)) => return Err(self.connect_error(TransportError::Direct(e))),
            Ok(Ok(r)) => r,
        };
        if !response.status.is_success() {
            let body = tokio::time::timeout(
                ERROR_BODY_WAIT,
                response.body.read_at_most(ERROR_BODY_LIMIT),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
            return Err(self.status_error(response.status, body, response.headers));
        }
        Ok(StreamResponse {
            content_type: response.content_type,
            headers: response.headers,
            body: StreamBody::Direct(response.body),
        })
    }
}

/// Read `response`'s body up to `limit` bytes, within `wait`; returns the
/// bytes and whether there was more (which is left unread).
pub async fn read_at_most(
    mut response: reqwest::Response,
    limit: usize,
    wait: Duration,
) -> Result<(Bytes, bool), ReadAtMostError> {
    let read = async {
        let mut out = bytes::BytesMut::new();
        while let Some(chunk) = response.chunk().await? {
            let room = limit - out.len();
            if chunk.len() > room {
                out.extend_from_slice(&chunk[..room]);
                return Ok((out.freeze(), true));
            }
            out.extend_from_slice(&chunk);
        }
        Ok((out.freeze(), false))
    };
    match tokio::time::timeout(wait, read).await {
        Ok(result) => result.map_err(ReadAtMostError::Transport),
        Err(_) => Err(ReadAtMostError::Timeout),
    }
}

/// Why [`read_at_most`] did not read a body.
#[derive(Debug)]
pub enum ReadAtMostError {
    Transport(reqwest::Error),
    Timeout,
}

/// How long, and how much of, a provider's error body is read to pass on.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(5);
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// How much of what follows a finished stream's end is read, at most, to
/// keep its connection.
const REST_LIMIT: usize = 64 * 1024;

/// Whether `headers` carry a provider credential of the client's.
pub fn has_credential(headers: &HeaderMap) -> bool {
    CLIENT_CREDENTIAL
        .iter()
        .any(|name| headers.contains_key(name))
}

/// The client's provider credential headers alone (`Authorization`,
/// `x-api-key`); `bearer_is_token`: the `Authorization` header carried the
/// resume token, not a key.
pub fn client_credential(headers: &HeaderMap, bearer_is_token: bool) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in &CLIENT_CREDENTIAL {
        if bearer_is_token && name == header::AUTHORIZATION {
            continue;
        }
        if let Some(v) = headers.get(name) {
            let mut v = v.clone();
            v.set_sensitive(true);
            out.insert(name.clone(), v);
        }
    }
    out
}

/// The non-secret headers of the client's that go to the provider, to
/// keep with the stream for its continuations.
pub fn non_secret(headers: &HeaderMap) -> Vec<(String, String)> {
    FORWARDED
        .iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name.as_str().to_owned(), value.to_owned()))
        })
        .collect()
}

/// The client headers a pump keeps for its provider call: the forwarded
/// ones and the client's own credential (used only without `api_key_env`).
pub fn forwardable(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED
        .iter()
        .chain(&CLIENT_CREDENTIAL)
        .chain(&crate::trace::TRACE_HEADERS)
    {
        if let Some(v) = headers.get(name) {
            out.insert(name.clone(), v.clone());
        }
    }
    out
}

/// Whether a provider's response header is shown to the client: request
/// ids, processing time, rate limits and `retry-after` — what a client
/// reads to correlate, pace and back off. Never cookies, hop-by-hop
/// headers, framing or anything else the provider sets.
pub fn passes_to_client(name: &str) -> bool {
    const EXACT: [&str; 8] = [
        "x-request-id",
        "request-id",
        "openai-processing-ms",
        "openai-organization",
        "openai-project",
        "openai-version",
        "anthropic-organization-id",
        "retry-after",
    ];
    const PREFIXES: [&str; 2] = ["x-ratelimit-", "anthropic-ratelimit-"];
    EXACT.iter().any(|e| e.eq_ignore_ascii_case(name))
        || PREFIXES.iter().any(|p| {
            name.get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        })
}

/// The headers of `headers` that [`passes_to_client`].
pub fn passed_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if passes_to_client(name.as_str()) {
            out.append(name.clone(), value.clone());
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

/// Whether a response's content type announces an SSE body.
pub fn is_event_stream(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}
