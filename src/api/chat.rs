//! `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages` (Anthropic):
//! validate, route, then either start a relayed stream or pass a
//! non-streaming request through.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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
    let top = serde_json::from_slice::<Top>(&bytes)
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let Shape::Object(fields) = top.0 else {
        return Err(ApiError::InvalidRequest(
            "the request body must be a JSON object".into(),
        ));
    };
    let model = match &fields.model {
        Some(Shape::Str(m)) if !m.is_empty() => m.as_ref(),
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
    match fields.messages {
        Some(Shape::Array { empty: false }) => {}
        Some(Shape::Array { empty: true }) => {
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
    if protocol == Protocol::Anthropic && !matches!(fields.max_tokens, Some(Shape::Unsigned)) {
        return Err(ApiError::InvalidRequest(
            "missing required field `max_tokens`".into(),
        ));
    }
    let stream = match fields.stream {
        None | Some(Shape::Null) => false,
        Some(Shape::Bool(b)) => b,
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

/// The request body as validation reads it: an object's four checked
/// fields, each reduced to its [`Shape`], and nothing else kept. Building
/// the whole JSON tree (every message's text) was most of this handler's
/// allocations. A repeated key counts by its last value, as it would in a
/// parsed object.
struct Top<'a>(Shape<'a>);

#[derive(Default)]
struct Fields<'a> {
    model: Option<Shape<'a>>,
    messages: Option<Shape<'a>>,
    max_tokens: Option<Shape<'a>>,
    stream: Option<Shape<'a>>,
}

/// What validation needs to know of a JSON value.
enum Shape<'a> {
    Str(std::borrow::Cow<'a, str>),
    Array {
        empty: bool,
    },
    Bool(bool),
    /// An integer that fits `u64`.
    Unsigned,
    Null,
    /// The body's own object (only at the top: a nested one is `Other`).
    Object(Box<Fields<'a>>),
    /// A nested object, a negative or fractional number.
    Other,
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor { top: true }).map(Top)
    }
}

impl<'de> Deserialize<'de> for Shape<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor { top: false })
    }
}

enum Key {
    Model,
    Messages,
    MaxTokens,
    Stream,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "model" => Key::Model,
                    "messages" => Key::Messages,
                    "max_tokens" => Key::MaxTokens,
                    "stream" => Key::Stream,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads one value as its [`Shape`]; `top`: the body itself, whose
/// object's checked fields are kept.
struct ShapeVisitor {
    top: bool,
}

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Shape<'de>, E> {
        Ok(Shape::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Shape<'de>, E> {
        Ok(if n >= 0 {
            Shape::Unsigned
        } else {
            Shape::Other
        })
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape<'de>, E> {
        Ok(Shape::Unsigned)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other)
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Shape<'de>, E> {
        Ok(Shape::Str(s.into()))
    }
    fn visit_str<E>(self, s: &str) -> Result<Shape<'de>, E> {
        Ok(Shape::Str(s.to_owned().into()))
    }
    fn visit_unit<E>(self) -> Result<Shape<'de>, E> {
        Ok(Shape::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape<'de>, A::Error> {
        let empty = seq.next_element::<IgnoredAny>()?.is_none();
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shape::Array { empty })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape<'de>, A::Error> {
        if !self.top {
            return IgnoredAny.visit_map(map).map(|_| Shape::Other);
        }
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Model => &mut fields.model,
                Key::Messages => &mut fields.messages,
                Key::MaxTokens => &mut fields.max_tokens,
                Key::Stream => &mut fields.stream,
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(Shape::Object(Box::new(fields)))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// How validation sees a body: each checked field's shape, as text.
    fn read(json: &str) -> Result<Option<[String; 4]>, String> {
        fn show(s: &Option<Shape>) -> String {
            match s {
                None => "-".into(),
                Some(Shape::Str(s)) => format!("str {s}"),
                Some(Shape::Array { empty }) => format!("array empty={empty}"),
                Some(Shape::Bool(b)) => format!("bool {b}"),
                Some(Shape::Unsigned) => "unsigned".into(),
                Some(Shape::Null) => "null".into(),
                Some(Shape::Object(_)) => "object".into(),
                Some(Shape::Other) => "other".into(),
            }
        }
        let top: Top = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Ok(match top.0 {
            Shape::Object(f) => Some([
                show(&f.model),
                show(&f.messages),
                show(&f.max_tokens),
                show(&f.stream),
            ]),
            _ => None,
        })
    }

    #[test]
    fn reads_the_checked_fields_and_skips_the_rest() {
        let got = read(
            r#"{"model":"m\u00e9","pad":{"a":[1,{"b":null}]},"messages":[{"role":"user","content":"hi"}],"max_tokens":64,"stream":true}"#,
        );
        assert_eq!(
            got,
            Ok(Some([
                "str mé".into(),
                "array empty=false".into(),
                "unsigned".into(),
                "bool true".into()
            ]))
        );
        let got = read(r#"{"model":"","messages":[],"max_tokens":-1,"stream":null}"#);
        assert_eq!(
            got,
            Ok(Some([
                "str ".into(),
                "array empty=true".into(),
                "other".into(),
                "null".into()
            ]))
        );
        let got = read(r#"{"model":7,"messages":{},"max_tokens":1.5,"stream":"yes"}"#);
        assert_eq!(
            got,
            Ok(Some([
                "unsigned".into(),
                "other".into(),
                "other".into(),
                "str yes".into()
            ]))
        );
        assert_eq!(
            read("{}"),
            Ok(Some(["-".into(), "-".into(), "-".into(), "-".into()]))
        );
    }

    #[test]
    fn a_repeated_key_counts_by_its_last_value() {
        let got = read(r#"{"model":"a","model":"b","messages":[1],"messages":[]}"#);
        assert_eq!(
            got,
            Ok(Some([
                "str b".into(),
                "array empty=true".into(),
                "-".into(),
                "-".into()
            ]))
        );
    }

    #[test]
    fn json_that_is_not_an_object_and_json_that_is_not_json() {
        for json in ["[1,[2]]", "\"x\"", "3", "-3", "0.5", "true", "null"] {
            assert_eq!(read(json), Ok(None), "{json}");
        }
        for json in ["{not json", "{\"model\":\"a\"} trailing", "[1,", ""] {
            assert!(read(json).is_err(), "{json}");
        }
    }
}
