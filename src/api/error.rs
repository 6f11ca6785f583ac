//! The one error type at the HTTP edge.
//!
//! Every failure a request can meet maps to a status, an error `type` and
//! `code`, and a message fit for the client, in the protocol's own format
//! (OpenAI `{"error":{"message","type","code"}}` or Anthropic
//! `{"type":"error","error":{"type","message"}}`). The cause is logged once,
//! by the [`log_errors`] middleware, never here.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::protocol::{Protocol, RequestError};
use crate::relay::RelayError;
use crate::store::StoreError;
use crate::upstream::UpstreamError;

/// Whose fault an error is: the client's, the provider's, or ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Downstream,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("missing or invalid API key: send Authorization: Bearer <key>")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("no upstream serves model `{0}`")]
    ModelNotFound(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),

    /// What the relay could not do; its status is decided here.
    #[error(transparent)]
    Relay(#[from] RelayError),
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> ApiError {
        match e {
            RequestError::Malformed(e) => ApiError::MalformedJson(e.to_string()),
            RequestError::Invalid(message) => ApiError::InvalidRequest(message.into()),
        }
    }
}

/// Put in a response's extensions so the middleware can log the cause once.
#[derive(Clone, Debug)]
pub struct ErrorLog {
    pub source: Source,
    pub status: StatusCode,
    pub detail: String,
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) | ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) | ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Relay(e) => match e {
                RelayError::NotFound | RelayError::IdempotentStreamGone => StatusCode::NOT_FOUND,
                RelayError::IdempotencyConflict => StatusCode::CONFLICT,
                RelayError::TooManyStreams => StatusCode::SERVICE_UNAVAILABLE,
                RelayError::TooManyStreamsForKey(_) => StatusCode::TOO_MANY_REQUESTS,
                RelayError::Draining | RelayError::ServerRestarting | RelayError::Store(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                RelayError::Upstream(
                    UpstreamError::Connect { .. }
                    | UpstreamError::Body { .. }
                    | UpstreamError::TooLarge { .. },
                )
                | RelayError::NotAStream { .. } => StatusCode::BAD_GATEWAY,
                RelayError::CredentialRequired { .. } => StatusCode::UNAUTHORIZED,
                RelayError::Upstream(UpstreamError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
                // A provider's 4xx or 5xx is the client's answer; anything
                // else (a redirect we do not follow, a status that is no
                // error, a code past 599) is a provider that misbehaved.
                RelayError::Upstream(UpstreamError::Status { status, .. }) => {
                    if status.is_client_error() || status.is_server_error() {
                        *status
                    } else {
                        StatusCode::BAD_GATEWAY
                    }
                }
                RelayError::CancelledBeforeStart(_)
                | RelayError::PumpVanished
                | RelayError::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn kind_and_code(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::MalformedJson(_) => ("invalid_request_error", "invalid_json"),
            ApiError::InvalidRequest(_) => ("invalid_request_error", "invalid_request"),
            ApiError::Unauthorized => ("authentication_error", "invalid_api_key"),
            ApiError::NotFound(_) => ("not_found_error", "not_found"),
            ApiError::ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            ApiError::PayloadTooLarge(_) => ("invalid_request_error", "request_too_large"),
            ApiError::RequestTimeout(_) => ("invalid_request_error", "request_timeout"),
            ApiError::Relay(e) => match e {
                RelayError::NotFound | RelayError::IdempotentStreamGone => {
                    ("not_found_error", "not_found")
                }
                RelayError::IdempotencyConflict => {
                    ("invalid_request_error", "idempotency_conflict")
                }
                RelayError::Draining => ("server_draining", "draining"),
                RelayError::TooManyStreams => ("server_overloaded", "too_many_streams"),
                RelayError::TooManyStreamsForKey(_) => ("rate_limit_error", "too_many_streams"),
                RelayError::ServerRestarting => ("server_restarting", "server_restarting"),
                RelayError::Upstream(UpstreamError::Connect { .. }) => {
                    ("upstream_error", "upstream_unavailable")
                }
                RelayError::NotAStream { .. }
                | RelayError::Upstream(UpstreamError::TooLarge { .. }) => {
                    ("upstream_error", "upstream_failed")
                }
                RelayError::Upstream(UpstreamError::Body { .. }) => {
                    ("upstream_error", "upstream_body_failed")
                }
                RelayError::CredentialRequired { .. } => {
                    ("authentication_error", "provider_credential_required")
                }
                RelayError::Upstream(UpstreamError::Timeout { .. }) => {
                    ("upstream_error", "upstream_timeout")
                }
                RelayError::Upstream(UpstreamError::Status { status, .. })
                    if !(status.is_client_error() || status.is_server_error()) =>
                {
                    ("upstream_error", "upstream_bad_status")
                }
                RelayError::Upstream(UpstreamError::Status { .. }) => {
                    ("upstream_error", "upstream_error")
                }
                RelayError::Store(StoreError::Full { .. }) => ("server_overloaded", "store_full"),
                RelayError::Store(_) => ("server_error", "store_unavailable"),
                RelayError::CancelledBeforeStart(_)
                | RelayError::PumpVanished
                | RelayError::Encode(_) => ("server_error", "internal_error"),
            },
        }
    }

    fn source(&self) -> Source {
        match self {
            ApiError::Relay(RelayError::Upstream(_) | RelayError::NotAStream { .. }) => {
                Source::Upstream
            }
            // A store full of running streams is load, like too many
            // streams: nothing failed.
            ApiError::Relay(RelayError::Store(StoreError::Full { .. })) => Source::Downstream,
            ApiError::Relay(
                RelayError::Store(_)
                | RelayError::CancelledBeforeStart(_)
                | RelayError::PumpVanished
                | RelayError::Encode(_),
            ) => Source::Internal,
            _ => Source::Downstream,
        }
    }

    /// The message a client may see: internal details stay in the log.
    fn public_message(&self) -> String {
        match self {
            ApiError::Relay(RelayError::Upstream(UpstreamError::Connect { upstream, .. })) => {
                format!("cannot reach upstream `{upstream}`")
            }
            ApiError::Relay(RelayError::Store(StoreError::Full { .. })) => {
                "the gateway's partial-response store is full of running streams (store.max_bytes); retry shortly".into()
            }
            ApiError::Relay(RelayError::Store(_)) => {
                "the partial-response store is unavailable".into()
            }
            ApiError::Relay(RelayError::Upstream(UpstreamError::Status {
                upstream,
                status,
                ..
            })) if status.is_redirection() => format!(
                "upstream `{upstream}` answered with a redirect ({}), which the gateway does not follow: check its base_url",
                status.as_u16()
            ),
            ApiError::Relay(RelayError::Upstream(UpstreamError::Status {
                upstream,
                status,
                ..
            })) if !(status.is_client_error() || status.is_server_error()) => format!(
                "upstream `{upstream}` answered with status {}, which is not an HTTP error status",
                status.as_u16()
            ),
            ApiError::Relay(
                RelayError::CancelledBeforeStart(_)
                | RelayError::PumpVanished
                | RelayError::Encode(_),
            ) => "internal error".into(),
            other => other.to_string(),
        }
    }

    /// What the log says: the whole cause.
    fn detail(&self) -> String {
        self.to_string()
    }

    pub fn render(self, protocol: Protocol) -> Response {
        let status = self.status_code();
        let (kind, code) = self.kind_and_code();
        let message = self.public_message();
        // An upstream's own error body, when it is in the protocol's shape,
        // tells the client more than we could.
        let wire = protocol.wire();
        let passthrough = match &self {
            ApiError::Relay(RelayError::Upstream(UpstreamError::Status {
                body, status, ..
            })) if status.is_client_error() || status.is_server_error() => {
                serde_json::from_slice::<Value>(body)
                    .ok()
                    .filter(|v| wire.is_error_body(v))
            }
            _ => None,
        };
        let body = passthrough.unwrap_or_else(|| wire.error_body(kind, code, &message));
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let ApiError::Relay(RelayError::Upstream(UpstreamError::Status {
            headers: provider,
            ..
        })) = &self
        {
            headers.extend(provider.as_ref().clone());
        }
        if matches!(
            self,
            ApiError::Relay(RelayError::Draining | RelayError::ServerRestarting)
        ) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(
            self,
            ApiError::Relay(
                RelayError::TooManyStreams
                    | RelayError::TooManyStreamsForKey(_)
                    | RelayError::Store(StoreError::Full { .. })
            )
        ) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::RequestTimeout(_)) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response.extensions_mut().insert(ErrorLog {
            source: self.source(),
            status,
            detail: self.detail(),
        });
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.render(Protocol::OpenAi)
    }
}

/// Log each error response once, with its cause and whose fault it was.
pub async fn log_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    if let Some(log) = response.extensions().get::<ErrorLog>() {
        match log.source {
            Source::Downstream => {
                tracing::debug!(%method, %path, status = log.status.as_u16(), "{}", log.detail)
            }
            Source::Upstream => {
                tracing::warn!(%method, %path, status = log.status.as_u16(), source = "upstream", "{}", log.detail)
            }
            Source::Internal => {
                tracing::error!(%method, %path, status = log.status.as_u16(), source = "internal", "{}", log.detail)
            }
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn rendered(protocol: Protocol) -> (StatusCode, axum::http::HeaderMap, Value) {
        let full = StoreError::Full {
            held: 2048,
            max: 1024,
        };
        let response = ApiError::Relay(RelayError::Store(full)).render(protocol);
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 16).await.unwrap();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_full_store_is_a_503_store_full_in_each_protocols_shape() {
        let (status, headers, body) = rendered(Protocol::OpenAi).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert!(headers.get(header::CONNECTION).is_none());
        assert_eq!(body["error"]["type"], "server_overloaded");
        assert_eq!(body["error"]["code"], "store_full");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("full"), "{message}");
        assert!(
            !message.contains("2048"),
            "sizes stay in the log: {message}"
        );

        let (status, headers, body) = rendered(Protocol::Anthropic).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "server_overloaded");
        assert!(body["error"]["message"].as_str().unwrap().contains("full"));
    }

    #[test]
    fn other_store_failures_stay_store_unavailable() {
        let e = ApiError::Relay(RelayError::Store(StoreError::Impaired));
        assert_eq!(e.kind_and_code(), ("server_error", "store_unavailable"));
        assert_eq!(e.source(), Source::Internal);
        let full = ApiError::Relay(RelayError::Store(StoreError::Full { held: 1, max: 1 }));
        assert_eq!(full.source(), Source::Downstream);
        assert!(
            full.detail().contains("store.max_bytes"),
            "{}",
            full.detail()
        );
    }
}
