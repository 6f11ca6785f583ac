//! The HTTP surface: routes, the state they share, and request-level
//! concerns (authentication, body limits). Handlers read the request, call
//! into [`crate::relay`], and turn what it returns into a response.
//!
//! - [`chat`]: `POST /v1/chat/completions`, `POST /v1/messages` and
//!   `POST /v1/responses`;
//! - [`responses`]: the OpenAI Responses API's own resume, state and
//!   cancel (`GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`);
//! - [`streams`]: resume, state and cancel of a stream by id;
//! - [`ops`]: health, metrics, `/admin/drain`, and the demo page;
//! - [`sse`]: the head of every event-stream answer;
//! - [`error`]: the one error type at the edge.

pub mod chat;
pub mod error;
pub mod ops;
pub mod responses;
pub mod sse;
pub mod streams;

use std::collections::HashSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::HeaderMap;
use axum::middleware;
use axum::routing::{get, post};
use bytes::Bytes;

use crate::config::Config;
use crate::drain::Drain;
use crate::relay::Relay;
use crate::token::hash_hex;
use error::ApiError;

/// Everything a handler may need, built once at start-up.
pub struct AppState {
    pub config: Config,
    pub relay: Arc<Relay>,
    pub drain: Arc<Drain>,
    /// SHA-256 hashes of the client keys; `None` when the gateway is open.
    pub key_hashes: Option<HashSet<String>>,
    /// Serve the demo chat page at `/`.
    pub ui: bool,
}

impl AppState {
    /// Who is asking: the hash of their key, or `anonymous` on an open
    /// gateway. Accepts `Authorization: Bearer` and Anthropic's `x-api-key`.
    pub fn owner(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let Some(hashes) = &self.key_hashes else {
            return Ok("anonymous".into());
        };
        let presented = bearer(headers)
            .or_else(|| {
                headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
            })
            .ok_or(ApiError::Unauthorized)?;
        let hash = hash_hex(presented.as_bytes());
        if hashes.contains(&hash) {
            Ok(hash)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

impl AppState {
    /// Who asks, on the OpenAI Responses routes: [`owner`](Self::owner) on
    /// a gateway with client keys; on an open one, a hash of the key the
    /// client presents (its own provider key), so that the SDKs' own
    /// `GET /v1/responses/{id}` with another key finds nothing, as on
    /// OpenAI's API. No key at all is `anonymous`.
    pub fn responses_owner(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        if self.key_hashes.is_some() {
            return self.owner(headers);
        }
        let presented = bearer(headers)
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .filter(|k| !k.is_empty());
        Ok(presented.map_or_else(|| "anonymous".into(), |k| hash_hex(k.as_bytes())))
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Read a request body up to `limit` bytes (more is a 413, not a cut),
/// within `within` (a client that sends part of it and stops gets a 408
/// instead of holding the connection).
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    within: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let read = tokio::time::timeout(within, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError::RequestTimeout(within));
    };
    read.map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if c.is::<http_body_util::LengthLimitError>() {
                return ApiError::PayloadTooLarge(limit);
            }
            cause = c.source();
        }
        ApiError::InvalidRequest(format!("cannot read the request body: {e}"))
    })
}

/// The router; tests build it around their own state.
pub fn app(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/v1/chat/completions", post(chat::openai))
        .route("/v1/messages", post(chat::anthropic))
        .route("/v1/responses", post(chat::responses))
        .route("/v1/responses/{id}", get(responses::retrieve))
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route(
            "/v1/streams/{id}",
            get(streams::resume).delete(streams::cancel),
        )
        .route("/v1/streams/{id}/state", get(streams::state));
    // CORS for the `/v1` routes only (a layer covers the routes before it).
    if let Some(cors) = cors(&state.config.cors_origins) {
        router = router.layer(cors);
    }
    router = router
        .route("/healthz/live", get(ops::live))
        .route("/healthz/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/admin/drain", post(ops::admin_drain))
        .route("/admin/canary", get(ops::canary_list))
        .route("/admin/canary/{to}/{action}", post(ops::canary_action));
    if state.ui {
        router = router
            .route("/", get(ops::ui_index))
            .route("/{file}", get(ops::ui_file));
    }
    router
        .fallback(ops::not_found)
        .layer(middleware::from_fn(error::log_errors))
        .with_state(state)
}

/// CORS for browser clients on other origins (`[cors] allow_origins`); off
/// when none is configured. A page may send what the clients send (its
/// key, the resume token, the cursor, an idempotency key, the providers'
/// version headers) and read the stream id and resume token.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    let headers = [
        "authorization",
        "content-type",
        "x-api-key",
        "x-tidegate-resume-token",
        "last-event-id",
        "idempotency-key",
        "anthropic-version",
        "anthropic-beta",
        "openai-organization",
        "openai-project",
    ];
    let exposed = [
        "x-tidegate-stream-id",
        "x-tidegate-resume-token",
        "x-request-id",
        "request-id",
        "retry-after",
    ];
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers(headers.map(HeaderName::from_static))
            .expose_headers(exposed.map(HeaderName::from_static))
            .max_age(std::time::Duration::from_secs(600)),
    )
}
