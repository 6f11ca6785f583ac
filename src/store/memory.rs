//! The `memory` store: a map in this process. For tests and throw-away dev;
//! nothing survives a restart.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{Store, StoreError};
use crate::stream::{Event, IdempotencyEntry, Status, StreamRecord, now_ms};

pub struct MemoryStore {
    ttl_ms: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<String, Entry>,
    idempotency: HashMap<(String, String), (IdempotencyEntry, u64)>,
}

struct Entry {
    record: StreamRecord,
    events: Vec<Event>,
}

impl MemoryStore {
    pub fn new(ttl: Duration) -> MemoryStore {
        MemoryStore {
            ttl_ms: ttl.as_millis() as u64,
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
    async fn create(&self, record: &StreamRecord) -> Result<(), StoreError> {
        self.lock()?.streams.insert(
            record.id.clone(),
            Entry {
                record: record.clone(),
                events: Vec::new(),
            },
        );
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
        entry.events.extend_from_slice(events);
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
        if let Some(entry) = inner.streams.get_mut(stream_id) {
            entry.record.status = status;
            entry.record.reason = reason.map(str::to_owned);
            entry.record.updated_ms = now_ms();
            entry.record.instance = instance.to_owned();
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
        let before = inner.streams.len();
        inner.streams.retain(|_, e| e.record.updated_ms + ttl > now);
        inner.idempotency.retain(|_, (_, at)| *at + ttl > now);
        Ok(before - inner.streams.len())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn shared(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
