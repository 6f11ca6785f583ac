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
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::event::{AbortKind, End, Event};
use super::live::{LiveStream, Registry};
use crate::config::Protocol;
use crate::metrics::Metrics;
use crate::store::{SharedStore, Status};
use crate::upstream::{Upstream, UpstreamError, continuation, error_chain, is_event_stream};

/// What every pump shares.
pub struct RelayContext {
    pub store: SharedStore,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// This process's id, recorded as the runner of its streams.
    pub instance: String,
}

/// Why a pump could not start relaying.
#[derive(Debug)]
pub enum StartError {
    Upstream(UpstreamError),
    /// The provider answered 200 but not with an event stream.
    NotAStream(String),
    /// The stream's token was cancelled first (drain deadline, client gone).
    Cancelled(AbortKind),
}

pub struct Pump {
    pub live: Arc<LiveStream>,
    pub upstream: Arc<Upstream>,
    pub protocol: Protocol,
    pub body: Bytes,
    pub client_headers: HeaderMap,
    /// Set for a continuation: the original chunk id to give new chunks.
    pub continuation: Option<Option<String>>,
    pub ctx: Arc<RelayContext>,
}

impl Pump {
    pub async fn run(self, started: oneshot::Sender<Result<(), StartError>>) {
        let metrics = &self.ctx.metrics;
        metrics.upstream_requests.inc();
        let token = self.live.token.clone();
        let sent = tokio::select! {
            biased;
            _ = token.cancelled() => Err(StartError::Cancelled(self.live.cancel_reason())),
            r = self.upstream.send(self.protocol, self.body.clone(), &self.client_headers) => r.map_err(StartError::Upstream),
        };
        let response = match sent {
            Ok(r) if is_event_stream(r.headers()) => r,
            Ok(r) => {
                let content_type = r
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("no content type");
                let message = format!(
                    "upstream `{}` answered with {content_type}, not an event stream",
                    self.upstream.config.name
                );
                return self
                    .start_failed(StartError::NotAStream(message), started)
                    .await;
            }
            Err(e) => return self.start_failed(e, started).await,
        };
        let _ = started.send(Ok(()));
        let end = self.relay(response).await;
        self.finish(end, None).await;
    }

    async fn start_failed(
        &self,
        error: StartError,
        started: oneshot::Sender<Result<(), StartError>>,
    ) {
        let kind = match &error {
            StartError::Cancelled(kind) => *kind,
            _ => {
                self.ctx.metrics.upstream_errors.inc();
                AbortKind::UpstreamFailed
            }
        };
        let _ = started.send(Err(error));
        // A first request that never started is over (its client got an
        // error status); a continuation stays resumable.
        let status = if self.continuation.is_some() {
            Status::Interrupted
        } else {
            Status::Failed
        };
        self.finish(End::Abort(kind), Some(status)).await;
    }

    async fn relay(&self, response: reqwest::Response) -> End {
        let idle = self.upstream.config.idle_timeout;
        let token = &self.live.token;
        let mut events = response.bytes_stream().eventsource();
        let mut seq = self.live.base;
        let chunk_id = self.continuation.as_ref().and_then(|c| c.as_deref());
        loop {
            let next = tokio::select! {
                biased;
                _ = token.cancelled() => return End::Abort(self.live.cancel_reason()),
                next = tokio::time::timeout(idle, events.next()) => next,
            };
            let event = match next {
                Err(_) => {
                    tracing::warn!(stream = %self.live.who.id, upstream = %self.upstream.config.name, ?idle, "upstream stalled mid-stream");
                    self.ctx.metrics.upstream_errors.inc();
                    return End::Abort(AbortKind::UpstreamFailed);
                }
                Ok(None) => {
                    tracing::warn!(stream = %self.live.who.id, upstream = %self.upstream.config.name, "upstream closed the stream before it finished");
                    self.ctx.metrics.upstream_errors.inc();
                    return End::Abort(AbortKind::UpstreamFailed);
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(stream = %self.live.who.id, upstream = %self.upstream.config.name, error = %error_chain(&e), "upstream failed mid-stream");
                    self.ctx.metrics.upstream_errors.inc();
                    return End::Abort(AbortKind::UpstreamFailed);
                }
                Ok(Some(Ok(event))) => event,
            };
            if self.protocol == Protocol::OpenAi && event.data == "[DONE]" {
                return End::Done;
            }
            if self.continuation.is_some()
                && continuation::skip_in_continuation(self.protocol, &event)
            {
                continue;
            }
            let finished = self.protocol == Protocol::Anthropic && event.event == "message_stop";
            let name = match event.event.as_str() {
                "" | "message" => None,
                other => Some(other.into()),
            };
            let data = match self.continuation {
                Some(_) => continuation::rewrite(self.protocol, event.data, chunk_id),
                None => Bytes::from(event.data),
            };
            seq += 1;
            let event = Event { seq, name, data };
            let written = tokio::select! {
                biased;
                _ = token.cancelled() => return End::Abort(self.live.cancel_reason()),
                r = self.ctx.store.append(&self.live.who.id, &event) => r,
            };
            if let Err(e) = written {
                tracing::error!(stream = %self.live.who.id, error = %e, "store write failed; ending the stream");
                self.ctx.metrics.store_errors.inc();
                return End::Abort(AbortKind::StoreFailed);
            }
            self.live.push(event);
            self.ctx.metrics.events_relayed.inc();
            if finished {
                return End::Done;
            }
        }
    }

    /// Every exit: record the status, release the lease, wake subscribers.
    async fn finish(&self, end: End, status: Option<Status>) {
        let (status, reason) = match end {
            End::Done => (Status::Completed, None),
            End::Abort(kind) => (
                status.unwrap_or(match kind {
                    AbortKind::Cancelled => Status::Cancelled,
                    AbortKind::StoreFailed | AbortKind::Incomplete => Status::Failed,
                    AbortKind::ServerRestarting
                    | AbortKind::UpstreamFailed
                    | AbortKind::ClientGone => Status::Interrupted,
                }),
                Some(kind.as_str()),
            ),
        };
        let id = &self.live.who.id;
        if let Err(e) = self
            .ctx
            .store
            .set_status(id, status, reason, &self.ctx.instance)
            .await
        {
            tracing::error!(stream = %id, error = %e, "could not record the stream's end");
            self.ctx.metrics.store_errors.inc();
        }
        if let Err(e) = self.ctx.store.release_lease(id, &self.ctx.instance).await {
            tracing::warn!(stream = %id, error = %e, "could not release the stream's lease");
        }
        // Out of the registry first: a client that reacts to the end at once
        // must find the stored status, not this finished run.
        self.ctx.registry.remove(&self.live);
        self.live.finish(end);
        self.ctx.metrics.stream_ended(end);
        tracing::debug!(stream = %id, status = status.as_str(), "stream ended");
    }
}

/// Feed `live` from a stream that another replica runs (shared store):
/// what it writes to the store is published here as it lands, until the
/// record says the run is over. Nothing is written and no provider is
/// called; the runner's lease makes sure of that.
pub async fn follow_remote(live: Arc<LiveStream>, ctx: Arc<RelayContext>) {
    const WAIT: std::time::Duration = std::time::Duration::from_millis(250);
    let id = live.who.id.clone();
    let mut last = live.base;
    let end = loop {
        let batch = tokio::select! {
            biased;
            _ = live.token.cancelled() => break End::Abort(live.cancel_reason()),
            r = ctx.store.follow(&id, last, WAIT) => r,
        };
        match batch {
            Err(e) => {
                tracing::error!(stream = %id, error = %e, "following a remote stream failed");
                break End::Abort(AbortKind::StoreFailed);
            }
            Ok(events) if !events.is_empty() => {
                for event in events {
                    last = event.seq;
                    live.push(event);
                }
                continue;
            }
            Ok(_) => {}
        }
        let record = match ctx.store.get(&id).await {
            Ok(Some(r)) => r,
            Ok(None) => break End::Abort(AbortKind::Incomplete),
            Err(_) => break End::Abort(AbortKind::StoreFailed),
        };
        let end = match record.status {
            Status::Running => match ctx.store.lease_alive(&id).await {
                Ok(true) => continue,
                // The runner died without a word: resume to continue.
                Ok(false) => End::Abort(AbortKind::ServerRestarting),
                Err(_) => End::Abort(AbortKind::StoreFailed),
            },
            Status::Completed => End::Done,
            Status::Cancelled => End::Abort(AbortKind::Cancelled),
            Status::Failed => End::Abort(AbortKind::Incomplete),
            Status::Interrupted => End::Abort(
                record
                    .reason
                    .as_deref()
                    .and_then(AbortKind::parse)
                    .filter(|k| k.resumable())
                    .unwrap_or(AbortKind::ServerRestarting),
            ),
        };
        // Whatever landed between the last read and the status change.
        match ctx.store.events_after(&id, last).await {
            Ok(events) => events.into_iter().for_each(|e| live.push(e)),
            Err(_) => break End::Abort(AbortKind::StoreFailed),
        }
        break end;
    };
    ctx.registry.remove(&live);
    live.finish(end);
}
