//! A client that comes back for a stream: follow the run in this process,
//! replay a stream that is over, follow a run on another replica, or
//! continue an interrupted answer with a new run.
//!
//! One resume reads the stream's record once and its events at most once:
//! the events a continuation reads to build its request are the ones its
//! client's replay is made of.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::live::LiveStream;
use super::pump::{Continued, Pump, Refused, Route};
use super::{Access, Attached, Relay, RelayError, StreamIdentity, protocol_of};
use crate::protocol::{Partial, Plan, Protocol, Stamp, Wire};
use crate::stream::{AbortKind, End, Event, Status, StreamRecord, reason_detail};
use crate::trace::{RunTrace, Scope};
use crate::upstream::has_credential;

/// Continuations a stream gets in a row without progress before the
/// gateway stops re-asking a provider that keeps failing.
pub(super) const MAX_ATTEMPTS: u32 = 4;

impl Relay {
    /// Serve stream `id` to a client that has everything up to `cursor`.
    /// `is_resume`: a client reconnecting (its body gets a `retry:` hint),
    /// not an idempotent retry of the first request. `credential`: the
    /// client's own provider key headers, presented on the resume request,
    /// for a continuation on an upstream without a key of its own.
    pub async fn resume(
        self: &Arc<Self>,
        id: &str,
        access: Access<'_>,
        cursor: u64,
        is_resume: bool,
        credential: &HeaderMap,
    ) -> Result<Attached, RelayError> {
        let scope = self
            .tracing
            .as_ref()
            .map(|t| t.resume(credential, id, cursor));
        if let Some(live) = self.registry.get(id) {
            self.allows(access, id, &live.owner)?;
            self.count_resume(is_resume);
            return Ok(self.follow_live(live, cursor, None, is_resume));
        }
        let record = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| self.unknown(id, access))?;
        self.allows(access, id, &record.owner)?;
        self.count_resume(is_resume);
        let who = self.identity(id, &record.owner, protocol_of(&record), true);
        match record.status {
            Status::Completed | Status::Cancelled | Status::Failed => {
                let end = record.status.end_after_replay(record.reason.as_deref());
                let detail = record
                    .reason
                    .as_deref()
                    .and_then(reason_detail)
                    .map(str::to_owned);
                Ok(self
                    .attach(who, cursor, None, end, None, is_resume)
                    .with_detail(detail))
            }
            Status::Running if self.store.lease_alive(id).await? => {
                Ok(self.follow_remote(who, &record.owner, cursor, is_resume))
            }
            Status::Running | Status::Interrupted => {
                self.admit()?;
                self.continue_stream(record, who, cursor, is_resume, credential, scope.as_ref())
                    .await
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
        let live = self.new_live(who, owner, 0, false);
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
        mut who: StreamIdentity,
        cursor: u64,
        is_resume: bool,
        credential: &HeaderMap,
        scope: Option<&Scope>,
    ) -> Result<Attached, RelayError> {
        let id = record.id.as_str();
        let ended = |who: &StreamIdentity, end: End, stored: Option<Vec<Event>>| {
            self.attach(who.clone(), cursor, None, end, stored, is_resume)
        };
        let Ok(original) = serde_json::from_str::<Value>(&record.request) else {
            return Ok(ended(&who, End::Abort(AbortKind::Incomplete), None));
        };
        let model = original.get("model").and_then(Value::as_str).unwrap_or("");
        // The upstream that served it; else whichever serves its model now
        // in its protocol (the config may have changed since).
        // (An ejected one gives way to the group's choice.)
        let key = crate::protocol::route_key(&HeaderMap::new(), record.request.as_bytes());
        let upstream = self
            .upstreams
            .named(&record.upstream)
            .filter(|u| u.health.available() || record.client_credential)
            .or_else(|| {
                self.upstreams
                    .route(model, who.protocol, key.as_deref(), &[])
            })
            .or_else(|| self.upstreams.named(&record.upstream));
        let Some(upstream) = upstream.cloned() else {
            return Ok(ended(&who, End::Abort(AbortKind::Incomplete), None));
        };
        who.continuable = upstream.resumes(model);
        let events = self.store.events_after(id, 0).await?;
        let wire = who.protocol.wire();
        let partial = wire.partial(&events);
        let background = who.protocol == Protocol::OpenAiResponses
            && original.get("background").and_then(Value::as_bool) == Some(true);
        let stamp = Stamp { id, background };
        let styles = upstream.styles(model);
        let style = styles[0];
        // Made in the provider's own background response: re-attach to it,
        // with the continuation as the fallback (`relay/reattach.rs`).
        let attach = record.reattach.clone().filter(|_| {
            who.protocol == Protocol::OpenAiResponses
                && upstream.config.provider_background
                && upstream.config.name == record.upstream
        });
        let mut plan = Some(wire.continuation(&original, style, &partial));
        let mut legs = match plan.take_if(|_| attach.is_none()) {
            None => Vec::new(),
            Some(Plan::Continue(legs)) => legs,
            Some(Plan::AlreadyComplete) => {
                // What ends the answer, when the stored events stop short of it.
                let mut events = events;
                let closing = closing_events(wire, &stamp, &partial);
                if closing.is_empty() {
                    self.store
                        .set_status(id, Status::Completed, None, &self.instance)
                        .await?;
                } else {
                    self.store
                        .append_final(id, &closing, Status::Completed, None, &self.instance)
                        .await?;
                    events.extend(closing);
                }
                return Ok(ended(&who, End::Done, Some(events)));
            }
            Some(Plan::Unsupported) => {
                return Ok(ended(&who, End::Abort(AbortKind::Incomplete), Some(events)));
            }
            Some(Plan::Impossible(why)) => {
                tracing::info!(stream = %id, reason = %why, "an interrupted stream cannot be continued");
                let reason = format!("{}: {why}", AbortKind::Incomplete.as_str());
                self.store
                    .set_status(id, Status::Failed, Some(&reason), &self.instance)
                    .await?;
                return Ok(ended(&who, End::Abort(AbortKind::Incomplete), Some(events))
                    .with_detail(Some(why)));
            }
        };
        if upstream.config.api_key.is_none()
            && record.client_credential
            && !has_credential(credential)
        {
            return Err(RelayError::CredentialRequired {
                upstream: upstream.config.name.clone(),
            });
        }
        if !self.attempt(id) {
            let why =
                format!("the provider failed {MAX_ATTEMPTS} continuations in a row; giving up");
            tracing::warn!(stream = %id, upstream = %upstream.config.name, "{why}");
            let reason = format!("{}: {why}", AbortKind::Incomplete.as_str());
            self.store
                .set_status(id, Status::Failed, Some(&reason), &self.instance)
                .await?;
            return Ok(
                ended(&who, End::Abort(AbortKind::Incomplete), Some(events)).with_detail(Some(why))
            );
        }
        let (body, splice, fallback, refused) = if attach.is_some() {
            // A 4xx to the re-attach falls back to the continuation, or
            // ends the stream as a resume without a re-attach would.
            let (fallback, refused) = match plan {
                Some(Plan::Continue(legs)) if !legs.is_empty() => (Some((style, legs)), None),
                Some(Plan::Continue(_)) | None => (None, None),
                Some(Plan::AlreadyComplete) => {
                    let closing = closing_events(wire, &stamp, &partial);
                    (None, Some(Refused::Close(closing)))
                }
                Some(Plan::Unsupported) => (None, Some(Refused::Incomplete(None))),
                Some(Plan::Impossible(why)) => (None, Some(Refused::Incomplete(Some(why)))),
            };
            (Vec::new(), None, fallback, refused)
        } else {
            // The next style, ready for a 400 refusing this one.
            let fallback = styles.get(1).and_then(|&next| {
                match wire.continuation(&original, next, &partial) {
                    Plan::Continue(legs) => Some((next, legs)),
                    _ => None,
                }
            });
            let first = legs.remove(0);
            let body = serde_json::to_vec(&first.body).map_err(RelayError::Encode)?;
            (body, Some(first.splice), fallback, None)
        };
        // Continued by a re-ask, the events no longer come one for one from
        // the provider's background response: never re-attach to it again.
        if attach.is_none() && record.reattach.is_some() {
            self.store.set_reattach(id, None, &self.instance).await?;
        }
        // A continuation is a generation: it counts against the stream
        // limits of the stream's owner like the run it continues (a place
        // taken by a resume that then joins another's run is given back).
        let permit = self.stream_permit(&record.owner)?;
        let live = self.new_live(who.clone(), &record.owner, partial.last_seq, background);
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
        live.hold(permit);
        if let Some(reattach) = &attach {
            self.metrics.reattaches.inc();
            tracing::info!(stream = %id, after = partial.last_seq, upstream = %upstream.config.name, response = %reattach.response, "re-attaching an interrupted stream to the provider's background response");
        } else {
            self.metrics.continuations.inc();
            tracing::info!(stream = %id, after = partial.last_seq, upstream = %upstream.config.name, style = style.as_str(), requests = legs.len() + 1, "continuing an interrupted stream");
        }
        let pinned = upstream.config.api_key.is_none() && record.client_credential;
        let pump = Pump {
            live: live.clone(),
            route: Route {
                model: model.into(),
                key: crate::protocol::route_key(&HeaderMap::new(), record.request.as_bytes())
                    .map(Into::into),
                original: record.request.clone().into(),
                pinned,
                moved: upstream.config.name != record.upstream,
            },
            sent_at: tokio::time::Instant::now(),
            failovers: 0,
            trace: self.tracing.as_ref().map(|t| {
                let parent = scope.map(Scope::context).cloned().unwrap_or_default();
                Box::new(RunTrace::new(
                    t,
                    "tidegate.continuation",
                    &parent,
                    id,
                    model,
                    who.protocol.as_str(),
                ))
            }),
            upstream,
            protocol: who.protocol,
            body: body.into(),
            client_headers: continuation_headers(&record, credential),
            tools: crate::protocol::declares_tools(&original),
            continued: Some(Continued {
                splice,
                legs: legs.into(),
                style,
                fallback,
                refused,
            }),
            attach,
            sent_background: false,
            relay: self.clone(),
        };
        // Nobody waits for the start: a failure reaches the clients in-band.
        let (started, _) = tokio::sync::oneshot::channel();
        self.drain.tracker.spawn(Box::new(pump).run(started, None));
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

/// What a continuation sends the provider of the client's: the non-secret
/// headers the original carried, and the credential the resume request
/// presented (used only when the upstream has no key of its own).
fn continuation_headers(record: &StreamRecord, credential: &HeaderMap) -> HeaderMap {
    let mut out = credential.clone();
    for (name, value) in &record.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            out.insert(name, value);
        }
    }
    out
}

/// The events that end an answer whose stored events stop short of its
/// end ([`Plan::AlreadyComplete`]), numbered on from them and stamped.
fn closing_events(wire: &dyn Wire, to: &Stamp<'_>, partial: &Partial) -> Vec<Event> {
    wire.closing(partial)
        .into_iter()
        .zip(partial.last_seq + 1..)
        .map(|((name, data), seq)| {
            let data = wire.stamp(to, seq, name.as_deref(), data);
            Event { seq, name, data }
        })
        .collect()
}
