//! `tidegate mock-upstream`: a deterministic OpenAI- and Anthropic-compatible
//! provider for demos, tests and benchmarks, as strict as the real ones.
//! It serves OpenAI's chat completions (`POST /v1/chat/completions`) and
//! Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`, `POST
//! /v1/responses/{id}/cancel`), and Anthropic's Messages (`POST
//! /v1/messages`).
//!
//! The answer to a request is drawn from its messages (the same for the
//! same conversation), one unit per chunk: a word of reasoning or text, a
//! tool call's opening, a fragment of its arguments. Knobs ride in the
//! request body's `mock` object and pass through the gateway untouched:
//! - `shape`: `text` (default), `tools`, `parallel_tools` (need `tools`),
//!   OpenAI `reasoning` (`reasoning_content` first), Anthropic `thinking` /
//!   `redacted_thinking` (need `thinking` enabled); `words` (text words,
//!   default: as many as `max_tokens` allows, else 64), `reasoning_words`
//!   (6), `content_words` (text before tool calls, 3), `tool_words` (3);
//!   `n` (OpenAI, 1..=8) gives choices that interleave, each shorter than
//!   the one before;
//! - `token_interval_ms`: pacing between units; `delay_ms`: wait before the
//!   response head; `status`: answer with that HTTP status;
//! - `fail_after` / `stall_after`: once the answer holds that many units
//!   (the prefix's included), cut the connection / stop sending;
//! - `cut_after_events` / `error_after_events` (+ `fail_id`, once per id;
//!   on a non-streaming request, `cut_after_events` cuts the body half-way):
//!   after that many SSE events, cut the connection / send the provider's
//!   own mid-stream error and end the body;
//! - `styles`: the continuation styles this provider supports (default all
//!   of `continue_final_message`, `prefix`, `assistant_prefix`);
//!   `no_prefill`: more model globs that refuse Anthropic prefill;
//!   `ping_every`: Anthropic pings (every 5 units);
//! - `hostile`: a provider broken at the byte level, whatever `stream`
//!   says ([`hostile`]): `endless_line`, `endless_stream` (+
//!   `hostile_events`), `comments_only`, `drip` (one per
//!   `token_interval_ms`, default 100), `html`, `redirect`,
//!   `endless_error_body`, `endless_json`; `status` sets its head's status
//!   (any final one, 200 to 999: hyper writes `HTTP/1.1 999 <none>`).
//!
//! A continuation must continue *this* answer (else 400), in a style the
//! provider supports ([`plan`] has the rules). `GET /mock/stats` counts
//! requests, and the body bytes and SSE events it wrote; `GET /mock/requests`
//! shows the last 256 received (never a key). `GET /v1/models` lists the
//! models in the protocol's shape (with the same credentials).
//!
//! The Responses API ([`responses`], [`background`]) answers the same
//! conversation with the same words: its `input` (and `instructions`, as a
//! leading system message) becomes the chat messages the plan is drawn
//! from, `max_output_tokens` (at least 16) the budget. It refuses what
//! OpenAI refuses: a parameter it does not have (`messages`, `max_tokens`,
//! `n`, …: `unknown_parameter`), a chat-shaped tool, an input item of an
//! unknown type or with a part its role may not send, a function call
//! output without its call, `previous_response_id` (nothing is kept as a
//! conversation: `previous_response_not_found`), `background` without
//! `store`. There is no prefill: a trailing assistant message is history;
//! `[assistant partial, user]` is the re-ask, answered as the chat API's.
//! A stream is named events (`event: <type>`), each `data` with its `type`
//! and a `sequence_number` from 0, no `[DONE]`: `response.created`,
//! `response.in_progress`, per output item (reasoning summary, message,
//! function call) its `output_item.added`, content events and
//! `output_item.done`, then `response.completed`, or
//! `response.incomplete` when `max_output_tokens` cut the answer. A unit
//! is one delta event. `error_after_events` sends OpenAI's `error` event.
//! Stored responses (`store`, the default; the last 1,024) are served by
//! `GET /v1/responses/{id}`. `background: true` runs the generation as a
//! task of the mock that no connection owns (`response.queued` after
//! `response.created`; a client leaving does not stop it):
//! `?stream=true&starting_after=N` replays the events after N and follows
//! the live ones, `…/cancel` stops it (status `cancelled`, counted in
//! `requests_cancelled`). There a connection's faults (`cut_after_events`,
//! `fail_after`, `--die-after`, `stall_after`) cut the connection, not the
//! generation, so a cut background stream can be resumed.
//!
//! Faults of the whole instance ([`Faults`], so a test can run two or three
//! mocks as providers and break one): `--fail-rate P` (every request whose
//! index crosses a multiple of 1/P answers `--fail-status`, default 500, in
//! the provider's error shape), `--latency-ms` (before every head),
//! `--die-after N` (every stream is cut after N units), `--token-interval-ms`
//! (default pacing), `--down` (every request, `/v1/models` included, 503).
//! `GET /mock/faults` shows them and `PUT /mock/faults` (a JSON object of the
//! same names) changes them while the mock runs.

mod background;
mod hostile;
mod plan;
mod render;
mod responses;
#[cfg(test)]
mod tests;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use plan::Plan;

/// How many fail ids are remembered (the oldest forgotten first).
const FAIL_IDS_KEPT: usize = 65_536;
/// How many requests `GET /mock/requests` shows.
const REQUESTS_KEPT: usize = 256;

/// The mock's state: counters behind `GET /mock/stats`, the key it
/// demands, the fail ids already used, the last requests.
#[derive(Default)]
pub struct Stats {
    /// When set, requests must carry it (`Authorization: Bearer` on the
    /// OpenAI API, `x-api-key` on Anthropic's), as a real provider would.
    api_key: Option<String>,
    requests_started: AtomicU64,
    requests_completed: AtomicU64,
    requests_cancelled: AtomicU64,
    requests_unauthorized: AtomicU64,
    requests_rejected: AtomicU64,
    tokens_sent: AtomicU64,
    /// Body bytes handed to the connection, every answer's (errors too).
    bytes_sent: AtomicU64,
    /// SSE events written (`[DONE]` included, comments not).
    events_sent: AtomicU64,
    request_ids: AtomicU64,
    fail_ids: Mutex<(HashSet<String>, VecDeque<String>)>,
    log: Mutex<VecDeque<Value>>,
    /// The instance's faults (`--fail-rate`…, `PUT /mock/faults`).
    faults: Mutex<Faults>,
    /// Generation requests that reached the `fail_rate` check.
    fault_checks: AtomicU64,
    /// Requests answered with `fail_status` by `fail_rate` or `down`.
    requests_failed: AtomicU64,
    models_requests: AtomicU64,
    /// The Responses API's kept responses and background generations.
    responses: background::Store,
}

/// Faults of the whole instance, for tests that run several mocks as one
/// model group's providers.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Faults {
    /// This share of generation requests (deterministically: request `i`
    /// fails when `floor((i+1)·rate) > floor(i·rate)`) is answered
    /// `fail_status` before anything is generated.
    pub fail_rate: Option<f64>,
    /// Default 503.
    pub fail_status: Option<u16>,
    /// Extra wait before every response head.
    pub latency_ms: Option<u64>,
    /// Every streaming answer is cut once it holds this many units (unless
    /// the request sets `fail_after`).
    pub die_after: Option<u64>,
    /// Pacing when the request gives none.
    pub token_interval_ms: Option<u64>,
    /// Every request, the models list included, is answered `fail_status`.
    pub down: bool,
}

impl Faults {
    /// Apply a `PUT /mock/faults` body: each field given replaces its
    /// value, `null` clears it.
    fn update(&mut self, body: &Value) -> Result<(), String> {
        let Some(fields) = body.as_object() else {
            return Err("the body must be a JSON object of faults".into());
        };
        let mut next = self.clone();
        for (key, value) in fields {
            let count = || -> Result<Option<u64>, String> {
                match value {
                    Value::Null => Ok(None),
                    v => v
                        .as_u64()
                        .map(Some)
                        .ok_or_else(|| format!("`{key}` must be a whole number or null")),
                }
            };
            match key.as_str() {
                "fail_rate" => {
                    next.fail_rate = match value {
                        Value::Null => None,
                        v => match v.as_f64() {
                            Some(r) if (0.0..=1.0).contains(&r) => Some(r),
                            _ => {
                                return Err(
                                    "`fail_rate` must be a number from 0 to 1, or null".into()
                                );
                            }
                        },
                    }
                }
                "fail_status" => {
                    next.fail_status = match count()? {
                        None => None,
                        Some(s @ 400..=599) => Some(s as u16),
                        Some(_) => {
                            return Err("`fail_status` must be an error status, 400 to 599".into());
                        }
                    }
                }
                "latency_ms" => next.latency_ms = count()?,
                "die_after" => next.die_after = count()?,
                "token_interval_ms" => next.token_interval_ms = count()?,
                "down" => {
                    next.down = match value {
                        Value::Null => false,
                        Value::Bool(b) => *b,
                        _ => return Err("`down` must be true, false or null".into()),
                    }
                }
                other => {
                    return Err(format!(
                        "`{other}` is not a fault (fail_rate, fail_status, latency_ms, die_after, token_interval_ms, down)"
                    ));
                }
            }
        }
        *self = next;
        Ok(())
    }

    fn status(&self) -> StatusCode {
        self.fail_status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
    }
}

impl Stats {
    /// Whether this is the first use of `id` (and remember it).
    fn first_use(&self, id: &str) -> bool {
        let Ok(mut guard) = self.fail_ids.lock() else {
            return false;
        };
        let (set, order) = &mut *guard;
        if !set.insert(id.to_owned()) {
            return false;
        }
        order.push_back(id.to_owned());
        if order.len() > FAIL_IDS_KEPT
            && let Some(old) = order.pop_front()
        {
            set.remove(&old);
        }
        true
    }

    fn faults(&self) -> Faults {
        self.faults.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Whether this generation request is one `fail_rate` fails.
    fn fails_now(&self, rate: f64) -> bool {
        let i = self.fault_checks.fetch_add(1, Ordering::Relaxed) as f64;
        ((i + 1.0) * rate).floor() > (i * rate).floor()
    }

    fn record(&self, entry: Value) {
        if let Ok(mut log) = self.log.lock() {
            log.push_back(entry);
            if log.len() > REQUESTS_KEPT {
                log.pop_front();
            }
        }
    }
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
    router_with(api_key, Faults::default())
}

/// The mock's routes, with the instance's `faults` from the start.
pub fn router_with(api_key: Option<String>, faults: Faults) -> Router {
    let state = Arc::new(Stats {
        api_key,
        faults: Mutex::new(faults),
        responses: background::Store::new(),
        ..Stats::default()
    });
    // Background generations end with the router: its last clone dropped
    // (the server gone) drops this guard, which cancels them.
    let generations = Arc::new(state.responses.stop.clone().drop_guard());
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
        .route("/v1/responses", post(responses_create))
        .route("/v1/responses/{id}", get(background::retrieve))
        .route("/v1/responses/{id}/cancel", post(background::cancel))
        .route("/v1/models", get(models))
        .route("/mock/stats", get(stats))
        .route("/mock/faults", get(get_faults).put(put_faults))
        .route("/mock/requests", get(requests).delete(clear_requests))
        .with_state(state)
        .layer(axum::Extension(generations))
}

async fn get_faults(State(stats): State<Arc<Stats>>) -> Response {
    axum::Json(stats.faults()).into_response()
}

async fn put_faults(State(stats): State<Arc<Stats>>, body: Bytes) -> Response {
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")).into_response(),
    };
    let Ok(mut faults) = stats.faults.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match faults.update(&parsed) {
        Ok(()) => axum::Json(faults.clone()).into_response(),
        Err(message) => (StatusCode::BAD_REQUEST, message).into_response(),
    }
}

/// `GET /v1/models`: OpenAI's list, or Anthropic's with `anthropic-version`.
async fn models(State(stats): State<Arc<Stats>>, headers: HeaderMap) -> Response {
    let dialect = if headers.contains_key("anthropic-version") {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    };
    stats.models_requests.fetch_add(1, Ordering::Relaxed);
    let faults = stats.faults();
    if let Some(ms) = faults.latency_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(denied) = unauthorized(&stats, dialect, &headers) {
        return denied;
    }
    if faults.down {
        stats.requests_failed.fetch_add(1, Ordering::Relaxed);
        return error(faults.status(), dialect, "the mock is down", None);
    }
    const IDS: [&str; 3] = ["mock-model", "mock-large", "claude-mock-4"];
    let body = match dialect {
        Dialect::OpenAi => json!({
            "object": "list",
            "data": IDS.iter().map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "tidegate-mock"})).collect::<Vec<_>>(),
        }),
        Dialect::Anthropic => json!({
            "data": IDS.iter().map(|id| json!({"type": "model", "id": id, "display_name": id, "created_at": "2025-01-01T00:00:00Z"})).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": IDS[0],
            "last_id": IDS[IDS.len() - 1],
        }),
    };
    axum::Json(body).into_response()
}

async fn stats(State(stats): State<Arc<Stats>>) -> Response {
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    axum::Json(json!({
        "requests_started": n(&stats.requests_started),
        "requests_completed": n(&stats.requests_completed),
        "requests_cancelled": n(&stats.requests_cancelled),
        "requests_unauthorized": n(&stats.requests_unauthorized),
        "requests_rejected": n(&stats.requests_rejected),
        "tokens_sent": n(&stats.tokens_sent),
        "bytes_sent": n(&stats.bytes_sent),
        "events_sent": n(&stats.events_sent),
        "requests_failed": n(&stats.requests_failed),
        "models_requests": n(&stats.models_requests),
    }))
    .into_response()
}

async fn requests(State(stats): State<Arc<Stats>>) -> Response {
    let log: Vec<Value> = stats
        .log
        .lock()
        .map(|l| l.iter().cloned().collect())
        .unwrap_or_default();
    axum::Json(Value::Array(log)).into_response()
}

async fn clear_requests(State(stats): State<Arc<Stats>>) -> Response {
    if let Ok(mut log) = stats.log.lock() {
        log.clear();
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    OpenAi,
    Anthropic,
}

/// An error in the provider's own shape.
fn error(status: StatusCode, dialect: Dialect, message: &str, param: Option<&str>) -> Response {
    let body = match dialect {
        Dialect::OpenAi => {
            let (kind, code) = match status.as_u16() {
                401 => ("invalid_request_error", json!("invalid_api_key")),
                429 => ("requests", json!("rate_limit_exceeded")),
                400..=499 => ("invalid_request_error", Value::Null),
                _ => ("server_error", Value::Null),
            };
            json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
        }
        Dialect::Anthropic => {
            let kind = match status.as_u16() {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    };
    let mut response = (status, axum::Json(body)).into_response();
    if matches!(status.as_u16(), 429 | 529) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// OpenAI's error with the real API's `code` (`unknown_parameter`, …).
fn error_coded(
    status: StatusCode,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    (status, axum::Json(body)).into_response()
}

/// The generation APIs the mock serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Chat,
    Messages,
    Responses,
}

impl Api {
    fn dialect(self) -> Dialect {
        match self {
            Api::Chat | Api::Responses => Dialect::OpenAi,
            Api::Messages => Dialect::Anthropic,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Messages => "/v1/messages",
            Api::Responses => "/v1/responses",
        }
    }
}

async fn chat(State(stats): State<Arc<Stats>>, headers: HeaderMap, body: Bytes) -> Response {
    respond(stats, &headers, body, Api::Chat).await
}

async fn messages(State(stats): State<Arc<Stats>>, headers: HeaderMap, body: Bytes) -> Response {
    respond(stats, &headers, body, Api::Messages).await
}

async fn responses_create(
    State(stats): State<Arc<Stats>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(stats, &headers, body, Api::Responses).await
}

/// The credential the request carries in the dialect's own header.
fn credential(dialect: Dialect, headers: &HeaderMap) -> Option<&str> {
    let value = match dialect {
        Dialect::OpenAi => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ")),
        Dialect::Anthropic => headers.get("x-api-key").and_then(|v| v.to_str().ok()),
    };
    value.map(str::trim).filter(|v| !v.is_empty())
}

/// Response headers like the provider's own (and a cookie no gateway
/// should pass on).
fn provider_headers(response: &mut Response, dialect: Dialect, request: u64) {
    let id = format!("req_{:016x}{:08x}", plan::mix(request), request);
    let cookie = format!(
        "__cf_bm=mock{:016x}; path=/; expires=Thu, 01-Jan-2099 00:00:00 GMT; domain=.mock.invalid; HttpOnly; Secure; SameSite=None",
        plan::mix(!request)
    );
    let pairs: Vec<(&'static str, String)> = match dialect {
        Dialect::OpenAi => vec![
            ("x-request-id", id),
            ("openai-organization", "mock-org".into()),
            ("openai-processing-ms", "12".into()),
            ("openai-version", "2020-10-01".into()),
            ("x-ratelimit-limit-requests", "10000".into()),
            ("x-ratelimit-limit-tokens", "2000000".into()),
            ("x-ratelimit-remaining-requests", "9999".into()),
            ("x-ratelimit-remaining-tokens", "1999000".into()),
            ("x-ratelimit-reset-requests", "6ms".into()),
            ("x-ratelimit-reset-tokens", "30ms".into()),
            ("set-cookie", cookie),
        ],
        Dialect::Anthropic => vec![
            ("request-id", id),
            ("anthropic-organization-id", "mock-org".into()),
            ("anthropic-ratelimit-requests-limit", "4000".into()),
            ("anthropic-ratelimit-requests-remaining", "3999".into()),
            (
                "anthropic-ratelimit-requests-reset",
                "2099-01-01T00:00:00Z".into(),
            ),
            ("anthropic-ratelimit-tokens-limit", "400000".into()),
            ("anthropic-ratelimit-tokens-remaining", "399000".into()),
            ("set-cookie", cookie),
        ],
    };
    let headers = response.headers_mut();
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.append(name, v);
        }
    }
}

async fn respond(stats: Arc<Stats>, headers: &HeaderMap, body: Bytes, api: Api) -> Response {
    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    let logged = parsed
        .as_ref()
        .map_or_else(|_| json!(String::from_utf8_lossy(&body)), Clone::clone);
    let request = stats.request_ids.fetch_add(1, Ordering::Relaxed);
    let response = answer(&stats, headers, parsed, api).await;
    finish(
        stats,
        api.path(),
        logged,
        headers,
        api.dialect(),
        request,
        response,
    )
}

/// Log a request and its status in `/mock/requests`, count its refusals,
/// add the provider's headers and count the body's bytes.
fn finish(
    stats: Arc<Stats>,
    path: &str,
    body: Value,
    headers: &HeaderMap,
    dialect: Dialect,
    request: u64,
    mut response: Response,
) -> Response {
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map_or(Value::Null, |v| json!(v))
    };
    let mut entry = json!({
        "path": path,
        "body": body,
        "has_credential": credential(dialect, headers).is_some(),
        "headers": {
            "anthropic-version": header_text("anthropic-version"),
            "anthropic-beta": header_text("anthropic-beta"),
            "openai-organization": header_text("openai-organization"),
            "openai-project": header_text("openai-project"),
            "traceparent": header_text("traceparent"),
        },
    });
    let status = response.status();
    entry["status"] = json!(status.as_u16());
    stats.record(entry);
    if status == StatusCode::UNAUTHORIZED {
        stats.requests_unauthorized.fetch_add(1, Ordering::Relaxed);
    }
    if status.is_client_error() {
        stats.requests_rejected.fetch_add(1, Ordering::Relaxed);
    }
    provider_headers(&mut response, dialect, request);
    response.map(|body| Body::new(Counted { inner: body, stats }))
}

/// A body that counts the bytes it hands to the connection (its size
/// hint kept, so a whole answer keeps its `content-length`).
struct Counted {
    inner: Body,
    stats: Arc<Stats>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.stats
                .bytes_sent
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The provider's 401 when the mock demands a key the request lacks.
fn unauthorized(stats: &Stats, dialect: Dialect, headers: &HeaderMap) -> Option<Response> {
    if let Some(expected) = &stats.api_key {
        match (credential(dialect, headers), dialect) {
            (Some(key), _) if key == expected => {}
            (None, Dialect::OpenAi) => {
                return Some(error(
                    StatusCode::UNAUTHORIZED,
                    dialect,
                    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    None,
                ));
            }
            (Some(_), Dialect::OpenAi) => {
                return Some(error(
                    StatusCode::UNAUTHORIZED,
                    dialect,
                    "Incorrect API key provided. You can find your API key in your account settings.",
                    None,
                ));
            }
            (None, Dialect::Anthropic) => {
                return Some(error(
                    StatusCode::UNAUTHORIZED,
                    dialect,
                    "x-api-key header is required",
                    None,
                ));
            }
            (Some(_), Dialect::Anthropic) => {
                return Some(error(
                    StatusCode::UNAUTHORIZED,
                    dialect,
                    "invalid x-api-key",
                    None,
                ));
            }
        }
    }
    None
}

/// What every request to the mock's API passes first: `--latency-ms`, the
/// key, `--down`.
async fn gate(stats: &Stats, headers: &HeaderMap) -> Option<Response> {
    let faults = stats.faults();
    if let Some(ms) = faults.latency_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(denied) = unauthorized(stats, Dialect::OpenAi, headers) {
        return Some(denied);
    }
    if faults.down {
        stats.requests_failed.fetch_add(1, Ordering::Relaxed);
        return Some(error(
            faults.status(),
            Dialect::OpenAi,
            "the mock is down",
            None,
        ));
    }
    None
}

async fn answer(
    stats: &Arc<Stats>,
    headers: &HeaderMap,
    parsed: Result<Value, serde_json::Error>,
    api: Api,
) -> Response {
    let dialect = api.dialect();
    let faults = stats.faults();
    if let Some(ms) = faults.latency_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(denied) = unauthorized(stats, dialect, headers) {
        return denied;
    }
    if faults.down || faults.fail_rate.is_some_and(|rate| stats.fails_now(rate)) {
        stats.requests_failed.fetch_add(1, Ordering::Relaxed);
        let why = if faults.down {
            "the mock is down"
        } else {
            "the mock failed this request (fail_rate)"
        };
        return error(faults.status(), dialect, why, None);
    }
    // Instance defaults for what the request leaves out.
    let mut parsed = parsed;
    if let Ok(Value::Object(body)) = &mut parsed {
        for (knob, value) in [
            ("fail_after", faults.die_after),
            ("token_interval_ms", faults.token_interval_ms),
        ] {
            if let Some(v) = value {
                let mock = body.entry("mock").or_insert_with(|| json!({}));
                if let Some(mock) = mock.as_object_mut() {
                    mock.entry(knob).or_insert(json!(v));
                }
            }
        }
    }
    stats.requests_started.fetch_add(1, Ordering::Relaxed);
    if dialect == Dialect::Anthropic && headers.get("anthropic-version").is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            dialect,
            "anthropic-version: header is required",
            None,
        );
    }
    let parsed = match parsed {
        Ok(v) => v,
        Err(e) => {
            let message = format!("malformed JSON: {e}");
            return error(StatusCode::BAD_REQUEST, dialect, &message, None);
        }
    };
    // `delay_ms`: a provider slow to answer at all (first-byte timeouts).
    if let Some(delay) = parsed.pointer("/mock/delay_ms").and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    // A final status HTTP/1.1 can carry: three digits, not informational
    // (hyper turns a 1xx answer into a 500 of its own).
    let status = match parsed.pointer("/mock/status") {
        None | Some(Value::Null) => None,
        Some(v) => match v
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .filter(|s| (200..=999).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            Some(status) => Some(status),
            None => {
                let message = format!("mock.status: {v} is no final HTTP status (200 to 999)");
                return error(StatusCode::BAD_REQUEST, dialect, &message, None);
            }
        },
    };
    let hostile = parsed
        .pointer("/mock/hostile")
        .is_some_and(|h| !h.is_null());
    if let Some(status) = status.filter(|_| !hostile) {
        let message = match status.as_u16() {
            429 => "Rate limit reached for requests (the mock was asked to fail)",
            529 => "Overloaded",
            _ => "the mock was asked to fail",
        };
        return error(status, dialect, message, None);
    }
    if api == Api::Responses {
        return background::create(stats, &parsed, status);
    }
    let plan = match plan::plan(&parsed, dialect) {
        Ok(p) => p,
        Err(refusal) => {
            return error(
                StatusCode::BAD_REQUEST,
                dialect,
                &refusal.message,
                refusal.param.as_deref(),
            );
        }
    };
    let delivery = plan.delivery.clone();
    let covered = plan.covered;
    if let Some(kind) = delivery.hostile {
        return hostile::answer(
            kind,
            Renderer::new(plan, dialect),
            &delivery,
            stats.clone(),
            status,
        );
    }
    if !plan.stream {
        stats.requests_completed.fetch_add(1, Ordering::Relaxed);
        stats
            .tokens_sent
            .fetch_add(plan.completion_tokens() as u64, Ordering::Relaxed);
        let body = match dialect {
            Dialect::OpenAi => render::openai_whole(&plan),
            Dialect::Anthropic => render::anthropic_whole(&plan),
        };
        return whole(body, delivery.cut_after_events.is_some());
    }
    let armed = armed(stats, &delivery);
    let body = Body::from_stream(stream(
        Renderer::new(plan, dialect),
        delivery,
        covered,
        stats.clone(),
        armed,
        None,
    ));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Whether a stream's `cut_after_events` / `error_after_events` happen:
/// with a fail id, on the first request carrying it only.
fn armed(stats: &Stats, delivery: &plan::Delivery) -> bool {
    let fails = delivery.cut_after_events.is_some() || delivery.error_after_events.is_some();
    !fails
        || delivery
            .fail_id
            .as_deref()
            .is_none_or(|id| stats.first_use(id))
}

/// A whole (non-streaming) answer; `cut`: the head and half the body,
/// then the connection dies (a provider crashing mid-body).
fn whole(body: Value, cut: bool) -> Response {
    if !cut {
        return axum::Json(body).into_response();
    }
    let bytes = Bytes::from(body.to_string());
    let half = bytes.slice(..bytes.len() / 2);
    let cut = async_stream::stream! {
        yield Ok::<_, std::io::Error>(half);
        // Let the head and the half reach the socket first: an
        // error aborts the connection without flushing.
        tokio::time::sleep(Duration::from_millis(20)).await;
        yield Err(std::io::Error::other("mock: cut mid-body"));
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(Body::from_stream(cut))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Clone, Copy, PartialEq)]
enum Ending {
    /// Still sending: a drop now means the peer went away.
    Running,
    Finished,
    /// The mock failed on purpose: neither completed nor cancelled.
    Failed,
}

/// Counts a stream as cancelled when its body is dropped before the end
/// (and marks its kept response, if any, cancelled or failed).
struct Outcome {
    stats: Arc<Stats>,
    ending: Ending,
    /// A Responses API stream's kept response.
    record: Option<Arc<background::Entry>>,
}

impl Outcome {
    fn new(stats: Arc<Stats>) -> Outcome {
        Outcome {
            stats,
            ending: Ending::Running,
            record: None,
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if let Some(record) = &self.record
            && self.ending != Ending::Finished
        {
            record.abandon(self.ending == Ending::Running);
        }
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

/// A plan's events in one API's shape.
enum Renderer {
    OpenAi(render::OpenAiStream),
    Anthropic(render::AnthropicStream),
    Responses(Box<responses::Stream>),
}

impl Renderer {
    fn new(plan: Plan, dialect: Dialect) -> Renderer {
        match dialect {
            Dialect::OpenAi => Renderer::OpenAi(render::OpenAiStream::new(plan)),
            Dialect::Anthropic => Renderer::Anthropic(render::AnthropicStream::new(plan)),
        }
    }

    fn next(&mut self) -> Option<render::Out> {
        match self {
            Renderer::OpenAi(r) => r.next(),
            Renderer::Anthropic(r) => r.next(),
            Renderer::Responses(r) => r.next(),
        }
    }

    /// The provider's own mid-stream error, as the `events`th event.
    fn error_event(&self, events: usize) -> Bytes {
        match self {
            Renderer::OpenAi(_) => sse(None, OPENAI_STREAM_ERROR),
            Renderer::Anthropic(_) => sse(Some("error"), ANTHROPIC_STREAM_ERROR),
            Renderer::Responses(_) => sse(Some("error"), &responses::Stream::error_event(events)),
        }
    }
}

const OPENAI_STREAM_ERROR: &str = r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#;
const ANTHROPIC_STREAM_ERROR: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

/// A streaming answer as the connection's body: the renderer's events,
/// paced, with the request's faults; `covered`: the units the request's
/// prefix already holds; `record`: the kept response each event updates.
fn stream(
    mut renderer: Renderer,
    delivery: plan::Delivery,
    covered: usize,
    stats: Arc<Stats>,
    armed: bool,
    record: Option<Arc<background::Entry>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    async_stream::stream! {
        let mut outcome = Outcome::new(stats.clone());
        outcome.record = record.clone();
        let cut_after = delivery.cut_after_events.filter(|_| armed);
        let error_after = delivery.error_after_events.filter(|_| armed);
        let start = tokio::time::Instant::now();
        let mut events = 0usize;
        let mut units = 0usize;
        let mut next = renderer.next();
        while let Some(out) = next.take() {
            next = renderer.next();
            if cut_after == Some(events) {
                outcome.ending = Ending::Failed;
                // Let the events already yielded reach the socket: an error
                // aborts the connection without flushing.
                tokio::time::sleep(Duration::from_millis(20)).await;
                yield Err(std::io::Error::other("mock: cut_after_events reached"));
                return;
            }
            if error_after == Some(events) {
                outcome.ending = Ending::Failed;
                if let Some(record) = &record {
                    record.fail(None);
                }
                stats.events_sent.fetch_add(1, Ordering::Relaxed);
                yield Ok(renderer.error_event(events));
                return;
            }
            if out.unit {
                let at = covered + units;
                if delivery.fail_after.is_some_and(|n| n > covered && at >= n) {
                    outcome.ending = Ending::Failed;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    yield Err(std::io::Error::other("mock: fail_after reached"));
                    return;
                }
                if delivery.stall_after.is_some_and(|n| n > covered && at >= n) {
                    std::future::pending::<()>().await;
                }
                if !delivery.interval.is_zero() && units > 0 {
                    let step = u32::try_from(units).unwrap_or(u32::MAX);
                    tokio::time::sleep_until(start + delivery.interval.saturating_mul(step)).await;
                }
                units += 1;
                stats.tokens_sent.fetch_add(1, Ordering::Relaxed);
            }
            events += 1;
            if next.is_none() {
                // The last event: a peer leaving now has had it all.
                outcome.ending = Ending::Finished;
            }
            if let Some(record) = &record {
                record.record(&out);
            }
            stats.events_sent.fetch_add(1, Ordering::Relaxed);
            yield Ok(sse(out.event, &out.data));
        }
    }
}
