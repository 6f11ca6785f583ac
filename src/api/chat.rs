//! `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages` (Anthropic):
//! validate, route, then either start a relayed stream or pass a
//! non-streaming request through.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::oneshot;

use super::AppState;
use super::error::ApiError;
use super::streams;
use crate::config::Protocol;
use crate::relay::event::{AbortKind, End, StreamIdentity};
use crate::relay::pump::{Pump, StartError};
use crate::relay::subscriber::{self, Follow};
use crate::store::token::random_string;
use crate::store::{IdempotencyEntry, Status, StreamRecord, hash_hex, now_ms};
use crate::upstream::Upstream;

pub async fn openai(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Protocol::OpenAi, headers, body)
        .await
        .unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

pub async fn anthropic(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Protocol::Anthropic, headers, body)
        .await
        .unwrap_or_else(|e| e.render(Protocol::Anthropic))
}

/// A validated request: what routing and the relay need from it.
struct ChatRequest {
    bytes: Bytes,
    stream: bool,
    upstream: Arc<Upstream>,
}

fn validate(state: &AppState, protocol: Protocol, bytes: Bytes) -> Result<ChatRequest, ApiError> {
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::InvalidRequest("the request body must be a JSON object".into()))?;
    let model = match object.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.as_str(),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "`model` must be a non-empty string".into(),
            ));
        }
        None => {
            return Err(ApiError::InvalidRequest(
                "missing required field `model`".into(),
            ));
        }
    };
    match object.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => {}
        Some(Value::Array(_)) => {
            return Err(ApiError::InvalidRequest(
                "`messages` must not be empty".into(),
            ));
        }
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "`messages` must be an array".into(),
            ));
        }
        None => {
            return Err(ApiError::InvalidRequest(
                "missing required field `messages`".into(),
            ));
        }
    }
    if protocol == Protocol::Anthropic && object.get("max_tokens").and_then(Value::as_u64).is_none()
    {
        return Err(ApiError::InvalidRequest(
            "missing required field `max_tokens`".into(),
        ));
    }
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "`stream` must be a boolean".into(),
            ));
        }
    };
    let index = state
        .config
        .route(model)
        .filter(|i| state.upstreams[*i].config.protocol == protocol)
        .ok_or_else(|| ApiError::ModelNotFound(model.to_owned()))?;
    Ok(ChatRequest {
        bytes,
        stream,
        upstream: state.upstreams[index].clone(),
    })
}

async fn handle(
    state: Arc<AppState>,
    protocol: Protocol,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let owner = state.owner(&headers)?;
    let bytes = super::read_body(&headers, body, state.config.max_body_bytes).await?;
    let request = validate(&state, protocol, bytes)?;
    if !state.drain.accepting() {
        state.relay.metrics.rejected_draining.inc();
        return Err(ApiError::Draining);
    }
    if !request.stream {
        return passthrough(&state, protocol, request, &headers).await;
    }
    let id = format!("tg_{}", random_string(15));
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        let entry = IdempotencyEntry {
            stream_id: id.clone(),
            body_hash: hash_hex(&request.bytes),
        };
        if let Some(existing) = state.store.claim_idempotency(&owner, key, &entry).await? {
            if existing.body_hash != entry.body_hash {
                return Err(ApiError::Conflict(
                    "this Idempotency-Key was used with a different request body".into(),
                ));
            }
            // The same request again: attach to the first stream from its
            // start. The first may have claimed the key a moment before
            // writing its record: give it a second to appear.
            for _ in 0..40 {
                match streams::attach(&state, &existing.stream_id, &owner, 0, false).await {
                    Err(ApiError::NotFound(_)) => {
                        tokio::time::sleep(std::time::Duration::from_millis(25)).await
                    }
                    other => return other,
                }
            }
            return Err(ApiError::NotFound(
                "the stream this Idempotency-Key started is gone".into(),
            ));
        }
    }
    start(&state, protocol, request, &headers, owner, id).await
}

/// Start a stream: record it, start its pump, and answer once the provider
/// has answered (so its errors become our status codes).
async fn start(
    state: &Arc<AppState>,
    protocol: Protocol,
    request: ChatRequest,
    headers: &HeaderMap,
    owner: String,
    id: String,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let record = StreamRecord {
        id: id.clone(),
        owner: owner.clone(),
        protocol: protocol.as_str().into(),
        upstream: request.upstream.config.name.clone(),
        request: String::from_utf8_lossy(&request.bytes).into_owned(),
        status: Status::Running,
        reason: None,
        created_ms: now,
        updated_ms: now,
        instance: state.relay.instance.clone(),
    };
    let who = StreamIdentity {
        id: id.clone(),
        resume_token: state.signer.sign(&id, &owner),
        protocol,
    };
    let live = state.new_live(who.clone(), &owner, 0);
    // In the registry before the record exists: whoever finds the record
    // (an idempotent retry) finds this run too, and never starts another.
    state.registry().get_or_insert(&id, || live.clone());
    let (store, instance) = (state.store.clone(), state.relay.instance.clone());
    let recording: crate::relay::pump::Recording = Box::pin(async move {
        store.create(&record).await?;
        store.try_lease(&record.id, &instance).await.map(|_| ())
    });
    // Subscribe before the pump starts: if this client leaves while we wait
    // for the provider, the subscription's drop cancels the pump.
    let subscription = live.subscribe();
    state.relay.metrics.streams_started.inc();
    let (started_tx, started_rx) = oneshot::channel();
    let pump = Pump {
        live: live.clone(),
        upstream: request.upstream.clone(),
        protocol,
        body: request.bytes,
        client_headers: crate::upstream::forwardable(headers),
        continuation: None,
        ctx: state.relay.clone(),
    };
    state
        .drain
        .tracker
        .spawn(pump.run(started_tx, Some(recording)));
    match started_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(StartError::Upstream(e))) => return Err(ApiError::Upstream(e)),
        Ok(Err(StartError::Store(e))) => return Err(e.into()),
        Ok(Err(StartError::NotAStream(message))) => {
            return Err(ApiError::UpstreamNotAStream(message));
        }
        Ok(Err(StartError::Cancelled(AbortKind::ServerRestarting))) => {
            return Err(ApiError::ServerRestarting);
        }
        Ok(Err(StartError::Cancelled(kind))) => {
            return Err(ApiError::Internal(format!(
                "stream cancelled before it started: {}",
                kind.as_str()
            )));
        }
        Err(_) => {
            return Err(ApiError::Internal(
                "the stream's pump ended without a word".into(),
            ));
        }
    }
    let follow = Follow {
        who: who.clone(),
        cursor: 0,
        live: Some((live, subscription)),
        end_after_replay: End::Done,
        store: state.store.clone(),
        heartbeat: state.config.streams.heartbeat,
        retry_hint: None,
        deadline: state.drain.streams.clone(),
    };
    Ok(sse_response(
        &who,
        Body::from_stream(subscriber::body(follow)),
    ))
}

/// The head of every SSE answer: the stream id and resume token come before
/// the first body byte, so a client can resume even after a silent cut.
pub fn sse_response(who: &StreamIdentity, body: Body) -> Response {
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(
        "x-tidegate-stream-id",
        crate::upstream::header_value(&who.id),
    );
    h.insert(
        "x-tidegate-resume-token",
        crate::upstream::header_value(&who.resume_token),
    );
    response
}

/// `stream: false`: the provider's JSON answer, passed through. At the drain
/// deadline a request still waiting gets a 503 `server_restarting` instead
/// of hanging.
async fn passthrough(
    state: &Arc<AppState>,
    protocol: Protocol,
    request: ChatRequest,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let _in_flight = state.drain.in_flight();
    state.relay.metrics.non_streaming.inc();
    state.relay.metrics.upstream_requests.inc();
    let upstream = request.upstream.clone();
    let call = async {
        let response = upstream.send(protocol, request.bytes, headers).await?;
        let status =
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .cloned();
        let after = upstream.config.idle_timeout;
        let body = match tokio::time::timeout(after, response.bytes()).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                return Err(ApiError::Upstream(
                    crate::upstream::UpstreamError::Connect {
                        upstream: upstream.config.name.clone(),
                        message: crate::upstream::error_chain(&e),
                    },
                ));
            }
            Err(_) => {
                return Err(ApiError::Upstream(
                    crate::upstream::UpstreamError::Timeout {
                        upstream: upstream.config.name.clone(),
                        after,
                    },
                ));
            }
        };
        let mut out = (status, body).into_response();
        if let Some(ct) = content_type.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
            out.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        Ok(out)
    };
    tokio::select! {
        result = call => result,
        _ = state.drain.streams.cancelled() => Err(ApiError::ServerRestarting),
    }
}
