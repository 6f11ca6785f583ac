//! `/v1/streams/{id}`: resume (replay, then follow or continue), state, and
//! cancel. These handlers read the token and the cursor; the relay does
//! the rest.
//!
//! A resume token is the only credential these routes need: it is bound to
//! one stream and its owner, so a browser `EventSource` can resume with
//! `?token=`. A wrong token and an unknown stream get the same 404.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use crate::relay::{Access, RelayError};

#[derive(Debug, Deserialize)]
pub struct ResumeQuery {
    after: Option<String>,
    token: Option<String>,
}

/// The resume token: our own header first (it leaves a client's
/// `Authorization` to the client), then `?token=`, then a bearer. No
/// token is the same 404 as a wrong one.
fn token<'a>(headers: &'a HeaderMap, query: &'a ResumeQuery) -> Result<Access<'a>, ApiError> {
    headers
        .get("x-tidegate-resume-token")
        .and_then(|v| v.to_str().ok())
        .or(query.token.as_deref())
        .or_else(|| super::bearer(headers))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(Access::Token)
        .ok_or_else(|| RelayError::NotFound.into())
}

/// `Last-Event-ID` wins over `?after=`: a reconnecting `EventSource` sends
/// the header while its URL still carries the first cursor.
fn cursor(headers: &HeaderMap, after: Option<&str>) -> Result<u64, ApiError> {
    let text = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(after)
        .map(str::trim)
        .filter(|t| !t.is_empty());
    match text {
        None => Ok(0),
        Some(t) => t.parse().map_err(|_| {
            ApiError::InvalidRequest(format!("`{t}` is not an event id (a whole number)"))
        }),
    }
}

pub async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<ResumeQuery>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let cursor = cursor(&headers, query.after.as_deref())?;
        let access = token(&headers, &query)?;
        let attached = state.relay.resume(&id, access, cursor, true).await?;
        Ok::<_, ApiError>(super::sse::response(attached))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub async fn state(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<ResumeQuery>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let view = state.relay.state(&id, token(&headers, &query)?).await?;
        Ok::<_, ApiError>(axum::Json(view).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<ResumeQuery>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let status = state.relay.cancel(&id, token(&headers, &query)?).await?;
        Ok::<_, ApiError>(axum::Json(json!({"id": id, "status": status})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
