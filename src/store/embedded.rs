//! The `embedded` store (the default): fjall, an LSM-tree key-value engine,
//! in a directory on local disk.
//!
//! Why an LSM tree: the workload is many small appends per second from many
//! streams, per-stream range reads on resume, and whole-stream deletes at
//! expiry. An LSM engine turns the appends into sequential journal writes
//! and serves prefix ranges from sorted runs; a copy-on-write B-tree
//! (redb) would rewrite pages on every commit.
//!
//! Durability: all writes go through one writer thread that group-commits
//! whatever every stream has pending into one batch and pushes the journal
//! into the OS (`PersistMode::Buffer`) before acknowledging. That survives a
//! SIGKILL of the gateway (the page cache outlives the process); a machine
//! crash may lose the last few hundred milliseconds, which the OS flushes on
//! its own schedule. fjall locks the directory: one process at a time.
//!
//! A failed commit or journal persist (a full disk) poisons a fjall
//! database for good: every later write fails. So the store reopens it in
//! the process: the first failed write takes the database out of service
//! (every call then fails with [`StoreError::Reopening`], a 503, until it is
//! back), a thread waits for the calls still using it, stops its writer,
//! drops it, and opens the directory again, with backoff, until a test
//! write commits. Opening replays the journal, which keeps every
//! acknowledged batch and drops a torn last one (fjall checks each batch's
//! checksum), so what was acknowledged is what is read after.
//!
//! Keys: `streams`: id → JSON record, written once; `status`: id → the
//! record's changing part (status, reason, updated, instance), so a status
//! change is one small write with no read and the request is not rewritten;
//! `batches`: id ‖ 0x00 ‖ last seq (big endian) → the events of one
//! append (consecutive seqs), each as a little-endian u32 length and the
//! encoded event, so the batches holding events after `n` are the keys
//! from seq `n + 1` on; `idempotency`: owner ‖ 0x00 ‖ key → JSON entry.
//!
//! One key per append, not per event: the pump appends what arrived
//! together, so a 50-chunk answer is a handful of keys, and the memtable
//! inserts, flushes and compactions scale with appends, not events.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::{mpsc, oneshot};

use super::{Corruption, Store, StoreError, decode_batch, encode_batch};
use crate::config::StoreConfig;
use crate::stream::{Event, IdempotencyEntry, Status, StreamRecord, now_ms};

#[derive(Clone, Copy)]
enum Space {
    Streams,
    Batches,
    Idempotency,
    Status,
}

/// The part of a record that changes after creation.
#[derive(serde::Serialize, serde::Deserialize)]
struct StatusRecord {
    status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    updated_ms: u64,
    instance: String,
}

enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    Remove(Space, Vec<u8>),
}

struct Write {
    ops: Vec<Op>,
    /// The group commit's result, shared by every write it held.
    done: oneshot::Sender<Result<(), Arc<fjall::Error>>>,
}

pub struct EmbeddedStore {
    /// Held from an idempotency key's read to its write, so that of many
    /// concurrent claims of one key exactly one wins (claims are rare:
    /// one lock for all keys is enough).
    claims: tokio::sync::Mutex<()>,
    shared: Arc<Shared>,
    ttl_ms: u64,
    secret: Vec<u8>,
}

/// One open database: its keyspaces and the writer thread that commits
/// to it. Replaced as a whole when a failed write poisons it.
struct Engine {
    db: Database,
    streams: Keyspace,
    status: Keyspace,
    batches: Keyspace,
    idempotency: Keyspace,
    writer: mpsc::UnboundedSender<Write>,
    writer_thread: std::thread::JoinHandle<()>,
}

/// What the store and its reopening thread share.
struct Shared {
    /// fjall's directory.
    path: PathBuf,
    commit_interval: Duration,
    state: Mutex<State>,
    /// Set when the store is dropped: a reopening thread gives up.
    closed: AtomicBool,
}

struct State {
    /// The database in service; `None` while it is being reopened.
    engine: Option<Arc<Engine>>,
    /// Whether a thread is reopening it.
    reopening: bool,
    /// The wait before the next open attempt. It doubles while attempts
    /// fail, and is kept when a reopened database fails again soon after,
    /// so a disk that stays nearly full is not replayed in a tight loop.
    backoff: Duration,
    /// When the database was last reopened.
    reopened: Option<Instant>,
}

/// The first wait before reopening, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A reopened database that fails again within this keeps its backoff.
const BACKOFF_MEMORY: Duration = Duration::from_secs(30);
/// How long a reopen waits for the calls still using the old database
/// before it drops its own handle and lets the directory lock tell.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// Turns a fjall error into a [`StoreError::Engine`] that says what failed.
fn engine(context: &'static str) -> impl FnOnce(fjall::Error) -> StoreError {
    move |e| StoreError::Engine {
        context,
        source: Arc::new(e),
    }
}

/// Turns an I/O error on `path` into a [`StoreError::Io`] that says what
/// failed and where.
fn io_at(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io {
        context: format!("cannot {action} {}", path.display()),
        source,
    }
}

fn event_key(stream_id: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream_id.len() + 9);
    key.extend_from_slice(stream_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(a.len() + b.len() + 1);
    key.extend_from_slice(a.as_bytes());
    key.push(0);
    key.extend_from_slice(b.as_bytes());
    key
}

fn open_error(path: &Path) -> impl FnOnce(fjall::Error) -> StoreError {
    move |e| match e {
        fjall::Error::Locked => StoreError::Locked {
            path: path.to_owned(),
        },
        source => StoreError::Open {
            path: path.to_owned(),
            source,
        },
    }
}

impl Engine {
    /// Open fjall's directory `path` and start its writer. When `check`,
    /// first commit one tiny write, so a database reopened on a disk that is
    /// still full is not put back in service.
    fn open(path: &Path, interval: Duration, check: bool) -> Result<Engine, StoreError> {
        let db = Database::builder(path)
            // One background thread for flushes and compactions: with two,
            // fjall 3.1 spins a core handing compactions back and forth
            // (benches/OPTIMISATIONS.md, "embedded store").
            .worker_threads(1)
            // No journal compression: batches are small and short-lived.
            .journal_compression(fjall::CompressionType::None)
            .open()
            .map_err(open_error(path))?;
        let open = |name: &str, context: &'static str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(engine(context))
        };
        let streams = open("streams", "cannot open the streams keyspace")?;
        let batches = open("batches", "cannot open the batches keyspace")?;
        let idempotency = open("idempotency", "cannot open the idempotency keyspace")?;
        let status = open("status", "cannot open the status keyspace")?;
        if check {
            let mut batch = db.batch().durability(Some(PersistMode::Buffer));
            let (key, value) = probe_entry();
            batch.insert(&status, key, value);
            batch
                .commit()
                .map_err(engine("cannot commit a test write"))?;
        }

        let (tx, rx) = mpsc::unbounded_channel();
        let spaces = [
            streams.clone(),
            batches.clone(),
            idempotency.clone(),
            status.clone(),
        ];
        let writer_db = db.clone();
        let writer_thread = std::thread::Builder::new()
            .name("tidegate-store-writer".into())
            .spawn(move || writer_loop(writer_db, spaces, rx, interval))
            .map_err(|source| StoreError::Io {
                context: "cannot start the store writer thread".into(),
                source,
            })?;
        Ok(Engine {
            db,
            streams,
            status,
            batches,
            idempotency,
            writer: tx,
            writer_thread,
        })
    }

    /// Stop the writer (it commits what it holds, and answers every write
    /// still queued) and drop the database, which stops fjall's workers.
    fn close(self) {
        let Engine {
            db,
            streams,
            status,
            batches,
            idempotency,
            writer,
            writer_thread,
        } = self;
        drop(writer);
        if writer_thread.join().is_err() {
            tracing::error!("the store writer thread panicked");
        }
        drop((streams, status, batches, idempotency, db));
    }
}

/// The record readiness writes: a key no stream id can name (ids start
/// with `tg_`), and the time.
fn probe_entry() -> (Vec<u8>, Vec<u8>) {
    (b"\0probe".to_vec(), now_ms().to_be_bytes().to_vec())
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The database in service, or [`StoreError::Reopening`].
    fn engine(self: &Arc<Self>) -> Result<Arc<Engine>, StoreError> {
        let mut state = self.lock();
        match &state.engine {
            Some(engine) => Ok(engine.clone()),
            None => {
                if !state.reopening {
                    // The last reopening thread could not be started.
                    self.start_reopen(&mut state, None);
                }
                Err(StoreError::Reopening)
            }
        }
    }

    /// A write to `failed` failed: fjall has poisoned it (a full disk, a
    /// failed persist), so take it out of service and reopen the directory.
    /// Only the first failure of a database does anything.
    fn failed(self: &Arc<Self>, failed: &Arc<Engine>) {
        let mut state = self.lock();
        let current = state
            .engine
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(e, failed));
        if !current {
            return;
        }
        let old = state.engine.take();
        let soon = state
            .reopened
            .is_some_and(|at| at.elapsed() < BACKOFF_MEMORY);
        if !soon {
            state.backoff = BACKOFF_MIN;
        }
        tracing::warn!(
            path = %self.path.display(),
            "a write to the embedded store failed; reopening it (calls fail with store_unavailable until it is back)"
        );
        self.start_reopen(&mut state, old);
    }

    fn start_reopen(self: &Arc<Self>, state: &mut State, old: Option<Arc<Engine>>) {
        let shared = self.clone();
        let delay = state.backoff;
        state.reopening = std::thread::Builder::new()
            .name("tidegate-store-reopen".into())
            .spawn(move || shared.reopen(old, delay))
            .inspect_err(|e| tracing::error!(error = %e, "cannot start the store reopening thread"))
            .is_ok();
    }

    /// The reopening thread: close `old` once nothing uses it, then open
    /// the directory until a database takes a test write.
    fn reopen(self: Arc<Self>, old: Option<Arc<Engine>>, mut delay: Duration) {
        if let Some(old) = old {
            let deadline = Instant::now() + DRAIN_WAIT;
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(engine) => {
                        engine.close();
                        break;
                    }
                    Err(shared) if Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => {
                        tracing::warn!(
                            "calls still hold the failed embedded store; reopening when they let go"
                        );
                        break;
                    }
                }
            }
        }
        let mut attempts = 0u32;
        loop {
            std::thread::sleep(delay);
            if self.closed.load(Ordering::Acquire) {
                self.lock().reopening = false;
                return;
            }
            attempts += 1;
            delay = (delay * 2).min(BACKOFF_MAX);
            match Engine::open(&self.path, self.commit_interval, true) {
                Ok(engine) => {
                    let mut state = self.lock();
                    state.reopening = false;
                    state.backoff = delay;
                    state.reopened = Some(Instant::now());
                    if self.closed.load(Ordering::Acquire) {
                        drop(state);
                        engine.close();
                        return;
                    }
                    state.engine = Some(Arc::new(engine));
                    tracing::info!(attempts, "the embedded store is back in service");
                    return;
                }
                Err(e) => {
                    // The first failure, then one in 30 (a minute at the
                    // longest backoff).
                    if attempts % 30 == 1 {
                        tracing::warn!(error = %e, attempts, "cannot reopen the embedded store yet");
                    }
                }
            }
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
    }
}

impl EmbeddedStore {
    pub fn open(path: &Path, config: &StoreConfig) -> Result<EmbeddedStore, StoreError> {
        // The store holds every prompt and answer: what this process
        // creates is for its own user only (files 0600, directories 0700).
        #[cfg(unix)]
        // SAFETY: umask only sets the process's file-creation mask; it
        // cannot fail and touches no memory.
        unsafe {
            libc::umask(0o077);
        }
        std::fs::create_dir_all(path).map_err(io_at("create", path))?;
        let db_path = path.join("db");
        let engine =
            Engine::open(&db_path, config.commit_interval, false).map_err(|e| match e {
                // Name the directory the operator configured.
                StoreError::Locked { .. } => StoreError::Locked {
                    path: path.to_owned(),
                },
                StoreError::Open { source, .. } => StoreError::Open {
                    path: path.to_owned(),
                    source,
                },
                e => e,
            })?;
        let secret = load_or_create_secret(&path.join("resume-secret"))?;
        restrict_permissions(path)?;
        Ok(EmbeddedStore {
            claims: tokio::sync::Mutex::new(()),
            shared: Arc::new(Shared {
                path: db_path,
                commit_interval: config.commit_interval,
                state: Mutex::new(State {
                    engine: Some(Arc::new(engine)),
                    reopening: false,
                    backoff: BACKOFF_MIN,
                    reopened: None,
                }),
                closed: AtomicBool::new(false),
            }),
            ttl_ms: config.ttl.as_millis() as u64,
            secret,
        })
    }

    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.shared.engine()
    }

    async fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let engine = self.engine()?;
        let (done, wait) = oneshot::channel();
        let result = match engine.writer.send(Write { ops, done }) {
            Ok(()) => match wait.await {
                Ok(committed) => committed.map_err(|source| StoreError::Engine {
                    context: "cannot commit a write batch",
                    source,
                }),
                Err(_) => Err(StoreError::WriterStopped),
            },
            Err(_) => Err(StoreError::WriterStopped),
        };
        if result.is_err() {
            self.shared.failed(&engine);
        }
        result
    }
}

fn read_record(
    streams: &Keyspace,
    status: &Keyspace,
    stream_id: &str,
) -> Result<Option<StreamRecord>, StoreError> {
    match streams
        .get(stream_id)
        .map_err(engine("cannot read a stream record"))?
    {
        Some(bytes) => with_status(status, stream_id, &bytes).map(Some),
        None => Ok(None),
    }
}

/// A stored record with its latest status applied.
fn with_status(
    status: &Keyspace,
    stream_id: &str,
    record: &[u8],
) -> Result<StreamRecord, StoreError> {
    let mut record: StreamRecord =
        serde_json::from_slice(record).map_err(|source| StoreError::Decode {
            what: "stream record",
            source,
        })?;
    if let Some(bytes) = status
        .get(stream_id)
        .map_err(engine("cannot read a stream's status"))?
    {
        let latest: StatusRecord =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Decode {
                what: "stream status",
                source,
            })?;
        record.status = latest.status;
        record.reason = latest.reason;
        record.updated_ms = latest.updated_ms;
        record.instance = latest.instance;
    }
    Ok(record)
}

/// The group commit: take one write, then everything else already waiting
/// (from every stream), commit them as one batch, acknowledge them all.
fn writer_loop(
    db: Database,
    spaces: [Keyspace; 4],
    mut rx: mpsc::UnboundedReceiver<Write>,
    interval: Duration,
) {
    let mut pending = Vec::with_capacity(1024);
    while let Some(first) = rx.blocking_recv() {
        pending.push(first);
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
        while pending.len() < 8192 {
            match rx.try_recv() {
                Ok(w) => pending.push(w),
                Err(_) => break,
            }
        }
        let mut batch = db.batch().durability(Some(PersistMode::Buffer));
        for write in &pending {
            for op in &write.ops {
                match op {
                    Op::Put(space, k, v) => {
                        batch.insert(&spaces[*space as usize], k.as_slice(), v.as_slice())
                    }
                    Op::Remove(space, k) => batch.remove(&spaces[*space as usize], k.as_slice()),
                }
            }
        }
        let result = batch.commit().map_err(Arc::new);
        for write in pending.drain(..) {
            let _ = write.done.send(result.clone());
        }
    }
    let _ = db.persist(PersistMode::SyncAll);
}

/// The removals of every expired stream and idempotency key, and how many
/// streams they remove. A full scan: run it off the async workers.
fn expired_ops(
    streams: &Keyspace,
    status: &Keyspace,
    batches: &Keyspace,
    idempotency: &Keyspace,
    ttl_ms: u64,
) -> Result<(Vec<Op>, usize), StoreError> {
    let now = now_ms();
    let mut ops = Vec::new();
    let mut gone = 0;
    for guard in streams.iter() {
        let (key, value) = guard
            .into_inner()
            .map_err(engine("cannot scan the stream records"))?;
        let id = std::str::from_utf8(&key).unwrap_or_default();
        let expired = match with_status(status, id, &value) {
            Ok(record) => record.updated_ms + ttl_ms <= now,
            Err(_) => true,
        };
        if expired {
            gone += 1;
            let mut prefix = key.to_vec();
            prefix.push(0);
            for batch in batches.prefix(&prefix) {
                ops.push(Op::Remove(
                    Space::Batches,
                    batch
                        .key()
                        .map_err(engine("cannot scan a stream's event batches"))?
                        .to_vec(),
                ));
            }
            ops.push(Op::Remove(Space::Streams, key.to_vec()));
            ops.push(Op::Remove(Space::Status, key.to_vec()));
        }
    }
    for guard in idempotency.iter() {
        let (key, value) = guard
            .into_inner()
            .map_err(engine("cannot scan the idempotency keys"))?;
        let expired = serde_json::from_slice::<(IdempotencyEntry, u64)>(&value)
            .map(|(_, at)| at + ttl_ms <= now)
            .unwrap_or(true);
        if expired {
            ops.push(Op::Remove(Space::Idempotency, key.to_vec()));
        }
    }
    Ok((ops, gone))
}

/// The write of one append: the batch under its last seq.
fn batch_op(stream_id: &str, events: &[Event]) -> Option<Op> {
    let last = events.last()?;
    Some(Op::Put(
        Space::Batches,
        event_key(stream_id, last.seq),
        encode_batch(events),
    ))
}

/// The write of a status change.
fn status_op(
    stream_id: &str,
    status: Status,
    reason: Option<&str>,
    instance: &str,
) -> Result<Op, StoreError> {
    let latest = StatusRecord {
        status,
        reason: reason.map(str::to_owned),
        updated_ms: now_ms(),
        instance: instance.to_owned(),
    };
    let value = serde_json::to_vec(&latest).map_err(StoreError::Encode)?;
    Ok(Op::Put(Space::Status, stream_id.as_bytes().to_vec(), value))
}

/// Take group and other permissions off the store's directory and
/// everything in it (a store made by an older version, or under a looser
/// umask, was readable by every local user).
fn restrict_permissions(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
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
    }
    Ok(())
}

/// Run a read of the store off the async workers: an LSM read may touch
/// the disk, and a worker thread blocked on it holds every stream it runs.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(StoreError::FlushTask)?
}

fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, StoreError> {
    if let Ok(bytes) = std::fs::read(path)
        && bytes.len() >= 32
    {
        return Ok(bytes);
    }
    let secret = crate::token::random_string(32).into_bytes();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &secret).map_err(io_at("write", &tmp))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_at("restrict the permissions of", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_at("move the new resume secret to", path))?;
    Ok(secret)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create(&self, record: &StreamRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(StoreError::Encode)?;
        self.write(vec![Op::Put(
            Space::Streams,
            record.id.as_bytes().to_vec(),
            value,
        )])
        .await
    }

    async fn append(&self, stream_id: &str, events: &[Event]) -> Result<(), StoreError> {
        match batch_op(stream_id, events) {
            Some(op) => self.write(vec![op]).await,
            None => Ok(()),
        }
    }

    async fn append_final(
        &self,
        stream_id: &str,
        events: &[Event],
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        let mut ops: Vec<Op> = batch_op(stream_id, events).into_iter().collect();
        ops.push(status_op(stream_id, status, reason, instance)?);
        self.write(ops).await
    }

    async fn set_status(
        &self,
        stream_id: &str,
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.write(vec![status_op(stream_id, status, reason, instance)?])
            .await
    }

    async fn get(&self, stream_id: &str) -> Result<Option<StreamRecord>, StoreError> {
        let (db, ttl_ms) = (self.engine()?, self.ttl_ms);
        let id = stream_id.to_owned();
        let record = blocking(move || read_record(&db.streams, &db.status, &id)).await?;
        Ok(record.filter(|r| r.updated_ms + ttl_ms > now_ms()))
    }

    async fn events_after(&self, stream_id: &str, after: u64) -> Result<Vec<Event>, StoreError> {
        let start = event_key(stream_id, after.saturating_add(1));
        let end = event_key(stream_id, u64::MAX);
        let db = self.engine()?;
        blocking(move || {
            let mut out = Vec::new();
            for guard in db.batches.range(start..=end) {
                let (key, value) = guard
                    .into_inner()
                    .map_err(engine("cannot read a stream's event batches"))?;
                let last: [u8; 8] = key[key.len().saturating_sub(8)..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt(Corruption::ShortEventKey))?;
                out.extend(decode_batch(u64::from_be_bytes(last), &value, after)?);
            }
            Ok(out)
        })
        .await
    }

    async fn events_page(
        &self,
        stream_id: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let start = event_key(stream_id, after.saturating_add(1));
        let end = event_key(stream_id, u64::MAX);
        let db = self.engine()?;
        blocking(move || {
            let mut out = Vec::new();
            for guard in db.batches.range(start..=end) {
                let (key, value) = guard
                    .into_inner()
                    .map_err(engine("cannot read a stream's event batches"))?;
                let last: [u8; 8] = key[key.len().saturating_sub(8)..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt(Corruption::ShortEventKey))?;
                out.extend(decode_batch(u64::from_be_bytes(last), &value, after)?);
                if out.len() >= max {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        entry: &IdempotencyEntry,
    ) -> Result<Option<IdempotencyEntry>, StoreError> {
        let k = pair_key(owner, key);
        // From the read to the write: one claim at a time.
        let _claiming = self.claims.lock().await;
        let (db, read_key) = (self.engine()?, k.clone());
        let stored = blocking(move || {
            db.idempotency
                .get(&read_key)
                .map_err(engine("cannot read an idempotency key"))
        })
        .await?;
        if let Some(bytes) = stored
            && let Ok((existing, at)) = serde_json::from_slice::<(IdempotencyEntry, u64)>(&bytes)
            && at + self.ttl_ms > now_ms()
        {
            return Ok(Some(existing));
        }
        let value = serde_json::to_vec(&(entry, now_ms())).map_err(StoreError::Encode)?;
        self.write(vec![Op::Put(Space::Idempotency, k, value)])
            .await?;
        Ok(None)
    }

    async fn try_lease(&self, _stream_id: &str, _instance: &str) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn lease_alive(&self, _stream_id: &str) -> Result<bool, StoreError> {
        // The directory lock means this process is the store's only user: a
        // run this process does not hold belonged to a process that is gone.
        Ok(false)
    }

    async fn renew_leases(&self, _ids: &[String], _instance: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn release_lease(&self, _stream_id: &str, _instance: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let (db, ttl_ms) = (self.engine()?, self.ttl_ms);
        let (ops, gone) = blocking(move || {
            expired_ops(
                &db.streams,
                &db.status,
                &db.batches,
                &db.idempotency,
                ttl_ms,
            )
        })
        .await?;
        if !ops.is_empty() {
            self.write(ops).await?;
        }
        Ok(gone)
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let (key, value) = probe_entry();
        self.write(vec![Op::Put(Space::Status, key, value)]).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let db = self.engine()?;
        let persisted = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || db.db.persist(PersistMode::SyncAll))
                .await
                .map_err(StoreError::FlushTask)?
        };
        if persisted.is_err() {
            // A failed persist poisons the database as a failed commit does.
            self.shared.failed(&db);
        }
        persisted.map_err(engine("cannot persist the journal"))
    }

    fn shared(&self) -> bool {
        false
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

    fn config(path: &Path, ttl: Duration) -> StoreConfig {
        StoreConfig {
            kind: StoreKind::Embedded {
                path: path.to_owned(),
            },
            ttl,
            commit_interval: Duration::ZERO,
            lease_ttl: Duration::from_secs(5),
            max_bytes: 1 << 30,
        }
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
        }
    }

    fn event(seq: u64) -> Event {
        Event {
            seq,
            name: None,
            data: Bytes::from(format!("e{seq}")),
        }
    }

    #[tokio::test]
    async fn records_events_status_and_expiry() {
        let dir = std::env::temp_dir().join(format!(
            "tidegate-embedded-{}",
            crate::token::random_string(6)
        ));
        let store = EmbeddedStore::open(&dir, &config(&dir, Duration::from_millis(300))).unwrap();
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
        store
            .set_status("s1", Status::Interrupted, Some("server_restarting"), "i2")
            .await
            .unwrap();
        let back = store.get("s1").await.unwrap().unwrap();
        assert_eq!(back.status, Status::Interrupted);
        assert_eq!(back.reason.as_deref(), Some("server_restarting"));
        assert_eq!(back.instance, "i2");
        assert_eq!(back.request, "{}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            store.get("s1").await.unwrap().is_none(),
            "expired records read as gone"
        );
        assert_eq!(store.sweep().await.unwrap(), 1);
        assert!(store.events_after("s1", 0).await.unwrap().is_empty());
        assert!(
            store
                .engine()
                .is_ok_and(|db| db.streams.get("s1").unwrap().is_none()
                    && db.status.get("s1").unwrap().is_none())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_of_one_key_have_one_winner() {
        let dir = std::env::temp_dir().join(format!(
            "tidegate-embedded-{}",
            crate::token::random_string(6)
        ));
        let store =
            Arc::new(EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60))).unwrap());
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

    #[cfg(unix)]
    #[tokio::test]
    async fn files_are_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "tidegate-embedded-{}",
            crate::token::random_string(6)
        ));
        // A store left by an older version, readable by everyone.
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("old"), b"x").unwrap();
        std::fs::set_permissions(dir.join("old"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60))).unwrap();
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
        assert!(checked > 4, "only {checked} paths");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_open_is_locked_out() {
        let dir = std::env::temp_dir().join(format!(
            "tidegate-embedded-{}",
            crate::token::random_string(6)
        ));
        let first = EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60))).unwrap();
        let Err(second) = EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60))) else {
            panic!("a second open of a locked store succeeded");
        };
        assert!(matches!(&second, StoreError::Locked { path } if *path == dir));
        assert!(
            second
                .to_string()
                .contains("in use by another tidegate process")
        );
        drop(first);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whether `e` is what a call may meet while the store is reopened.
    fn unavailable(e: &StoreError) -> bool {
        matches!(
            e,
            StoreError::Reopening | StoreError::WriterStopped | StoreError::Engine { .. }
        )
    }

    async fn wait_until_back(store: &EmbeddedStore) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match store.probe().await {
                Ok(()) => return,
                Err(e) => assert!(unavailable(&e), "{e}"),
            }
            assert!(tokio::time::Instant::now() < deadline, "never back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Reopens forced while writers and readers run: every call either
    /// works or fails as unavailable (no panic, no hang), and every
    /// acknowledged append reads back exactly afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopening_under_load_keeps_every_acknowledged_append() {
        let dir = std::env::temp_dir().join(format!(
            "tidegate-embedded-{}",
            crate::token::random_string(6)
        ));
        let store =
            Arc::new(EmbeddedStore::open(&dir, &config(&dir, Duration::from_secs(60))).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = tokio_util::task::TaskTracker::new();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (store, stop) = (store.clone(), stop.clone());
                tasks.spawn(async move {
                    let id = format!("w{w}");
                    while store.create(&record(&id)).await.is_err() {
                        tokio::task::yield_now().await;
                    }
                    let mut acked = 0;
                    while !stop.load(Ordering::Relaxed) {
                        match store.append(&id, &[event(acked + 1)]).await {
                            Ok(()) => acked += 1,
                            Err(e) => assert!(unavailable(&e), "{e}"),
                        }
                        match store.events_after(&id, acked.saturating_sub(1)).await {
                            Ok(got) => assert!(got.len() <= 1, "{got:?}"),
                            Err(e) => assert!(unavailable(&e), "{e}"),
                        }
                        // A failed call returns at once: let the other
                        // tasks (and the timers) run.
                        tokio::task::yield_now().await;
                    }
                    (id, acked)
                })
            })
            .collect();
        let mut reopens = 0;
        while reopens < 5 {
            if let Ok(db) = store.engine() {
                store.shared.failed(&db);
                drop(db);
                reopens += 1;
            }
            wait_until_back(&store).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            let (id, acked) = w.await.unwrap();
            assert!(acked > 0, "{id} never wrote");
            let got = store.events_after(&id, 0).await.unwrap();
            let want: Vec<Event> = (1..=acked).map(event).collect();
            assert_eq!(got, want, "{id}");
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A real full disk (a 4 MiB tmpfs, mounting needs root): appends fail,
    /// the store stays out of service while the disk is full, and comes
    /// back when the filesystem is grown, with every acknowledged append.
    #[tokio::test]
    async fn a_full_disk_comes_back_when_the_filesystem_grows() {
        let dir = std::env::temp_dir().join(format!(
            "tidegate-embedded-{}",
            crate::token::random_string(6)
        ));
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
        let store = EmbeddedStore::open(&path, &config(&path, Duration::from_secs(60))).unwrap();
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
        assert!(matches!(failure, StoreError::Engine { .. }), "{failure}");
        // While the disk stays full, the store takes no stream's append.
        let mut outcomes = (0, 0, 0);
        for _ in 0..50 {
            match store.append("f1", &[big(acked + 1)]).await {
                Ok(()) => {
                    acked += 1;
                    outcomes.0 += 1
                }
                Err(StoreError::Reopening) => outcomes.1 += 1,
                Err(e) => {
                    assert!(unavailable(&e), "{e}");
                    outcomes.2 += 1
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("while full (ok, reopening, failed): {outcomes:?}");
        assert!(
            mount(&["-o", "remount,size=32m", &at]),
            "cannot grow the tmpfs"
        );
        wait_until_back(&store).await;
        for _ in 0..3 {
            store.append("f1", &[big(acked + 1)]).await.unwrap();
            acked += 1;
        }
        let got = store.events_after("f1", 0).await.unwrap();
        let want: Vec<Event> = (1..=acked).map(big).collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the events read back differ");
        drop(store);
    }

    #[test]
    fn engine_and_decode_errors_keep_their_sources() {
        use std::error::Error;
        let source = Arc::new(fjall::Error::Io(std::io::Error::other("disk on fire")));
        let e = StoreError::Engine {
            context: "cannot commit a write batch",
            source: source.clone(),
        };
        assert_eq!(
            e.to_string(),
            format!("store i/o: cannot commit a write batch: {source}")
        );
        let fjall = e.source().unwrap();
        assert!(fjall.downcast_ref::<Arc<fjall::Error>>().is_some());
        let io = fjall.source().unwrap();
        assert_eq!(io.to_string(), "disk on fire");

        let Err(json) = serde_json::from_slice::<StatusRecord>(b"{") else {
            panic!("half a JSON object decoded");
        };
        let e = StoreError::Decode {
            what: "stream status",
            source: json,
        };
        assert!(
            e.to_string()
                .starts_with("store record is corrupt: cannot decode the stream status: ")
        );
        assert!(
            e.source()
                .unwrap()
                .downcast_ref::<serde_json::Error>()
                .is_some()
        );
    }
}
