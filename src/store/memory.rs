//! The `memory` store: a map in this process. For tests and throw-away dev;
//! nothing survives a restart.
//!
//! It holds at most `store.max_bytes` of stream data, counted as
//! [`stream_bytes`] and [`event_bytes`] say: a stream's request body and
//! headers plus [`STREAM_OVERHEAD`], and each event's name and data plus
//! [`EVENT_OVERHEAD`]. [`Store::admit`] makes room for a new stream by
//! evicting finished streams, oldest created first; a running stream is
//! never evicted, and appends are never refused for size.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{Store, StoreError};
use crate::stream::{Event, IdempotencyEntry, Reattach, Status, StreamRecord, now_ms};

/// What one stored event costs beyond its name and data: its seq, the
/// handles of its name and data, its slot in the stream's list.
pub const EVENT_OVERHEAD: u64 = 64;

/// What one stream's record costs beyond its request body and headers:
/// its id, owner, names, timestamps and map entries.
pub const STREAM_OVERHEAD: u64 = 256;

pub struct MemoryStore {
    ttl_ms: u64,
    /// `store.max_bytes`: what [`Store::admit`] keeps the store under.
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<String, Entry>,
    /// [`Store::put_meta`]'s values.
    meta: HashMap<String, String>,
    /// The streams that are over (any status but running), by (created,
    /// order of creation): the order they are evicted in.
    finished: BTreeMap<(u64, u64), String>,
    /// What every stream held here costs, running or not.
    held: u64,
    /// The order the next stream is created in (ties of `created_ms`).
    next_order: u64,
    idempotency: HashMap<(String, String), (IdempotencyEntry, u64)>,
}

struct Entry {
    record: StreamRecord,
    events: Vec<Event>,
    /// What this stream costs: its record and its events.
    bytes: u64,
    /// Its place among streams created in the same millisecond.
    order: u64,
}

impl Entry {
    fn eviction_key(&self) -> (u64, u64) {
        (self.record.created_ms, self.order)
    }
}

/// What a stream's record costs under `store.max_bytes`.
pub fn stream_bytes(record: &StreamRecord) -> u64 {
    let headers: usize = record.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (record.request.len() + headers) as u64 + STREAM_OVERHEAD
}

/// What an event costs under `store.max_bytes`.
pub fn event_bytes(event: &Event) -> u64 {
    let name = event.name.as_deref().map_or(0, str::len);
    (name + event.data.len()) as u64 + EVENT_OVERHEAD
}

impl Inner {
    /// Drop stream `id` (record and events); whether it was there.
    fn remove(&mut self, id: &str) -> bool {
        let Some(entry) = self.streams.remove(id) else {
            return false;
        };
        self.held = self.held.saturating_sub(entry.bytes);
        self.finished.remove(&entry.eviction_key());
        true
    }

    /// Evict finished streams, oldest created first, until less than `max`
    /// is held or none is left; how many went.
    fn evict_until_below(&mut self, max: u64) -> usize {
        let mut evicted = 0;
        while self.held >= max {
            let Some((_, id)) = self.finished.pop_first() else {
                break;
            };
            if let Some(entry) = self.streams.remove(&id) {
                self.held = self.held.saturating_sub(entry.bytes);
                evicted += 1;
            }
        }
        evicted
    }
}

impl MemoryStore {
    /// A store with no size bound (tests of other things).
    pub fn new(ttl: Duration) -> MemoryStore {
        MemoryStore::bounded(ttl, u64::MAX)
    }

    /// A store that holds at most `max_bytes` of stream data once it
    /// admits a new stream (`store.max_bytes`).
    pub fn bounded(ttl: Duration, max_bytes: u64) -> MemoryStore {
        MemoryStore {
            ttl_ms: ttl.as_millis() as u64,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner.lock().map_err(|_| StoreError::Poisoned)
    }

    fn live(&self, record: &StreamRecord, now: u64) -> bool {
        record.updated_ms + self.ttl_ms > now
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn admit(&self) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let evicted = inner.evict_until_below(self.max_bytes);
        if evicted > 0 {
            tracing::debug!(
                evicted,
                held = inner.held,
                max = self.max_bytes,
                "memory store evicted finished streams to admit a new one"
            );
        }
        if inner.held >= self.max_bytes {
            // Only running streams are left.
            return Err(StoreError::Full {
                held: inner.held,
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    async fn create(&self, record: &StreamRecord) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        inner.remove(&record.id);
        let order = inner.next_order;
        inner.next_order += 1;
        let entry = Entry {
            record: record.clone(),
            events: Vec::new(),
            bytes: stream_bytes(record),
            order,
        };
        inner.held = inner.held.saturating_add(entry.bytes);
        if entry.record.status != Status::Running {
            inner
                .finished
                .insert(entry.eviction_key(), record.id.clone());
        }
        inner.streams.insert(record.id.clone(), entry);
        Ok(())
    }

    async fn append(&self, stream_id: &str, events: &[Event]) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let entry = inner
            .streams
            .get_mut(stream_id)
            .ok_or_else(|| StoreError::NoRecord {
                stream_id: stream_id.to_owned(),
            })?;
        let bytes: u64 = events.iter().map(event_bytes).sum();
        entry.bytes = entry.bytes.saturating_add(bytes);
        entry.events.extend_from_slice(events);
        inner.held = inner.held.saturating_add(bytes);
        Ok(())
    }

    async fn set_status(
        &self,
        stream_id: &str,
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let Inner {
            streams, finished, ..
        } = &mut *inner;
        if let Some(entry) = streams.get_mut(stream_id) {
            entry.record.status = status;
            entry.record.reason = reason.map(str::to_owned);
            entry.record.updated_ms = now_ms();
            entry.record.instance = instance.to_owned();
            // A continuation makes a finished stream run again.
            if status == Status::Running {
                finished.remove(&entry.eviction_key());
            } else {
                finished.insert(entry.eviction_key(), stream_id.to_owned());
            }
        }
        Ok(())
    }

    async fn set_upstream(
        &self,
        stream_id: &str,
        upstream: &str,
        instance: &str,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if let Some(entry) = inner.streams.get_mut(stream_id) {
            entry.record.upstream = upstream.to_owned();
            entry.record.instance = instance.to_owned();
        }
        Ok(())
    }

    async fn set_reattach(
        &self,
        stream_id: &str,
        reattach: Option<&Reattach>,
        _instance: &str,
    ) -> Result<(), StoreError> {
        if let Some(entry) = self.lock()?.streams.get_mut(stream_id) {
            entry.record.reattach = reattach.cloned();
        }
        Ok(())
    }

    async fn get(&self, stream_id: &str) -> Result<Option<StreamRecord>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .streams
            .get(stream_id)
            .map(|e| e.record.clone())
            .filter(|r| self.live(r, now_ms())))
    }

    async fn events_after(&self, stream_id: &str, after: u64) -> Result<Vec<Event>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .streams
            .get(stream_id)
            .map(|e| {
                let start = e.events.partition_point(|ev| ev.seq <= after);
                e.events[start..].to_vec()
            })
            .unwrap_or_default())
    }

    async fn events_page(
        &self,
        stream_id: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .streams
            .get(stream_id)
            .map(|e| {
                let start = e.events.partition_point(|ev| ev.seq <= after);
                let end = start.saturating_add(max.max(1)).min(e.events.len());
                e.events[start..end].to_vec()
            })
            .unwrap_or_default())
    }

    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        entry: &IdempotencyEntry,
    ) -> Result<Option<IdempotencyEntry>, StoreError> {
        let now = now_ms();
        let mut inner = self.lock()?;
        let slot = (owner.to_owned(), key.to_owned());
        if let Some((existing, at)) = inner.idempotency.get(&slot)
            && at + self.ttl_ms > now
        {
            return Ok(Some(existing.clone()));
        }
        inner.idempotency.insert(slot, (entry.clone(), now));
        Ok(None)
    }

    async fn release_idempotency(
        &self,
        owner: &str,
        key: &str,
        stream_id: &str,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let slot = (owner.to_owned(), key.to_owned());
        if inner
            .idempotency
            .get(&slot)
            .is_some_and(|(e, _)| e.stream_id == stream_id)
        {
            inner.idempotency.remove(&slot);
        }
        Ok(())
    }

    async fn try_lease(&self, _stream_id: &str, _instance: &str) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn lease_alive(&self, _stream_id: &str) -> Result<bool, StoreError> {
        // One process owns a memory store: a run it does not know is dead.
        Ok(false)
    }

    async fn renew_leases(&self, _ids: &[String], _instance: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn release_lease(&self, _stream_id: &str, _instance: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let ttl = self.ttl_ms;
        let mut inner = self.lock()?;
        let expired: Vec<String> = inner
            .streams
            .iter()
            .filter(|(_, e)| e.record.updated_ms + ttl <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            inner.remove(id);
        }
        inner.idempotency.retain(|_, (_, at)| *at + ttl > now);
        Ok(expired.len())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock()?.meta.get(key).cloned())
    }

    async fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.lock()?.meta.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    fn shared(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const TTL: Duration = Duration::from_secs(900);

    /// A stream created at `created_ms` (a fixed clock: the order is what
    /// these tests are about) whose request is `request_len` bytes.
    fn record(id: &str, created_ms: u64, request_len: usize) -> StreamRecord {
        let now = now_ms();
        StreamRecord {
            id: id.into(),
            owner: "o".into(),
            protocol: "openai".into(),
            upstream: "u".into(),
            request: "x".repeat(request_len),
            headers: vec![("anthropic-version".into(), "2023-06-01".into())],
            client_credential: false,
            status: Status::Running,
            reason: None,
            created_ms: now - 10_000 + created_ms,
            updated_ms: now,
            instance: "i1".into(),
            reattach: None,
        }
    }

    fn events(n: u64, len: usize) -> Vec<Event> {
        (1..=n)
            .map(|seq| Event {
                seq,
                name: (seq % 2 == 0).then(|| "delta".into()),
                data: Bytes::from("d".repeat(len)),
            })
            .collect()
    }

    /// What [`stream`] makes a stream cost.
    fn cost(request_len: usize, events: &[Event]) -> u64 {
        let r = record("any", 0, request_len);
        stream_bytes(&r) + events.iter().map(event_bytes).sum::<u64>()
    }

    /// Create stream `id` with `events`, and end it with `status` unless
    /// that is `Running`.
    async fn stream(
        store: &MemoryStore,
        id: &str,
        created_ms: u64,
        events: &[Event],
        status: Status,
    ) {
        store.create(&record(id, created_ms, 100)).await.unwrap();
        store.append(id, events).await.unwrap();
        if status != Status::Running {
            store.set_status(id, status, None, "i1").await.unwrap();
        }
    }

    fn held(store: &MemoryStore) -> u64 {
        store.lock().unwrap().held
    }

    async fn present(store: &MemoryStore, id: &str) -> bool {
        let record = store.get(id).await.unwrap();
        let events = store.events_after(id, 0).await.unwrap();
        assert_eq!(
            record.is_some(),
            !events.is_empty(),
            "{id}: a record without its events, or events without their record"
        );
        record.is_some()
    }

    #[test]
    fn costs_count_bodies_headers_names_data_and_the_overheads() {
        let r = record("a", 0, 100);
        let headers = ("anthropic-version".len() + "2023-06-01".len()) as u64;
        assert_eq!(stream_bytes(&r), 100 + headers + STREAM_OVERHEAD);
        let e = events(2, 10);
        assert_eq!(event_bytes(&e[0]), 10 + EVENT_OVERHEAD);
        assert_eq!(
            event_bytes(&e[1]),
            ("delta".len() + 10) as u64 + EVENT_OVERHEAD
        );
    }

    #[tokio::test]
    async fn admit_evicts_finished_streams_oldest_created_first() {
        let e = events(10, 50);
        let one = cost(100, &e);
        let store = MemoryStore::bounded(TTL, 3 * one);
        // Created out of order: the eviction order is the creation time's.
        stream(&store, "c", 3, &e, Status::Failed).await;
        stream(&store, "a", 1, &e, Status::Completed).await;
        stream(&store, "b", 2, &e, Status::Interrupted).await;
        assert_eq!(held(&store), 3 * one);

        store.admit().await.unwrap();
        assert!(!present(&store, "a").await, "the oldest goes first");
        assert!(present(&store, "b").await && present(&store, "c").await);
        assert_eq!(held(&store), 2 * one);

        // Under the bound: nothing more goes.
        store.admit().await.unwrap();
        assert!(present(&store, "b").await && present(&store, "c").await);

        stream(&store, "d", 4, &e, Status::Cancelled).await;
        stream(&store, "e", 5, &e, Status::Completed).await;
        assert_eq!(held(&store), 4 * one);
        store.admit().await.unwrap();
        assert!(!present(&store, "b").await && !present(&store, "c").await);
        assert!(present(&store, "d").await && present(&store, "e").await);
        assert_eq!(held(&store), 2 * one);
    }

    #[tokio::test]
    async fn running_streams_are_never_evicted_and_alone_fill_the_store() {
        let e = events(10, 50);
        let one = cost(100, &e);
        let evs = one - cost(100, &[]);
        let max = 2 * one + 1;
        let store = MemoryStore::bounded(TTL, max);
        // The oldest is running; two finished ones after it.
        stream(&store, "running", 1, &e, Status::Running).await;
        stream(&store, "done-1", 2, &e, Status::Completed).await;
        stream(&store, "done-2", 3, &e, Status::Completed).await;
        store.admit().await.unwrap();
        assert!(present(&store, "running").await);
        assert!(!present(&store, "done-1").await);
        assert!(present(&store, "done-2").await);
        assert_eq!(held(&store), 2 * one);

        // Appends to a running stream are never refused for size: now it
        // alone fills the store.
        store.append("running", &events(10, 50)).await.unwrap();
        store.append("running", &events(10, 50)).await.unwrap();
        let running = one + 2 * evs;
        assert!(running >= max);
        assert_eq!(held(&store), running + one);
        match store.admit().await {
            Err(StoreError::Full { held, max: m }) => assert_eq!((held, m), (running, max)),
            other => panic!("a store full of running streams admitted: {other:?}"),
        }
        assert!(
            !present(&store, "done-2").await,
            "finished streams go before a refusal"
        );
        assert!(present(&store, "running").await);
        assert_eq!(store.events_after("running", 0).await.unwrap().len(), 30);
        store.append("running", &events(1, 50)).await.unwrap();
        assert!(matches!(store.admit().await, Err(StoreError::Full { .. })));

        // Once it is over, it can go too.
        store
            .set_status("running", Status::Completed, None, "i1")
            .await
            .unwrap();
        store.admit().await.unwrap();
        assert!(!present(&store, "running").await);
        assert_eq!(held(&store), 0);
    }

    #[tokio::test]
    async fn full_exactly_at_max_and_admitted_one_byte_under() {
        let e = events(4, 20);
        let one = cost(100, &e);
        let at = MemoryStore::bounded(TTL, one);
        stream(&at, "r", 1, &e, Status::Running).await;
        assert!(matches!(at.admit().await, Err(StoreError::Full { .. })));
        let under = MemoryStore::bounded(TTL, one + 1);
        stream(&under, "r", 1, &e, Status::Running).await;
        under.admit().await.unwrap();
    }

    #[tokio::test]
    async fn a_continued_stream_runs_again_and_is_not_evicted() {
        let e = events(10, 50);
        let one = cost(100, &e);
        let store = MemoryStore::bounded(TTL, one);
        stream(&store, "cut", 1, &e, Status::Interrupted).await;
        store
            .set_status("cut", Status::Running, None, "i1")
            .await
            .unwrap();
        assert!(matches!(store.admit().await, Err(StoreError::Full { .. })));
        assert!(present(&store, "cut").await);
    }

    #[tokio::test]
    async fn evicted_streams_keep_their_idempotency_entries() {
        let e = events(3, 10);
        let store = MemoryStore::bounded(TTL, 1);
        let entry = IdempotencyEntry {
            stream_id: "a".into(),
            body_hash: "h".into(),
        };
        assert_eq!(
            store.claim_idempotency("o", "k", &entry).await.unwrap(),
            None
        );
        stream(&store, "a", 1, &e, Status::Completed).await;
        store.admit().await.unwrap();
        assert!(!present(&store, "a").await);
        let again = IdempotencyEntry {
            stream_id: "b".into(),
            body_hash: "h".into(),
        };
        assert_eq!(
            store.claim_idempotency("o", "k", &again).await.unwrap(),
            Some(entry),
            "the key still names the stream it started"
        );
    }

    #[tokio::test]
    async fn replacing_and_sweeping_keep_the_count() {
        let e = events(5, 30);
        let store = MemoryStore::bounded(Duration::from_secs(1), u64::MAX);
        stream(&store, "a", 1, &e, Status::Completed).await;
        // The same id again replaces the stream; it is not counted twice.
        store.create(&record("a", 1, 100)).await.unwrap();
        assert_eq!(held(&store), cost(100, &[]));
        assert!(store.lock().unwrap().finished.is_empty());
        // Two that expired long ago (one recorded as over from the start),
        // one that did not.
        let mut old = record("old-done", 2, 100);
        old.status = Status::Completed;
        old.updated_ms -= 60_000;
        store.create(&old).await.unwrap();
        let mut stale = record("old-running", 3, 100);
        stale.updated_ms -= 60_000;
        store.create(&stale).await.unwrap();
        store.append("old-running", &e).await.unwrap();
        assert_eq!(store.lock().unwrap().finished.len(), 1);
        assert_eq!(store.sweep().await.unwrap(), 2);
        assert_eq!(held(&store), cost(100, &[]));
        assert!(store.lock().unwrap().finished.is_empty());
        assert!(store.get("a").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn unbounded_never_evicts() {
        let store = MemoryStore::new(TTL);
        stream(&store, "a", 1, &events(100, 1000), Status::Completed).await;
        store.admit().await.unwrap();
        assert!(present(&store, "a").await);
    }
}
