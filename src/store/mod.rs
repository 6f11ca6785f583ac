//! The partial-response store: every relayed event, each stream's record
//! (original request, owner, status, timestamps), idempotency keys and
//! continuation leases.
//!
//! Three backends share one trait: [`memory`] for tests, [`embedded`] (the
//! default, on local disk, survives a SIGKILL) and [`redis`] for many
//! replicas (one Redis or a Redis Cluster). The relay never knows which one it talks to.
//!
//! **Invariant:** when [`Store::append`] returns `Ok`, the event is durable
//! enough to be replayed by the next process on the same store; the relay
//! writes an event to a client only after that.

pub mod embedded;
pub mod memory;
pub mod redis;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::{StoreConfig, StoreKind};
use crate::stream::{Event, IdempotencyEntry, Reattach, Status, StreamRecord};

/// Why a store call failed, with the typed cause as its source.
///
/// Every Display names the store's state first (`store i/o`, `store record
/// is corrupt`, `store is unavailable`) and ends with the cause's own text:
/// callers log errors with `%e` and never walk the source chain, so the
/// message alone has to tell an operator what went wrong. Redis URLs in it
/// are always redacted.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded store's directory, or a file in it, could not be created
    /// or written, or read.
    #[error("store i/o: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the embedded store's directory lock.
    #[error(
        "store is unavailable: {} is in use by another tidegate process (the embedded store serves one process; use store.kind = \"redis\" for replicas)",
        path.display()
    )]
    Locked { path: PathBuf },
    /// A write to the embedded store failed (a full disk, say): readiness
    /// and new streams fail with this until a test write fits again.
    #[error(
        "store is unavailable: a write to the embedded store failed and it has no room yet (is its disk full?)"
    )]
    Impaired,
    /// A blocking task reading or syncing the embedded store did not finish
    /// (it panicked or was cancelled).
    #[error("store i/o: a blocking store task did not finish: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// A Redis command or connection failed; `url` is already redacted.
    #[error("store is unavailable: redis at {url}: {what}: {source}")]
    Redis {
        url: String,
        what: &'static str,
        #[source]
        source: ::redis::RedisError,
    },
    /// A Redis command (or connecting, or a blocking XREAD) took longer than
    /// its deadline; `url` is already redacted.
    #[error("store is unavailable: redis at {url}: {what} timed out after {after:?}")]
    Timeout {
        url: String,
        what: &'static str,
        after: Duration,
    },
    /// A new stream does not fit under `store.max_bytes`: running streams
    /// alone fill it (finished ones were evicted to make room).
    #[error("store is full: running streams hold {held} of its {max} bytes (store.max_bytes)")]
    Full { held: u64, max: u64 },
    /// As many background responses are pending as the store tracks.
    #[error("store is full: {0} background responses are pending, as many as it tracks")]
    TooManyBackground(usize),
    /// The memory store's lock was poisoned by a panic while it was held.
    #[error("store is unavailable: memory store lock poisoned")]
    Poisoned,
    /// An event was appended to a stream the memory store has no record of.
    #[error("store i/o: no record for stream {stream_id}")]
    NoRecord { stream_id: String },
    /// A record could not be encoded as JSON.
    #[error("store i/o: cannot encode a record as JSON: {0}")]
    Encode(#[source] serde_json::Error),
    /// A stored JSON value did not decode; `what` names the value.
    #[error("store record is corrupt: cannot decode the {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Bytes in our own encoding (event batches, keys, entry ids) are
    /// malformed.
    #[error("store record is corrupt: {0}")]
    Corrupt(#[source] Corruption),
}

/// What is wrong with bytes the gateway encoded itself.
#[derive(Debug, thiserror::Error)]
pub enum Corruption {
    /// A batch ends inside an event's length prefix.
    #[error("short event batch")]
    ShortBatch,
    /// An event's length runs past the end of its batch.
    #[error("event overruns its batch")]
    EventOverrunsBatch,
    /// A batch holds more events than there are seqs up to its last one.
    #[error("a batch ending at {last} is too long")]
    BatchTooLong { last: u64 },
    /// An encoded event has no bytes at all.
    #[error("empty event")]
    EmptyEvent,
    /// An event's name length runs past the end of the event.
    #[error("event name overruns")]
    NameOverruns,
    /// An event's name is not UTF-8.
    #[error("event name is not UTF-8: {0}")]
    NameNotUtf8(#[source] std::str::Utf8Error),
    /// An index entry names a segment file that is gone.
    #[error("the embedded store has no segment {0}")]
    MissingSegment(u64),
    /// A stream id or idempotency key is too long to store (over 65,535 bytes).
    #[error("a key of {0} bytes is too long to store")]
    KeyTooLong(usize),
    /// A Redis stream entry's id is not `<seq>-<n>`.
    #[error("bad stream id {0}")]
    BadEntryId(String),
    /// A Redis stream entry has no `b` (event batch) field.
    #[error("stream entry {0} holds no event batch")]
    NoBatch(String),
}

/// The meta key local stores keep the background responses under.
const BACKGROUND_KEY: &str = "background";
/// Background responses a store keeps track of at most: past it, a new one
/// is refused (503 `store_full`) rather than grow the list without bound.
pub const MAX_BACKGROUND: usize = 10_000;
/// Serialises a local store's read-modify-write of its background list.
static BACKGROUND_LIST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[async_trait]
pub trait Store: Send + Sync {
    /// Whether a new stream fits under `store.max_bytes`, asked before its
    /// provider is: makes room by evicting finished streams, oldest first,
    /// and fails with [`StoreError::Full`] only when running streams alone
    /// fill the store.
    async fn admit(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Store a new record, replacing none, and (in a shared store) lease
    /// it to `record.instance`, the replica that will run it.
    async fn create(&self, record: &StreamRecord) -> Result<(), StoreError>;
    /// Append events (in order, one stream); durable when this returns.
    async fn append(&self, stream_id: &str, events: &[Event]) -> Result<(), StoreError>;
    /// Append a run's last events and record how it ended: one write where
    /// the backend can group them (embedded: one commit, one round trip to
    /// the writer). Durable when this returns, like the two calls it joins.
    async fn append_final(
        &self,
        stream_id: &str,
        events: &[Event],
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.append(stream_id, events).await?;
        self.set_status(stream_id, status, reason, instance).await
    }
    /// Set a stream's status (and why it ended).
    async fn set_status(
        &self,
        stream_id: &str,
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError>;
    /// Record that upstream `upstream` now serves the stream (a retry went
    /// elsewhere, or a failover moved it): a later continuation goes there.
    async fn set_upstream(
        &self,
        stream_id: &str,
        upstream: &str,
        instance: &str,
    ) -> Result<(), StoreError>;
    /// Record the provider's background response the stream's events now
    /// come from (`None`: they do not, or no longer, map one for one).
    async fn set_reattach(
        &self,
        stream_id: &str,
        reattach: Option<&Reattach>,
        instance: &str,
    ) -> Result<(), StoreError>;
    /// The record, unless it does not exist or has expired.
    async fn get(&self, stream_id: &str) -> Result<Option<StreamRecord>, StoreError>;
    /// Events with `seq > after`, in order.
    async fn events_after(&self, stream_id: &str, after: u64) -> Result<Vec<Event>, StoreError>;
    /// The first events after `after`, about `max` of them (whole appends:
    /// a few more, never fewer while there are more): a page, so a client
    /// catching up does not read the rest of a long answer at once.
    async fn events_page(
        &self,
        stream_id: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut events = self.events_after(stream_id, after).await?;
        events.truncate(max.max(1));
        Ok(events)
    }
    /// Record `entry` under (owner, key) unless one is there; return the one
    /// that was there.
    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        entry: &IdempotencyEntry,
    ) -> Result<Option<IdempotencyEntry>, StoreError>;
    /// Undo a claim whose stream was refused before it started (store
    /// full, stream limits), so a retry with the key starts it then;
    /// only when the key still names `stream_id`.
    async fn release_idempotency(
        &self,
        owner: &str,
        key: &str,
        stream_id: &str,
    ) -> Result<(), StoreError>;
    /// Take the right to run `stream_id` (the first run or a continuation).
    /// Local stores: the registry already serialises within the process, and
    /// only one process opens the store, so this always succeeds.
    async fn try_lease(&self, stream_id: &str, instance: &str) -> Result<bool, StoreError>;
    /// Whether the stream's runner is alive (holds a fresh lease).
    async fn lease_alive(&self, stream_id: &str) -> Result<bool, StoreError>;
    /// Keep this instance's leases fresh.
    async fn renew_leases(&self, stream_ids: &[String], instance: &str) -> Result<(), StoreError>;
    async fn release_lease(&self, stream_id: &str, instance: &str) -> Result<(), StoreError>;
    /// Wait for the next events of a stream run by another replica
    /// (`seq > after`), up to `wait`. Local stores never have such streams.
    async fn follow(
        &self,
        stream_id: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<Event>, StoreError> {
        let _ = wait;
        self.events_after(stream_id, after).await
    }
    /// Ask the replica running `stream_id` to cancel it (shared stores).
    async fn request_cancel(&self, stream_id: &str) -> Result<(), StoreError> {
        let _ = stream_id;
        Ok(())
    }
    /// Which of these streams another replica asked to cancel.
    async fn cancel_requested(&self, stream_ids: &[String]) -> Result<Vec<String>, StoreError> {
        let _ = stream_ids;
        Ok(Vec::new())
    }
    /// Delete what expired. Returns how many streams went.
    async fn sweep(&self) -> Result<usize, StoreError>;
    /// Make everything written so far durable (at exit).
    async fn flush(&self) -> Result<(), StoreError>;
    /// Whether the store takes a write now (readiness asks): one tiny
    /// write, of nothing any stream reads.
    async fn probe(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// A small named value kept with the data, with no TTL (a canary's
    /// phase): `key` is `[a-z0-9_-]`, the value at most a few KiB.
    async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError>;
    async fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;
    /// Remember stream `id` as a background response (OpenAI Responses
    /// `background: true`): whichever process finds it interrupted
    /// continues it, with no client attached. Local stores keep the list in
    /// one meta value (only this process writes it); Redis in a set.
    async fn add_background(&self, id: &str) -> Result<(), StoreError> {
        let _guard = BACKGROUND_LIST.lock().await;
        let mut ids = self.background().await?;
        if ids.len() >= MAX_BACKGROUND {
            return Err(StoreError::TooManyBackground(MAX_BACKGROUND));
        }
        if !ids.iter().any(|i| i == id) {
            ids.push(id.to_owned());
        }
        self.put_meta(BACKGROUND_KEY, &serde_json::Value::from(ids).to_string())
            .await
    }
    /// Forget background response `id` (it ended, or it expired).
    async fn remove_background(&self, id: &str) -> Result<(), StoreError> {
        let _guard = BACKGROUND_LIST.lock().await;
        let mut ids = self.background().await?;
        let before = ids.len();
        ids.retain(|i| i != id);
        if ids.len() == before {
            return Ok(());
        }
        self.put_meta(BACKGROUND_KEY, &serde_json::Value::from(ids).to_string())
            .await
    }
    /// The background responses not yet known to be over.
    async fn background(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .get_meta(BACKGROUND_KEY)
            .await?
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default())
    }
    /// Whether other replicas share this store (runs may live elsewhere).
    fn shared(&self) -> bool;
    /// A secret kept with the data (embedded), for resume tokens when none
    /// is configured.
    fn local_secret(&self) -> Option<Vec<u8>> {
        None
    }
    fn name(&self) -> &'static str;
}

pub type SharedStore = Arc<dyn Store>;

pub async fn open(config: &StoreConfig) -> Result<SharedStore, StoreError> {
    Ok(match &config.kind {
        StoreKind::Memory => Arc::new(memory::MemoryStore::bounded(config.ttl, config.max_bytes)),
        StoreKind::Embedded { path } => Arc::new(embedded::EmbeddedStore::open(path, config)?),
        StoreKind::Redis { url } => redis::connect(url, config).await?,
        StoreKind::RedisCluster { nodes } => redis::connect_cluster(nodes, config).await?,
    })
}

/// Encode an event for a byte-oriented store: `[name len][name][data]`.
pub fn encode_event(event: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + event.data.len() + 16);
    put_event(&mut out, event);
    out
}

fn put_event(out: &mut Vec<u8>, event: &Event) {
    let name = event.name.as_deref().unwrap_or("").as_bytes();
    let name = &name[..name.len().min(255)];
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&event.data);
}

/// Several consecutive events in one value: each as a little-endian u32
/// length and [`encode_event`]'s bytes. One store entry per append.
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    let size = events.iter().map(|e| e.data.len() + 16).sum();
    let mut value = Vec::with_capacity(size);
    put_batch(&mut value, events);
    value
}

/// [`encode_batch`]'s bytes, written at the end of `out` (no buffer per
/// event).
pub fn put_batch(out: &mut Vec<u8>, events: &[Event]) {
    for event in events {
        let name = event.name.as_deref().map_or(0, |n| n.len().min(255));
        out.extend_from_slice(&((1 + name + event.data.len()) as u32).to_le_bytes());
        put_event(out, event);
    }
}

/// The events of a batch whose last event is `last` (stores key a batch by
/// its last seq, so a range from seq `n + 1` starts at the batch holding
/// it), keeping those after `after`.
pub fn decode_batch(last: u64, bytes: &[u8], after: u64) -> Result<Vec<Event>, StoreError> {
    let mut encoded = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or(StoreError::Corrupt(Corruption::ShortBatch))?;
        let len = u32::from_le_bytes(*len) as usize;
        encoded.push(
            tail.get(..len)
                .ok_or(StoreError::Corrupt(Corruption::EventOverrunsBatch))?,
        );
        rest = &tail[len..];
    }
    let first = (last + 1)
        .checked_sub(encoded.len() as u64)
        .filter(|first| *first >= 1)
        .ok_or(StoreError::Corrupt(Corruption::BatchTooLong { last }))?;
    (first..)
        .zip(encoded)
        .filter(|(seq, _)| *seq > after)
        .map(|(seq, bytes)| decode_event(seq, bytes))
        .collect()
}

pub fn decode_event(seq: u64, bytes: &[u8]) -> Result<Event, StoreError> {
    let (&len, rest) = bytes
        .split_first()
        .ok_or(StoreError::Corrupt(Corruption::EmptyEvent))?;
    let len = len as usize;
    if rest.len() < len {
        return Err(StoreError::Corrupt(Corruption::NameOverruns));
    }
    let name = if len == 0 {
        None
    } else {
        Some(
            std::str::from_utf8(&rest[..len])
                .map_err(|e| StoreError::Corrupt(Corruption::NameNotUtf8(e)))?
                .into(),
        )
    };
    Ok(Event {
        seq,
        name,
        data: Bytes::copy_from_slice(&rest[len..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_encoding_round_trips() {
        for name in [None, Some("content_block_delta")] {
            let e = Event {
                seq: 7,
                name: name.map(Into::into),
                data: Bytes::from_static(b"{\"a\":1}"),
            };
            let back = decode_event(7, &encode_event(&e)).unwrap();
            assert_eq!(back.name, e.name);
            assert_eq!(back.data, e.data);
        }
        assert!(matches!(
            decode_event(1, &[]),
            Err(StoreError::Corrupt(Corruption::EmptyEvent))
        ));
        assert!(matches!(
            decode_event(1, &[5, b'a']),
            Err(StoreError::Corrupt(Corruption::NameOverruns))
        ));
    }

    #[test]
    fn corrupt_names_keep_their_utf8_error() {
        use std::error::Error;
        let e = decode_event(1, &[1, 0xff]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("store record is corrupt: event name is not UTF-8: "),
            "{e}"
        );
        let reason = e.source().unwrap();
        assert!(reason.downcast_ref::<Corruption>().is_some());
        assert!(
            reason
                .source()
                .unwrap()
                .downcast_ref::<std::str::Utf8Error>()
                .is_some()
        );
    }

    #[test]
    fn batches_round_trip_and_reject_bad_lengths() {
        let events: Vec<Event> = (3..=5)
            .map(|seq| Event {
                seq,
                name: None,
                data: Bytes::from(format!("e{seq}")),
            })
            .collect();
        let bytes = encode_batch(&events);
        assert_eq!(decode_batch(5, &bytes, 3).unwrap(), events[1..]);
        assert!(matches!(
            decode_batch(5, &bytes[..2], 0),
            Err(StoreError::Corrupt(Corruption::ShortBatch))
        ));
        assert!(matches!(
            decode_batch(5, &bytes[..bytes.len() - 1], 0),
            Err(StoreError::Corrupt(Corruption::EventOverrunsBatch))
        ));
        assert!(matches!(
            decode_batch(2, &bytes, 0),
            Err(StoreError::Corrupt(Corruption::BatchTooLong { last: 2 }))
        ));
    }
}
