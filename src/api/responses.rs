//! The OpenAI Responses API's own calls on a response tidegate holds, as
//! the official SDKs make them with no tidegate client library:
//!
//! - `GET /v1/responses/{id}`: the response as it stands (status, the
//!   output so far, usage once it ended);
//! - `GET /v1/responses/{id}?stream=true[&starting_after=N]`: its events
//!   after sequence number `N` (all of them without), then the live ones, or
//!   its continuation when it was interrupted — `responses.retrieve(id,
//!   stream=True, starting_after=N)` and the `responses.stream(response_id=…)`
//!   helper;
//! - `POST /v1/responses/{id}/cancel`: stops its generation wherever it
//!   runs, and answers the response.
//!
//! They are authorized as OpenAI's are, by the key that created the
//! response (another key, like an unknown id, gets 404).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use crate::protocol::Protocol;
use crate::protocol::responses::view;
use crate::relay::Access;

#[derive(Debug, Deserialize)]
pub struct RetrieveQuery {
    stream: Option<String>,
    starting_after: Option<String>,
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<RetrieveQuery>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let owner = state.responses_owner(&headers)?;
        let stream = match query.stream.as_deref().map(str::trim) {
            None | Some("") | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(ApiError::InvalidRequest(format!(
                    "`stream` must be true or false, not `{other}`"
                )));
            }
        };
        if !stream {
            let stored = state.relay.stored(&id, Access::Owner(&owner)).await?;
            return Ok(
                axum::Json(view(&stored.record, stored.status, &stored.events)).into_response(),
            );
        }
        // Sequence numbers count from 0, the gateway's event ids from 1.
        let cursor = match query.starting_after.as_deref().map(str::trim) {
            None | Some("") => 0,
            Some(n) => n.parse::<u64>().map(|n| n + 1).map_err(|_| {
                ApiError::InvalidRequest(format!(
                    "`starting_after` must be a sequence number (a whole number), not `{n}`"
                ))
            })?,
        };
        let mut credential = crate::upstream::client_credential(&headers, false);
        for name in &crate::trace::TRACE_HEADERS {
            if let Some(value) = headers.get(name) {
                credential.insert(name.clone(), value.clone());
            }
        }
        let attached = state
            .relay
            .resume(&id, Access::Owner(&owner), cursor, true, &credential)
            .await?;
        Ok(super::sse::response(attached))
    }
    .await;
    result.unwrap_or_else(|e| e.render(Protocol::OpenAiResponses))
}

pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let owner = state.responses_owner(&headers)?;
        let credential = crate::upstream::client_credential(&headers, false);
        state
            .relay
            .cancel(&id, Access::Owner(&owner), &credential)
            .await?;
        let stored = state.relay.stored(&id, Access::Owner(&owner)).await?;
        Ok::<_, ApiError>(
            axum::Json(view(&stored.record, stored.status, &stored.events)).into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|e| e.render(Protocol::OpenAiResponses))
}
