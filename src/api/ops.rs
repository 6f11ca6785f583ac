//! Operations routes: health probes, metrics, the admin drain trigger, the
//! demo page, and the JSON 404 for everything else.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;

/// Liveness: 200 until the process exits, drain or not.
pub async fn live() -> Response {
    axum::Json(json!({"status": "live"})).into_response()
}

/// Readiness: 503 from the first moment of the drain, so load balancers
/// stop sending new work; and 503 while the store takes no write (a full
/// disk, Redis gone), since every new stream would fail.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.drain.ready() {
        match state.relay.store.probe().await {
            Ok(()) => axum::Json(json!({"status": "ready"})).into_response(),
            Err(e) => {
                tracing::warn!(error = %e, "readiness: the store takes no write");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(json!({"status": "store_unavailable"})),
                )
                    .into_response()
            }
        }
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response()
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut body = state
        .relay
        .metrics
        .render(state.relay.registry.len(), state.drain.requested());
    state.drain.render(&mut body, state.relay.registry.len());
    crate::upstream::health::render(&mut body, state.relay.upstreams.all());
    crate::upstream::rollout::render(&mut body, state.relay.upstreams.rollouts());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// What `POST /admin/drain` may say: how long the gateway has left, as a
/// duration from now or a moment (RFC 3339). Either only shortens the
/// configured grace.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    grace: Option<String>,
    deadline: Option<String>,
}

/// The moment a drain request asks to be done by, if any.
fn requested_deadline(body: &[u8]) -> Result<Option<tokio::time::Instant>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let request: DrainRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "the body must be {{\"grace\": \"30s\"}} or {{\"deadline\": \"<RFC 3339 time>\"}}: {e}"
        ))
    })?;
    let now = tokio::time::Instant::now();
    match (request.grace, request.deadline) {
        (Some(_), Some(_)) => Err(ApiError::InvalidRequest(
            "give either grace or deadline, not both".into(),
        )),
        (Some(grace), None) => humantime::parse_duration(grace.trim())
            .map(|d| Some(now + d))
            .map_err(|e| {
                ApiError::InvalidRequest(format!(
                    "grace `{grace}` is not a duration like \"30s\": {e}"
                ))
            }),
        (None, Some(deadline)) => {
            let at = humantime::parse_rfc3339_weak(deadline.trim()).map_err(|e| {
                ApiError::InvalidRequest(format!(
                    "deadline `{deadline}` is not an RFC 3339 time like \"2026-01-01T12:00:00Z\": {e}"
                ))
            })?;
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            Ok(Some(now + left))
        }
        (None, None) => Ok(None),
    }
}

/// `POST /admin/drain`: start the drain without a signal (a spot
/// preemption notice), optionally with less time than the configured
/// grace (`{"grace": "30s"}` or `{"deadline": "…"}`). Needs the admin
/// token; absent without one. Calling it again is harmless: it can only
/// bring the deadline nearer.
/// The admin token check every `/admin/*` route makes.
fn admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.config.admin_token else {
        return Err(ApiError::NotFound(
            "admin routes are disabled: set [admin] token_env".into(),
        ));
    };
    let presented = super::bearer(headers).unwrap_or("");
    let matches = crate::token::hash_hex(presented.as_bytes())
        == crate::token::hash_hex(expected.0.as_bytes());
    if presented.is_empty() || !matches {
        return Err(ApiError::Unauthorized);
    }
    Ok(())
}

/// `GET /admin/canary`: every canary's percent, state and figures.
pub async fn canary_list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = admin(&state, &headers) {
        return e.into_response();
    }
    let list: Vec<serde_json::Value> = state
        .relay
        .upstreams
        .rollouts()
        .iter()
        .map(|r| r.snapshot())
        .collect();
    axum::Json(list).into_response()
}

/// `POST /admin/canary/{to}/{advance|hold|rollback}`.
pub async fn canary_action(
    State(state): State<Arc<AppState>>,
    axum::extract::Path((to, action)): axum::extract::Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = admin(&state, &headers) {
        return e.into_response();
    }
    let Some(rollout) = state.relay.upstreams.rollout(&to) else {
        return ApiError::NotFound(format!("no canary has `to = \"{to}\"`")).into_response();
    };
    let now = crate::stream::now_ms();
    match rollout.operate(&state.relay.store, &action, now).await {
        Ok(snapshot) => axum::Json(snapshot).into_response(),
        Err(crate::upstream::rollout::OperateError::UnknownAction(a)) => ApiError::NotFound(format!(
            "`{a}` is not a canary action (advance, hold, rollback)"
        ))
        .into_response(),
        Err(crate::upstream::rollout::OperateError::Refused(why)) => (
            StatusCode::CONFLICT,
            axum::Json(json!({"error": {"message": why, "type": "invalid_request_error", "code": "canary_conflict"}})),
        )
            .into_response(),
    }
}

pub async fn admin_drain(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(e) = admin(&state, &headers) {
        return e.into_response();
    }
    let by = match requested_deadline(&body) {
        Ok(by) => by,
        Err(e) => return e.into_response(),
    };
    let started = state.drain.begin("POST /admin/drain", by);
    let grace = state.config.drain.grace;
    let left = state.drain.deadline(grace).map_or(grace, |d| {
        d.saturating_duration_since(tokio::time::Instant::now())
    });
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "status": "draining",
            "started_now": started,
            "grace_ms": left.as_millis() as u64,
        })),
    )
        .into_response()
}

pub async fn not_found() -> Response {
    ApiError::NotFound("no such route".into()).into_response()
}

const UI_FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../examples/chat-ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../examples/chat-ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../examples/chat-ui/style.css"),
    ),
    (
        "client.js",
        "text/javascript; charset=utf-8",
        include_str!("../../examples/chat-ui/client.js"),
    ),
];

fn ui(name: &str) -> Response {
    match UI_FILES.iter().find(|(file, _, _)| *file == name) {
        Some((_, content_type, body)) => {
            let mut response = (*body).into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
        None => ApiError::NotFound("no such file".into()).into_response(),
    }
}

pub async fn ui_index() -> Response {
    ui("index.html")
}

pub async fn ui_file(Path(file): Path<String>) -> Response {
    ui(&file)
}
