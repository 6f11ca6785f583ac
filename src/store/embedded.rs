//! The `embedded` store (the default): an append-only log of segment
//! files in a directory on local disk, with its index in memory — the
//! layout of Kafka's and NATS JetStream's file stores.
//!
//! Why a log and not a key-value engine: every byte the store holds is
//! written once, read rarely (a resume) and dropped whole at expiry. An
//! LSM tree (the first version used fjall) adds memtable inserts, flushes
//! and compactions that rewrite the same short-lived bytes, checksums at
//! every level, and a writer thread the relay hands every append to; here
//! an append is one `pwrite` of the bytes relayed, made by the task that
//! relays them (benches/OPTIMISATIONS.md, "embedded store").
//!
//! Durability: [`Store::append`] returns once its entry is in the OS (one
//! `pwrite`), which survives a SIGKILL of the gateway (the page cache
//! outlives the process); a machine crash may lose what the OS had not
//! flushed yet, as before. [`Store::flush`] (at exit) syncs the files.
//! Every entry carries its length and a CRC-32 of its body, so reopening
//! keeps every acknowledged entry and cuts a torn last one. A lock file
//! keeps a second process out.
//!
//! Entries: `[u32 body length][u32 crc32 of the body][body]`, the body a
//! kind byte and its fields (little endian): a stream's record (JSON,
//! written once), a status change (JSON), an append's events (the batch
//! encoding of [`super::encode_batch`] under the batch's last seq), an
//! idempotency key, a readiness probe, and a stream copied forward whole
//! (below).
//!
//! Space: segments are deleted oldest first, once nothing live is in them.
//! All of a stream's entries are in the segment holding its record or
//! later ones, so a segment holds something live exactly while a stream
//! created in it, or an idempotency key written in it, is live. To free a
//! segment that is old (past the TTL) or needed for room (past
//! `store.max_bytes`), what is still live in it is copied forward into the
//! newest segment, each stream as one entry (so a crash mid-copy leaves
//! the original in force), and the segment is deleted. Past
//! `store.max_bytes`, streams no run of this process is writing go first,
//! oldest first; a new stream is refused only when running streams alone
//! fill the store.
//!
//! A failed write (a full disk) is cut back off its segment (or, when
//! an entry was reserved after it, its header is zeroed), the call fails, and the store is *impaired*: readiness and new streams fail
//! (503) until a test write as large as the one that failed (at least
//! [`SPACE_CHECK`] bytes) fits again, which they try at most every
//! [`SPACE_RETRY`].

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Corruption, Store, StoreError, decode_batch};
use crate::config::StoreConfig;
use crate::stream::{Event, IdempotencyEntry, Reattach, Status, StreamRecord, now_ms};

/// The part of a record that changes after creation.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct StatusRecord {
    status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    updated_ms: u64,
    instance: String,
    /// The upstream serving it, once it is not the one created with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    /// The provider's background response it re-attaches to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reattach: Option<Reattach>,
}

const RECORD: u8 = 1;
const STATUS: u8 = 2;
const BATCH: u8 = 3;
const IDEMPOTENCY: u8 = 4;
const PROBE: u8 = 5;
const COPY: u8 = 6;
const RELEASE: u8 = 7;

/// An entry's header: body length and CRC-32.
const HEADER: usize = 8;
/// What a status entry usually takes (more only grows the buffer).
const STATUS_ROOM: usize = 512;
/// The largest segment; smaller when `store.max_bytes` is small, so that
/// room is freed in steps of a sixteenth of it.
const SEGMENT_MAX: u64 = 64 << 20;
const SEGMENT_MIN: u64 = 64 << 10;
/// The test write an impaired store must fit before it takes new streams.
const SPACE_CHECK: usize = 256 << 10;
/// ... or as large as the write that failed, up to this.
const SPACE_CHECK_MAX: usize = 16 << 20;
const SPACE_RETRY: Duration = Duration::from_millis(100);

pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// Held from an idempotency key's read to its write, so that of many
    /// concurrent claims of one key exactly one wins.
    claims: tokio::sync::Mutex<()>,
    secret: Vec<u8>,
}

struct Shared {
    dir: PathBuf,
    ttl_ms: u64,
    max_bytes: u64,
    segment_bytes: u64,
    log: Mutex<Log>,
    /// The lock file, locked while the store is open.
    _lock: File,
}

/// Where an entry's payload is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

/// Room taken at the end of a segment for one entry (see [`Shared::reserve`]).
struct Reserved {
    file: Arc<File>,
    at: Loc,
}

/// Write an entry into its reserved room.
fn put(reserved: &Reserved, entry: &[u8]) -> std::io::Result<()> {
    reserved.file.write_all_at(entry, reserved.at.offset)
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
    /// Live streams whose record is in this segment.
    streams: usize,
    /// Live idempotency keys written in it.
    keys: usize,
    /// When it was last written.
    written_ms: u64,
}

struct StreamIndex {
    record: Loc,
    status: Option<StatusRecord>,
    /// Each append's last seq and where its batch is, in seq order.
    batches: Vec<(u64, Loc)>,
    segment: u64,
    updated_ms: u64,
    /// Bytes of its entries.
    bytes: u64,
    /// A run of this process writes it (never evicted, never expired).
    running: bool,
}

struct KeyIndex {
    entry: IdempotencyEntry,
    at_ms: u64,
    segment: u64,
}

struct Log {
    segments: BTreeMap<u64, Segment>,
    active: u64,
    streams: HashMap<Box<str>, StreamIndex>,
    keys: HashMap<Vec<u8>, KeyIndex>,
    /// The sum of the segments' lengths.
    bytes: u64,
    /// The bytes of running streams.
    running_bytes: u64,
    /// Set by a failed write (when, and how large a test write must fit);
    /// cleared by a space check that fits.
    impaired: Option<(Instant, usize)>,
    /// Segments out of the index, to unlink once the lock is released.
    doomed: Vec<PathBuf>,
    /// The active segment's end is unknown (a failed write could not be
    /// cut back): the next write starts a new segment.
    damaged: bool,
}

fn io_at(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io {
        context: format!("cannot {action} {}", path.display()),
        source,
    }
}

fn segment_name(n: u64) -> String {
    format!("{n:016}.log")
}

fn key_of(owner: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + key.len() + 1);
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// An entry under construction: the header's room, then the body.
struct Entry(Vec<u8>);

impl Entry {
    fn new(kind: u8, size: usize) -> Entry {
        let mut buf = Vec::with_capacity(HEADER + 1 + size);
        buf.extend_from_slice(&[0; HEADER]);
        buf.push(kind);
        Entry(buf)
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A length-prefixed (u16) string: stream ids and idempotency keys.
    fn name(&mut self, v: &[u8]) -> Result<&mut Self, StoreError> {
        let len = u16::try_from(v.len())
            .map_err(|_| StoreError::Corrupt(Corruption::KeyTooLong(v.len())))?;
        Ok(self.u16(len).bytes(v))
    }
    /// Where the next byte goes, from the entry's start.
    fn here(&self) -> u64 {
        self.0.len() as u64
    }
    fn finish(mut self) -> Vec<u8> {
        let body = (self.0.len() - HEADER) as u32;
        let crc = crc32fast::hash(&self.0[HEADER..]);
        self.0[..4].copy_from_slice(&body.to_le_bytes());
        self.0[4..8].copy_from_slice(&crc.to_le_bytes());
        self.0
    }
}

fn batch_size(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| e.data.len() + e.name.as_deref().map_or(0, str::len) + 5)
        .sum()
}

/// A reader over one entry's body.
struct Body<'a> {
    rest: &'a [u8],
    /// The offset of `rest` in its segment.
    at: u64,
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        self.at += n as u64;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn name(&mut self) -> Option<&'a str> {
        let len = self.u16()? as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }
    /// The rest of the body, and where it is.
    fn tail(&mut self, segment: u64) -> Option<Loc> {
        let len = u32::try_from(self.rest.len()).ok()?;
        let loc = Loc {
            segment,
            offset: self.at,
            len,
        };
        self.rest = &[];
        Some(loc)
    }
    /// `n` bytes, and where they are.
    fn span(&mut self, segment: u64, n: usize) -> Option<Loc> {
        let loc = Loc {
            segment,
            offset: self.at,
            len: u32::try_from(n).ok()?,
        };
        self.take(n)?;
        Some(loc)
    }
}

impl Log {
    fn segment(&self, n: u64) -> Result<&Segment, StoreError> {
        self.segments
            .get(&n)
            .ok_or(StoreError::Corrupt(Corruption::MissingSegment(n)))
    }

    fn read(&self, loc: Loc) -> Result<(Arc<File>, Loc), StoreError> {
        Ok((self.segment(loc.segment)?.file.clone(), loc))
    }

    fn forget_stream(&mut self, id: &str) -> Option<StreamIndex> {
        let gone = self.streams.remove(id)?;
        if gone.running {
            self.running_bytes -= gone.bytes;
        }
        if let Some(segment) = self.segments.get_mut(&gone.segment) {
            segment.streams -= 1;
        }
        Some(gone)
    }

    /// Forget every stream `which` picks; how many.
    fn forget_streams(&mut self, which: impl Fn(&StreamIndex) -> bool) -> usize {
        let ids: Vec<Box<str>> = self
            .streams
            .iter()
            .filter(|(_, s)| which(s))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.forget_stream(id);
        }
        ids.len()
    }

    fn forget_key(&mut self, key: &[u8]) {
        if let Some(gone) = self.keys.remove(key)
            && let Some(segment) = self.segments.get_mut(&gone.segment)
        {
            segment.keys -= 1;
        }
    }

    /// Add `bytes` to a stream's size (and the running total).
    fn grow(&mut self, id: &str, bytes: u64) {
        if let Some(stream) = self.streams.get_mut(id) {
            stream.bytes += bytes;
            if stream.running {
                self.running_bytes += bytes;
            }
        }
    }

    fn set_running(&mut self, id: &str, running: bool) {
        if let Some(stream) = self.streams.get_mut(id)
            && stream.running != running
        {
            stream.running = running;
            if running {
                self.running_bytes += stream.bytes;
            } else {
                self.running_bytes -= stream.bytes;
            }
        }
    }
}

impl EmbeddedStore {
    fn meta_path(&self, key: &str) -> PathBuf {
        let safe: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let root = self.shared.dir.parent().unwrap_or(&self.shared.dir);
        root.join("meta").join(safe)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Start segment `n` (and make it the active one).
    fn start_segment(&self, log: &mut Log, n: u64) -> Result<(), StoreError> {
        let path = self.dir.join(segment_name(n));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_at("create", &path))?;
        log.segments.insert(
            n,
            Segment {
                file: Arc::new(file),
                path,
                len: 0,
                streams: 0,
                keys: 0,
                written_ms: now_ms(),
            },
        );
        log.active = n;
        log.damaged = false;
        Ok(())
    }

    /// Room for an entry of `len` bytes at the end of the active segment,
    /// taken under the log's lock. The entry is written with [`put`] once
    /// the lock is released, so that appends of different streams do not
    /// wait on each other's `pwrite` (benches/OPTIMISATIONS.md, "embedded
    /// store").
    fn reserve(&self, log: &mut Log, len: usize) -> Result<Reserved, StoreError> {
        let needs_new = log.damaged
            || log
                .segments
                .get(&log.active)
                .is_none_or(|s| s.len > 0 && s.len + len as u64 > self.segment_bytes);
        if needs_new {
            let next = log.active + 1;
            self.start_segment(log, next)?;
        }
        let active = log.active;
        let segment = log
            .segments
            .get_mut(&active)
            .ok_or(StoreError::Corrupt(Corruption::MissingSegment(active)))?;
        let offset = segment.len;
        segment.len += len as u64;
        segment.written_ms = now_ms();
        log.bytes += len as u64;
        Ok(Reserved {
            file: segment.file.clone(),
            at: Loc {
                segment: active,
                offset,
                len: len as u32,
            },
        })
    }

    /// A reserved entry could not be written: it is cut back off its
    /// segment when nothing was reserved after it, or else its header is
    /// zeroed (opening skips it); the store is impaired.
    fn failed(&self, log: &mut Log, reserved: &Reserved, source: std::io::Error) -> StoreError {
        let Loc {
            segment: n,
            offset,
            len,
        } = reserved.at;
        let mut path = self.dir.join(segment_name(n));
        if let Some(segment) = log.segments.get_mut(&n) {
            path.clone_from(&segment.path);
            if segment.len == offset + u64::from(len) {
                if segment.file.set_len(offset).is_ok() {
                    segment.len = offset;
                    log.bytes -= u64::from(len);
                } else {
                    log.damaged = true;
                }
            } else if segment.file.write_all_at(&[0; HEADER], offset).is_err() {
                log.damaged = true;
            }
        }
        if log.impaired.is_none() {
            tracing::warn!(
                path = %path.display(),
                error = %source,
                "a write to the embedded store failed; new streams get store_unavailable until it has room again"
            );
        }
        let need = (len as usize).clamp(SPACE_CHECK, SPACE_CHECK_MAX);
        log.impaired = Some((Instant::now(), need));
        StoreError::Io {
            context: format!("cannot write to {}", path.display()),
            source,
        }
    }

    /// Write one entry at the end of the active segment, holding the lock
    /// throughout; where it is.
    fn write(&self, log: &mut Log, entry: Vec<u8>) -> Result<Loc, StoreError> {
        let reserved = self.reserve(log, entry.len())?;
        match put(&reserved, &entry) {
            Ok(()) => Ok(reserved.at),
            Err(e) => Err(self.failed(log, &reserved, e)),
        }
    }

    /// Write `entry` into the room reserved for it, without the lock, and
    /// take the lock back: where the entry is then. When what it belongs
    /// to moved meanwhile (`moved`: the reserved segment is gone, or the
    /// stream was copied forward past it), it is written again, locked,
    /// next to where its stream is now.
    fn put_unlocked<'a>(
        &'a self,
        reserved: Reserved,
        entry: &[u8],
        moved: impl FnOnce(&Log) -> bool,
    ) -> Result<(MutexGuard<'a, Log>, Loc), StoreError> {
        let written = put(&reserved, entry);
        let mut log = self.lock();
        if let Err(e) = written {
            return Err(self.failed(&mut log, &reserved, e));
        }
        if !log.segments.contains_key(&reserved.at.segment) || moved(&log) {
            let at = self.write(&mut log, entry.to_vec())?;
            return Ok((log, at));
        }
        Ok((log, reserved.at))
    }

    /// Whether an impaired store has room again: a test write, cut back.
    fn check_space(&self, log: &mut Log) -> Result<(), StoreError> {
        let Some((since, need)) = log.impaired else {
            return Ok(());
        };
        if since.elapsed() < SPACE_RETRY {
            return Err(StoreError::Impaired);
        }
        let mut test = Entry::new(PROBE, need);
        test.bytes(&vec![0; need]);
        match self.write(log, test.finish()) {
            Ok(loc) => {
                // The test bytes are not kept: cut them back off.
                let segment = log
                    .segments
                    .get_mut(&loc.segment)
                    .ok_or(StoreError::Corrupt(Corruption::MissingSegment(loc.segment)))?;
                if segment.file.set_len(loc.offset).is_ok() {
                    segment.len = loc.offset;
                    log.bytes -= u64::from(loc.len);
                }
                log.impaired = None;
                tracing::info!("the embedded store has room again");
                Ok(())
            }
            Err(_) => Err(StoreError::Impaired),
        }
    }

    /// Delete segments from the oldest while nothing live is in them.
    fn drop_empty(&self, log: &mut Log) {
        while let Some((&n, segment)) = log.segments.first_key_value() {
            if n == log.active || segment.streams > 0 || segment.keys > 0 {
                return;
            }
            let Some(segment) = log.segments.remove(&n) else {
                return;
            };
            log.bytes -= segment.len;
            // Unlinked once the log's lock is released: freeing a large
            // file's blocks takes milliseconds, and appends wait on the lock.
            log.doomed.push(segment.path);
        }
    }

    /// Take the segments to delete, to unlink after the lock is released.
    fn doomed(log: &mut Log) -> Vec<PathBuf> {
        std::mem::take(&mut log.doomed)
    }

    /// Free the oldest segment: evict what no run of this process writes
    /// (when `evict`) or copy it forward, copy forward its running streams
    /// and live keys, delete it.
    fn free_oldest(&self, log: &mut Log, evict: bool) -> Result<(), StoreError> {
        let Some(&oldest) = log.segments.keys().next() else {
            return Ok(());
        };
        if oldest == log.active {
            let next = log.active + 1;
            self.start_segment(log, next)?;
        }
        let ids: Vec<Box<str>> = log
            .streams
            .iter()
            .filter(|(_, s)| s.segment == oldest)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let running = log.streams.get(&id).is_some_and(|s| s.running);
            if evict && !running {
                log.forget_stream(&id);
                tracing::debug!(stream = %id, "evicted to stay under store.max_bytes");
            } else {
                self.copy_forward(log, &id)?;
            }
        }
        let keys: Vec<Vec<u8>> = log
            .keys
            .iter()
            .filter(|(_, k)| k.segment == oldest)
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            let (entry, at) = match log.keys.get(&key) {
                Some(k) => (k.entry.clone(), k.at_ms),
                None => continue,
            };
            self.write_key(log, key, entry, at)?;
        }
        self.drop_empty(log);
        Ok(())
    }

    /// Rewrite a stream whole as one entry in the active segment.
    fn copy_forward(&self, log: &mut Log, id: &str) -> Result<(), StoreError> {
        let Some(stream) = log.streams.get(id) else {
            return Ok(());
        };
        let record = read_at(&log.read(stream.record)?.0, stream.record)?;
        let status = match &stream.status {
            Some(s) => serde_json::to_vec(s).map_err(StoreError::Encode)?,
            None => Vec::new(),
        };
        let mut batches = Vec::with_capacity(stream.batches.len());
        for (last, loc) in &stream.batches {
            batches.push((*last, read_at(&log.read(*loc)?.0, *loc)?));
        }
        let size =
            record.len() + status.len() + batches.iter().map(|(_, b)| b.len() + 12).sum::<usize>();
        let mut entry = Entry::new(COPY, size + id.len() + 10);
        entry.name(id.as_bytes())?;
        entry.u32(record.len() as u32);
        let record_at = entry.here();
        entry.bytes(&record).u32(status.len() as u32).bytes(&status);
        let mut spans = Vec::with_capacity(batches.len());
        for (last, bytes) in &batches {
            entry.u64(*last).u32(bytes.len() as u32);
            spans.push((*last, entry.here(), bytes.len() as u32));
            entry.bytes(bytes);
        }
        let at = self.write(log, entry.finish())?;
        let loc = |offset: u64, len: u32| Loc {
            segment: at.segment,
            offset: at.offset + offset,
            len,
        };
        let moved_from = log.streams.get(id).map(|s| s.segment);
        if let Some(from) = moved_from
            && let Some(segment) = log.segments.get_mut(&from)
        {
            segment.streams -= 1;
        }
        if let Some(segment) = log.segments.get_mut(&at.segment) {
            segment.streams += 1;
        }
        let grown = u64::from(at.len);
        if let Some(stream) = log.streams.get_mut(id) {
            stream.record = loc(record_at, record.len() as u32);
            stream.batches = spans
                .into_iter()
                .map(|(last, offset, len)| (last, loc(offset, len)))
                .collect();
            stream.segment = at.segment;
            let old = std::mem::replace(&mut stream.bytes, grown);
            if stream.running {
                log.running_bytes = log.running_bytes - old + grown;
            }
        }
        Ok(())
    }

    fn write_key(
        &self,
        log: &mut Log,
        key: Vec<u8>,
        entry: IdempotencyEntry,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(&(&entry, at_ms)).map_err(StoreError::Encode)?;
        let mut e = Entry::new(IDEMPOTENCY, key.len() + value.len() + 2);
        e.name(&key)?.bytes(&value);
        let at = self.write(log, e.finish())?;
        log.forget_key(&key);
        if let Some(segment) = log.segments.get_mut(&at.segment) {
            segment.keys += 1;
        }
        log.keys.insert(
            key,
            KeyIndex {
                entry,
                at_ms,
                segment: at.segment,
            },
        );
        Ok(())
    }

    fn expired(&self, updated_ms: u64, now: u64) -> bool {
        updated_ms + self.ttl_ms <= now
    }

    /// The sweep: forget what expired, copy forward what is still live in
    /// a segment older than the TTL, delete what is empty.
    fn sweep(&self) -> Result<usize, StoreError> {
        let mut log = self.lock();
        let result = self.sweep_locked(&mut log);
        let doomed = Shared::doomed(&mut log);
        drop(log);
        unlink(doomed);
        result
    }

    fn sweep_locked(&self, log: &mut MutexGuard<'_, Log>) -> Result<usize, StoreError> {
        let now = now_ms();
        let expired = log.forget_streams(|s| !s.running && self.expired(s.updated_ms, now));
        let keys: Vec<Vec<u8>> = log
            .keys
            .iter()
            .filter(|(_, k)| self.expired(k.at_ms, now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            log.forget_key(&key);
        }
        self.drop_empty(log);
        let old = log
            .segments
            .first_key_value()
            .filter(|(n, s)| **n != log.active && self.expired(s.written_ms, now))
            .is_some();
        if old {
            self.free_oldest(log, false)?;
        }
        Ok(expired)
    }

    /// Make room for a new stream under `store.max_bytes`.
    fn admit(&self) -> Result<(), StoreError> {
        let mut log = self.lock();
        let result = self.admit_locked(&mut log);
        let doomed = Shared::doomed(&mut log);
        drop(log);
        // Here, not in a background task: a store opened after this one
        // must never list a segment that is about to go. At most once per
        // sixteenth of `max_bytes` written, and no append waits for it.
        unlink(doomed);
        result
    }

    fn admit_locked(&self, log: &mut MutexGuard<'_, Log>) -> Result<(), StoreError> {
        self.check_space(log)?;
        let mut rounds = log.segments.len() + 1;
        while log.bytes > self.max_bytes {
            if log.running_bytes >= self.max_bytes {
                // As the memory store does: the finished streams go (their
                // segments are freed once the running streams let go of
                // them); copying the running ones forward would free nothing.
                log.forget_streams(|s| !s.running);
                self.drop_empty(log);
                return Err(StoreError::Full {
                    held: log.running_bytes,
                    max: self.max_bytes,
                });
            }
            if rounds == 0 {
                // Running streams are copied forward as segments are
                // freed; what is left over is theirs.
                break;
            }
            rounds -= 1;
            self.free_oldest(log, true)?;
        }
        Ok(())
    }
}

/// Delete segment files the index let go of.
fn unlink(paths: Vec<PathBuf>) {
    for path in paths {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete an embedded store segment");
        }
    }
}

/// Read an entry's payload.
fn read_at(file: &File, loc: Loc) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0; loc.len as usize];
    file.read_exact_at(&mut buf, loc.offset)
        .map_err(|source| StoreError::Io {
            context: "cannot read the embedded store".into(),
            source,
        })?;
    Ok(buf)
}

/// Read each batch and decode the events after `after`, up to about `max`.
fn read_batches(
    batches: Vec<(u64, Arc<File>, Loc)>,
    after: u64,
    max: usize,
) -> Result<Vec<Event>, StoreError> {
    let mut out = Vec::new();
    for (last, file, loc) in batches {
        let bytes = read_at(&file, loc)?;
        out.extend(decode_batch(last, &bytes, after)?);
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

/// What opening found in one segment.
struct Scanned {
    /// Where its last whole entry ends.
    end: u64,
    torn: bool,
}

/// Apply every whole entry of `bytes` (segment `n`) to the index.
///
/// Entries are written without the log's lock, each into room reserved
/// for it, so a process killed between a reservation and its write leaves
/// a run of zeros before entries written after it; a failed write leaves
/// a zeroed header. Past anything that is not a whole entry, the scan
/// looks for the next one byte by byte (its length and checksum must hold).
fn scan(log: &mut Log, n: u64, bytes: &[u8]) -> Scanned {
    let mut at = 0usize;
    let mut end = 0usize;
    let mut skipped = false;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
        let start = at + HEADER;
        match bytes.get(start..start.saturating_add(len)) {
            Some(body) if len > 0 && crc32fast::hash(body) == crc => {
                apply(log, n, body, start as u64, (HEADER + len) as u64);
                at = start + len;
                end = at;
            }
            _ => {
                skipped = true;
                at += 1;
            }
        }
    }
    Scanned {
        end: end as u64,
        torn: skipped || end != bytes.len(),
    }
}

/// A stored record's `updated_ms` (its only field opening needs).
fn record_updated(json: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Times {
        updated_ms: u64,
    }
    serde_json::from_slice::<Times>(json)
        .ok()
        .map(|t| t.updated_ms)
}

/// Index one entry read back at open. An entry that does not parse is
/// skipped (its checksum held, so it is a kind this version does not know).
fn apply(log: &mut Log, n: u64, body: &[u8], offset: u64, size: u64) {
    let kind = body[0];
    let mut b = Body {
        rest: &body[1..],
        at: offset + 1,
    };
    let _ = (|| -> Option<()> {
        match kind {
            RECORD => {
                let id = b.name()?;
                let updated_ms = record_updated(b.rest)?;
                let record = b.tail(n)?;
                log.forget_stream(id);
                log.segments.get_mut(&n)?.streams += 1;
                log.streams.insert(
                    id.into(),
                    StreamIndex {
                        record,
                        status: None,
                        batches: Vec::new(),
                        segment: n,
                        updated_ms,
                        bytes: size,
                        running: false,
                    },
                );
            }
            STATUS => {
                let id = b.name()?;
                let status: StatusRecord = serde_json::from_slice(b.rest).ok()?;
                let stream = log.streams.get_mut(id)?;
                stream.updated_ms = status.updated_ms;
                stream.status = Some(status);
                stream.bytes += size;
            }
            BATCH => {
                let id = b.name()?;
                let last = b.u64()?;
                let loc = b.tail(n)?;
                let stream = log.streams.get_mut(id)?;
                stream.batches.push((last, loc));
                stream.bytes += size;
            }
            IDEMPOTENCY => {
                let len = b.u16()? as usize;
                let key = b.take(len)?.to_vec();
                let (entry, at_ms): (IdempotencyEntry, u64) =
                    serde_json::from_slice(b.rest).ok()?;
                log.forget_key(&key);
                log.segments.get_mut(&n)?.keys += 1;
                log.keys.insert(
                    key,
                    KeyIndex {
                        entry,
                        at_ms,
                        segment: n,
                    },
                );
            }
            COPY => {
                let id = b.name()?;
                let record_len = b.u32()? as usize;
                let updated_ms = record_updated(b.rest.get(..record_len)?)?;
                let record = b.span(n, record_len)?;
                let status_len = b.u32()? as usize;
                let status = match status_len {
                    0 => None,
                    len => Some(serde_json::from_slice::<StatusRecord>(b.take(len)?).ok()?),
                };
                let mut batches = Vec::new();
                while !b.rest.is_empty() {
                    let last = b.u64()?;
                    let len = b.u32()? as usize;
                    batches.push((last, b.span(n, len)?));
                }
                log.forget_stream(id);
                log.segments.get_mut(&n)?.streams += 1;
                log.streams.insert(
                    id.into(),
                    StreamIndex {
                        record,
                        updated_ms: status.as_ref().map_or(updated_ms, |s| s.updated_ms),
                        status,
                        batches,
                        segment: n,
                        bytes: size,
                        running: false,
                    },
                );
            }
            RELEASE => {
                let len = b.u16()? as usize;
                let key = b.take(len)?;
                let stream_id = std::str::from_utf8(b.rest).ok()?;
                if log
                    .keys
                    .get(key)
                    .is_some_and(|k| k.entry.stream_id == stream_id)
                {
                    log.forget_key(key);
                }
            }
            _ => {}
        }
        Some(())
    })();
}

impl EmbeddedStore {
    pub fn open(path: &Path, config: &StoreConfig) -> Result<EmbeddedStore, StoreError> {
        // The store holds every prompt and answer: what this process
        // creates is for its own user only (files 0600, directories 0700).
        // SAFETY: umask only sets the process's file-creation mask; it
        // cannot fail and touches no memory.
        unsafe {
            libc::umask(0o077);
        }
        let dir = path.join("log");
        std::fs::create_dir_all(&dir).map_err(io_at("create", &dir))?;
        let lock_path = dir.join("LOCK");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_at("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: path.to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_at("lock", &lock_path)(e)),
        }
        let old = path.join("db");
        if old.is_dir() {
            tracing::warn!(path = %old.display(), "removing the store of an earlier tidegate version (fjall); its streams are not carried over");
            std::fs::remove_dir_all(&old).map_err(io_at("remove", &old))?;
        }
        let mut log = Log {
            segments: BTreeMap::new(),
            active: 0,
            streams: HashMap::new(),
            keys: HashMap::new(),
            bytes: 0,
            running_bytes: 0,
            impaired: None,
            doomed: Vec::new(),
            damaged: false,
        };
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_at("list", &dir))? {
            let entry = entry.map_err(io_at("list", &dir))?;
            let name = entry.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        for n in numbers {
            let seg_path = dir.join(segment_name(n));
            let bytes = std::fs::read(&seg_path).map_err(io_at("read", &seg_path))?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&seg_path)
                .map_err(io_at("open", &seg_path))?;
            log.segments.insert(
                n,
                Segment {
                    file: Arc::new(file),
                    path: seg_path.clone(),
                    len: bytes.len() as u64,
                    streams: 0,
                    keys: 0,
                    written_ms: now_ms(),
                },
            );
            let scanned = scan(&mut log, n, &bytes);
            if scanned.torn {
                tracing::warn!(path = %seg_path.display(), at = scanned.end, "the embedded store's segment holds a torn or damaged entry; skipped it, and cut what follows its last whole entry");
                if let Some(segment) = log.segments.get_mut(&n) {
                    segment
                        .file
                        .set_len(scanned.end)
                        .map_err(io_at("cut the torn end of", &seg_path))?;
                    segment.len = scanned.end;
                }
            }
            log.bytes += scanned.end;
            log.active = n;
        }
        let shared = Shared {
            dir,
            ttl_ms: config.ttl.as_millis() as u64,
            max_bytes: config.max_bytes,
            segment_bytes: (config.max_bytes / 16).clamp(SEGMENT_MIN, SEGMENT_MAX),
            log: Mutex::new(log),
            _lock: lock,
        };
        {
            let mut log = shared.lock();
            let now = now_ms();
            log.forget_streams(|s| shared.expired(s.updated_ms, now));
            // Appends go to a new segment, never after a cut.
            let next = log.active + 1;
            shared.start_segment(&mut log, next)?;
            shared.drop_empty(&mut log);
            unlink(Shared::doomed(&mut log));
        }
        let secret = load_or_create_secret(&path.join("resume-secret"))?;
        restrict_permissions(path)?;
        Ok(EmbeddedStore {
            shared: Arc::new(shared),
            claims: tokio::sync::Mutex::new(()),
            secret,
        })
    }
}

/// Take group and other permissions off the store's directory and
/// everything in it (a store made by an older version, or under a looser
/// umask, was readable by every local user).
fn restrict_permissions(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(io_at("inspect", &path))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                .map_err(io_at("restrict the permissions of", &path))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(io_at("list", &path))? {
                pending.push(entry.map_err(io_at("list", &path))?.path());
            }
        }
    }
    Ok(())
}

/// Run a read of the store off the async workers: a read may touch the
/// disk, and a worker thread blocked on it holds every stream it runs.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(StoreError::Task)?
}

fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, StoreError> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(bytes) = std::fs::read(path)
        && bytes.len() >= 32
    {
        return Ok(bytes);
    }
    let secret = crate::token::random_string(32).into_bytes();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &secret).map_err(io_at("write", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(io_at("restrict the permissions of", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_at("move the new resume secret to", path))?;
    Ok(secret)
}

/// A stream's status entry.
fn status_entry(stream_id: &str, latest: &StatusRecord) -> Result<Vec<u8>, StoreError> {
    let value = serde_json::to_vec(latest).map_err(StoreError::Encode)?;
    let mut entry = Entry::new(STATUS, value.len() + stream_id.len() + 2);
    entry.name(stream_id.as_bytes())?.bytes(&value);
    Ok(entry.finish())
}

fn status_record(status: Status, reason: Option<&str>, instance: &str) -> StatusRecord {
    StatusRecord {
        status,
        reason: reason.map(str::to_owned),
        updated_ms: now_ms(),
        instance: instance.to_owned(),
        upstream: None,
        reattach: None,
    }
}

impl EmbeddedStore {
    /// Append `events` as a batch entry (none for no events) and, with
    /// `status`, a status entry after it: one write, made without the
    /// log's lock.
    fn append_entries(
        &self,
        stream_id: &str,
        events: &[Event],
        status: Option<(Status, Option<&str>, &str)>,
    ) -> Result<(), StoreError> {
        if events.is_empty() && status.is_none() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        // The batch's last seq, and where its payload is in `bytes`.
        let mut batch = None;
        if let Some(last) = events.last() {
            // With room for the status entry, which goes in the same write.
            let room = if status.is_some() { STATUS_ROOM } else { 0 };
            let mut entry = Entry::new(BATCH, batch_size(events) + stream_id.len() + 10 + room);
            entry.name(stream_id.as_bytes())?.u64(last.seq);
            let batch_at = entry.here();
            super::put_batch(&mut entry.0, events);
            bytes = entry.finish();
            batch = Some((last.seq, batch_at, (bytes.len() as u64 - batch_at) as u32));
        }
        let mut log = self.shared.lock();
        let Some(stream) = log.streams.get(stream_id) else {
            return match batch {
                Some(_) => Err(StoreError::NoRecord {
                    stream_id: stream_id.to_owned(),
                }),
                None => Ok(()),
            };
        };
        let record = stream.record;
        let latest = status.map(|(status, reason, instance)| {
            let mut latest = status_record(status, reason, instance);
            if let Some(current) = &stream.status {
                latest.upstream.clone_from(&current.upstream);
                latest.reattach.clone_from(&current.reattach);
            }
            latest
        });
        if let Some(latest) = &latest {
            bytes.extend_from_slice(&status_entry(stream_id, latest)?);
        }
        let reserved = self.shared.reserve(&mut log, bytes.len())?;
        drop(log);
        // Copied forward meanwhile: the copy does not hold these entries.
        let (mut log, at) = self.shared.put_unlocked(reserved, &bytes, |log| {
            log.streams.get(stream_id).is_some_and(|s| {
                (s.record.segment, s.record.offset) != (record.segment, record.offset)
            })
        })?;
        if let Some((last, offset, len)) = batch
            && let Some(stream) = log.streams.get_mut(stream_id)
        {
            stream.batches.push((
                last,
                Loc {
                    segment: at.segment,
                    offset: at.offset + offset,
                    len,
                },
            ));
        }
        log.grow(stream_id, u64::from(at.len));
        if let Some(latest) = latest {
            let running = latest.status == Status::Running;
            if let Some(stream) = log.streams.get_mut(stream_id) {
                stream.updated_ms = latest.updated_ms;
                stream.status = Some(latest);
            }
            log.set_running(stream_id, running);
        }
        Ok(())
    }

    /// Write `stream_id`'s status entry again with `change` made to it:
    /// the status stays what it is.
    fn amend_status(
        &self,
        stream_id: &str,
        instance: &str,
        change: impl FnOnce(&mut StatusRecord),
    ) -> Result<(), StoreError> {
        let mut log = self.shared.lock();
        let Some(stream) = log.streams.get(stream_id) else {
            return Ok(());
        };
        let mut latest = match &stream.status {
            Some(current) => current.clone(),
            None => status_record(Status::Running, None, instance),
        };
        latest.updated_ms = now_ms();
        change(&mut latest);
        self.write_status(&mut log, stream_id, latest)
    }

    /// Append `latest` as `stream_id`'s status entry and make it current.
    fn write_status(
        &self,
        log: &mut Log,
        stream_id: &str,
        latest: StatusRecord,
    ) -> Result<(), StoreError> {
        let status = latest.status;
        let at = self.shared.write(log, status_entry(stream_id, &latest)?)?;
        if let Some(stream) = log.streams.get_mut(stream_id) {
            stream.updated_ms = latest.updated_ms;
            stream.status = Some(latest);
        }
        log.grow(stream_id, u64::from(at.len));
        log.set_running(stream_id, status == Status::Running);
        Ok(())
    }

    /// Where the batches after `after` are.
    fn batches_after(
        &self,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<(u64, Arc<File>, Loc)>, StoreError> {
        let log = self.shared.lock();
        let Some(stream) = log.streams.get(stream_id) else {
            return Ok(Vec::new());
        };
        let from = stream.batches.partition_point(|(last, _)| *last <= after);
        stream.batches[from..]
            .iter()
            .map(|(last, loc)| {
                let (file, loc) = log.read(*loc)?;
                Ok((*last, file, loc))
            })
            .collect()
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn admit(&self) -> Result<(), StoreError> {
        self.shared.admit()
    }

    async fn create(&self, record: &StreamRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(StoreError::Encode)?;
        let mut entry = Entry::new(RECORD, value.len() + record.id.len() + 2);
        entry.name(record.id.as_bytes())?;
        let record_at = entry.here();
        entry.bytes(&value);
        let entry = entry.finish();
        let reserved = {
            let mut log = self.shared.lock();
            self.shared.check_space(&mut log)?;
            self.shared.reserve(&mut log, entry.len())?
        };
        let (mut log, at) = self.shared.put_unlocked(reserved, &entry, |_| false)?;
        log.forget_stream(&record.id);
        if let Some(segment) = log.segments.get_mut(&at.segment) {
            segment.streams += 1;
        }
        let running = record.status == Status::Running;
        log.streams.insert(
            record.id.as_str().into(),
            StreamIndex {
                record: Loc {
                    segment: at.segment,
                    offset: at.offset + record_at,
                    len: at.len - record_at as u32,
                },
                status: None,
                batches: Vec::new(),
                segment: at.segment,
                updated_ms: record.updated_ms,
                bytes: u64::from(at.len),
                running,
            },
        );
        if running {
            log.running_bytes += u64::from(at.len);
        }
        Ok(())
    }

    async fn append(&self, stream_id: &str, events: &[Event]) -> Result<(), StoreError> {
        self.append_entries(stream_id, events, None)
    }

    async fn append_final(
        &self,
        stream_id: &str,
        events: &[Event],
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.append_entries(stream_id, events, Some((status, reason, instance)))
    }

    async fn set_status(
        &self,
        stream_id: &str,
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.append_entries(stream_id, &[], Some((status, reason, instance)))
    }

    async fn set_upstream(
        &self,
        stream_id: &str,
        upstream: &str,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.amend_status(stream_id, instance, |latest| {
            latest.upstream = Some(upstream.to_owned());
        })
    }

    async fn set_reattach(
        &self,
        stream_id: &str,
        reattach: Option<&Reattach>,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.amend_status(stream_id, instance, |latest| {
            latest.reattach = reattach.cloned();
        })
    }

    async fn get(&self, stream_id: &str) -> Result<Option<StreamRecord>, StoreError> {
        let found = {
            let log = self.shared.lock();
            match log.streams.get(stream_id) {
                Some(s) if !self.shared.expired(s.updated_ms, now_ms()) => {
                    Some((log.read(s.record)?, s.status.clone()))
                }
                _ => None,
            }
        };
        let Some(((file, loc), status)) = found else {
            return Ok(None);
        };
        let bytes = blocking(move || read_at(&file, loc)).await?;
        let mut record: StreamRecord =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Decode {
                what: "stream record",
                source,
            })?;
        if let Some(latest) = status {
            record.status = latest.status;
            record.reason = latest.reason;
            record.updated_ms = latest.updated_ms;
            record.instance = latest.instance;
            if let Some(upstream) = latest.upstream {
                record.upstream = upstream;
            }
            record.reattach = latest.reattach;
        }
        Ok(Some(record))
    }

    async fn events_after(&self, stream_id: &str, after: u64) -> Result<Vec<Event>, StoreError> {
        self.events_page(stream_id, after, usize::MAX).await
    }

    async fn events_page(
        &self,
        stream_id: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let batches = self.batches_after(stream_id, after)?;
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        blocking(move || read_batches(batches, after, max.max(1))).await
    }

    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        entry: &IdempotencyEntry,
    ) -> Result<Option<IdempotencyEntry>, StoreError> {
        let k = key_of(owner, key);
        // From the read to the write: one claim at a time.
        let _claiming = self.claims.lock().await;
        let mut log = self.shared.lock();
        let now = now_ms();
        if let Some(existing) = log.keys.get(&k)
            && !self.shared.expired(existing.at_ms, now)
        {
            return Ok(Some(existing.entry.clone()));
        }
        self.shared.write_key(&mut log, k, entry.clone(), now)?;
        Ok(None)
    }

    async fn release_idempotency(
        &self,
        owner: &str,
        key: &str,
        stream_id: &str,
    ) -> Result<(), StoreError> {
        let k = key_of(owner, key);
        let _claiming = self.claims.lock().await;
        let mut log = self.shared.lock();
        if log
            .keys
            .get(&k)
            .is_none_or(|e| e.entry.stream_id != stream_id)
        {
            return Ok(());
        }
        // A release entry is newer than the claim it undoes, and segments
        // go oldest first: it is never gone while the claim is there.
        let mut entry = Entry::new(RELEASE, k.len() + stream_id.len() + 2);
        entry.name(&k)?.bytes(stream_id.as_bytes());
        self.shared.write(&mut log, entry.finish())?;
        log.forget_key(&k);
        Ok(())
    }

    async fn try_lease(&self, _stream_id: &str, _instance: &str) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn lease_alive(&self, _stream_id: &str) -> Result<bool, StoreError> {
        // The lock file means this process is the store's only user: a run
        // this process does not hold belonged to a process that is gone.
        Ok(false)
    }

    async fn renew_leases(&self, _ids: &[String], _instance: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn release_lease(&self, _stream_id: &str, _instance: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let shared = self.shared.clone();
        blocking(move || shared.sweep()).await
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let mut log = self.shared.lock();
        self.shared.check_space(&mut log)?;
        let mut entry = Entry::new(PROBE, 8);
        entry.u64(now_ms());
        self.shared.write(&mut log, entry.finish()).map(|_| ())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        blocking(move || {
            let files: Vec<(Arc<File>, PathBuf)> = shared
                .lock()
                .segments
                .values()
                .map(|s| (s.file.clone(), s.path.clone()))
                .collect();
            for (file, path) in files {
                file.sync_data().map_err(io_at("sync", &path))?;
            }
            File::open(&shared.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_at("sync", &shared.dir))
        })
        .await
    }

    fn shared(&self) -> bool {
        false
    }

    /// One file per key beside the log (`<path>/meta/<key>`), replaced
    /// whole by a write to a temporary file and a rename: never torn.
    async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let path = self.meta_path(key);
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at("read", &path)(e)),
        }
    }

    async fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let path = self.meta_path(key);
        let dir = path.parent().map(Path::to_owned).unwrap_or_default();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_at("create", &dir))?;
        let tmp = path.with_extension("tmp");
        tokio::fs::write(&tmp, value)
            .await
            .map_err(io_at("write", &tmp))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(io_at("rename", &path))
    }

    fn local_secret(&self) -> Option<Vec<u8>> {
        Some(self.secret.clone())
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{StoreConfig, StoreKind};
    use bytes::Bytes;

    fn config(path: &Path, ttl: Duration, max_bytes: u64) -> StoreConfig {
        StoreConfig {
            kind: StoreKind::Embedded {
                path: path.to_owned(),
            },
            ttl,
            lease_ttl: Duration::from_secs(5),
            max_bytes,
        }
    }

    fn tempdir() -> PathBuf {
        std::env::temp_dir().join(format!(
            "tidegate-embedded-{}",
            crate::token::random_string(6)
        ))
    }

    fn open(dir: &Path, ttl: Duration) -> EmbeddedStore {
        EmbeddedStore::open(dir, &config(dir, ttl, 1 << 30)).unwrap()
    }

    fn record(id: &str) -> StreamRecord {
        StreamRecord {
            id: id.into(),
            owner: "o".into(),
            protocol: "openai".into(),
            upstream: "u".into(),
            request: "{}".into(),
            headers: Vec::new(),
            client_credential: false,
            status: Status::Running,
            reason: None,
            created_ms: now_ms(),
            updated_ms: now_ms(),
            instance: "i1".into(),
            reattach: None,
        }
    }

    fn event(seq: u64) -> Event {
        Event {
            seq,
            name: seq.is_multiple_of(2).then(|| "content_block_delta".into()),
            data: Bytes::from(format!("e{seq}")),
        }
    }

    fn segments(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("log"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".log")
            })
            .count()
    }

    #[tokio::test]
    async fn records_events_status_and_expiry() {
        let dir = tempdir();
        let store = open(&dir, Duration::from_millis(300));
        store.create(&record("s1")).await.unwrap();
        store.append("s1", &[event(1), event(2)]).await.unwrap();
        store.append("s1", &[event(3)]).await.unwrap();
        store
            .append("s1", &[event(4), event(5), event(6)])
            .await
            .unwrap();
        for after in 0..=6 {
            let got = store.events_after("s1", after).await.unwrap();
            let want: Vec<Event> = (after + 1..=6).map(event).collect();
            assert_eq!(got, want, "after {after}");
        }
        // Pages are whole appends: a few more than asked, never fewer.
        assert_eq!(store.events_page("s1", 0, 1).await.unwrap().len(), 2);
        assert_eq!(store.events_page("s1", 0, 3).await.unwrap().len(), 3);
        assert_eq!(store.events_page("s1", 2, 2).await.unwrap().len(), 4);
        store
            .set_status("s1", Status::Interrupted, Some("server_restarting"), "i2")
            .await
            .unwrap();
        let back = store.get("s1").await.unwrap().unwrap();
        assert_eq!(back.status, Status::Interrupted);
        assert_eq!(back.reason.as_deref(), Some("server_restarting"));
        assert_eq!(back.instance, "i2");
        assert_eq!(back.request, "{}");
        assert!(matches!(
            store.append("nope", &[event(1)]).await,
            Err(StoreError::NoRecord { .. })
        ));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            store.get("s1").await.unwrap().is_none(),
            "expired records read as gone"
        );
        assert_eq!(store.sweep().await.unwrap(), 1);
        assert!(store.events_after("s1", 0).await.unwrap().is_empty());
        assert!(store.shared.lock().streams.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What was acknowledged is what a new process reads: records, the
    /// latest status, every batch, idempotency keys; a torn last entry is
    /// cut and the store goes on after it.
    #[tokio::test]
    async fn a_new_upstream_is_kept_through_later_statuses_and_a_reopen() {
        let dir = tempdir();
        {
            let store = open(&dir, Duration::from_secs(60));
            store.create(&record("moved")).await.unwrap();
            store.set_upstream("moved", "next", "i1").await.unwrap();
            let got = store.get("moved").await.unwrap().unwrap();
            assert_eq!(
                (got.upstream.as_str(), got.status),
                ("next", Status::Running)
            );
            assert_eq!(got.instance, "i1");
            store
                .set_status(
                    "moved",
                    Status::Interrupted,
                    Some("server_restarting"),
                    "i1",
                )
                .await
                .unwrap();
            store.set_upstream("nowhere", "next", "i1").await.unwrap();
            store.flush().await.unwrap();
        }
        let store = open(&dir, Duration::from_secs(60));
        let got = store.get("moved").await.unwrap().unwrap();
        assert_eq!(got.upstream, "next");
        assert_eq!(got.status, Status::Interrupted);
        assert_eq!(got.reason.as_deref(), Some("server_restarting"));
        assert!(store.get("nowhere").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_reopened_store_reads_what_was_acknowledged() {
        let dir = tempdir();
        {
            let store = open(&dir, Duration::from_secs(60));
            for s in ["a", "b"] {
                store.create(&record(s)).await.unwrap();
                for seq in 1..=5 {
                    store.append(s, &[event(seq)]).await.unwrap();
                }
            }
            store
                .append_final("a", &[event(6)], Status::Completed, None, "i1")
                .await
                .unwrap();
            let key = IdempotencyEntry {
                stream_id: "a".into(),
                body_hash: "h".into(),
            };
            assert!(
                store
                    .claim_idempotency("o", "k", &key)
                    .await
                    .unwrap()
                    .is_none()
            );
            // A claim undone (its stream was refused), and one whose
            // release names another stream (kept).
            let claim = |k: &'static str| store.claim_idempotency("o", k, &key);
            assert!(claim("gone").await.unwrap().is_none());
            store.release_idempotency("o", "gone", "a").await.unwrap();
            assert!(claim("kept").await.unwrap().is_none());
            store
                .release_idempotency("o", "kept", "other")
                .await
                .unwrap();
            // No flush: a SIGKILL leaves what the OS holds.
        }
        // A torn entry at the end of the last segment.
        let last = std::fs::read_dir(dir.join("log"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .max()
            .unwrap();
        let mut torn = std::fs::read(&last).unwrap();
        let whole = torn.len();
        torn.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 3, b'x']);
        std::fs::write(&last, &torn).unwrap();

        let store = open(&dir, Duration::from_secs(60));
        assert_eq!(
            std::fs::metadata(&last).unwrap().len() as usize,
            whole,
            "the torn entry was cut"
        );
        let a = store.get("a").await.unwrap().unwrap();
        assert_eq!(a.status, Status::Completed);
        assert_eq!(
            store.events_after("a", 0).await.unwrap(),
            (1..=6).map(event).collect::<Vec<_>>()
        );
        assert_eq!(
            store.get("b").await.unwrap().unwrap().status,
            Status::Running
        );
        assert_eq!(
            store.events_after("b", 3).await.unwrap(),
            (4..=5).map(event).collect::<Vec<_>>()
        );
        let other = IdempotencyEntry {
            stream_id: "z".into(),
            body_hash: "h".into(),
        };
        let held = store.claim_idempotency("o", "k", &other).await.unwrap();
        assert_eq!(held.map(|e| e.stream_id).as_deref(), Some("a"));
        let claim = |k: &'static str| store.claim_idempotency("o", k, &other);
        assert!(claim("gone").await.unwrap().is_none(), "a released key");
        assert!(claim("kept").await.unwrap().is_some());
        // A stream found running belonged to a process that is gone: it
        // is evictable, and it takes more events after a continuation.
        store.append("b", &[event(6)]).await.unwrap();
        drop(store);
        let store = open(&dir, Duration::from_secs(60));
        assert_eq!(store.events_after("b", 0).await.unwrap().len(), 6);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An entry is written after the log's lock is released, into room
    /// reserved for it: a process killed in between leaves zeros before
    /// entries written after them, and a failed write a zeroed header.
    /// Opening skips both and keeps every entry after them.
    #[tokio::test]
    async fn entries_after_a_hole_or_a_failed_write_are_kept() {
        let dir = tempdir();
        {
            let store = open(&dir, Duration::from_secs(60));
            store.create(&record("before")).await.unwrap();
            store.append("before", &[event(1)]).await.unwrap();
            // Room reserved and never written (the kill came first).
            {
                let mut log = store.shared.lock();
                store.shared.reserve(&mut log, 300).unwrap();
            }
            store.create(&record("after")).await.unwrap();
            store.append("after", &[event(1), event(2)]).await.unwrap();
            // A write that failed with an entry reserved after it.
            let failed = {
                let mut log = store.shared.lock();
                store.shared.reserve(&mut log, 40).unwrap()
            };
            {
                let late = {
                    let mut log = store.shared.lock();
                    store.shared.reserve(&mut log, 0).unwrap()
                };
                let (mut log, _) = store.shared.put_unlocked(late, &[], |_| false).unwrap();
                put(&failed, &[7; 40]).unwrap();
                let _ = store
                    .shared
                    .failed(&mut log, &failed, std::io::Error::other("disk full"));
                log.impaired = None;
            }
            store
                .append_final("after", &[event(3)], Status::Completed, None, "i1")
                .await
                .unwrap();
            store.append("before", &[event(2)]).await.unwrap();
        }
        let store = open(&dir, Duration::from_secs(60));
        assert_eq!(
            store.events_after("before", 0).await.unwrap(),
            vec![event(1), event(2)]
        );
        assert_eq!(
            store.events_after("after", 0).await.unwrap(),
            (1..=3).map(event).collect::<Vec<_>>()
        );
        assert_eq!(
            store.get("after").await.unwrap().unwrap().status,
            Status::Completed
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Many streams appended from several threads at once, each write made
    /// outside the lock: every stream reads back whole and in order, in
    /// this process and after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_of_many_streams_read_back_whole() {
        let dir = tempdir();
        // Small segments, so that appends cross from one to the next.
        let store = Arc::new(
            EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60), 1 << 20)).unwrap(),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..8 {
            let store = store.clone();
            tasks.spawn(async move {
                for n in 0..20 {
                    let id = format!("t{t}-{n}");
                    store.create(&record(&id)).await.unwrap();
                    for seq in (1..=30).step_by(3) {
                        store
                            .append(&id, &[event(seq), event(seq + 1), event(seq + 2)])
                            .await
                            .unwrap();
                    }
                    store
                        .append_final(&id, &[event(31)], Status::Completed, None, "i1")
                        .await
                        .unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let want: Vec<Event> = (1..=31).map(event).collect();
        let mut store = store;
        for pass in ["running", "reopened"] {
            for t in 0..8 {
                for n in 0..20 {
                    let id = format!("t{t}-{n}");
                    assert_eq!(
                        store.events_after(&id, 0).await.unwrap(),
                        want,
                        "{pass} {id}"
                    );
                    assert_eq!(
                        store.get(&id).await.unwrap().unwrap().status,
                        Status::Completed,
                        "{pass} {id}"
                    );
                }
            }
            drop(store);
            store = Arc::new(
                EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60), 1 << 20)).unwrap(),
            );
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Past `max_bytes`, finished streams go oldest first and running ones
    /// stay (copied forward, whole); a new stream is refused only when
    /// running streams alone fill the store; the files shrink.
    #[tokio::test]
    async fn max_bytes_evicts_finished_streams_oldest_first() {
        let dir = tempdir();
        let max = 1 << 20;
        let store = EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60), max)).unwrap();
        let big = |seq: u64| Event {
            seq,
            name: None,
            data: Bytes::from(vec![b'x'; 16 << 10]),
        };
        store.admit().await.unwrap();
        store.create(&record("keep")).await.unwrap();
        store.append("keep", &[big(1), big(2)]).await.unwrap();
        let mut finished = Vec::new();
        for i in 0..200 {
            store.admit().await.unwrap();
            let id = format!("f{i}");
            store.create(&record(&id)).await.unwrap();
            store
                .append_final(&id, &[big(1), big(2)], Status::Completed, None, "i1")
                .await
                .unwrap();
            finished.push(id);
            let bytes = store.shared.lock().bytes;
            assert!(bytes <= max + (256 << 10), "{bytes} bytes held after {i}");
        }
        assert!(store.get("f0").await.unwrap().is_none(), "the oldest went");
        assert!(
            store.get("f199").await.unwrap().is_some(),
            "the newest stayed"
        );
        let kept: Vec<usize> = finished
            .iter()
            .enumerate()
            .filter(|(_, id)| store.shared.lock().streams.contains_key(id.as_str()))
            .map(|(i, _)| i)
            .collect();
        assert!(
            kept.windows(2).all(|w| w[1] == w[0] + 1),
            "oldest first: {kept:?}"
        );
        // The running stream stayed, whole, and still takes appends.
        store.append("keep", &[big(3)]).await.unwrap();
        assert_eq!(
            store.events_after("keep", 0).await.unwrap(),
            (1..=3).map(big).collect::<Vec<_>>()
        );
        // About one stream per 64 KiB segment here, 1 MiB in all.
        assert!(segments(&dir) <= 40, "{} segments", segments(&dir));

        // Running streams alone fill it: a new stream is refused.
        for seq in 4..80 {
            store.append("keep", &[big(seq)]).await.unwrap();
        }
        match store.admit().await {
            Err(StoreError::Full { held, max: m }) => assert!(held >= m, "{held} {m}"),
            other => panic!("admitted past max_bytes: {other:?}"),
        }
        store
            .set_status("keep", Status::Completed, None, "i1")
            .await
            .unwrap();
        store.admit().await.unwrap();
        // Reopened, what is left reads back.
        let mut left: Vec<String> = store
            .shared
            .lock()
            .streams
            .keys()
            .map(|id| id.to_string())
            .collect();
        left.sort();
        let mut before = Vec::new();
        for id in &left {
            before.push(store.events_after(id, 0).await.unwrap());
        }
        drop(store);
        let store = EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60), max)).unwrap();
        let mut after: Vec<String> = store
            .shared
            .lock()
            .streams
            .keys()
            .map(|id| id.to_string())
            .collect();
        after.sort();
        assert_eq!(left, after);
        for (id, events) in left.iter().zip(before) {
            assert_eq!(store.events_after(id, 0).await.unwrap(), events, "{id}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A segment older than the TTL is freed even while a stream in it
    /// lives on: the live stream is copied forward and reads back whole,
    /// before and after a restart.
    #[tokio::test]
    async fn old_segments_are_freed_with_live_streams_copied_forward() {
        let dir = tempdir();
        let ttl = Duration::from_millis(300);
        let store = EmbeddedStore::open(&dir, &config(&dir, ttl, 1 << 20)).unwrap();
        store.create(&record("long")).await.unwrap();
        store.append("long", &[event(1), event(2)]).await.unwrap();
        let key = IdempotencyEntry {
            stream_id: "long".into(),
            body_hash: "h".into(),
        };
        store.claim_idempotency("o", "k", &key).await.unwrap();
        store.create(&record("short")).await.unwrap();
        store
            .append_final("short", &[event(1)], Status::Completed, None, "i1")
            .await
            .unwrap();
        // Fill past one segment (64 KiB at this max_bytes).
        let pad = Event {
            seq: 3,
            name: None,
            data: Bytes::from(vec![b'p'; 70 << 10]),
        };
        store
            .append("long", std::slice::from_ref(&pad))
            .await
            .unwrap();
        let first = *store.shared.lock().segments.keys().next().unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Keep `long` and its key alive past the TTL.
        store
            .set_status("long", Status::Running, None, "i1")
            .await
            .unwrap();
        store.claim_idempotency("o", "k", &key).await.unwrap();
        store.sweep().await.unwrap();
        let oldest = *store.shared.lock().segments.keys().next().unwrap();
        assert!(oldest > first, "the old segment is still there");
        assert!(store.get("short").await.unwrap().is_none());
        let want = vec![event(1), event(2), pad];
        assert_eq!(store.events_after("long", 0).await.unwrap(), want);
        drop(store);
        let store =
            EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60), 1 << 20)).unwrap();
        assert_eq!(store.events_after("long", 0).await.unwrap(), want);
        assert!(store.get("short").await.unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_of_one_key_have_one_winner() {
        let dir = tempdir();
        let store = Arc::new(open(&dir, Duration::from_secs(60)));
        for round in 0..5 {
            let tasks = tokio_util::task::TaskTracker::new();
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let store = store.clone();
                    tasks.spawn(async move {
                        let entry = IdempotencyEntry {
                            stream_id: format!("s{i}"),
                            body_hash: "h".into(),
                        };
                        store
                            .claim_idempotency("o", &format!("k{round}"), &entry)
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut winners = 0;
            let mut seen = std::collections::HashSet::new();
            for h in handles {
                match h.await.unwrap() {
                    None => winners += 1,
                    Some(existing) => {
                        seen.insert(existing.stream_id);
                    }
                }
            }
            assert_eq!(winners, 1, "round {round}: {winners} claims won");
            assert_eq!(seen.len(), 1, "every loser sees the one winner");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn files_are_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        // A store left by an older version, readable by everyone.
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("old"), b"x").unwrap();
        std::fs::set_permissions(dir.join("old"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = open(&dir, Duration::from_secs(60));
        assert!(
            !dir.join("db").exists(),
            "the old version's store was removed"
        );
        store.create(&record("p1")).await.unwrap();
        store.append("p1", &[event(1)]).await.unwrap();
        store.flush().await.unwrap();
        let mut pending = vec![dir.clone()];
        let mut checked = 0;
        while let Some(path) = pending.pop() {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
            checked += 1;
            if meta.is_dir() {
                for e in std::fs::read_dir(&path).unwrap() {
                    pending.push(e.unwrap().path());
                }
            }
        }
        assert!(checked >= 5, "only {checked} paths");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_open_is_locked_out() {
        let dir = tempdir();
        let first = open(&dir, Duration::from_secs(60));
        let Err(second) =
            EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60), 1 << 30))
        else {
            panic!("a second open of a locked store succeeded");
        };
        assert!(matches!(&second, StoreError::Locked { path } if *path == dir));
        assert!(
            second
                .to_string()
                .contains("in use by another tidegate process")
        );
        drop(first);
        open(&dir, Duration::from_secs(60));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A real full disk (a 4 MiB tmpfs, mounting needs root): an append
    /// fails and is cut back; readiness and new streams fail while the disk
    /// is full; once the filesystem grows they work again, and every
    /// acknowledged append reads back, also after a restart.
    #[tokio::test]
    async fn a_full_disk_comes_back_when_the_filesystem_grows() {
        let dir = tempdir();
        std::fs::create_dir_all(&dir).unwrap();
        let mount = |args: &[&str]| {
            std::process::Command::new("mount")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let at = dir.display().to_string();
        assert!(
            mount(&["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", &at]),
            "cannot mount a tmpfs (this test needs root)"
        );
        struct Unmount(String);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .args(["-l", &self.0])
                    .status();
            }
        }
        let _unmount = Unmount(at.clone());
        let path = dir.join("data");
        let store = open(&path, Duration::from_secs(60));
        store.create(&record("f1")).await.unwrap();
        let big = |seq: u64| Event {
            seq,
            name: None,
            data: Bytes::from(format!("{seq:08}").repeat(4096)),
        };
        let mut acked = 0;
        let failure = loop {
            match store.append("f1", &[big(acked + 1)]).await {
                Ok(()) => acked += 1,
                Err(e) => break e,
            }
            assert!(acked < 1000, "4 MiB never filled");
        };
        assert!(matches!(failure, StoreError::Io { .. }), "{failure}");
        assert!(failure.to_string().contains("No space left"), "{failure}");
        for _ in 0..5 {
            assert!(matches!(store.probe().await, Err(StoreError::Impaired)));
            assert!(matches!(store.admit().await, Err(StoreError::Impaired)));
            tokio::time::sleep(SPACE_RETRY).await;
        }
        assert!(
            mount(&["-o", "remount,size=32m", &at]),
            "cannot grow the tmpfs"
        );
        tokio::time::sleep(SPACE_RETRY).await;
        store.probe().await.unwrap();
        store.admit().await.unwrap();
        for _ in 0..3 {
            store.append("f1", &[big(acked + 1)]).await.unwrap();
            acked += 1;
        }
        let want: Vec<Event> = (1..=acked).map(big).collect();
        let got = store.events_after("f1", 0).await.unwrap();
        assert!(got == want, "the events read back differ");
        drop(store);
        let store = open(&path, Duration::from_secs(60));
        let got = store.events_after("f1", 0).await.unwrap();
        assert!(got == want, "the events read back after a restart differ");
    }
}
