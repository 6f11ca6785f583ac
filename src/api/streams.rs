//! `/v1/streams/{id}`: resume (replay, then follow or continue), state, and
//! cancel.
//!
//! A resume token is the only credential these routes need: it is bound to
//! one stream and its owner, so a browser `EventSource` can resume with
//! `?token=`. A wrong token and an unknown stream get the same 404.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::chat::sse_response;
use super::error::ApiError;
use crate::config::Protocol;
use crate::relay::event::{AbortKind, End, StreamIdentity};
use crate::relay::live::LiveStream;
use crate::relay::pump::{Pump, follow_remote};
use crate::relay::subscriber::{self, Follow};
use crate::store::{Status, StreamRecord};
use crate::upstream::continuation::{self, Plan};

#[derive(Debug, Deserialize)]
pub struct ResumeQuery {
    after: Option<String>,
    token: Option<String>,
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such stream (or the resume token does not match it)".into())
}

/// The resume token: our own header first (it leaves a client's
/// `Authorization` to the client), then `?token=`, then a bearer.
fn presented_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    headers
        .get("x-tidegate-resume-token")
        .and_then(|v| v.to_str().ok())
        .or(query)
        .or_else(|| super::bearer(headers))
        .map(str::trim)
        .filter(|t| !t.is_empty())
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

fn protocol_of(record: &StreamRecord) -> Protocol {
    if record.protocol == "anthropic" {
        Protocol::Anthropic
    } else {
        Protocol::OpenAi
    }
}

/// Check the token against the stream's owner; return the owner.
async fn authorize(state: &AppState, id: &str, token: Option<&str>) -> Result<String, ApiError> {
    let token = token.ok_or_else(not_found)?;
    let owner = match state.registry().get(id) {
        Some(live) => live.owner.clone(),
        None => state.store.get(id).await?.ok_or_else(not_found)?.owner,
    };
    if state.signer.verify(id, &owner, token) {
        Ok(owner)
    } else {
        Err(not_found())
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
        let owner = authorize(
            &state,
            &id,
            presented_token(&headers, query.token.as_deref()),
        )
        .await?;
        state.relay.metrics.resumes.inc();
        attach(&state, &id, &owner, cursor, true).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Serve stream `id` to a client that has everything up to `cursor`:
/// follow the run in this process, replay a finished stream, continue an
/// interrupted one, or follow a run on another replica.
pub async fn attach(
    state: &Arc<AppState>,
    id: &str,
    owner: &str,
    cursor: u64,
    is_resume: bool,
) -> Result<Response, ApiError> {
    let retry_hint = is_resume.then_some(state.config.resume.retry_hint);
    let follow = |who: StreamIdentity, live: Option<Arc<LiveStream>>, end: End| {
        let live = live.map(|l| {
            let sub = l.subscribe();
            (l, sub)
        });
        let f = Follow {
            who: who.clone(),
            cursor,
            live,
            end_after_replay: end,
            store: state.store.clone(),
            heartbeat: state.config.streams.heartbeat,
            retry_hint,
            deadline: state.drain.streams.clone(),
        };
        sse_response(&who, Body::from_stream(subscriber::body(f)))
    };
    // Three rounds at most: a run can end (or start elsewhere) between a
    // look at the registry and a look at the store.
    for _ in 0..3 {
        if let Some(live) = state.registry().get(id) {
            return Ok(follow(live.who.clone(), Some(live), End::Done));
        }
        let record = state.store.get(id).await?.ok_or_else(not_found)?;
        let protocol = protocol_of(&record);
        let who = StreamIdentity {
            id: id.to_owned(),
            resume_token: state.signer.sign(id, owner),
            protocol,
        };
        let reason = record.reason.as_deref().and_then(AbortKind::parse);
        match record.status {
            Status::Completed => return Ok(follow(who, None, End::Done)),
            Status::Cancelled => return Ok(follow(who, None, End::Abort(AbortKind::Cancelled))),
            Status::Failed => {
                let kind = if reason == Some(AbortKind::StoreFailed) {
                    AbortKind::StoreFailed
                } else {
                    AbortKind::Incomplete
                };
                return Ok(follow(who, None, End::Abort(kind)));
            }
            Status::Running if state.store.lease_alive(id).await? => {
                let live = state.new_live(who, owner, last_stored_seq(state, id).await?);
                let (live, created) = state.registry().get_or_insert(id, || live);
                if created {
                    state
                        .drain
                        .tracker
                        .spawn(follow_remote(live, state.relay.clone()));
                }
            }
            Status::Running | Status::Interrupted => {
                if !state.drain.accepting() {
                    state.relay.metrics.rejected_draining.inc();
                    return Err(ApiError::Draining);
                }
                if let Some(end) = continue_stream(state, &record, owner, who.clone()).await? {
                    return Ok(follow(who, None, end));
                }
            }
        }
    }
    Err(ApiError::Internal(format!(
        "stream {id} changed hands three times during one resume"
    )))
}

async fn last_stored_seq(state: &AppState, id: &str) -> Result<u64, ApiError> {
    Ok(state
        .store
        .events_after(id, 0)
        .await?
        .last()
        .map_or(0, |e| e.seq))
}

/// Start (or join) the continuation of an interrupted stream. Returns how
/// the stream ends instead when it cannot or need not be continued.
async fn continue_stream(
    state: &Arc<AppState>,
    record: &StreamRecord,
    owner: &str,
    who: StreamIdentity,
) -> Result<Option<End>, ApiError> {
    let id = record.id.as_str();
    let protocol = who.protocol;
    let original: Value = match serde_json::from_str(&record.request) {
        Ok(v) => v,
        Err(_) => return Ok(Some(End::Abort(AbortKind::Incomplete))),
    };
    let upstream = state.upstream_named(&record.upstream).or_else(|| {
        let model = original.get("model").and_then(Value::as_str)?;
        state
            .config
            .route(model)
            .map(|i| state.upstreams[i].clone())
    });
    let Some(upstream) = upstream else {
        return Ok(Some(End::Abort(AbortKind::Incomplete)));
    };
    let events = state.store.events_after(id, 0).await?;
    let partial = continuation::partial(protocol, &events);
    let body = match continuation::plan(&original, protocol, upstream.config.continuation, &partial)
    {
        Plan::Continue(body) => body,
        Plan::AlreadyComplete => {
            state
                .store
                .set_status(id, Status::Completed, None, &state.relay.instance)
                .await?;
            return Ok(Some(End::Done));
        }
        Plan::Unsupported => return Ok(Some(End::Abort(AbortKind::Incomplete))),
    };
    let live = state.new_live(who, owner, partial.last_seq);
    let (live, created) = state.registry().get_or_insert(id, || live);
    if !created {
        return Ok(None); // another resume started it a moment ago: follow that
    }
    if !state.store.try_lease(id, &state.relay.instance).await? {
        // Another replica won the lease: it continues, we follow it.
        state.registry().remove(&live);
        let follower = state.new_live(live.who.clone(), owner, partial.last_seq);
        let (follower, created) = state.registry().get_or_insert(id, || follower);
        if created {
            state
                .drain
                .tracker
                .spawn(follow_remote(follower, state.relay.clone()));
        }
        return Ok(None);
    }
    state
        .store
        .set_status(id, Status::Running, None, &state.relay.instance)
        .await?;
    state.relay.metrics.continuations.inc();
    tracing::info!(stream = %id, after = partial.last_seq, upstream = %upstream.config.name, "continuing an interrupted stream");
    let pump = Pump {
        live,
        upstream,
        protocol,
        body: serde_json::to_vec(&body)
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .into(),
        // The resume request's credentials are a resume token, never a
        // provider key: continuations use the upstream's configured key.
        client_headers: HeaderMap::new(),
        continuation: Some(partial.chunk_id),
        ctx: state.relay.clone(),
    };
    // Nobody waits for the start: a failure reaches the clients in-band.
    let (started, _) = tokio::sync::oneshot::channel();
    state.drain.tracker.spawn(pump.run(started, None));
    Ok(None)
}

pub async fn state(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<ResumeQuery>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        authorize(
            &state,
            &id,
            presented_token(&headers, query.token.as_deref()),
        )
        .await?;
        let record = state.store.get(&id).await?.ok_or_else(not_found)?;
        let events = state.store.events_after(&id, 0).await?;
        let protocol = protocol_of(&record);
        let partial = continuation::partial(protocol, &events);
        let local = state.registry().get(&id).is_some();
        let status = match record.status {
            Status::Running if !local && !state.store.lease_alive(&id).await? => {
                Status::Interrupted
            }
            other => other,
        };
        Ok::<_, ApiError>(
            axum::Json(json!({
                "id": id,
                "status": status.as_str(),
                "reason": record.reason,
                "last_seq": partial.last_seq,
                "text": partial.text,
                "finish_reason": partial.finish_reason,
                "protocol": record.protocol,
                "upstream": record.upstream,
                "created_at_ms": record.created_ms,
                "updated_at_ms": record.updated_ms,
            }))
            .into_response(),
        )
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
        authorize(
            &state,
            &id,
            presented_token(&headers, query.token.as_deref()),
        )
        .await?;
        if let Some(live) = state.registry().get(&id) {
            live.cancel(AbortKind::Cancelled);
            // Wait (briefly) for the pump to record it, so a state read
            // right after this answer agrees.
            let mut changes = live.watch();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while live.end().is_none() {
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        } else {
            let record = state.store.get(&id).await?.ok_or_else(not_found)?;
            if state.store.shared()
                && record.status == Status::Running
                && state.store.lease_alive(&id).await?
            {
                state.store.request_cancel(&id).await?;
            } else if matches!(record.status, Status::Running | Status::Interrupted) {
                state
                    .store
                    .set_status(
                        &id,
                        Status::Cancelled,
                        Some("cancelled"),
                        &state.relay.instance,
                    )
                    .await?;
            }
        }
        let status = state
            .store
            .get(&id)
            .await?
            .map_or("cancelled", |r| r.status.as_str());
        Ok::<_, ApiError>(axum::Json(json!({"id": id, "status": status})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
