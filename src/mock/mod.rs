//! `tidegate mock-upstream`: a deterministic OpenAI- and Anthropic-compatible
//! provider for demos, tests and benchmarks.
//!
//! The answer to a request is a sequence of words drawn from its messages
//! (a trailing assistant prefix left out), the same for the same messages,
//! one word per chunk. A trailing assistant message is a prefix to continue:
//! it must be the start of the answer, and only the words after it are sent.
//! Knobs ride in the request body's `mock` object and pass through the
//! gateway untouched:
//! - `words`: the answer's natural length (default: prefix + `max_tokens`, else 64);
//! - `token_interval_ms`: pacing between chunks (0: as fast as possible);
//! - `delay_ms`: wait before the response head;
//! - `fail_after` / `stall_after`: once the answer holds that many words
//!   (prefix included, so a continuation past that point succeeds), cut the
//!   connection / stop sending while keeping it open;
//! - `status`: answer with that HTTP status and an error body.
//!
//! `GET /mock/stats` counts requests so tests can prove an upstream request
//! was really dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// Counters behind `GET /mock/stats`, and the key the mock demands.
#[derive(Default)]
pub struct Stats {
    /// When set, requests must carry it (`Authorization: Bearer` or
    /// `x-api-key`), as a real provider would.
    api_key: Option<String>,
    requests_started: AtomicU64,
    requests_completed: AtomicU64,
    requests_cancelled: AtomicU64,
    tokens_sent: AtomicU64,
}

/// Serve the mock on `listener` until `stop` resolves: HTTP/1.1, and
/// HTTP/2 with prior knowledge (h2c) with room for 100,000 concurrent
/// streams on one connection (hyper's default is 200), so an upstream with
/// `http2 = true` can hold a scale test's streams on a few connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(100_000);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = tokio_util::task::TaskTracker::new();
    tokio::pin!(stop);
    loop {
        let mut stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait, then go on.
                    tracing::warn!(error = %e, "mock: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        crate::net::no_delay(&mut stream);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _ = connection.await;
        });
    }
    // Let answers in flight finish, briefly: a mock is never waited on long.
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

/// The mock's routes. `api_key`: the credential it demands, if any.
pub fn router(api_key: Option<String>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
        .route("/mock/stats", get(stats))
        .with_state(Arc::new(Stats {
            api_key,
            ..Stats::default()
        }))
}

async fn stats(State(stats): State<Arc<Stats>>) -> Response {
    axum::Json(json!({
        "requests_started": stats.requests_started.load(Ordering::Relaxed),
        "requests_completed": stats.requests_completed.load(Ordering::Relaxed),
        "requests_cancelled": stats.requests_cancelled.load(Ordering::Relaxed),
        "tokens_sent": stats.tokens_sent.load(Ordering::Relaxed),
    }))
    .into_response()
}

/// The words the mock would say, and where this request starts in them.
struct Plan {
    words: Vec<String>,
    /// Words already in the assistant prefix.
    skip: usize,
    /// Whether the answer stops because `max_tokens` cut it.
    truncated: bool,
    interval: Duration,
    fail_after: Option<usize>,
    stall_after: Option<usize>,
    stream: bool,
    model: String,
    id: String,
}

impl Plan {
    fn piece(&self, index: usize) -> String {
        if index == 0 {
            self.words[0].clone()
        } else {
            format!(" {}", self.words[index])
        }
    }

    fn new_text(&self) -> String {
        (self.skip..self.words.len())
            .map(|i| self.piece(i))
            .collect()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Dialect {
    OpenAi,
    Anthropic,
}

fn error(status: StatusCode, dialect: Dialect, message: &str) -> Response {
    let body = match dialect {
        Dialect::OpenAi => {
            json!({"error": {"message": message, "type": "invalid_request_error", "code": status.as_u16()}})
        }
        Dialect::Anthropic => {
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}})
        }
    };
    (status, axum::Json(body)).into_response()
}

fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

fn fnv(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const FALLBACK: &[&str] = &[
    "the", "tide", "gate", "holds", "every", "stream", "until", "it", "ends",
];

/// The answer to `body`, or why the request is bad (a 400).
fn plan(body: &Value, dialect: Dialect) -> Result<Plan, String> {
    let bad = |m: &str| m.to_owned();
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("`messages` must be an array"))?;
    let (source, prefix) = match messages.last() {
        Some(last) if last.get("role").and_then(Value::as_str) == Some("assistant") => {
            let text = last
                .get("content")
                .and_then(text_of)
                .ok_or_else(|| bad("the assistant prefix has no text content"))?;
            if dialect == Dialect::OpenAi {
                let continue_final =
                    body.get("continue_final_message").and_then(Value::as_bool) == Some(true);
                let generation_prompt = body
                    .get("add_generation_prompt")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                if continue_final && generation_prompt {
                    return Err(bad(
                        "continue_final_message requires add_generation_prompt: false",
                    ));
                }
            }
            (&messages[..messages.len() - 1], Some(text))
        }
        _ => (&messages[..], None),
    };
    let mut joined = String::new();
    for m in source {
        if let Some(t) = m.get("content").and_then(text_of) {
            joined.push_str(&t);
            joined.push('\n');
        }
    }
    if let Some(system) = body.get("system").and_then(text_of) {
        joined.push_str(&system);
    }
    let vocab: Vec<String> = joined
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    let vocab: Vec<String> = if vocab.is_empty() {
        FALLBACK.iter().map(|w| w.to_string()).collect()
    } else {
        vocab
    };
    let seed = fnv(&joined);
    let knobs = body.get("mock").cloned().unwrap_or(Value::Null);
    let knob = |name: &str| knobs.get(name).and_then(Value::as_u64);
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map(|v| v as usize);

    // Find how many words the prefix covers.
    let word =
        |i: usize| vocab[(mix(seed.wrapping_add(i as u64)) % vocab.len() as u64) as usize].clone();
    let mut skip = 0;
    if let Some(prefix) = &prefix {
        let mut built = String::new();
        while built.len() < prefix.len() {
            if skip > 0 {
                built.push(' ');
            }
            built.push_str(&word(skip));
            skip += 1;
        }
        if &built != prefix {
            return Err(bad("the assistant prefix is not the start of this answer"));
        }
    }
    let natural = match (knob("words"), max_tokens) {
        (Some(words), _) => words as usize,
        (None, Some(max)) => skip + max,
        (None, None) => 64,
    };
    let remaining = natural.saturating_sub(skip);
    let adds = max_tokens.map_or(remaining, |m| remaining.min(m));
    let total = skip + adds;
    let words = (0..total).map(word).collect();
    Ok(Plan {
        words,
        skip,
        truncated: adds < remaining,
        interval: Duration::from_millis(knob("token_interval_ms").unwrap_or(0)),
        fail_after: knob("fail_after").map(|v| v as usize),
        stall_after: knob("stall_after").map(|v| v as usize),
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("mock")
            .to_owned(),
        id: format!("{:016x}", seed),
    })
}

async fn chat(State(stats): State<Arc<Stats>>, headers: HeaderMap, body: Bytes) -> Response {
    respond(stats, &headers, body, Dialect::OpenAi).await
}

async fn messages(State(stats): State<Arc<Stats>>, headers: HeaderMap, body: Bytes) -> Response {
    respond(stats, &headers, body, Dialect::Anthropic).await
}

fn authorized(expected: &str, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    bearer == Some(expected) || api_key == Some(expected)
}

async fn respond(
    stats: Arc<Stats>,
    headers: &HeaderMap,
    body: Bytes,
    dialect: Dialect,
) -> Response {
    if let Some(expected) = &stats.api_key
        && !authorized(expected, headers)
    {
        return error(StatusCode::UNAUTHORIZED, dialect, "invalid API key");
    }
    stats.requests_started.fetch_add(1, Ordering::Relaxed);
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                dialect,
                &format!("malformed JSON: {e}"),
            );
        }
    };
    // `delay_ms`: a provider slow to answer at all (first-byte timeouts).
    if let Some(delay) = parsed.pointer("/mock/delay_ms").and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(status) = parsed.pointer("/mock/status").and_then(Value::as_u64) {
        let status =
            StatusCode::from_u16(status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, dialect, "the mock was asked to fail");
    }
    let plan = match plan(&parsed, dialect) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, dialect, &message),
    };
    if !plan.stream {
        stats.requests_completed.fetch_add(1, Ordering::Relaxed);
        stats
            .tokens_sent
            .fetch_add((plan.words.len() - plan.skip) as u64, Ordering::Relaxed);
        return axum::Json(whole(&plan, dialect)).into_response();
    }
    let body = Body::from_stream(stream(plan, dialect, stats));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn whole(plan: &Plan, dialect: Dialect) -> Value {
    let text = plan.new_text();
    let count = plan.words.len() - plan.skip;
    match dialect {
        Dialect::OpenAi => json!({
            "id": format!("chatcmpl-mock-{}", plan.id),
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": plan.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": if plan.truncated { "length" } else { "stop" }}],
            "usage": {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1},
        }),
        Dialect::Anthropic => json!({
            "id": format!("msg_mock_{}", plan.id),
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": if plan.truncated { "max_tokens" } else { "end_turn" },
            "usage": {"input_tokens": 1, "output_tokens": count},
        }),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Ending {
    /// Still sending: a drop now means the peer went away.
    Running,
    Finished,
    /// The mock failed on purpose (`fail_after`): neither completed nor cancelled.
    Failed,
}

/// Counts a stream as cancelled when its body is dropped before the end.
struct Outcome {
    stats: Arc<Stats>,
    ending: Ending,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let counter = match self.ending {
            Ending::Running => &self.stats.requests_cancelled,
            Ending::Finished => &self.stats.requests_completed,
            Ending::Failed => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn sse(event: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 32);
    if let Some(event) = event {
        out.push_str("event: ");
        out.push_str(event);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(data);
    out.push_str("\n\n");
    Bytes::from(out)
}

fn stream(
    plan: Plan,
    dialect: Dialect,
    stats: Arc<Stats>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    async_stream::stream! {
        let mut outcome = Outcome { stats: stats.clone(), ending: Ending::Running };
        let created = 1_700_000_000;
        let model = serde_json::to_string(&plan.model).unwrap_or_else(|_| "\"mock\"".into());
        let start = tokio::time::Instant::now();
        if dialect == Dialect::Anthropic {
            yield Ok(sse(Some("message_start"), &format!(
                r#"{{"type":"message_start","message":{{"id":"msg_mock_{}","type":"message","role":"assistant","model":{model},"content":[],"stop_reason":null,"usage":{{"input_tokens":1,"output_tokens":0}}}}}}"#,
                plan.id)));
            yield Ok(sse(Some("content_block_start"), r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#));
        }
        for (sent, index) in (plan.skip..plan.words.len()).enumerate() {
            if plan.fail_after.is_some_and(|n| n > plan.skip && index >= n) {
                outcome.ending = Ending::Failed;
                // Let the chunks already yielded reach the socket: an error
                // aborts the connection without flushing.
                tokio::time::sleep(Duration::from_millis(20)).await;
                yield Err(std::io::Error::other("mock: fail_after reached"));
                return;
            }
            if plan.stall_after.is_some_and(|n| n > plan.skip && index >= n) {
                std::future::pending::<()>().await;
            }
            if !plan.interval.is_zero() && sent > 0 {
                tokio::time::sleep_until(start + plan.interval * sent as u32).await;
            }
            let piece = serde_json::to_string(&plan.piece(index)).unwrap_or_default();
            let chunk = match dialect {
                Dialect::OpenAi => {
                    let role = if sent == 0 { r#""role":"assistant","# } else { "" };
                    sse(None, &format!(
                        r#"{{"id":"chatcmpl-mock-{}","object":"chat.completion.chunk","created":{created},"model":{model},"choices":[{{"index":0,"delta":{{{role}"content":{piece}}},"finish_reason":null}}]}}"#,
                        plan.id))
                }
                Dialect::Anthropic => sse(Some("content_block_delta"), &format!(
                    r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{piece}}}}}"#)),
            };
            stats.tokens_sent.fetch_add(1, Ordering::Relaxed);
            yield Ok(chunk);
        }
        let added = plan.words.len() - plan.skip;
        match dialect {
            Dialect::OpenAi => {
                let reason = if plan.truncated { "length" } else { "stop" };
                yield Ok(sse(None, &format!(
                    r#"{{"id":"chatcmpl-mock-{}","object":"chat.completion.chunk","created":{created},"model":{model},"choices":[{{"index":0,"delta":{{}},"finish_reason":"{reason}"}}]}}"#,
                    plan.id)));
                outcome.ending = Ending::Finished;
                yield Ok(sse(None, "[DONE]"));
            }
            Dialect::Anthropic => {
                let reason = if plan.truncated { "max_tokens" } else { "end_turn" };
                yield Ok(sse(Some("content_block_stop"), r#"{"type":"content_block_stop","index":0}"#));
                yield Ok(sse(Some("message_delta"), &format!(
                    r#"{{"type":"message_delta","delta":{{"stop_reason":"{reason}","stop_sequence":null}},"usage":{{"output_tokens":{added}}}}}"#)));
                outcome.ending = Ending::Finished;
                yield Ok(sse(Some("message_stop"), r#"{"type":"message_stop"}"#));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(extra: Value) -> Value {
        let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "alpha beta gamma delta"}], "max_tokens": 10});
        if let (Some(b), Some(extra)) = (b.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                b.insert(k.clone(), v.clone());
            }
        }
        b
    }

    #[test]
    fn deterministic_and_capped() {
        let a = plan(&body(json!({})), Dialect::OpenAi).unwrap();
        let b = plan(&body(json!({})), Dialect::OpenAi).unwrap();
        assert_eq!(a.words, b.words);
        assert_eq!(a.words.len(), 10);
        assert!(
            a.words
                .iter()
                .all(|w| ["alpha", "beta", "gamma", "delta"].contains(&w.as_str()))
        );
    }

    #[test]
    fn continues_from_a_prefix() {
        let full = plan(&body(json!({})), Dialect::OpenAi).unwrap();
        let text = full.new_text();
        let prefix: String = (0..4).map(|i| full.piece(i)).collect();
        let mut req = body(json!({"max_tokens": 6}));
        req["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "assistant", "content": prefix}));
        let cont = plan(&req, Dialect::OpenAi).unwrap();
        assert_eq!(cont.skip, 4);
        assert_eq!(format!("{prefix}{}", cont.new_text()), text);
        // vLLM style needs add_generation_prompt: false
        req["continue_final_message"] = json!(true);
        assert!(plan(&req, Dialect::OpenAi).is_err());
        req["add_generation_prompt"] = json!(false);
        assert!(plan(&req, Dialect::OpenAi).is_ok());
    }

    #[test]
    fn rejects_a_foreign_prefix() {
        let mut req = body(json!({}));
        req["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "assistant", "content": "zzz"}));
        assert!(plan(&req, Dialect::OpenAi).is_err());
    }
}
