//! Streams running in this process.
//!
//! A [`LiveStream`] holds the events its pump has made durable since it
//! started (`seq > base`) and how it ended, and wakes every subscriber when
//! either changes. The original client, a resume and an idempotent retry are
//! all subscribers of the same `LiveStream`: there is one generation however
//! many clients watch it.
//!
//! **Invariant:** an event is pushed here only after the store acknowledged
//! it, so whatever a subscriber sends is replayable.
//!
//! It holds only the newest events, up to `window` bytes: a subscriber
//! that reads slower than the provider writes falls behind the window and
//! catches up from the store ([`Behind`]), so memory does not grow with
//! the answer, and the pump never waits for the slowest reader.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bytes::{Bytes, BytesMut};

use super::end::StreamIdentity;
use crate::config::DisconnectPolicy;
use crate::protocol::sse::{frame_size, write_frame};
use crate::stream::{AbortKind, End, Event};

pub struct LiveStream {
    pub who: StreamIdentity,
    pub owner: String,
    /// Events up to `base` were stored before this run started (a
    /// continuation); this run's events are numbered from `base + 1`.
    pub base: u64,
    state: Mutex<LiveState>,
    changed: watch::Sender<()>,
    /// Cancels this stream's pump: a child of the drain's stream token, so
    /// the drain deadline reaches every pump.
    pub token: CancellationToken,
    subscribers: AtomicUsize,
    policy: DisconnectPolicy,
    tracker: TaskTracker,
    /// Bytes of events held for subscribers (`limits.live_buffer_bytes`).
    window: usize,
}

/// A subscriber's cursor is older than the events held: read the events
/// after it from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind;

#[derive(Default)]
struct LiveState {
    /// The newest events of this run: `base + dropped + 1` onwards.
    events: std::collections::VecDeque<Event>,
    /// Events of this run let go (older than the window).
    dropped: u64,
    /// What `events` holds, in data bytes.
    held: usize,
    end: Option<End>,
    /// Why the token was cancelled, when it was cancelled on purpose.
    cancel_reason: Option<AbortKind>,
    /// What the abort event tells the client beyond its kind (a provider's
    /// message, why the cut cannot be continued).
    detail: Option<String>,
    /// The provider's headers the first client's response carries.
    headers: axum::http::HeaderMap,
    /// This run's place under the stream limits, given back at its end.
    permit: Option<StreamPermit>,
    /// Upstreams that took over mid-answer: the first event each sent, and
    /// the SSE comment that goes out with it (at most `max_failovers`).
    notes: Vec<(u64, Bytes)>,
}

impl LiveStream {
    pub fn new(
        who: StreamIdentity,
        owner: String,
        base: u64,
        token: CancellationToken,
        policy: DisconnectPolicy,
        tracker: TaskTracker,
        window: usize,
    ) -> LiveStream {
        LiveStream {
            window,
            who,
            owner,
            base,
            state: Mutex::new(LiveState::default()),
            changed: watch::Sender::new(()),
            token,
            subscribers: AtomicUsize::new(0),
            policy,
            tracker,
        }
    }

    fn lock(&self) -> MutexGuard<'_, LiveState> {
        // A panic while holding this lock would be a bug in a few lines of
        // bookkeeping; the state stays consistent, so keep serving it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pump publishes durable events; the oldest beyond the window
    /// are let go (the store has them).
    pub fn push(&self, events: impl IntoIterator<Item = Event>) {
        let mut state = self.lock();
        for event in events {
            state.held += event.data.len();
            state.events.push_back(event);
        }
        while state.held > self.window && state.events.len() > 1 {
            if let Some(old) = state.events.pop_front() {
                state.held -= old.data.len();
                state.dropped += 1;
            }
        }
        drop(state);
        self.changed.send_replace(());
    }

    /// Count this run under the stream limits until it ends.
    pub fn hold(&self, permit: StreamPermit) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.permit = Some(permit);
        }
    }

    /// The pump says how the stream ended. Only the first end counts.
    pub fn finish(&self, end: End) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.end = Some(end);
        }
        let permit = state.permit.take();
        drop(state);
        drop(permit);
        self.changed.send_replace(());
    }

    /// Set what the abort event will say; before [`finish`](Self::finish).
    pub fn set_detail(&self, detail: String) {
        self.lock().detail.get_or_insert(detail);
    }

    /// The provider's response headers a client is shown; set before the
    /// first client is answered.
    pub fn set_headers(&self, headers: axum::http::HeaderMap) {
        self.lock().headers = headers;
    }

    pub fn headers(&self) -> axum::http::HeaderMap {
        self.lock().headers.clone()
    }

    /// Forget the detail (the stream went on after all: a failover).
    /// From event `seq` on, upstream `name` answers (a failover): that
    /// event goes out after `: tidegate-upstream <name>`, a comment every
    /// SSE parser skips, so SDKs see one answer and a person reading the
    /// stream sees who finished it. Live clients only: a replay from the
    /// store does not carry it.
    pub fn note_upstream(&self, seq: u64, name: &str) {
        let note = Bytes::from(format!(": tidegate-upstream {name}\n"));
        self.lock().notes.push((seq, note));
    }

    pub fn clear_detail(&self) {
        self.lock().detail = None;
    }

    pub fn detail(&self) -> Option<String> {
        self.lock().detail.clone()
    }

    pub fn last_seq(&self) -> u64 {
        let state = self.lock();
        self.base + state.dropped + state.events.len() as u64
    }

    pub fn end(&self) -> Option<End> {
        self.lock().end
    }

    /// Frame the events after `*cursor` (only those of this run) into
    /// `out`, moving the cursor; and say how the stream ended, if it has.
    /// [`Behind`]: the events after the cursor are no longer all held.
    /// Framing under the lock costs less than copying the events out.
    pub fn write_after(&self, cursor: &mut u64, out: &mut BytesMut) -> Result<Option<End>, Behind> {
        let state = self.lock();
        let first_held = self.base + state.dropped;
        if *cursor < first_held && *cursor >= self.base {
            return Err(Behind);
        }
        let skip = cursor.saturating_sub(first_held) as usize;
        if skip < state.events.len() {
            let events = state.events.range(skip..);
            out.reserve(events.clone().map(frame_size).sum());
            let notes = &state.notes;
            for event in events {
                if !notes.is_empty()
                    && let Some((_, note)) = notes.iter().find(|(seq, _)| *seq == event.seq)
                {
                    out.extend_from_slice(note);
                }
                write_frame(out, event);
            }
            if let Some(last) = state.events.back() {
                *cursor = last.seq;
            }
        }
        Ok(state.end)
    }

    pub fn watch(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Stop the pump for `reason`; the pump ends the stream with it.
    pub fn cancel(&self, reason: AbortKind) {
        {
            let mut state = self.lock();
            if state.end.is_some() {
                return;
            }
            state.cancel_reason.get_or_insert(reason);
        }
        self.token.cancel();
    }

    /// Why the token was cancelled: a reason given to [`cancel`](Self::cancel),
    /// else the drain deadline (the parent token).
    pub fn cancel_reason(&self) -> AbortKind {
        self.lock()
            .cancel_reason
            .unwrap_or(AbortKind::ServerRestarting)
    }

    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        self.subscribers.fetch_add(1, Ordering::AcqRel);
        Subscription { live: self.clone() }
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Acquire)
    }
}

/// A client following a live stream. When the last one goes, the stream's
/// disconnect policy decides whether the upstream is dropped.
pub struct Subscription {
    live: Arc<LiveStream>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let live = &self.live;
        if live.subscribers.fetch_sub(1, Ordering::AcqRel) != 1 || live.end().is_some() {
            return;
        }
        match live.policy {
            DisconnectPolicy::Cancel => live.cancel(AbortKind::ClientGone),
            DisconnectPolicy::Keep => {}
            DisconnectPolicy::Grace(wait) => {
                tracing::info!(stream = %live.who.id, grace = ?wait, "the stream's last client left; generating on for its return");
                let live = live.clone();
                live.tracker.clone().spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {
                            if live.subscribers() == 0 {
                                live.cancel(AbortKind::ClientGone);
                            }
                        }
                        _ = live.token.cancelled() => {}
                    }
                });
            }
        }
    }
}

/// How many streams may run at once: in this process, and per client key.
pub struct StreamLimits {
    max: usize,
    /// `None` on an open gateway, where every client is `anonymous`.
    per_key: Option<usize>,
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    total: usize,
    by_owner: HashMap<String, usize>,
}

/// Why a stream may not start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The process runs `max` streams.
    Process,
    /// The client key runs this many streams, its limit.
    Key(usize),
}

/// A place under the [`StreamLimits`]; dropping it gives the place back.
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    owner: String,
}

impl StreamLimits {
    pub fn new(max: usize, per_key: Option<usize>) -> StreamLimits {
        StreamLimits {
            max,
            per_key,
            running: Mutex::new(Running::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Running> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for a new stream of `owner`, if one is free.
    pub fn acquire(self: &Arc<Self>, owner: &str) -> Result<StreamPermit, Refusal> {
        let mut running = self.lock();
        if running.total >= self.max {
            return Err(Refusal::Process);
        }
        if let Some(per_key) = self.per_key {
            let mine = running.by_owner.get(owner).copied().unwrap_or(0);
            if mine >= per_key {
                return Err(Refusal::Key(per_key));
            }
        }
        running.total += 1;
        *running.by_owner.entry(owner.to_owned()).or_default() += 1;
        Ok(StreamPermit {
            limits: self.clone(),
            owner: owner.to_owned(),
        })
    }

    /// Streams counted now.
    pub fn running(&self) -> usize {
        self.lock().total
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut running = self.limits.lock();
        running.total = running.total.saturating_sub(1);
        if let Some(n) = running.by_owner.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                running.by_owner.remove(&self.owner);
            }
        }
    }
}

/// Every stream this process runs, by id.
#[derive(Default)]
pub struct Registry {
    streams: Mutex<HashMap<String, Arc<LiveStream>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<LiveStream>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<LiveStream>> {
        self.lock().get(id).cloned()
    }

    /// Insert the stream `make` builds unless one runs under that id:
    /// returns the running one and whether it was made now. This is what
    /// makes two concurrent resumes start one continuation.
    pub fn get_or_insert(
        &self,
        id: &str,
        make: impl FnOnce() -> Arc<LiveStream>,
    ) -> (Arc<LiveStream>, bool) {
        let mut map = self.lock();
        if let Some(existing) = map.get(id) {
            return (existing.clone(), false);
        }
        let live = make();
        map.insert(id.to_owned(), live.clone());
        (live, true)
    }

    /// Remove `live` (and not a newer run under the same id).
    pub fn remove(&self, live: &Arc<LiveStream>) {
        let mut map = self.lock();
        if map.get(&live.who.id).is_some_and(|l| Arc::ptr_eq(l, live)) {
            map.remove(&live.who.id);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Protocol;
    use bytes::Bytes;

    fn live(policy: DisconnectPolicy) -> Arc<LiveStream> {
        Arc::new(LiveStream::new(
            StreamIdentity {
                id: "s".into(),
                resume_token: "t".into(),
                protocol: Protocol::OpenAi,
                continuable: true,
            },
            "o".into(),
            5,
            CancellationToken::new(),
            policy,
            TaskTracker::new(),
            1024,
        ))
    }

    fn event(seq: u64) -> Event {
        Event {
            seq,
            name: None,
            data: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn snapshots_respect_base_and_cursor() {
        let l = live(DisconnectPolicy::Cancel);
        l.push([event(6)]);
        l.push([event(7)]);
        assert_eq!(l.last_seq(), 7);
        let after = |mut cursor: u64| {
            let mut out = BytesMut::new();
            l.write_after(&mut cursor, &mut out).unwrap();
            (cursor, String::from_utf8(out.to_vec()).unwrap())
        };
        assert_eq!(after(0), (7, "id: 6\ndata: x\n\nid: 7\ndata: x\n\n".into()));
        assert_eq!(after(6), (7, "id: 7\ndata: x\n\n".into()));
        assert_eq!(after(7), (7, String::new()));
        assert_eq!(after(99), (99, String::new()));
    }

    #[test]
    fn only_the_window_is_held_and_a_lagging_cursor_is_told() {
        let l = live(DisconnectPolicy::Cancel);
        // 100 events of 100 bytes through a 1 KiB window.
        for seq in 6..106 {
            l.push([Event {
                seq,
                name: None,
                data: Bytes::from(vec![b'x'; 100]),
            }]);
        }
        assert_eq!(l.last_seq(), 105);
        assert!(l.lock().held <= 1024);
        let mut out = BytesMut::new();
        let mut cursor = 5;
        assert_eq!(l.write_after(&mut cursor, &mut out), Err(Behind));
        assert!(out.is_empty());
        let mut cursor = 100;
        assert_eq!(l.write_after(&mut cursor, &mut out), Ok(None));
        assert_eq!(cursor, 105);
        assert!(
            String::from_utf8(out.to_vec())
                .unwrap()
                .starts_with("id: 101\n")
        );
    }

    #[test]
    fn stream_limits_count_per_process_and_per_key() {
        let limits = Arc::new(StreamLimits::new(3, Some(2)));
        let a1 = limits.acquire("a").unwrap();
        let _a2 = limits.acquire("a").unwrap();
        assert_eq!(limits.acquire("a").err(), Some(Refusal::Key(2)));
        let _b1 = limits.acquire("b").unwrap();
        assert_eq!(limits.acquire("c").err(), Some(Refusal::Process));
        drop(a1);
        assert_eq!(limits.running(), 2);
        let _a3 = limits.acquire("a").unwrap();
        let open = Arc::new(StreamLimits::new(10, None));
        let held: Vec<_> = (0..10)
            .map(|_| open.acquire("anonymous").unwrap())
            .collect();
        assert_eq!(held.len(), 10);
        assert_eq!(open.acquire("anonymous").err(), Some(Refusal::Process));
    }

    #[test]
    fn a_run_gives_its_place_back_when_it_ends() {
        let limits = Arc::new(StreamLimits::new(1, None));
        let l = live(DisconnectPolicy::Cancel);
        l.hold(limits.acquire("o").unwrap());
        assert!(limits.acquire("o").is_err());
        l.finish(End::Done);
        assert!(limits.acquire("o").is_ok());
    }

    #[test]
    fn last_subscriber_leaving_cancels() {
        let l = live(DisconnectPolicy::Cancel);
        let a = l.subscribe();
        let b = l.subscribe();
        drop(a);
        assert!(!l.token.is_cancelled());
        drop(b);
        assert!(l.token.is_cancelled());
        assert_eq!(l.cancel_reason(), AbortKind::ClientGone);
    }

    #[test]
    fn a_finished_stream_is_not_cancelled() {
        let l = live(DisconnectPolicy::Cancel);
        let a = l.subscribe();
        l.finish(End::Done);
        drop(a);
        assert!(!l.token.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn grace_policy_waits_for_a_returning_client() {
        let l = live(DisconnectPolicy::Grace(std::time::Duration::from_secs(10)));
        drop(l.subscribe());
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(!l.token.is_cancelled());
        let back = l.subscribe();
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        assert!(!l.token.is_cancelled());
        drop(back);
        tokio::time::sleep(std::time::Duration::from_secs(11)).await;
        assert!(l.token.is_cancelled());
    }
}
