//! The Responses API's endpoints and stored responses: `POST
//! /v1/responses` once the common checks passed ([`create`]), `GET
//! /v1/responses/{id}` ([`retrieve`]) and `POST /v1/responses/{id}/cancel`
//! ([`cancel`]).
//!
//! A response created with `store` (the default) is kept, as its Response
//! object as it stands. A background one (`background: true`) is generated
//! by a task of the mock that no client connection owns: a client leaving
//! does not stop it, `cancel` does. Its events are kept, so a client can
//! re-attach with `?stream=true&starting_after=N` and get exactly the
//! events after N, the kept ones and then the live ones. At most
//! [`RESPONSES_KEPT`] responses are kept, the oldest forgotten first.
//!
//! Faults split along the same line. The generation has the pacing and
//! the provider's own failure (`error_after_events`: the `error` event,
//! then status `failed`); a connection has the connection's faults
//! (`cut_after_events`, `fail_after` / `--die-after`, `stall_after`), so
//! a cut background stream goes on being generated and can be resumed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::plan::{self, Delivery};
use super::render::Out;
use super::responses::{self, Identity, Invalid};
use super::{Dialect, Renderer, Stats, error, error_coded, hostile, sse};

/// How many responses are kept for `GET /v1/responses/{id}`.
pub const RESPONSES_KEPT: usize = 1024;

const FAILED: &str = "The server had an error while processing your request.";

/// The kept responses by id, and their ids oldest first.
#[derive(Default)]
struct Kept {
    by_id: HashMap<String, Arc<Entry>>,
    order: VecDeque<String>,
}

/// The kept responses, and the background generations' tasks.
#[derive(Default)]
pub struct Store {
    kept: Mutex<Kept>,
    /// Every background generation runs here (no bare spawn, clippy.toml).
    tasks: TaskTracker,
    /// Cancelled when the mock's router is dropped: no generation
    /// outlives the mock.
    pub stop: CancellationToken,
    /// Per instance, so two mocks give different ids.
    nonce: u64,
    ids: AtomicU64,
}

impl Store {
    pub fn new() -> Store {
        Store {
            nonce: rand::random(),
            ..Store::default()
        }
    }

    /// A new response's id (`resp_` and 32 hex digits, the conversation's
    /// seed last) and creation time.
    fn identity(&self, seed_hex: &str) -> Identity {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        Identity {
            id: format!("resp_{:016x}{seed_hex}", plan::mix(self.nonce ^ n)),
            created_at: responses::now(),
        }
    }

    fn keep(&self, id: &str, entry: Arc<Entry>) {
        let Ok(mut guard) = self.kept.lock() else {
            return;
        };
        let kept = &mut *guard;
        kept.by_id.insert(id.to_owned(), entry);
        kept.order.push_back(id.to_owned());
        while kept.order.len() > RESPONSES_KEPT {
            if let Some(old) = kept.order.pop_front() {
                kept.by_id.remove(&old);
            }
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.kept.lock().ok()?.by_id.get(id).cloned()
    }
}

/// One event as it went out, kept for re-attaching.
#[derive(Clone)]
struct KeptEvent {
    bytes: Bytes,
    /// It carries a unit (a delta), for `fail_after`.
    unit: bool,
}

struct Progress {
    /// The Response object of the last lifecycle event.
    response: Value,
    /// The output items done so far.
    items: Vec<Value>,
    /// Every event (background responses only), `events[i]` having
    /// sequence number `i`.
    events: Vec<KeptEvent>,
    /// No more events: completed, incomplete, failed or cancelled.
    finished: bool,
}

/// A kept response.
pub struct Entry {
    background: bool,
    /// Units the plan counts as already given (an instruct re-ask's), so
    /// `fail_after` counts as it does on the chat API.
    covered: usize,
    state: Mutex<Progress>,
    /// Bumped on every change, for the streams that follow it.
    changed: watch::Sender<()>,
    /// Stops the background generation.
    cancel: CancellationToken,
}

impl Entry {
    fn new(response: Value, background: bool, covered: usize, stop: &CancellationToken) -> Entry {
        Entry {
            background,
            covered,
            state: Mutex::new(Progress {
                response,
                items: Vec::new(),
                events: Vec::new(),
                finished: false,
            }),
            changed: watch::Sender::new(()),
            cancel: stop.child_token(),
        }
    }

    /// Take in an event as it goes out; `false` once the response is
    /// finished (cancelled meanwhile), so the generation stops.
    pub fn record(&self, out: &Out) -> bool {
        {
            let Ok(mut state) = self.state.lock() else {
                return false;
            };
            if state.finished {
                return false;
            }
            match out.event {
                Some(
                    kind @ ("response.created"
                    | "response.queued"
                    | "response.in_progress"
                    | "response.completed"
                    | "response.incomplete"),
                ) => {
                    if let Ok(mut v) = serde_json::from_str::<Value>(&out.data) {
                        state.response = v["response"].take();
                    }
                    state.finished = matches!(kind, "response.completed" | "response.incomplete");
                }
                Some("response.output_item.done") => {
                    if let Ok(mut v) = serde_json::from_str::<Value>(&out.data) {
                        state.items.push(v["item"].take());
                    }
                }
                _ => {}
            }
            if self.background {
                state.events.push(KeptEvent {
                    bytes: sse(out.event, &out.data),
                    unit: out.unit,
                });
            }
        }
        self.changed.send_replace(());
        true
    }

    /// The provider failed: status `failed`, and (kept for re-attaching)
    /// the `error` event the stream ended with.
    pub fn fail(&self, event: Option<Bytes>) {
        self.end("failed", event);
    }

    /// Finish with `status` unless already finished; whether it did.
    fn end(&self, status: &str, event: Option<Bytes>) -> bool {
        {
            let Ok(mut state) = self.state.lock() else {
                return false;
            };
            if state.finished {
                return false;
            }
            state.finished = true;
            state.response["status"] = json!(status);
            if status == "failed" {
                state.response["error"] = json!({"code": "server_error", "message": FAILED});
            }
            if let (true, Some(bytes)) = (self.background, event) {
                state.events.push(KeptEvent { bytes, unit: false });
            }
        }
        self.changed.send_replace(());
        true
    }

    /// A non-background stream ended before its last event: the peer left
    /// (`cancelled`) or the mock cut it (`failed`).
    pub fn abandon(&self, peer_left: bool) {
        self.end(if peer_left { "cancelled" } else { "failed" }, None);
    }

    /// The Response object as it stands, with the output items done.
    fn snapshot(&self) -> Value {
        let Ok(state) = self.state.lock() else {
            return Value::Null;
        };
        let mut response = state.response.clone();
        response["output"] = Value::Array(state.items.clone());
        response
    }

    /// The kept events from `from` on, whether there will be more, and
    /// how many units came before `from`.
    fn events_from(&self, from: usize) -> (Vec<KeptEvent>, bool, usize) {
        let Ok(state) = self.state.lock() else {
            return (Vec::new(), true, 0);
        };
        let from = from.min(state.events.len());
        let before = state.events[..from].iter().filter(|e| e.unit).count();
        (state.events[from..].to_vec(), state.finished, before)
    }
}

/// A connection's own faults while it follows a background response.
#[derive(Clone, Copy, Default)]
struct Cuts {
    cut_after_events: Option<usize>,
    fail_after: Option<usize>,
    stall_after: Option<usize>,
}

/// The events of `entry` from sequence number `from` on, the kept ones
/// then the live ones, until it finishes.
fn follow(
    entry: Arc<Entry>,
    from: usize,
    cuts: Cuts,
    stats: Arc<Stats>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    async_stream::stream! {
        let mut changed = entry.changed.subscribe();
        let mut next = from;
        let mut sent = 0usize;
        // Units of the answer before `from`: a re-attach past the
        // `fail_after` point is not cut again, as a chat continuation.
        let covered = entry.covered + entry.events_from(from).2;
        let mut at = covered;
        loop {
            changed.borrow_and_update();
            let (batch, finished, _) = entry.events_from(next);
            for event in batch {
                if cuts.cut_after_events == Some(sent) {
                    // Let the events already yielded reach the socket.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    yield Err(std::io::Error::other("mock: cut_after_events reached"));
                    return;
                }
                if event.unit {
                    if cuts.fail_after.is_some_and(|n| n > covered && at >= n) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        yield Err(std::io::Error::other("mock: fail_after reached"));
                        return;
                    }
                    if cuts.stall_after.is_some_and(|n| n > covered && at >= n) {
                        std::future::pending::<()>().await;
                    }
                    at += 1;
                }
                next += 1;
                sent += 1;
                stats.events_sent.fetch_add(1, Ordering::Relaxed);
                yield Ok(event.bytes);
            }
            if finished || changed.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Run a background generation: the events, paced, into `entry`, until
/// the end, the provider's failure, a cancel or the mock's end.
fn spawn_generation(
    stats: &Arc<Stats>,
    entry: Arc<Entry>,
    stream: responses::Stream,
    interval: Duration,
    error_after: Option<usize>,
) {
    let cancelled = entry.cancel.clone();
    let task_stats = stats.clone();
    stats.responses.tasks.spawn(async move {
        let stats = task_stats;
        tokio::select! {
            // A cancel wins over a unit that is due at the same time.
            biased;
            () = cancelled.cancelled() => {
                // `cancel` has counted it already; the mock going away has not.
                if entry.end("cancelled", None) {
                    stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            () = generate(&stats, &entry, stream, interval, error_after) => {}
        }
    });
}

async fn generate(
    stats: &Stats,
    entry: &Entry,
    mut stream: responses::Stream,
    interval: Duration,
    error_after: Option<usize>,
) {
    let start = tokio::time::Instant::now();
    let mut units = 0usize;
    let mut events = 0usize;
    while let Some(out) = stream.next() {
        if error_after == Some(events) {
            let data = responses::Stream::error_event(events);
            entry.fail(Some(sse(Some("error"), &data)));
            return;
        }
        if out.unit && !interval.is_zero() && units > 0 {
            let step = u32::try_from(units).unwrap_or(u32::MAX);
            tokio::time::sleep_until(start + interval.saturating_mul(step)).await;
        }
        // Counted once kept: a cancelled generation counts no unit it lost.
        if !entry.record(&out) {
            return;
        }
        if out.unit {
            units += 1;
            stats.tokens_sent.fetch_add(1, Ordering::Relaxed);
        }
        events += 1;
        // Unpaced, a long answer would hold the worker: let others run.
        if events.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }
    stats.requests_completed.fetch_add(1, Ordering::Relaxed);
}

fn invalid(refusal: Invalid) -> Response {
    error_coded(
        StatusCode::BAD_REQUEST,
        &refusal.message,
        refusal.param.as_deref(),
        refusal.code,
    )
}

fn event_stream(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `POST /v1/responses`, its body parsed and past the checks every
/// generation request has (key, faults, `delay_ms`, `status`); `status`:
/// the head's status for a hostile answer.
pub fn create(stats: &Arc<Stats>, body: &Value, status: Option<StatusCode>) -> Response {
    let request = match responses::check(body) {
        Ok(r) => r,
        Err(refusal) => return invalid(refusal),
    };
    let plan = match plan::plan(&request.chat, Dialect::OpenAi) {
        Ok(p) => p,
        Err(refusal) => {
            return error(
                StatusCode::BAD_REQUEST,
                Dialect::OpenAi,
                &refusal.message,
                refusal.param.as_deref(),
            );
        }
    };
    let delivery: Delivery = plan.delivery.clone();
    let covered = plan.covered;
    let completion_tokens = plan.completion_tokens();
    let identity = stats.responses.identity(&plan.id);
    let id = identity.id.clone();
    let (store, background, streaming) = (request.store, request.background, request.stream);
    let renderer = responses::Stream::new(plan, request, identity);
    if let Some(kind) = delivery.hostile {
        return hostile::answer(
            kind,
            Renderer::Responses(Box::new(renderer)),
            &delivery,
            stats.clone(),
            status,
        );
    }
    let armed = super::armed(stats, &delivery);
    let cut_whole = delivery.cut_after_events.is_some();
    if background {
        let entry = Arc::new(Entry::new(
            renderer.response().clone(),
            true,
            covered,
            &stats.responses.stop,
        ));
        stats.responses.keep(&id, entry.clone());
        let error_after = delivery.error_after_events.filter(|_| armed);
        spawn_generation(
            stats,
            entry.clone(),
            renderer,
            delivery.interval,
            error_after,
        );
        if !streaming {
            return super::whole(entry.snapshot(), cut_whole);
        }
        let cuts = Cuts {
            cut_after_events: delivery.cut_after_events.filter(|_| armed),
            fail_after: delivery.fail_after,
            stall_after: delivery.stall_after,
        };
        return event_stream(Body::from_stream(follow(entry, 0, cuts, stats.clone())));
    }
    if !streaming {
        let response = renderer.whole();
        stats.requests_completed.fetch_add(1, Ordering::Relaxed);
        stats
            .tokens_sent
            .fetch_add(completion_tokens as u64, Ordering::Relaxed);
        if store {
            let entry = Entry::new(response.clone(), false, covered, &stats.responses.stop);
            if let Ok(mut state) = entry.state.lock() {
                state.finished = true;
                state.items = response["output"].as_array().cloned().unwrap_or_default();
            }
            stats.responses.keep(&id, Arc::new(entry));
        }
        return super::whole(response, cut_whole);
    }
    let record = store.then(|| {
        let entry = Arc::new(Entry::new(
            renderer.response().clone(),
            false,
            covered,
            &stats.responses.stop,
        ));
        stats.responses.keep(&id, entry.clone());
        entry
    });
    let body = super::stream(
        Renderer::Responses(Box::new(renderer)),
        delivery,
        covered,
        stats.clone(),
        armed,
        record,
    );
    event_stream(Body::from_stream(body))
}

fn not_found(id: &str) -> Response {
    error_coded(
        StatusCode::NOT_FOUND,
        &format!("No response found with id '{id}'."),
        None,
        None,
    )
}

/// What `GET /v1/responses/{id}` asks: `stream`, `starting_after`.
fn retrieve_query(query: Option<&str>) -> Result<(bool, Option<i64>), Invalid> {
    let mut stream = false;
    let mut starting_after = None;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "stream" => match value.as_ref() {
                "true" => stream = true,
                "false" => stream = false,
                other => {
                    return Err(Invalid {
                        message: format!(
                            "Invalid value for 'stream': expected a boolean, but got '{other}' instead."
                        ),
                        param: Some("stream".into()),
                        code: Some("invalid_type"),
                    });
                }
            },
            "starting_after" => match value.parse::<i64>() {
                Ok(n) => starting_after = Some(n),
                Err(_) => {
                    return Err(Invalid {
                        message: format!(
                            "Invalid type for 'starting_after': expected an integer, but got '{value}' instead."
                        ),
                        param: Some("starting_after".into()),
                        code: Some("invalid_type"),
                    });
                }
            },
            // What the SDKs may send; nothing the mock changes.
            "include" | "include[]" | "include_obfuscation" => {}
            other => {
                return Err(Invalid {
                    message: format!("Unknown parameter: '{other}'."),
                    param: Some(other.to_owned()),
                    code: Some("unknown_parameter"),
                });
            }
        }
    }
    Ok((stream, starting_after))
}

/// `GET /v1/responses/{id}`: the Response object as it stands, or with
/// `stream=true` (background responses only) its events after
/// `starting_after`, then the live ones until the end.
pub async fn retrieve(
    State(stats): State<Arc<Stats>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let request = stats.request_ids.fetch_add(1, Ordering::Relaxed);
    let path = format!("/v1/responses/{id}");
    let response = async {
        if let Some(refused) = super::gate(&stats, &headers).await {
            return refused;
        }
        let (stream, starting_after) = match retrieve_query(query.as_deref()) {
            Ok(q) => q,
            Err(refusal) => return invalid(refusal),
        };
        let Some(entry) = stats.responses.get(&id) else {
            return not_found(&id);
        };
        if !stream {
            return axum::Json(entry.snapshot()).into_response();
        }
        if !entry.background {
            return error_coded(
                StatusCode::BAD_REQUEST,
                "This response cannot be streamed because it was not created with background=true.",
                Some("stream"),
                None,
            );
        }
        let from = starting_after.map_or(0, |n| usize::try_from(n.saturating_add(1)).unwrap_or(0));
        let cuts = Cuts {
            fail_after: stats.faults().die_after.map(|n| n as usize),
            ..Cuts::default()
        };
        event_stream(Body::from_stream(follow(entry, from, cuts, stats.clone())))
    }
    .await;
    let logged = json!({"query": query});
    super::finish(
        stats,
        &path,
        logged,
        &headers,
        Dialect::OpenAi,
        request,
        response,
    )
}

/// `POST /v1/responses/{id}/cancel`: a background response stops being
/// generated at once (status `cancelled`, counted in
/// `requests_cancelled`); a finished one is answered as it is.
pub async fn cancel(
    State(stats): State<Arc<Stats>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let request = stats.request_ids.fetch_add(1, Ordering::Relaxed);
    let path = format!("/v1/responses/{id}/cancel");
    let response = async {
        if let Some(refused) = super::gate(&stats, &headers).await {
            return refused;
        }
        let Some(entry) = stats.responses.get(&id) else {
            return not_found(&id);
        };
        if !entry.background {
            return error_coded(
                StatusCode::BAD_REQUEST,
                "Only background responses can be cancelled.",
                None,
                None,
            );
        }
        if entry.end("cancelled", None) {
            entry.cancel.cancel();
            stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
        }
        axum::Json(entry.snapshot()).into_response()
    }
    .await;
    super::finish(
        stats,
        &path,
        Value::Null,
        &headers,
        Dialect::OpenAi,
        request,
        response,
    )
}
