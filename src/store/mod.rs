//! The partial-response store: every relayed event, each stream's record
//! (original request, owner, status, timestamps), idempotency keys and
//! continuation leases.
//!
//! Three backends share one trait: [`memory`] for tests, [`embedded`] (the
//! default, on local disk, survives a SIGKILL) and [`redis`] for many
//! replicas. The relay never knows which one it talks to.
//!
//! **Invariant:** when [`Store::append`] returns `Ok`, the event is durable
//! enough to be replayed by the next process on the same store; the relay
//! writes an event to a client only after that.

pub mod embedded;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::{StoreConfig, StoreKind};
use crate::stream::Event;
pub use crate::stream::{IdempotencyEntry, Status, StreamRecord, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o: {0}")]
    Io(String),
    #[error("store record is corrupt: {0}")]
    Corrupt(String),
    #[error("store is unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Store a new record, replacing none.
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
    /// The record, unless it does not exist or has expired.
    async fn get(&self, stream_id: &str) -> Result<Option<StreamRecord>, StoreError>;
    /// Events with `seq > after`, in order.
    async fn events_after(&self, stream_id: &str, after: u64) -> Result<Vec<Event>, StoreError>;
    /// Record `entry` under (owner, key) unless one is there; return the one
    /// that was there.
    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        entry: &IdempotencyEntry,
    ) -> Result<Option<IdempotencyEntry>, StoreError>;
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
        StoreKind::Memory => Arc::new(memory::MemoryStore::new(config.ttl)),
        StoreKind::Embedded { path } => Arc::new(embedded::EmbeddedStore::open(path, config)?),
        StoreKind::Redis { url } => Arc::new(redis::RedisStore::connect(url, config).await?),
    })
}

/// Encode an event for a byte-oriented store: `[name len][name][data]`.
pub fn encode_event(event: &Event) -> Vec<u8> {
    let name = event.name.as_deref().unwrap_or("").as_bytes();
    let mut out = Vec::with_capacity(1 + name.len() + event.data.len());
    out.push(name.len().min(255) as u8);
    out.extend_from_slice(&name[..name.len().min(255)]);
    out.extend_from_slice(&event.data);
    out
}

/// Several consecutive events in one value: each as a little-endian u32
/// length and [`encode_event`]'s bytes. One store entry per append.
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    let size = events.iter().map(|e| e.data.len() + 16).sum();
    let mut value = Vec::with_capacity(size);
    for event in events {
        let encoded = encode_event(event);
        value.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        value.extend_from_slice(&encoded);
    }
    value
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
            .ok_or_else(|| StoreError::Corrupt("short event batch".into()))?;
        let len = u32::from_le_bytes(*len) as usize;
        encoded.push(
            tail.get(..len)
                .ok_or_else(|| StoreError::Corrupt("event overruns its batch".into()))?,
        );
        rest = &tail[len..];
    }
    let first = (last + 1)
        .checked_sub(encoded.len() as u64)
        .filter(|first| *first >= 1)
        .ok_or_else(|| StoreError::Corrupt(format!("a batch ending at {last} is too long")))?;
    (first..)
        .zip(encoded)
        .filter(|(seq, _)| *seq > after)
        .map(|(seq, bytes)| decode_event(seq, bytes))
        .collect()
}

pub fn decode_event(seq: u64, bytes: &[u8]) -> Result<Event, StoreError> {
    let (&len, rest) = bytes
        .split_first()
        .ok_or_else(|| StoreError::Corrupt("empty event".into()))?;
    let len = len as usize;
    if rest.len() < len {
        return Err(StoreError::Corrupt("event name overruns".into()));
    }
    let name = if len == 0 {
        None
    } else {
        Some(
            std::str::from_utf8(&rest[..len])
                .map_err(|e| StoreError::Corrupt(e.to_string()))?
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
        assert!(decode_event(1, &[]).is_err());
        assert!(decode_event(1, &[5, b'a']).is_err());
    }
}
