//! A new stream: its record, its run in the registry, its pump — and the
//! idempotent retry that joins the stream its key started instead.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::pump::{Pump, Recording, Route};
use super::{Access, Attached, Relay, RelayError};
use crate::protocol::Protocol;
use crate::stream::{End, IdempotencyEntry, Status, StreamRecord, now_ms};
use crate::token::{hash_hex, random_string};
use crate::trace::RunTrace;
use crate::upstream::{Upstream, forwardable, has_credential, non_secret};

/// A validated streaming request, routed.
pub struct NewStream<'a> {
    pub protocol: Protocol,
    pub upstream: Arc<Upstream>,
    /// The request body, as the client sent it.
    pub body: Bytes,
    /// The client's headers: the forwardable ones go to the provider.
    pub client_headers: &'a HeaderMap,
    /// A hash of the client's key (or `anonymous`).
    pub owner: String,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<&'a str>,
    /// Whether the upstream can continue this model's answers.
    pub continuable: bool,
    /// The request declares tools: its tool calls are held until whole.
    pub tools: bool,
    /// The requested model.
    pub model: Box<str>,
    /// The client's route key, if it gave one.
    pub route_key: Option<String>,
    /// Generated to the end whether or not a client is attached (OpenAI
    /// Responses `background: true`).
    pub background: bool,
    /// What the provider is sent, when it is not `body` (a background
    /// request streams from the provider like any other).
    pub upstream_body: Option<Bytes>,
}

/// How long an idempotent retry waits for the stream its key started to
/// be recorded (the first request claims the key a moment before), and
/// how often it looks.
const JOIN_WAIT: Duration = Duration::from_secs(1);
const JOIN_POLL: Duration = Duration::from_millis(25);

impl Relay {
    /// Start a stream and answer once the provider has answered (so its
    /// errors become status codes); or, for a retried `Idempotency-Key`,
    /// attach to the stream the key started.
    ///
    /// One function, not a call into another: a nested future is moved
    /// into this one's whole, and that copy is paid for every stream.
    pub async fn start(self: &Arc<Self>, new: NewStream<'_>) -> Result<Attached, RelayError> {
        self.admit()?;
        let id = match new.protocol {
            // The id the SDKs resume by (`responses.retrieve`).
            Protocol::OpenAiResponses => format!("resp_{}", random_string(15)),
            _ => format!("tg_{}", random_string(15)),
        };
        if let Some(key) = new.idempotency_key {
            let entry = IdempotencyEntry {
                stream_id: id.clone(),
                body_hash: hash_hex(&new.body),
            };
            if let Some(existing) = self
                .store
                .claim_idempotency(&new.owner, key, &entry)
                .await?
            {
                if existing.body_hash != entry.body_hash {
                    return Err(RelayError::IdempotencyConflict);
                }
                return Box::pin(self.join(&existing.stream_id, &new.owner)).await;
            }
        }
        // An idempotent retry joins the stream its key started; a new
        // stream needs a place under the limits, and room in the store
        // (asked before the provider is: a refused stream is never billed).
        let admitted = match self.stream_permit(&new.owner) {
            Ok(permit) => self
                .store
                .admit()
                .await
                .map(|()| permit)
                .map_err(Into::into),
            Err(e) => Err(e),
        };
        let permit = match admitted {
            Ok(permit) => permit,
            Err(e) => {
                // Refused before it started: the key must not point at a
                // stream that never was, or the retry would get 404.
                if let Some(key) = new.idempotency_key
                    && let Err(release) = self.store.release_idempotency(&new.owner, key, &id).await
                {
                    tracing::warn!(error = %release, "cannot release the Idempotency-Key of a refused stream");
                }
                return Err(e);
            }
        };
        let now = now_ms();
        let record = StreamRecord {
            id: id.clone(),
            owner: new.owner.clone(),
            protocol: new.protocol.as_str().into(),
            upstream: new.upstream.config.name.clone(),
            request: String::from_utf8_lossy(&new.body).into_owned(),
            headers: non_secret(new.client_headers),
            client_credential: has_credential(new.client_headers),
            status: Status::Running,
            reason: None,
            created_ms: now,
            updated_ms: now,
            instance: self.instance.clone(),
            reattach: None,
        };
        let who = self.identity(&id, &new.owner, new.protocol, new.continuable);
        let live = self.new_live(who.clone(), &new.owner, 0, new.background);
        live.hold(permit);
        // In the registry before the record exists: whoever finds the record
        // (an idempotent retry) finds this run too, and never starts another.
        self.registry.get_or_insert(&id, || live.clone());
        let store = self.store.clone();
        let background = new.background;
        let recording: Recording = Box::pin(async move {
            store.create(&record).await?;
            if background {
                store.add_background(&record.id).await?;
            }
            Ok(())
        });
        // Subscribe before the pump starts: if this client leaves while we
        // wait for the provider, the subscription's drop cancels the pump.
        let subscription = live.subscribe();
        self.metrics.streams_started.inc();
        let (started_tx, started_rx) = oneshot::channel();
        let pinned = new.upstream.config.api_key.is_none() && has_credential(new.client_headers);
        let trace = self.tracing.as_ref().map(|t| {
            Box::new(RunTrace::new(
                t,
                "tidegate.stream",
                &t.parent(new.client_headers),
                &id,
                &new.model,
                new.protocol.as_str(),
            ))
        });
        let pump = Pump {
            live: live.clone(),
            upstream: new.upstream,
            protocol: new.protocol,
            route: Route {
                model: new.model,
                key: new.route_key.map(Into::into),
                original: new.body.clone(),
                pinned,
                moved: false,
            },
            body: new.upstream_body.unwrap_or(new.body),
            client_headers: forwardable(new.client_headers),
            tools: new.tools,
            continued: None,
            sent_at: tokio::time::Instant::now(),
            failovers: 0,
            trace,
            attach: None,
            sent_background: false,
            relay: self.clone(),
        };
        self.drain
            .tracker
            .spawn(Box::new(pump).run(started_tx, Some(recording)));
        match started_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(RelayError::PumpVanished),
        }
        let headers = live.headers();
        Ok(self
            .attach_subscribed(who, 0, Some((live, subscription)), End::Done, None, false)
            .with_headers(headers))
    }

    /// The same request again: attach to the first stream from its start,
    /// once it is there.
    async fn join(self: &Arc<Self>, id: &str, owner: &str) -> Result<Attached, RelayError> {
        let until = tokio::time::Instant::now() + JOIN_WAIT;
        loop {
            match self
                .resume(id, Access::Owner(owner), 0, false, &Default::default())
                .await
            {
                Err(RelayError::NotFound) if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(JOIN_POLL).await
                }
                Err(RelayError::NotFound) => return Err(RelayError::IdempotentStreamGone),
                other => return other,
            }
        }
    }
}
