//! The pump: the only task that talks to the provider for a stream.
//!
//! It sends the request, reads the provider's SSE events, numbers them,
//! writes each to the store and only then publishes it to the stream's
//! subscribers. Three inputs can stop it — the provider (done, failed,
//! stalled), the stream's token (every client gone, `DELETE`, the drain
//! deadline) and the store (a failed write) — and every way out goes through
//! [`Pump::finish`], which records the status and wakes the subscribers.

use std::sync::Arc;

use axum::http::HeaderMap;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::live::LiveStream;
use super::{Relay, RelayError};
use crate::protocol::sse::{Overflow, SseDecoder, SseEvent};
use crate::protocol::{Protocol, Terminal};
use crate::store::StoreError;
use crate::stream::{AbortKind, End, Event, Status};
use crate::upstream::{
    StreamBody, StreamResponse, TransportError, Upstream, UpstreamError, is_event_stream,
};

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

/// A continuation run: what its events take from the original.
pub struct Continued {
    /// The original's chunk id, given to continued chunks.
    pub chunk_id: Option<String>,
}

/// Writing a new stream's record (and taking its lease), which the pump
/// does while it waits for the provider's head.
pub type Recording = std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

pub struct Pump {
    pub live: Arc<LiveStream>,
    pub upstream: Arc<Upstream>,
    pub protocol: Protocol,
    pub body: Bytes,
    /// What of the client's headers goes to the provider.
    pub client_headers: HeaderMap,
    /// Set for a continuation.
    pub continued: Option<Continued>,
    pub relay: Arc<Relay>,
}

impl Pump {
    /// Run the stream. `recording`: a new stream's record, still being
    /// written. The provider is asked in the meantime (the two waits overlap
    /// instead of adding up); nothing is relayed before the record is there,
    /// and a failed write drops the provider call.
    pub async fn run(self, started: Started, recording: Option<Recording>) {
        let metrics = &self.relay.metrics;
        metrics.upstream_requests.inc();
        let token = self.live.token.clone();
        let sent = tokio::select! {
            biased;
            _ = token.cancelled() => Err(StartError::Cancelled(self.live.cancel_reason())),
            r = self.send_recorded(recording) => r,
        };
        let response = match sent {
            Ok(r) if is_event_stream(r.content_type.as_ref()) => r,
            Ok(r) => {
                let content_type = r
                    .content_type
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("no content type");
                let error = StartError::NotAStream {
                    upstream: self.upstream.config.name.clone(),
                    content_type: content_type.to_owned(),
                };
                return self.start_failed(error, started).await;
            }
            Err(e) => return self.start_failed(e, started).await,
        };
        let mut started = Some(started);
        let mut body = response.body;
        let (end, recorded) = self.relay(&mut body, &mut started).await;
        announce(&mut started);
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
    }

    /// Ask the provider while the record is written; both must succeed.
    async fn send_recorded(
        &self,
        recording: Option<Recording>,
    ) -> Result<StreamResponse, StartError> {
        let send = self
            .upstream
            .open_stream(self.body.clone(), &self.client_headers);
        let Some(mut recording) = recording else {
            return send.await.map_err(StartError::Upstream);
        };
        tokio::pin!(send);
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

    async fn start_failed(&self, error: StartError, started: Started) {
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
        // A first request that never started is over (its client got an
        // error status); a continuation stays resumable.
        let status = if self.continued.is_some() {
            Status::Interrupted
        } else {
            Status::Failed
        };
        self.finish(End::Abort(kind), Some(status), false).await;
    }

    /// Relay until the stream ends. `started` is answered once the first
    /// event is published (or the stream ended, or [`FIRST_EVENT_HOLD`]
    /// passed), so the handler's response head and the first event go to
    /// the client in one write.
    /// Returns how the stream ended and whether that end is already
    /// recorded (written with the last events).
    async fn relay(&self, body: &mut StreamBody, started: &mut Option<Started>) -> (End, bool) {
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
        let mut seq = self.live.base;
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
                step = self.step(Some(Ok(event)), &mut seq, &mut batch);
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
                    step = self.step(Some(Err(failure)), &mut seq, &mut batch);
                } else if body_done {
                    step = self.step(None, &mut seq, &mut batch);
                }
            }
            // Whether the end went into the store with the last batch.
            let mut recorded = false;
            if !batch.is_empty() {
                let store = &self.relay.store;
                let id = &self.live.who.id;
                // The last batch carries the stream's end: one store write.
                let write = async {
                    match step {
                        Some(end) => {
                            let (status, reason) = Status::of_end(end);
                            store
                                .append_final(id, &batch, status, reason, &self.relay.instance)
                                .await
                        }
                        None => store.append(id, &batch).await,
                    }
                };
                let written = tokio::select! {
                    biased;
                    _ = token.cancelled() => return (End::Abort(self.live.cancel_reason()), false),
                    r = write => r,
                };
                if let Err(e) = written {
                    tracing::error!(stream = %self.live.who.id, error = %e, "store write failed; ending the stream");
                    self.relay.metrics.store_errors.inc();
                    return (End::Abort(AbortKind::StoreFailed), false);
                }
                self.relay.metrics.events_relayed.add(batch.len() as u64);
                self.live.push(batch.drain(..));
                announce(started);
                recorded = step.is_some();
            }
            if let Some(end) = step {
                return (end, recorded);
            }
            if full {
                continue;
            }
            // Rule: the read is polled before the timers, so a read that is
            // ready at once registers no timer (benches/OPTIMISATIONS.md,
            // "timers after reads").
            let read = tokio::select! {
                biased;
                _ = token.cancelled() => return (End::Abort(self.live.cancel_reason()), false),
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

    /// Take one item of the provider's stream: number an event into
    /// `batch`, or say how the stream ends.
    fn step(
        &self,
        next: Option<Result<SseEvent, ReadError>>,
        seq: &mut u64,
        batch: &mut Vec<Event>,
    ) -> Option<End> {
        let failed = |what: &str, detail: String| {
            tracing::warn!(stream = %self.live.who.id, upstream = %self.upstream.config.name, error = %detail, "{what}");
            self.relay.metrics.upstream_errors.inc();
            Some(End::Abort(AbortKind::UpstreamFailed))
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
            return Some(End::Done);
        }
        if self.continued.is_some() && wire.skip_in_continuation(&event) {
            return None;
        }
        let name = match event.name.as_deref() {
            None | Some(b"") | Some(b"message") => None,
            Some(other) => Some(String::from_utf8_lossy(other).into()),
        };
        let data = match &self.continued {
            Some(continued) => wire.rewrite_continued(event.data, continued.chunk_id.as_deref()),
            None => event.data,
        };
        *seq += 1;
        batch.push(Event {
            seq: *seq,
            name,
            data,
        });
        terminal.map(|_| End::Done)
    }

    /// Every exit: record the status (unless `recorded` with the last
    /// events), release the lease, wake subscribers.
    /// `status` overrides the status `end` is recorded with.
    async fn finish(&self, end: End, status: Option<Status>, recorded: bool) {
        let (ended, reason) = Status::of_end(end);
        let status = status.unwrap_or(ended);
        let id = &self.live.who.id;
        if !recorded
            && let Err(e) = self
                .relay
                .store
                .set_status(id, status, reason, &self.relay.instance)
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
