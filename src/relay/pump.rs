//! The pump: the only task that talks to the provider for a stream.
//!
//! It sends the request, reads the provider's SSE events, numbers them,
//! writes each to the store and only then publishes it to the stream's
//! subscribers. Three inputs can stop it — the provider (done, failed,
//! stalled), the stream's token (every client gone, `DELETE`, the drain
//! deadline) and the store (a failed write) — and every way out goes through
//! [`Pump::finish`], which records the status and wakes the subscribers.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use tokio::sync::oneshot;

use super::live::LiveStream;
use super::reattach::Track;
use super::{Relay, RelayError};
use crate::protocol::sse::{Overflow, SseDecoder, SseEvent};
use crate::protocol::{Continuation, Hold, Leg, Plan, Protocol, Splice, Stamp, Terminal};
use crate::store::StoreError;
use crate::stream::{AbortKind, End, Event, Reattach, Status};
use crate::trace::RunTrace;
use crate::upstream::health::Outcome;
use crate::upstream::{
    StreamBody, StreamResponse, TransportError, Upstream, UpstreamError, is_event_stream,
};

/// At most this much of a stream is held back (a tool call being
/// streamed); past it, it is released and a cut there cannot be continued.
const MAX_HELD: usize = 1 << 20;

/// At most this many events go into one store write.
const MAX_BATCH: usize = 256;

/// How long the client's response head waits, after the provider's, for
/// the first event, so that head and first event leave in one write.
const FIRST_EVENT_HOLD: std::time::Duration = std::time::Duration::from_millis(5);

/// How long a finished stream's pump waits for the rest of the provider's
/// body (its closing chunk) so the connection can be reused.
const AFTER_DONE: std::time::Duration = std::time::Duration::from_secs(1);

type Started = oneshot::Sender<Result<(), StartError>>;

/// Tell the waiting handler the stream is on (once).
fn announce(started: &mut Option<Started>) {
    if let Some(tx) = started.take() {
        let _ = tx.send(Ok(()));
    }
}

/// Why reading the provider's stream failed.
enum ReadError {
    Stalled,
    Failed(TransportError),
    /// Past `limits.max_event_bytes` or `limits.max_answer_bytes`.
    TooLarge(Overflow),
}

/// Why a pump could not start relaying.
#[derive(Debug)]
pub enum StartError {
    Upstream(UpstreamError),
    /// The provider answered 200 but not with an event stream.
    NotAStream {
        upstream: String,
        content_type: String,
    },
    /// The stream's token was cancelled first (drain deadline, client gone).
    Cancelled(AbortKind),
    /// The stream's record could not be written: the provider call is dropped.
    Store(StoreError),
}

impl From<StartError> for RelayError {
    fn from(e: StartError) -> RelayError {
        match e {
            StartError::Upstream(e) => RelayError::Upstream(e),
            StartError::NotAStream {
                upstream,
                content_type,
            } => RelayError::NotAStream {
                upstream,
                content_type,
            },
            StartError::Cancelled(AbortKind::ServerRestarting) => RelayError::ServerRestarting,
            StartError::Cancelled(kind) => RelayError::CancelledBeforeStart(kind),
            StartError::Store(e) => RelayError::Store(e),
        }
    }
}

/// A continuation run: how its events are spliced into the original's,
/// and what follows its first request.
pub struct Continued {
    /// The first request's splice.
    pub splice: Option<Box<dyn Splice>>,
    /// The requests after the first (`n > 1`: one per unfinished choice).
    pub legs: VecDeque<Leg>,
    /// The style of these requests.
    pub style: Continuation,
    /// The plan in the next style, tried once when the provider refuses
    /// this one with a 400.
    pub fallback: Option<(Continuation, Vec<Leg>)>,
    /// A re-attach's end when the provider refuses it for good and the
    /// answer needs no continuation, or cannot have one.
    pub refused: Option<Refused>,
}

/// How a stream ends when the provider refuses to re-attach to its
/// background response (a 4xx) and there is no continuation to fall back
/// to: as a resume without a re-attach would have ended it.
pub enum Refused {
    /// Every item was said whole: these events (stamped, numbered on from
    /// the stored ones) end the answer.
    Close(Vec<Event>),
    /// The answer cannot be continued: it ends `incomplete`, saying why.
    Incomplete(Option<String>),
}

/// How a read of one request's stream stops.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    End(End),
    /// This request is done and another of the continuation follows.
    NextLeg,
}

/// What a run carries from one request to the next: numbering, the hold,
/// the current request's splice.
struct Flow {
    seq: u64,
    /// Only for a request that declares tools.
    hold: Option<Box<dyn Hold>>,
    splice: Option<Box<dyn Splice>>,
    more_legs: bool,
    /// Set when a request is sent, taken by its first event: its TTFT.
    first_event: Option<tokio::time::Instant>,
    /// The current request's time to first event, once it came.
    ttft: Option<std::time::Duration>,
    /// Scratch: events the hold lets through, a splice's output.
    released: Vec<SseEvent>,
    spliced: Vec<crate::protocol::continuation::Out>,
    /// The protocol rewrites each event once numbered (`Wire::stamp`).
    stamp: bool,
    /// The client asked for a background response (what the stamp says).
    background: bool,
    /// The provider's background response the events come from, one for
    /// one, when the request asked for one.
    track: Option<Track>,
}

impl Flow {
    /// What this run's events are stamped with, for stream `id`.
    fn stamp_as<'a>(&self, id: &'a str) -> Stamp<'a> {
        Stamp {
            id,
            background: self.background,
        }
    }
}

/// An SSE event name as stored (none for the default `message`).
fn stored_name(name: Option<&[u8]>) -> Option<Box<str>> {
    match name {
        None | Some(b"") | Some(b"message") => None,
        Some(other) => Some(String::from_utf8_lossy(other).into()),
    }
}

/// The body of one continuation request.
fn leg_body(body: &serde_json::Value) -> Bytes {
    Bytes::from(body.to_string())
}

/// A provider's 4xx that asking again the same way would get again.
fn is_final_refusal(status: StatusCode) -> bool {
    status.is_client_error() && !matches!(status.as_u16(), 408 | 409 | 429)
}

/// What a provider's error body says, for logs and the client.
fn provider_message(protocol: Protocol, body: &Bytes) -> String {
    let parsed = serde_json::from_slice::<serde_json::Value>(body).ok();
    match parsed.and_then(|v| protocol.wire().error_message(&v)) {
        Some(message) => message,
        None => {
            let text = String::from_utf8_lossy(body);
            text.chars().take(300).collect()
        }
    }
}

/// Writing a new stream's record (and taking its lease), which the pump
/// does while it waits for the provider's head.
pub type Recording = std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// The response header naming the upstream that answered first (a failover
/// later says so in-band, in an SSE comment: [`LiveStream::note_upstream`]).
const UPSTREAM_HEADER: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-tidegate-upstream");

pub struct Pump {
    pub live: Arc<LiveStream>,
    pub upstream: Arc<Upstream>,
    pub protocol: Protocol,
    pub body: Bytes,
    /// What of the client's headers goes to the provider.
    pub client_headers: HeaderMap,
    /// The request declares tools: tool calls are held until whole.
    pub tools: bool,
    /// Set for a continuation.
    pub continued: Option<Continued>,
    /// What routing needs to move the stream to another upstream.
    pub route: Route,
    /// When the current request was sent.
    pub sent_at: tokio::time::Instant,
    /// Times this run moved to another upstream mid-answer.
    pub failovers: u32,
    /// This run's spans, when traces are exported.
    pub trace: Option<Box<RunTrace>>,
    /// Set for a run that re-attaches to the provider's own background
    /// response instead of sending `body` (`relay/reattach.rs`).
    pub attach: Option<Reattach>,
    /// The request just sent asked for a provider background response.
    pub sent_background: bool,
    pub relay: Arc<Relay>,
}

/// A stream's routing facts: its model, route key and original request.
pub struct Route {
    pub model: Box<str>,
    /// The client's route key (`x-tidegate-route-key`, else the body's
    /// user): the same key, the same upstream.
    pub key: Option<Box<str>>,
    /// The client's request, as it sent it (what a continuation plans from).
    pub original: Bytes,
    /// The client presented its own provider credential (the upstream has
    /// none): it is never sent to another upstream.
    pub pinned: bool,
    /// The upstream answering is not the one the stream's record names
    /// (where a continuation goes): set when the stream moves.
    pub moved: bool,
}

impl Pump {
    /// Run the stream. `recording`: a new stream's record, still being
    /// written. The provider is asked in the meantime (the two waits overlap
    /// instead of adding up); nothing is relayed before the record is there,
    /// and a failed write drops the provider call.
    ///
    /// Boxed (benches/OPTIMISATIONS.md, "Held streams"): an async fn keeps
    /// its by-value `self` twice in its state, once as the argument and once
    /// moved into the body.
    pub async fn run(mut self: Box<Self>, started: Started, recording: Option<Recording>) {
        self.relay.metrics.upstream_requests.inc();
        let first = if self.continued.is_some() {
            "continuation"
        } else {
            "first"
        };
        let sent = self.send_cancellable(recording, first).await;
        let sent = self.retried(sent).await;
        let sent = self.fallen_back(sent).await;
        let response = match self.check_stream(sent) {
            Ok(r) => r,
            Err(e) => return self.start_failed(e, started).await,
        };
        self.record_upstream().await;
        let track = self.track();
        let mut started = Some(started);
        let mut flow = Flow {
            seq: self.live.base,
            hold: self.tools.then(|| self.protocol.wire().hold()),
            splice: self.continued.as_mut().and_then(|c| c.splice.take()),
            more_legs: self.continued.as_ref().is_some_and(|c| !c.legs.is_empty()),
            first_event: Some(self.sent_at),
            ttft: None,
            released: Vec::new(),
            spliced: Vec::new(),
            stamp: self.protocol.wire().stamps(),
            background: self.protocol == Protocol::OpenAiResponses
                && crate::protocol::responses::asks_background(&self.route.original),
            track,
        };
        let mut headers = response.headers;
        if let Some(name) = &self.upstream.name_header {
            headers.insert(UPSTREAM_HEADER, name.clone());
        }
        self.live.set_headers(headers);
        let mut body = response.body;
        loop {
            let (stop, recorded) = self.relay(&mut body, &mut started, &mut flow).await;
            let end = match stop {
                Stop::End(End::Abort(AbortKind::UpstreamFailed)) => {
                    // Boxed: rare, and inline it would be the largest state.
                    match Box::pin(self.failover(&mut flow, recorded)).await {
                        Some(next) => {
                            body = next;
                            continue;
                        }
                        None => End::Abort(AbortKind::UpstreamFailed),
                    }
                }
                Stop::End(end) => end,
                Stop::NextLeg => match self.next_leg(&mut flow).await {
                    Ok(next) => {
                        body = next;
                        continue;
                    }
                    Err(end) => end,
                },
            };
            announce(&mut started);
            self.outcome(end, flow.ttft);
            self.let_go(end, &flow).await;
            self.finish(end, None, recorded).await;
            if end == End::Done {
                // The answer is complete and its clients told; what follows
                // `[DONE]` is the body's framing. Reading it lets the
                // connection serve the next stream.
                tokio::select! {
                    _ = self.live.token.cancelled() => {}
                    _ = body.finish(AFTER_DONE) => {}
                }
            }
            return;
        }
    }

    /// Count how this upstream's request ended, and what it says about its
    /// health.
    fn outcome(&self, end: End, ttft: Option<std::time::Duration>) {
        use crate::upstream::canary::Outcome as Verdict;
        let upstream = &self.upstream;
        let (outcome, verdict) = match end {
            End::Done => {
                let duration = self.sent_at.elapsed();
                upstream.stats.duration.observe(duration);
                upstream.health.success();
                let ttft = ttft.unwrap_or(duration);
                (Outcome::Completed, Verdict::Success { ttft, duration })
            }
            End::Abort(AbortKind::UpstreamFailed) => {
                upstream.failed("it failed mid-answer");
                (Outcome::Failed, Verdict::Error { ttft })
            }
            End::Abort(AbortKind::UpstreamRejected) => (Outcome::Rejected, Verdict::Neutral),
            End::Abort(_) => (Outcome::Cancelled, Verdict::Neutral),
        };
        upstream.stats.outcome(outcome);
        self.judged(verdict);
    }

    /// Tell a canary judging this upstream how its request went.
    fn judged(&self, verdict: crate::upstream::canary::Outcome) {
        if matches!(verdict, crate::upstream::canary::Outcome::Neutral) {
            return;
        }
        for rollout in self.relay.upstreams.rollouts() {
            rollout.record(&self.upstream, verdict);
        }
    }

    /// Count a request that did not start.
    fn start_outcome(&self, error: &StartError) {
        let upstream = &self.upstream;
        let outcome = match error {
            StartError::Upstream(e) if e.provider_fault() => {
                upstream.failed("it failed before answering");
                self.judged(crate::upstream::canary::Outcome::Error { ttft: None });
                Outcome::Failed
            }
            StartError::Upstream(_) => Outcome::Rejected,
            StartError::NotAStream { .. } => {
                upstream.failed("it answered without an event stream");
                self.judged(crate::upstream::canary::Outcome::Error { ttft: None });
                Outcome::Failed
            }
            StartError::Cancelled(_) => Outcome::Cancelled,
            StartError::Store(_) => return,
        };
        upstream.stats.outcome(outcome);
    }

    /// Send again, with backoff and jitter, what failed before any byte of
    /// an answer where the provider did not start it
    /// ([`UpstreamError::not_started`]) — on another upstream of the group
    /// when there is one (a continuation, or a request with the client's
    /// own key, stays on its upstream). Bounded by `routing.attempts` and
    /// `routing.retry_within`; a `Retry-After` is honoured, and ends the
    /// retries when it points past the budget.
    async fn retried(
        &mut self,
        mut sent: Result<StreamResponse, StartError>,
    ) -> Result<StreamResponse, StartError> {
        let routing = self.relay.settings.routing;
        let began = tokio::time::Instant::now();
        let mut backoff = routing.backoff;
        let mut tried: Vec<String> = Vec::new();
        for _ in 1..routing.attempts {
            let Err(StartError::Upstream(error)) = &sent else {
                return sent;
            };
            if !error.not_started() {
                return sent;
            }
            let jittered = backoff
                .min(routing.max_backoff)
                .mul_f64(0.5 + rand::random::<f64>() * 0.5);
            let wait = error.retry_after().map_or(jittered, |ra| ra.max(jittered));
            if began.elapsed() + wait > routing.retry_within {
                return sent;
            }
            let failed = self.upstream.clone();
            let error = error.to_string();
            if let Err(e) = &sent {
                self.start_outcome(e);
            }
            failed.stats.retries.inc();
            tried.push(failed.config.name.clone());
            let next = if self.continued.is_some() || self.route.pinned {
                None
            } else {
                let exclude: Vec<&str> = tried.iter().map(String::as_str).collect();
                self.relay
                    .upstreams
                    .route(
                        &self.route.model,
                        self.protocol,
                        self.route.key.as_deref(),
                        &exclude,
                    )
                    .filter(|u| u.config.name != failed.config.name)
                    .cloned()
            };
            let next = next.unwrap_or(failed);
            tracing::warn!(stream = %self.live.who.id, upstream = %self.upstream.config.name, next = %next.config.name, %error, wait = ?wait, "the provider did not start the answer; sending the request again");
            let token = self.live.token.clone();
            tokio::select! {
                biased;
                _ = token.cancelled() => return Err(StartError::Cancelled(self.live.cancel_reason())),
                _ = tokio::time::sleep(wait) => {}
            }
            self.route.moved |= next.config.name != self.upstream.config.name;
            self.upstream = next;
            self.relay.metrics.upstream_requests.inc();
            sent = self.send_cancellable(None, "retry").await;
            backoff = backoff.mul_f64(routing.backoff_multiplier);
        }
        sent
    }

    /// A continuation the provider refused with a 400: the plan in the
    /// next style, once. A re-attach to the provider's background response
    /// it refused (a 4xx: it no longer has it): the continuation instead.
    async fn fallen_back(
        &mut self,
        sent: Result<StreamResponse, StartError>,
    ) -> Result<StreamResponse, StartError> {
        let Err(StartError::Upstream(UpstreamError::Status { status, body, .. })) = &sent else {
            return sent;
        };
        let reattached = self.attach.is_some();
        if !(*status == StatusCode::BAD_REQUEST || (reattached && is_final_refusal(*status))) {
            return sent;
        }
        let Some((style, legs)) = self.continued.as_mut().and_then(|c| c.fallback.take()) else {
            return sent;
        };
        let said = provider_message(self.protocol, body);
        let (stream, upstream) = (&self.live.who.id, &self.upstream.config.name);
        if reattached {
            // A 4xx to the re-attach: the provider no longer has the
            // response (or will not stream it); the answer is continued.
            tracing::warn!(stream = %stream, upstream = %upstream, %status, provider_said = %said, "the provider cannot stream its background response again; continuing the answer instead");
            self.attach = None;
            self.relay.metrics.continuations.inc();
            self.record_reattach(None).await;
        } else {
            let refused = self.continued.as_ref().map_or("", |c| c.style.as_str());
            tracing::warn!(stream = %stream, upstream = %upstream, refused, next = style.as_str(), provider_said = %said, "the provider refused this continuation style (400); falling back to the next, once");
            self.relay.metrics.continuation_fallbacks.inc();
        }
        let mut legs: VecDeque<Leg> = legs.into();
        if let (Some(first), Some(continued)) = (legs.pop_front(), self.continued.as_mut()) {
            continued.style = style;
            continued.splice = Some(first.splice);
            continued.legs = legs;
            self.body = leg_body(&first.body);
            self.relay.metrics.upstream_requests.inc();
            let why = if reattached {
                "continuation"
            } else {
                "fallback"
            };
            return self.send_cancellable(None, why).await;
        }
        sent
    }

    /// The provider failed mid-answer: continue the stream on another
    /// upstream of its group, so its clients see one answer. `None` when it
    /// cannot (no failover left, no other healthy upstream, the client's own
    /// key, nothing to continue, or the other upstream did not start).
    async fn failover(&mut self, flow: &mut Flow, recorded: bool) -> Option<StreamBody> {
        let relay = self.relay.clone();
        if self.failovers >= relay.settings.routing.max_failovers
            || self.route.pinned
            || !self.live.who.continuable
            || self.live.token.is_cancelled()
        {
            return None;
        }
        let failed = self.upstream.clone();
        let model = self.route.model.clone();
        let next = relay
            .upstreams
            .route(
                &model,
                self.protocol,
                self.route.key.as_deref(),
                &[failed.config.name.as_str()],
            )
            .filter(|u| {
                u.config.name != failed.config.name && u.health.available() && u.continues(&model)
            })?
            .clone();
        let id = self.live.who.id.clone();
        let events = relay.store.events_after(&id, 0).await.ok()?;
        let original: serde_json::Value = serde_json::from_slice(&self.route.original).ok()?;
        let wire = self.protocol.wire();
        let partial = wire.partial(&events);
        let styles = next.styles(&model);
        let style = *styles.first()?;
        let Plan::Continue(mut legs) = wire.continuation(&original, style, &partial) else {
            return None;
        };
        if legs.is_empty() {
            return None;
        }
        let fallback = styles.get(1).and_then(|&next_style| {
            match wire.continuation(&original, next_style, &partial) {
                Plan::Continue(legs) => Some((next_style, legs)),
                _ => None,
            }
        });
        self.outcome(End::Abort(AbortKind::UpstreamFailed), flow.ttft);
        // The stream goes on elsewhere: the provider's background response,
        // if it was one, is not wanted any more.
        if let Some(track) = flow.track.take()
            && let Some(response) = track.response()
        {
            relay.cancel_provider_response(&failed, response, &self.client_headers);
            self.record_reattach(None).await;
        }
        if let Some(trace) = &mut self.trace {
            trace.attempt_failed(format!("{}: failed mid-answer", failed.config.name));
        }
        failed.stats.failovers.inc();
        relay.metrics.failovers.inc();
        tracing::warn!(alert = "failover", stream = %id, from = %failed.config.name, to = %next.config.name, after = partial.last_seq, style = style.as_str(), "the provider failed mid-answer; the stream goes on on another upstream");
        if recorded
            && let Err(e) = relay
                .store
                .set_status(&id, crate::stream::Status::Running, None, &relay.instance)
                .await
        {
            tracing::error!(stream = %id, error = %e, "could not record the failover");
            return None;
        }
        self.failovers += 1;
        self.route.moved = true;
        self.upstream = next;
        let first = legs.remove(0);
        self.body = leg_body(&first.body);
        flow.more_legs = !legs.is_empty();
        flow.splice = Some(first.splice);
        // What the hold kept back was never sent: the continuation says it again.
        flow.hold = self.tools.then(|| wire.hold());
        self.continued = Some(Continued {
            splice: None,
            legs: legs.into(),
            style,
            fallback,
            refused: None,
        });
        self.live.clear_detail();
        self.live
            .note_upstream(self.live.last_seq() + 1, &self.upstream.config.name);
        relay.metrics.upstream_requests.inc();
        let sent = self.send_cancellable(None, "failover").await;
        let sent = self.fallen_back(sent).await;
        flow.first_event = Some(self.sent_at);
        flow.ttft = None;
        match self.check_stream(sent) {
            Ok(r) => {
                self.record_upstream().await;
                Some(r.body)
            }
            Err(e) => {
                self.start_outcome(&e);
                tracing::warn!(stream = %id, upstream = %self.upstream.config.name, error = ?e, "the failover's request did not start");
                None
            }
        }
    }

    /// The upstream answering is not the one the record names (a retry went
    /// elsewhere, a failover, a continuation routed anew): record it, so a
    /// continuation after a restart goes where the answer is being made.
    async fn record_upstream(&mut self) {
        if !self.route.moved {
            return;
        }
        let name = &self.upstream.config.name;
        let relay = &self.relay;
        match relay
            .store
            .set_upstream(&self.live.who.id, name, &relay.instance)
            .await
        {
            Ok(()) => self.route.moved = false,
            Err(e) => {
                relay.metrics.store_errors.inc();
                tracing::warn!(stream = %self.live.who.id, upstream = %name, error = %e, "could not record the stream's new upstream");
            }
        }
    }

    /// Record which provider background response the stream's events come
    /// from (none: a cut is continued, not re-attached). A failed write
    /// only costs the re-attach: the stream is continued instead.
    async fn record_reattach(&self, reattach: Option<&Reattach>) {
        let relay = &self.relay;
        let id = &self.live.who.id;
        if let Err(e) = relay
            .store
            .set_reattach(id, reattach, &relay.instance)
            .await
        {
            relay.metrics.store_errors.inc();
            tracing::warn!(stream = %id, error = %e, "could not record the provider's background response");
        }
    }

    /// Send the request unless the stream is cancelled first. `why`: what
    /// this request is, for its span. Boxed (benches/OPTIMISATIONS.md,
    /// "Held streams"): the send's state (3.2 KiB) is over once the head is
    /// in, and inline it would size the pump's task for the stream's life.
    fn send_cancellable(
        &mut self,
        recording: Option<Recording>,
        why: &'static str,
    ) -> std::pin::Pin<Box<impl Future<Output = Result<StreamResponse, StartError>> + Send + '_>>
    {
        Box::pin(self.send_cancellable_inline(recording, why))
    }

    async fn send_cancellable_inline(
        &mut self,
        recording: Option<Recording>,
        why: &'static str,
    ) -> Result<StreamResponse, StartError> {
        self.sent_at = tokio::time::Instant::now();
        self.upstream.stats.requests.inc();
        if let Some(trace) = &mut self.trace {
            trace.attempt(&self.upstream.config.name, why, &mut self.client_headers);
        }
        let body = self.outgoing();
        self.sent_background = body.is_some();
        let body = body.unwrap_or_else(|| self.body.clone());
        let token = self.live.token.clone();
        let sent = tokio::select! {
            biased;
            _ = token.cancelled() => Err(StartError::Cancelled(self.live.cancel_reason())),
            r = self.send_recorded(recording, body) => r,
        };
        if let (Err(e), Some(trace)) = (&sent, &mut self.trace) {
            let detail = match e {
                StartError::Upstream(e) => e.to_string(),
                StartError::NotAStream { content_type, .. } => {
                    format!("not an event stream: {content_type}")
                }
                StartError::Cancelled(kind) => kind.as_str().to_owned(),
                StartError::Store(e) => format!("store: {e}"),
            };
            trace.attempt_failed(detail);
        }
        sent
    }

    /// A 2xx answer is only a stream when it says it is one.
    fn check_stream(
        &self,
        sent: Result<StreamResponse, StartError>,
    ) -> Result<StreamResponse, StartError> {
        let r = sent?;
        if is_event_stream(r.content_type.as_ref()) {
            return Ok(r);
        }
        let content_type = r
            .content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no content type");
        Err(StartError::NotAStream {
            upstream: self.upstream.config.name.clone(),
            content_type: content_type.to_owned(),
        })
    }

    /// Send the continuation's next request (the next unfinished choice);
    /// the stream's end when it cannot start.
    async fn next_leg(&mut self, flow: &mut Flow) -> Result<StreamBody, End> {
        let Some(leg) = self.continued.as_mut().and_then(|c| c.legs.pop_front()) else {
            return Err(End::Done);
        };
        self.body = leg_body(&leg.body);
        flow.splice = Some(leg.splice);
        flow.more_legs = self.continued.as_ref().is_some_and(|c| !c.legs.is_empty());
        self.relay.metrics.upstream_requests.inc();
        let sent = self.send_cancellable(None, "next_leg").await;
        flow.first_event = Some(self.sent_at);
        flow.ttft = None;
        match self.check_stream(sent) {
            Ok(r) => Ok(r.body),
            Err(e) => {
                self.start_outcome(&e);
                Err(self.continuation_failed(&e))
            }
        }
    }

    /// A re-attach the provider refused for good, where the stored events
    /// need only their end or cannot be continued ([`Refused`]): the end,
    /// its status, and whether it is recorded. `None` for anything else.
    async fn refused_reattach(
        &mut self,
        error: &StartError,
    ) -> Option<(End, Option<Status>, bool)> {
        let StartError::Upstream(UpstreamError::Status { status, body, .. }) = error else {
            return None;
        };
        if self.attach.is_none() || !is_final_refusal(*status) {
            return None;
        }
        let refused = self.continued.as_mut()?.refused.take()?;
        let said = provider_message(self.protocol, body);
        let (stream, upstream) = (&self.live.who.id, &self.upstream.config.name);
        tracing::warn!(stream = %stream, upstream = %upstream, %status, provider_said = %said, "the provider cannot stream its background response again, and the answer needs no continuation or cannot have one");
        self.attach = None;
        self.record_reattach(None).await;
        match refused {
            Refused::Close(events) if events.is_empty() => {
                Some((End::Done, Some(Status::Completed), false))
            }
            Refused::Close(events) => {
                let relay = &self.relay;
                let written = relay
                    .store
                    .append_final(
                        &self.live.who.id,
                        &events,
                        Status::Completed,
                        None,
                        &relay.instance,
                    )
                    .await;
                if let Err(e) = written {
                    tracing::error!(stream = %self.live.who.id, error = %e, "could not record the end of the answer");
                    relay.metrics.store_errors.inc();
                    return Some((End::Abort(AbortKind::StoreFailed), None, false));
                }
                relay.metrics.events_relayed.add(events.len() as u64);
                self.live.push(events);
                Some((End::Done, Some(Status::Completed), true))
            }
            Refused::Incomplete(why) => {
                if let Some(why) = why {
                    self.live.set_detail(why);
                }
                Some((
                    End::Abort(AbortKind::Incomplete),
                    Some(Status::Failed),
                    false,
                ))
            }
        }
    }

    /// How a continuation request that did not start ends the stream: a
    /// provider's 4xx is final (with its message), anything else can be
    /// tried again.
    fn continuation_failed(&self, error: &StartError) -> End {
        let kind = match error {
            StartError::Cancelled(kind) => return End::Abort(*kind),
            StartError::Store(_) => return End::Abort(AbortKind::StoreFailed),
            StartError::Upstream(UpstreamError::Status { status, body, .. })
                if is_final_refusal(*status) =>
            {
                let message = provider_message(self.protocol, body);
                tracing::warn!(stream = %self.live.who.id, upstream = %self.upstream.config.name, %status, provider_said = %message, "the provider refused the continuation; ending the stream");
                self.live.set_detail(format!("{status}: {message}"));
                AbortKind::UpstreamRejected
            }
            other => {
                tracing::warn!(stream = %self.live.who.id, upstream = %self.upstream.config.name, error = ?other, "the continuation request failed");
                AbortKind::UpstreamFailed
            }
        };
        self.relay.metrics.upstream_errors.inc();
        End::Abort(kind)
    }

    /// The body of a request that asks the provider for a background
    /// response of its own (an `openai_responses` upstream with
    /// `provider_background`; not a continuation's re-ask, whose events are
    /// spliced, nor a request that asked not to be stored).
    fn outgoing(&self) -> Option<Bytes> {
        let splices = self.continued.as_ref().is_some_and(|c| c.splice.is_some());
        if self.protocol != Protocol::OpenAiResponses
            || !self.upstream.config.provider_background
            || self.attach.is_some()
            || splices
        {
            return None;
        }
        crate::protocol::responses::provider_background(&self.body)
    }

    /// What watches this run's events: the provider's background response
    /// it re-attached to, or the one it asked for.
    fn track(&mut self) -> Option<Track> {
        match self.attach.take() {
            Some(reattach) => Some(Track::attached(reattach)),
            None => self.sent_background.then(Track::new),
        }
    }

    /// A run in the provider's background response that ends for any
    /// reason but the drain deadline or the provider's own failure (after
    /// which it is re-attached): cancel the response, which dropping the
    /// connection no longer does — a client gone is an upstream dropped.
    async fn let_go(&self, end: End, flow: &Flow) {
        let Some(response) = flow.track.as_ref().and_then(Track::response) else {
            return;
        };
        if matches!(
            end,
            End::Done | End::Abort(AbortKind::ServerRestarting | AbortKind::UpstreamFailed)
        ) {
            return;
        }
        self.relay
            .cancel_provider_response(&self.upstream, response, &self.client_headers);
        // A resume after this is a continuation, not a re-attach.
        self.record_reattach(None).await;
    }

    /// Ask the provider while the record is written; both must succeed.
    async fn send_recorded(
        &self,
        recording: Option<Recording>,
        body: Bytes,
    ) -> Result<StreamResponse, StartError> {
        let send = async {
            match &self.attach {
                Some(reattach) => {
                    let after = reattach.starting_after(self.live.base);
                    self.upstream
                        .reattach_stream(&reattach.response, after, &self.client_headers)
                        .await
                }
                None => self.upstream.open_stream(body, &self.client_headers).await,
            }
        };
        // Pinned before either branch: one place for the send's state in
        // this future, not one per branch (rustc lays them out apart).
        tokio::pin!(send);
        let Some(mut recording) = recording else {
            return send.await.map_err(StartError::Upstream);
        };
        tokio::select! {
            recorded = &mut recording => match recorded {
                Ok(()) => send.await.map_err(StartError::Upstream),
                Err(e) => Err(StartError::Store(e)),
            },
            sent = &mut send => {
                // The record must exist before anything (an event, the
                // stream's end) is written about it.
                recording.await.map_err(StartError::Store)?;
                sent.map_err(StartError::Upstream)
            }
        }
    }

    async fn start_failed(&mut self, error: StartError, started: Started) {
        self.start_outcome(&error);
        if let Some((end, status, recorded)) = self.refused_reattach(&error).await {
            let _ = started.send(Err(error));
            return self.finish(end, status, recorded).await;
        }
        if self.continued.is_some() {
            // Nobody waits on a continuation's start: its clients learn
            // in-band. A 4xx is final; anything else stays resumable.
            let end = self.continuation_failed(&error);
            let _ = started.send(Err(error));
            let status = match end {
                End::Abort(AbortKind::UpstreamRejected) => None,
                _ => Some(Status::Interrupted),
            };
            return self.finish(end, status, false).await;
        }
        let kind = match &error {
            StartError::Cancelled(kind) => *kind,
            StartError::Store(_) => {
                self.relay.metrics.store_errors.inc();
                AbortKind::StoreFailed
            }
            _ => {
                self.relay.metrics.upstream_errors.inc();
                AbortKind::UpstreamFailed
            }
        };
        let _ = started.send(Err(error));
        // A first request that never started is over: its client got an
        // error status.
        self.finish(End::Abort(kind), Some(Status::Failed), false)
            .await;
    }

    /// Relay until the stream ends. `started` is answered once the first
    /// event is published (or the stream ended, or [`FIRST_EVENT_HOLD`]
    /// passed), so the handler's response head and the first event go to
    /// the client in one write.
    /// Returns how the stream ended and whether that end is already
    /// recorded (written with the last events).
    async fn relay(
        &self,
        body: &mut StreamBody,
        started: &mut Option<Started>,
        flow: &mut Flow,
    ) -> (Stop, bool) {
        let idle = self.upstream.config.idle_timeout;
        let hold = tokio::time::sleep(FIRST_EVENT_HOLD);
        tokio::pin!(hold);
        let token = &self.live.token;
        let limits = &self.relay.settings.limits;
        let mut decoder = SseDecoder::with_limits(limits.max_event_bytes, limits.max_answer_bytes);
        let stall = tokio::time::sleep(idle);
        tokio::pin!(stall);
        let mut last_read = tokio::time::Instant::now();
        let mut body_done = false;
        let mut failure: Option<ReadError> = None;
        // Grown as bursts need it, never reserved up front: a held stream
        // batches one event at a time (benches/OPTIMISATIONS.md, "held streams").
        let mut batch: Vec<Event> = Vec::new();
        loop {
            // Number every event decoded so far: one store write and one
            // wake-up for the lot (a read brings a whole burst).
            let mut step = None;
            let mut full = false;
            let mut alive = false;
            while let Some(event) = decoder.next_event() {
                alive = true;
                step = self.step(Some(Ok(event)), flow, &mut batch);
                full = batch.len() >= MAX_BATCH;
                if step.is_some() || full {
                    break;
                }
            }
            // Only an event counts as the provider being alive: a byte a
            // second, or `: keepalive` comments, do not.
            if alive {
                last_read = tokio::time::Instant::now();
            }
            // A line, an event or the answer past its limit: the decoder
            // took nothing more, and the stream ends here.
            if step.is_none()
                && !full
                && failure.is_none()
                && let Some(overflow) = decoder.overflow()
            {
                failure = Some(ReadError::TooLarge(overflow));
            }
            // The body's end or failure counts once what came before it is in.
            if step.is_none() && !full {
                if let Some(failure) = failure.take() {
                    step = self.step(Some(Err(failure)), flow, &mut batch);
                } else if body_done {
                    step = self.step(None, flow, &mut batch);
                }
            }
            // Whether the end went into the store with the last batch.
            let mut recorded = false;
            if !batch.is_empty() {
                let store = &self.relay.store;
                let id = &self.live.who.id;
                if let Some(change) = flow.track.as_mut().and_then(Track::take_change) {
                    self.record_reattach(change.as_ref()).await;
                }
                // The last batch carries the stream's end: one store write.
                let write = async {
                    match step {
                        Some(Stop::End(end)) => {
                            let (status, reason) = self.recorded_end(end, None);
                            store
                                .append_final(
                                    id,
                                    &batch,
                                    status,
                                    reason.as_deref(),
                                    &self.relay.instance,
                                )
                                .await
                        }
                        _ => store.append(id, &batch).await,
                    }
                };
                let written = tokio::select! {
                    biased;
                    _ = token.cancelled() => return (Stop::End(End::Abort(self.live.cancel_reason())), false),
                    r = write => r,
                };
                if let Err(e) = written {
                    tracing::error!(stream = %self.live.who.id, error = %e, "store write failed; ending the stream");
                    self.relay.metrics.store_errors.inc();
                    return (Stop::End(End::Abort(AbortKind::StoreFailed)), false);
                }
                self.relay.metrics.events_relayed.add(batch.len() as u64);
                self.upstream.stats.events.add(batch.len() as u64);
                if self.live.subscribers() == 0 {
                    self.upstream.stats.unattended.add(batch.len() as u64);
                }
                if let Some(at) = flow.first_event.take() {
                    let ttft = at.elapsed();
                    self.upstream.stats.ttft.observe(ttft);
                    flow.ttft = Some(ttft);
                }
                self.live.push(batch.drain(..));
                announce(started);
                recorded = matches!(step, Some(Stop::End(_)));
            }
            if let Some(stop) = step {
                return (stop, recorded);
            }
            if full {
                continue;
            }
            // Rule: the read is polled before the timers, so a read that is
            // ready at once registers no timer (benches/OPTIMISATIONS.md,
            // "timers after reads").
            let read = tokio::select! {
                biased;
                _ = token.cancelled() => return (Stop::End(End::Abort(self.live.cancel_reason())), false),
                read = body.read(&mut decoder) => read.map_err(ReadError::Failed),
                _ = &mut hold, if started.is_some() => {
                    announce(started);
                    continue;
                }
                _ = &mut stall => {
                    // Rule: one stall timer per stream, moved only when it
                    // fires, never reset per read.
                    let quiet_until = last_read + idle;
                    if tokio::time::Instant::now() < quiet_until {
                        stall.as_mut().reset(quiet_until);
                        continue;
                    }
                    Err(ReadError::Stalled)
                }
            };
            match read {
                Ok(done) => body_done = done,
                Err(e) => failure = Some(e),
            }
        }
    }

    /// Take one item of the provider's stream: number what of it goes to
    /// the client into `batch` (through the splice of a continuation and
    /// the hold), or say how the stream ends.
    fn step(
        &self,
        next: Option<Result<SseEvent, ReadError>>,
        flow: &mut Flow,
        batch: &mut Vec<Event>,
    ) -> Option<Stop> {
        let failed = |what: &str, detail: String| {
            tracing::warn!(stream = %self.live.who.id, upstream = %self.upstream.config.name, error = %detail, "{what}");
            self.relay.metrics.upstream_errors.inc();
            Some(Stop::End(End::Abort(AbortKind::UpstreamFailed)))
        };
        let event = match next {
            None => {
                return failed(
                    "upstream closed the stream before it finished",
                    String::new(),
                );
            }
            Some(Err(ReadError::Stalled)) => {
                return failed(
                    "upstream stalled mid-stream",
                    format!("no event for {:?}", self.upstream.config.idle_timeout),
                );
            }
            Some(Err(ReadError::Failed(e))) => {
                return failed("upstream failed mid-stream", e.to_string());
            }
            Some(Err(ReadError::TooLarge(overflow))) => {
                return failed(
                    "upstream sent more than the limits allow",
                    overflow.to_string(),
                );
            }
            Some(Ok(event)) => event,
        };
        let wire = self.protocol.wire();
        let terminal = wire.terminal(&event);
        if terminal == Some(Terminal::Sentinel) {
            // Nothing held is lost at a clean end.
            if let Some(hold) = &mut flow.hold {
                hold.release_all(&mut flow.released);
            }
            self.number(flow, batch);
            return Some(if flow.more_legs {
                Stop::NextLeg
            } else {
                Stop::End(End::Done)
            });
        }
        if let Some(error) = wire.provider_error(&event) {
            tracing::warn!(stream = %self.live.who.id, upstream = %self.upstream.config.name, provider_said = %error.message, "the provider sent an error mid-stream");
            self.relay.metrics.upstream_errors.inc();
            self.live.set_detail(error.message);
            let kind = if error.resumable {
                AbortKind::UpstreamFailed
            } else {
                AbortKind::UpstreamRejected
            };
            return Some(Stop::End(End::Abort(kind)));
        }
        if flow.splice.is_none() && flow.hold.is_none() {
            // Most streams: every event goes to the client as it comes.
            flow.seq += 1;
            let name = stored_name(event.name.as_deref());
            if let Some(track) = &mut flow.track {
                track.observe(flow.seq, name.as_deref(), &event.data);
            }
            let data = if flow.stamp {
                wire.stamp(
                    &flow.stamp_as(&self.live.who.id),
                    flow.seq,
                    name.as_deref(),
                    event.data,
                )
            } else {
                event.data
            };
            batch.push(Event {
                seq: flow.seq,
                name,
                data,
            });
            return terminal.map(|_| Stop::End(End::Done));
        }
        let released = &mut flow.released;
        let mut offer = |event: SseEvent| match &mut flow.hold {
            Some(hold) => hold.offer(event, released),
            None => released.push(event),
        };
        match &mut flow.splice {
            Some(splice) => {
                splice.event(event, &mut flow.spliced);
                for (name, data) in flow.spliced.drain(..) {
                    let name = name.map(|n| Bytes::from(String::from(n)));
                    offer(SseEvent { name, data });
                }
            }
            None => offer(event),
        }
        if let Some(hold) = &mut flow.hold
            && hold.held_bytes() > MAX_HELD
        {
            tracing::warn!(stream = %self.live.who.id, "a tool call is too large to hold back; relaying it as it comes (a cut inside it cannot be continued)");
            hold.release_all(&mut flow.released);
        }
        self.number(flow, batch);
        terminal.map(|_| Stop::End(End::Done))
    }

    /// Number what the hold released into `batch`.
    fn number(&self, flow: &mut Flow, batch: &mut Vec<Event>) {
        let wire = self.protocol.wire();
        let to = flow.stamp_as(&self.live.who.id);
        for event in flow.released.drain(..) {
            flow.seq += 1;
            let name = stored_name(event.name.as_deref());
            if let Some(track) = &mut flow.track {
                track.observe(flow.seq, name.as_deref(), &event.data);
            }
            let data = if flow.stamp {
                wire.stamp(&to, flow.seq, name.as_deref(), event.data)
            } else {
                event.data
            };
            batch.push(Event {
                seq: flow.seq,
                name,
                data,
            });
        }
    }

    /// The status and reason `end` is recorded with (`status` overrides the
    /// status): a cut on an upstream that cannot continue is final, and the
    /// reason carries what the client was told.
    fn recorded_end(&self, end: End, status: Option<Status>) -> (Status, Option<String>) {
        let (ended, kind) = Status::of_end(end);
        let mut status = status.unwrap_or(ended);
        if status == Status::Interrupted && !self.live.who.continuable {
            status = Status::Failed;
        }
        let reason = match (kind, self.live.detail()) {
            (Some(kind), Some(detail)) => Some(format!("{kind}: {detail}")),
            (kind, _) => kind.map(str::to_owned),
        };
        (status, reason)
    }

    /// Every exit: record the status (unless `recorded` with the last
    /// events), release the lease, wake subscribers.
    /// `status` overrides the status `end` is recorded with.
    async fn finish(&mut self, end: End, status: Option<Status>, recorded: bool) {
        if let Some(trace) = &mut self.trace {
            let name = match end {
                End::Done => "done",
                End::Abort(kind) => kind.as_str(),
            };
            let events = self.live.last_seq().saturating_sub(self.live.base);
            trace.end(name, events, end == End::Done);
        }
        let (status, reason) = self.recorded_end(end, status);
        let id = &self.live.who.id;
        // A run that ended for good, or said something new, restarts the
        // count of continuations in a row.
        if self.continued.is_some()
            && (status != Status::Interrupted || self.live.last_seq() > self.live.base)
        {
            self.relay.progressed(id);
        }
        if !recorded
            && let Err(e) = self
                .relay
                .store
                .set_status(id, status, reason.as_deref(), &self.relay.instance)
                .await
        {
            tracing::error!(stream = %id, error = %e, "could not record the stream's end");
            self.relay.metrics.store_errors.inc();
        }
        if let Err(e) = self
            .relay
            .store
            .release_lease(id, &self.relay.instance)
            .await
        {
            tracing::warn!(stream = %id, error = %e, "could not release the stream's lease");
        }
        // Out of the registry first: a client that reacts to the end at once
        // must find the stored status, not this finished run.
        self.relay.registry.remove(&self.live);
        self.live.finish(end);
        self.relay.metrics.stream_ended(end);
        tracing::debug!(stream = %id, status = status.as_str(), "stream ended");
    }
}
