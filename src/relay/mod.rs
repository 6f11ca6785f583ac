//! The relay: a stream's whole life, from the request that starts it to
//! `[DONE]` or an in-band abort event, and every later resume of it.
//!
//! - [`start`]: a new stream — its record, its registry entry, its pump —
//!   and the idempotent retry that joins one;
//! - [`resume`]: a client that comes back: follow, replay, continue;
//! - [`remote`]: following a run that another replica holds;
//! - [`control`]: a stream's state and its cancellation;
//! - [`background`]: background responses continued with no client;
//! - [`passthrough`]: a non-streaming request;
//! - [`reattach`]: streams made in a provider's own background response,
//!   re-attached to it after a cut;
//! - [`pump`]: the one task per run that talks to the provider and writes
//!   ahead to the store;
//! - [`live`]: runs in this process, shared by every client that follows
//!   them;
//! - [`subscriber`]: a client's SSE body: replay from the store, then follow;
//! - [`end`]: how a body ends (`[DONE]` or the abort event).
//!
//! The HTTP layer calls [`Relay`]'s methods and turns what they return into
//! responses; nothing here knows a route.

pub mod background;
pub mod control;
pub mod end;
pub mod live;
pub mod passthrough;
pub mod pump;
pub mod reattach;
pub mod remote;
pub mod resume;
pub mod start;
pub mod subscriber;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

use crate::config::{DisconnectPolicy, LimitsConfig};
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::protocol::Protocol;
use crate::store::{SharedStore, StoreError};
use crate::stream::{AbortKind, End, Event, StreamRecord};
use crate::token::TokenSigner;
use crate::upstream::{UpstreamError, Upstreams};
pub use end::StreamIdentity;
use live::{LiveStream, Refusal, Registry, StreamLimits, StreamPermit, Subscription};
use subscriber::Follow;

/// What a client's stream needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How often a quiet body sends a `: ping` comment line.
    pub heartbeat: Duration,
    /// What the last client leaving does to a run.
    pub on_client_disconnect: DisconnectPolicy,
    /// The `retry:` hint on resume streams.
    pub retry_hint: Duration,
    /// What a peer may make a stream hold.
    pub limits: LimitsConfig,
    /// Whether clients are told apart by key (`[auth]` keys are set), so
    /// `limits.max_streams_per_key` applies.
    pub keyed: bool,
    /// Retries before the first byte, failover after it.
    pub routing: crate::config::RoutingConfig,
}

/// Everything a stream's life needs, built once at start-up and shared by
/// every handler and pump.
pub struct Relay {
    pub store: SharedStore,
    pub registry: Registry,
    /// How many streams may run at once, per process and per key.
    pub stream_limits: Arc<StreamLimits>,
    pub metrics: Metrics,
    pub upstreams: Upstreams,
    pub signer: TokenSigner,
    /// Its phase says whether new runs may start; its root token is the
    /// parent of every run's; its tracker holds every task.
    pub drain: Arc<Drain>,
    pub settings: Settings,
    /// This process's id, recorded as the runner of its streams.
    pub instance: String,
    /// Continuations started per stream since it last made progress: a
    /// provider that keeps failing is not re-asked forever.
    attempts: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Where spans go, when traces are exported.
    pub tracing: Option<Arc<crate::trace::Tracing>>,
}

/// Why the relay could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// No such stream, or the token or owner does not match it (the same
    /// answer either way).
    #[error("no such stream (or the resume token does not match it)")]
    NotFound,
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyConflict,
    #[error("the stream this Idempotency-Key started is gone")]
    IdempotentStreamGone,
    /// The drain has passed `pre_stop_delay`: no new provider calls.
    #[error("the gateway is draining and accepts no new streams; retry on another instance")]
    Draining,
    /// This process runs as many streams as `limits.max_streams` allows.
    #[error("the gateway runs as many streams as it may; retry shortly")]
    TooManyStreams,
    /// This client key runs as many streams as `limits.max_streams_per_key`
    /// allows.
    #[error("this API key runs as many concurrent streams as it may ({0}); retry once one ends")]
    TooManyStreamsForKey(usize),
    /// The drain deadline came first.
    #[error("the gateway is restarting; retry the request")]
    ServerRestarting,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The provider answered 200 but not with an event stream.
    #[error("upstream `{upstream}` answered with {content_type}, not an event stream")]
    NotAStream {
        upstream: String,
        content_type: String,
    },
    #[error("the partial-response store is unavailable: {0}")]
    Store(#[from] StoreError),
    /// The run was cancelled before its provider answered, other than by
    /// the drain (its client left, a `DELETE`).
    #[error("stream cancelled before it started: {}", .0.as_str())]
    CancelledBeforeStart(AbortKind),
    #[error("the stream's pump ended without a word")]
    PumpVanished,
    #[error("cannot encode the continuation request: {0}")]
    Encode(#[source] serde_json::Error),
    /// A continuation needs the client's own provider key (the upstream
    /// has no `api_key_env`) and the resume request did not carry one.
    #[error(
        "continuing this stream calls upstream `{upstream}`, which uses the client's own key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`, with the resume token in `x-tidegate-resume-token` or `?token=`"
    )]
    CredentialRequired { upstream: String },
}

/// The protocol a stored stream speaks. An unknown name is read as
/// OpenAI's, as the first versions wrote no other.
fn protocol_of(record: &StreamRecord) -> Protocol {
    Protocol::parse(&record.protocol).unwrap_or(Protocol::OpenAi)
}

/// Who may attach to a stream.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    /// A client presenting this resume token.
    Token(&'a str),
    /// The owner itself (an idempotent retry, authenticated by its key).
    Owner(&'a str),
    /// A client presenting this resume token and, authenticated by its
    /// key, being this owner: both must match (`[auth]` keys set).
    TokenOf { token: &'a str, owner: &'a str },
}

/// A client attached to a stream: the head its response carries and the
/// body that follows.
pub struct Attached {
    follow: Follow,
    /// The provider's response headers a client is shown (a first run's).
    headers: axum::http::HeaderMap,
}

impl Attached {
    /// The stream the client is attached to.
    pub fn who(&self) -> &StreamIdentity {
        &self.follow.who
    }

    fn with_headers(mut self, headers: axum::http::HeaderMap) -> Attached {
        self.headers = headers;
        self
    }

    /// What the abort after a replay says beyond its kind.
    fn with_detail(mut self, detail: Option<String>) -> Attached {
        self.follow.detail = detail;
        self
    }

    /// The SSE body: replay, then follow, then the end.
    pub fn into_body(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        subscriber::body(self.follow)
    }

    /// The provider's headers and the SSE body, for the client's response.
    pub fn into_parts(
        self,
    ) -> (
        axum::http::HeaderMap,
        impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
    ) {
        (self.headers, subscriber::body(self.follow))
    }
}

impl Relay {
    /// The relay of this process: no stream runs yet; `instance` names
    /// the process in the records of the streams it runs.
    pub fn new(
        store: SharedStore,
        upstreams: Upstreams,
        signer: TokenSigner,
        drain: Arc<Drain>,
        settings: Settings,
        instance: String,
    ) -> Relay {
        Relay {
            store,
            registry: Registry::default(),
            stream_limits: Arc::new(StreamLimits::new(
                settings.limits.max_streams,
                settings
                    .keyed
                    .then_some(settings.limits.max_streams_per_key),
            )),
            metrics: Metrics::default(),
            upstreams,
            signer,
            drain,
            settings,
            instance,
            attempts: Default::default(),
            tracing: None,
        }
    }

    /// Refuse new provider calls once the drain has passed `pre_stop_delay`.
    pub fn admit(&self) -> Result<(), RelayError> {
        if self.drain.accepting() {
            Ok(())
        } else {
            self.metrics.rejected_draining.inc();
            Err(RelayError::Draining)
        }
    }

    /// A place for a new stream of `owner` under the stream limits.
    fn stream_permit(&self, owner: &str) -> Result<StreamPermit, RelayError> {
        self.stream_limits
            .acquire(owner)
            .map_err(|refusal| match refusal {
                Refusal::Process => RelayError::TooManyStreams,
                Refusal::Key(n) => RelayError::TooManyStreamsForKey(n),
            })
    }

    fn identity(
        &self,
        id: &str,
        owner: &str,
        protocol: Protocol,
        continuable: bool,
    ) -> StreamIdentity {
        StreamIdentity {
            id: id.to_owned(),
            resume_token: self.signer.sign(id, owner),
            protocol,
            continuable,
        }
    }

    /// Count a continuation of stream `id`; `false` when it has had too
    /// many in a row without an end.
    fn attempt(&self, id: &str) -> bool {
        let mut attempts = self
            .attempts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if attempts.len() > 100_000 {
            // Streams that never came back: forget them all rather than grow.
            attempts.clear();
        }
        let n = attempts.entry(id.to_owned()).or_insert(0);
        *n += 1;
        *n <= resume::MAX_ATTEMPTS
    }

    /// Stream `id` ended for good (or finished): its continuations start
    /// counting afresh.
    fn progressed(&self, id: &str) {
        self.attempts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(id);
    }

    /// The answer for a stream that does not exist, after the work a wrong
    /// token for an existing one costs (its token checked), so the two take
    /// the same time and a caller cannot tell them apart.
    fn unknown(&self, id: &str, access: Access<'_>) -> RelayError {
        if let Access::Token(token) | Access::TokenOf { token, .. } = access {
            std::hint::black_box(self.signer.verify(id, "", token));
        }
        RelayError::NotFound
    }

    /// Whether `access` may attach to a stream of `owner`.
    fn allows(&self, access: Access<'_>, id: &str, owner: &str) -> Result<(), RelayError> {
        let allowed = match access {
            Access::Token(token) => self.signer.verify(id, owner, token),
            Access::Owner(who) => who == owner,
            // Both checked, whichever fails: the same work either way.
            Access::TokenOf { token, owner: who } => {
                self.signer.verify(id, owner, token) & (who == owner)
            }
        };
        allowed.then_some(()).ok_or(RelayError::NotFound)
    }

    /// A run of stream `who` in this process, for events after `base`: its
    /// token a child of the drain's, its disconnect policy the config's
    /// (`background`: generated to the end, attached or not).
    fn new_live(
        &self,
        who: StreamIdentity,
        owner: &str,
        base: u64,
        background: bool,
    ) -> Arc<LiveStream> {
        let policy = if background {
            DisconnectPolicy::Keep
        } else {
            self.settings.on_client_disconnect
        };
        Arc::new(LiveStream::new(
            who,
            owner.to_owned(),
            base,
            self.drain.streams.child_token(),
            policy,
            self.drain.tracker.clone(),
            self.settings.limits.live_buffer_bytes,
        ))
    }

    /// A client's body for stream `who` from `cursor`: the run `live` to
    /// follow, or `end` after the replay of a stream that is over.
    /// `stored`: the stream's events, when the caller has already read
    /// them (from seq 1), so the replay does not read them again.
    fn attach(
        &self,
        who: StreamIdentity,
        cursor: u64,
        live: Option<Arc<LiveStream>>,
        end: End,
        stored: Option<Vec<Event>>,
        is_resume: bool,
    ) -> Attached {
        let live = live.map(|l| {
            let subscription = l.subscribe();
            (l, subscription)
        });
        self.attach_subscribed(who, cursor, live, end, stored, is_resume)
    }

    /// [`attach`](Self::attach) with a subscription taken earlier.
    fn attach_subscribed(
        &self,
        who: StreamIdentity,
        cursor: u64,
        live: Option<(Arc<LiveStream>, Subscription)>,
        end_after_replay: End,
        stored: Option<Vec<Event>>,
        is_resume: bool,
    ) -> Attached {
        let follow = Follow {
            who,
            cursor,
            live,
            end_after_replay,
            detail: None,
            stored,
            store: self.store.clone(),
            heartbeat: self.settings.heartbeat,
            retry_hint: is_resume.then_some(self.settings.retry_hint),
            deadline: self.drain.streams.clone(),
        };
        Attached {
            follow,
            headers: Default::default(),
        }
    }
}
#[cfg(test)]
mod tests;
