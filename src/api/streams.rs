//! `/v1/streams/{id}`: resume (replay, then follow or continue), state, and
//! cancel. These handlers read the token and the cursor; the relay does
//! the rest.
//!
//! A resume token is bound to one stream and its owner. On an open gateway
//! it is the only credential these routes need, so a browser `EventSource`
//! can resume with `?token=`. With `[auth]` client keys, the owner's key is
//! needed beside the token (a leaked token alone opens nothing), unless
//! `[auth] resume_token_only` says otherwise. A wrong token, another key's
//! stream and an unknown stream get the same 404. A continuation on an
//! upstream that uses the client's own provider key needs that key too,
//! beside the token.

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
fn token<'a>(
    state: &AppState,
    owner: &'a mut String,
    headers: &'a HeaderMap,
    query: &'a ResumeQuery,
) -> Result<Access<'a>, ApiError> {
    Ok(token_and_credential(state, owner, headers, query)?.0)
}

/// The resume token, and the client's provider credential: beside a token
/// in `x-tidegate-resume-token` or `?token=`, an `Authorization` or
/// `x-api-key` header is the client's own provider key (a continuation on
/// an upstream without a key of its own needs it); a bearer is the token
/// only when no other token is given.
///
/// With `[auth]` keys (and not `resume_token_only`), the caller's key is
/// authenticated first (401 without a valid one) and written to `owner`;
/// a bearer is then that key, never the token.
fn token_and_credential<'a>(
    state: &AppState,
    owner: &'a mut String,
    headers: &'a HeaderMap,
    query: &'a ResumeQuery,
) -> Result<(Access<'a>, HeaderMap), ApiError> {
    let keyed = state.key_hashes.is_some() && !state.config.resume_token_only;
    if keyed {
        *owner = state.owner(headers)?;
    }
    let given = |t: Option<&'a str>| t.map(str::trim).filter(|t| !t.is_empty());
    let named = given(
        headers
            .get("x-tidegate-resume-token")
            .and_then(|v| v.to_str().ok()),
    )
    .or(given(query.token.as_deref()));
    let (token, bearer_is_token) = match named {
        Some(token) => (token, false),
        None if keyed => return Err(ApiError::Relay(RelayError::NotFound)),
        None => (
            given(super::bearer(headers)).ok_or(ApiError::Relay(RelayError::NotFound))?,
            true,
        ),
    };
    let access = if keyed {
        Access::TokenOf {
            token,
            owner: owner.as_str(),
        }
    } else {
        Access::Token(token)
    };
    Ok((
        access,
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
        let mut owner = String::new();
        let (access, mut credential) = token_and_credential(&state, &mut owner, &headers, &query)?;
        // The client's trace: the resume's span, and a continuation's
        // provider request, hang under it.
        for name in &crate::trace::TRACE_HEADERS {
            if let Some(value) = headers.get(name) {
                credential.insert(name.clone(), value.clone());
            }
        }
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
        let mut owner = String::new();
        let access = token(&state, &mut owner, &headers, &query)?;
        let view = state.relay.state(&id, access).await?;
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
        let mut owner = String::new();
        let access = token(&state, &mut owner, &headers, &query)?;
        // The upstream's own key cancels a provider's background response.
        let status = state.relay.cancel(&id, access, &HeaderMap::new()).await?;
        Ok::<_, ApiError>(axum::Json(json!({"id": id, "status": status})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
