//! The HTTP surface: routes, the state they share, and request-level
//! concerns (authentication, body limits).
//!
//! - [`chat`]: `POST /v1/chat/completions` and `POST /v1/messages`;
//! - [`streams`]: resume, state and cancel of a stream by id;
//! - [`ops`]: health, metrics, `/admin/drain`, and the demo page;
//! - [`error`]: the one error type at the edge.

pub mod chat;
pub mod error;
pub mod ops;
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
use crate::relay::event::StreamIdentity;
use crate::relay::live::{LiveStream, Registry};
use crate::relay::pump::RelayContext;
use crate::store::SharedStore;
use crate::store::token::TokenSigner;
use crate::upstream::Upstream;
use error::ApiError;

/// Everything a handler may need, built once at start-up.
pub struct AppState {
    pub config: Config,
    pub upstreams: Vec<Arc<Upstream>>,
    pub store: SharedStore,
    pub signer: TokenSigner,
    pub relay: Arc<RelayContext>,
    pub drain: Arc<Drain>,
    /// SHA-256 hashes of the client keys; `None` when the gateway is open.
    pub key_hashes: Option<HashSet<String>>,
    /// Serve the demo chat page at `/`.
    pub ui: bool,
}

impl AppState {
    pub fn registry(&self) -> &Registry {
        &self.relay.registry
    }

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
        let hash = crate::store::hash_hex(presented.as_bytes());
        if hashes.contains(&hash) {
            Ok(hash)
        } else {
            Err(ApiError::Unauthorized)
        }
    }

    /// A run of stream `who` in this process, for events after `base`: its
    /// token a child of the drain's, its disconnect policy the config's.
    pub fn new_live(&self, who: StreamIdentity, owner: &str, base: u64) -> Arc<LiveStream> {
        Arc::new(LiveStream::new(
            who,
            owner.to_owned(),
            base,
            self.drain.streams.child_token(),
            self.config.streams.on_client_disconnect,
            self.drain.tracker.clone(),
        ))
    }

    pub fn upstream_named(&self, name: &str) -> Option<Arc<Upstream>> {
        self.upstreams
            .iter()
            .find(|u| u.config.name == name)
            .cloned()
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Read a request body up to `limit` bytes: more is a 413, not a cut.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large =
            std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit"));
        if too_large || e.to_string().contains("length limit") {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::InvalidRequest(format!("cannot read the request body: {e}"))
        }
    })
}

/// The router; tests build it around their own state.
pub fn app(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/v1/chat/completions", post(chat::openai))
        .route("/v1/messages", post(chat::anthropic))
        .route(
            "/v1/streams/{id}",
            get(streams::resume).delete(streams::cancel),
        )
        .route("/v1/streams/{id}/state", get(streams::state))
        .route("/healthz/live", get(ops::live))
        .route("/healthz/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/admin/drain", post(ops::admin_drain));
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
