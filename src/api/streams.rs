//! `/v1/streams/{id}`: resume (replay, then follow or continue), state, and
//! cancel. These handlers read the token and the cursor; the relay does
//! the rest.
//!
//! A resume token is the only credential these routes need: it is bound to
//! one stream and its owner, so a browser `EventSource` can resume with
//! `?token=`. A wrong token and an unknown stream get the same 404. A
//! continuation on an upstream that uses the client's own provider key
//! needs that key too, beside the token.

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
    Ok(token_and_credential(headers, query)?.0)
}

/// The resume token, and the client's provider credential: beside a token
/// in `x-tidegate-resume-token` or `?token=`, an `Authorization` or
/// `x-api-key` header is the client's own provider key (a continuation on
/// an upstream without a key of its own needs it); a bearer is the token
/// only when no other token is given.
fn token_and_credential<'a>(
    headers: &'a HeaderMap,
    query: &'a ResumeQuery,
) -> Result<(Access<'a>, HeaderMap), ApiError> {
    let given = |t: Option<&'a str>| t.map(str::trim).filter(|t| !t.is_empty());
    let named = given(
        headers
            .get("x-tidegate-resume-token")
            .and_then(|v| v.to_str().ok()),
    )
    .or(given(query.token.as_deref()));
    let (token, bearer_is_token) = match named {
        Some(token) => (token, false),
        None => (
            given(super::bearer(headers)).ok_or(ApiError::Relay(RelayError::NotFound))?,
            true,
        ),
    };
    Ok((
        Access::Token(token),
        crate::upstream::client_credential(headers, bearer_is_token),
    ))
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
        let (access, credential) = token_and_credential(&headers, &query)?;
        let attached = state
            .relay
            .resume(&id, access, cursor, true, &credential)
            .await?;
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
