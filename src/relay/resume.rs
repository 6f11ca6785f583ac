//! A client that comes back for a stream: follow the run in this process,
//! replay a stream that is over, follow a run on another replica, or
//! continue an interrupted answer with a new run.
//!
//! One resume reads the stream's record once and its events at most once:
//! the events a continuation reads to build its request are the ones its
//! client's replay is made of.

use std::sync::Arc;

use serde_json::Value;

use super::live::LiveStream;
use super::pump::{Continued, Pump};
use super::{Access, Attached, Relay, RelayError, StreamIdentity, protocol_of};
use crate::protocol::Plan;
use crate::stream::{AbortKind, End, Event, Status, StreamRecord};

impl Relay {
    /// Serve stream `id` to a client that has everything up to `cursor`.
    /// `is_resume`: a client reconnecting (its body gets a `retry:` hint),
    /// not an idempotent retry of the first request.
    pub async fn resume(
        self: &Arc<Self>,
        id: &str,
        access: Access<'_>,
        cursor: u64,
        is_resume: bool,
    ) -> Result<Attached, RelayError> {
        if let Some(live) = self.registry.get(id) {
            self.allows(access, id, &live.owner)?;
            self.count_resume(is_resume);
            return Ok(self.follow_live(live, cursor, None, is_resume));
        }
        let record = self.store.get(id).await?.ok_or(RelayError::NotFound)?;
        self.allows(access, id, &record.owner)?;
        self.count_resume(is_resume);
        let who = self.identity(id, &record.owner, protocol_of(&record));
        match record.status {
            Status::Completed | Status::Cancelled | Status::Failed => {
                let end = record.status.end_after_replay(record.reason.as_deref());
                Ok(self.attach(who, cursor, None, end, None, is_resume))
            }
            Status::Running if self.store.lease_alive(id).await? => {
                Ok(self.follow_remote(who, &record.owner, cursor, is_resume))
            }
            Status::Running | Status::Interrupted => {
                self.admit()?;
                self.continue_stream(record, who, cursor, is_resume).await
            }
        }
    }

    /// A client's body following the run `live` from `cursor`.
    fn follow_live(
        &self,
        live: Arc<LiveStream>,
        cursor: u64,
        stored: Option<Vec<Event>>,
        is_resume: bool,
    ) -> Attached {
        self.attach(
            live.who.clone(),
            cursor,
            Some(live),
            End::Done,
            stored,
            is_resume,
        )
    }

    fn count_resume(&self, is_resume: bool) {
        if is_resume {
            self.metrics.resumes.inc();
        }
    }

    /// Follow a run another replica holds, through the store. One follower
    /// per stream in this process; it mirrors the whole stream (base 0), so
    /// its client replays from it and the store is read once.
    fn follow_remote(
        self: &Arc<Self>,
        who: StreamIdentity,
        owner: &str,
        cursor: u64,
        is_resume: bool,
    ) -> Attached {
        let live = self.new_live(who, owner, 0);
        let (live, created) = self.registry.get_or_insert(&live.who.id.clone(), || live);
        if created {
            self.drain
                .tracker
                .spawn(super::remote::follow(live.clone(), self.clone()));
        }
        self.follow_live(live, cursor, None, is_resume)
    }

    /// Start (or join) the continuation of an interrupted stream; or replay
    /// it and end, when it cannot or need not be continued.
    async fn continue_stream(
        self: &Arc<Self>,
        record: StreamRecord,
        who: StreamIdentity,
        cursor: u64,
        is_resume: bool,
    ) -> Result<Attached, RelayError> {
        let id = record.id.as_str();
        let ended = |end: End, stored: Option<Vec<Event>>| {
            Ok(self.attach(who.clone(), cursor, None, end, stored, is_resume))
        };
        let Ok(original) = serde_json::from_str::<Value>(&record.request) else {
            return ended(End::Abort(AbortKind::Incomplete), None);
        };
        // The upstream that served it; else whichever serves its model now
        // in its protocol (the config may have changed since).
        let upstream = self.upstreams.named(&record.upstream).or_else(|| {
            let model = original.get("model").and_then(Value::as_str)?;
            self.upstreams.route(model, who.protocol)
        });
        let Some(upstream) = upstream.cloned() else {
            return ended(End::Abort(AbortKind::Incomplete), None);
        };
        let events = self.store.events_after(id, 0).await?;
        let wire = who.protocol.wire();
        let partial = wire.partial(&events);
        let body = match wire.continuation(&original, upstream.config.continuation, &partial) {
            Plan::Continue(body) => body,
            Plan::AlreadyComplete => {
                self.store
                    .set_status(id, Status::Completed, None, &self.instance)
                    .await?;
                return ended(End::Done, Some(events));
            }
            Plan::Unsupported => return ended(End::Abort(AbortKind::Incomplete), Some(events)),
        };
        let body = serde_json::to_vec(&body).map_err(RelayError::Encode)?;
        let live = self.new_live(who.clone(), &record.owner, partial.last_seq);
        let (live, created) = self.registry.get_or_insert(id, || live);
        if !created {
            // Another resume started it a moment ago: follow that run.
            return Ok(self.follow_live(live, cursor, Some(events), is_resume));
        }
        match self.take_over(&live).await {
            Ok(true) => {}
            Ok(false) => {
                // Another replica won the lease: it continues, we follow it.
                self.drain
                    .tracker
                    .spawn(super::remote::follow(live.clone(), self.clone()));
                return Ok(self.follow_live(live, cursor, Some(events), is_resume));
            }
            Err(e) => {
                self.registry.remove(&live);
                live.finish(End::Abort(AbortKind::StoreFailed));
                return Err(e.into());
            }
        }
        self.metrics.continuations.inc();
        tracing::info!(stream = %id, after = partial.last_seq, upstream = %upstream.config.name, "continuing an interrupted stream");
        let pump = Pump {
            live: live.clone(),
            upstream,
            protocol: who.protocol,
            body: body.into(),
            // The resume request's credentials are a resume token, never a
            // provider key: continuations use the upstream's configured key.
            client_headers: Default::default(),
            continued: Some(Continued {
                chunk_id: partial.chunk_id,
            }),
            relay: self.clone(),
        };
        // Nobody waits for the start: a failure reaches the clients in-band.
        let (started, _) = tokio::sync::oneshot::channel();
        self.drain.tracker.spawn(pump.run(started, None));
        Ok(self.follow_live(live, cursor, Some(events), is_resume))
    }

    /// Take the lease of `live`'s stream and mark it running here; `false`
    /// when another replica holds it.
    async fn take_over(&self, live: &LiveStream) -> Result<bool, crate::store::StoreError> {
        let id = &live.who.id;
        if !self.store.try_lease(id, &self.instance).await? {
            return Ok(false);
        }
        self.store
            .set_status(id, Status::Running, None, &self.instance)
            .await?;
        Ok(true)
    }
}
