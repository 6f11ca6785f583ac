//! The `redis` store: shared by every replica, on one Redis or a Redis
//! Cluster.
//!
//! Per stream, under one hash tag so Redis Cluster keeps them on one slot:
//! - `tg:{id}:ev`: a Redis Stream, one entry per append (the batch of
//!   consecutive events the pump wrote together, field `b`) with the
//!   explicit id `<last seq>-0`: XRANGE from `<n+1>-0` and XREAD after
//!   `<n>-0` both return exactly the entries holding events after `n`
//!   (XADD to append, XRANGE to replay, XREAD to follow live from another
//!   replica);
//! - `tg:{id}:rec`: the record as JSON;
//! - `tg:{id}:lease`: the replica running it, with a TTL it renews;
//! - `tg:{id}:cancel`: a `DELETE` that arrived at another replica.
//!
//! Idempotency keys live under `tg:idem:{<owner>:<key>}`. Every key has a
//! TTL. Appends from all streams on one runtime share one multiplexed
//! connection (on a cluster, one per master), which pipelines whatever is
//! in flight: that is the group commit. With thread-per-core workers each
//! worker runtime has its own, made on its first command, so a command and
//! its reply never cross threads (see `Connections`; benches/OPTIMISATIONS.md,
//! "Redis connections").
//!
//! **Slots:** a pipeline or a script only ever touches the keys of one
//! stream (one hash tag, one slot). Calls about many streams at once
//! (lease renewal, the cancel check) send one command per stream,
//! concurrently: the multiplexed connection pipelines them anyway, and a
//! cluster routes each to its own master, where one pipeline across
//! streams would fail with CROSSSLOT.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::{BoxFuture, try_join_all};
use redis::AsyncCommands;
use redis::aio::{ConnectionLike, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};

use super::{Corruption, SharedStore, Store, StoreError, decode_batch, encode_batch};
use crate::config::StoreConfig;
use crate::stream::{Event, IdempotencyEntry, Reattach, Status, StreamRecord, now_ms};
use crate::workers::current_runtime;

/// How long one Redis command may take before the store reports itself
/// unavailable (a stream then ends with `store_failed`, never hangs).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// How long connecting at startup (with its retries) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A follower's first pause between reads of a stream that has nothing
/// new, and the longest one (the pause doubles up to it while nothing
/// comes; see [`Store::follow`] below).
const FOLLOW_POLL_FIRST: Duration = Duration::from_millis(10);
const FOLLOW_POLL_MAX: Duration = Duration::from_millis(50);

/// The store on one Redis (`C` = [`redis::aio::ConnectionManager`]) or a
/// Redis Cluster (`C` = [`redis::cluster_async::ClusterConnection`]): the
/// same commands on either.
pub struct RedisStore<C> {
    conns: Connections<C>,
    ttl_ms: u64,
    lease_ms: u64,
    url_for_errors: String,
}

/// Makes another connection like the first (same URL or seed nodes, same
/// timeouts and retries), driven by the runtime it is made on.
type Connect<C> = Arc<dyn Fn() -> BoxFuture<'static, redis::RedisResult<C>> + Send + Sync>;

/// One connection per runtime. A connection's reads and writes are driven
/// by a task on the runtime it was made on: a command sent from a worker
/// to the process runtime's connection is handed over to that thread, and
/// its reply wakes the worker back (two cross-thread wake-ups per command).
/// Each worker's commands go out on a connection of its own runtime
/// instead, made on its first command; under the work-stealing scheduler
/// there is one runtime and this is the one connection made at startup.
/// At most one connection per runtime that ever used the store (the
/// process's and one per worker).
struct Connections<C> {
    first: C,
    first_runtime: Option<tokio::runtime::Id>,
    connect: Connect<C>,
    others: Mutex<HashMap<tokio::runtime::Id, Arc<tokio::sync::OnceCell<C>>>>,
}

fn events_key(id: &str) -> String {
    format!("tg:{{{id}}}:ev")
}
fn record_key(id: &str) -> String {
    format!("tg:{{{id}}}:rec")
}
fn lease_key(id: &str) -> String {
    format!("tg:{{{id}}}:lease")
}
fn cancel_key(id: &str) -> String {
    format!("tg:{{{id}}}:cancel")
}
/// The background responses not yet known to be over, for every replica.
const BACKGROUND_SET: &str = "tg:background";

/// Renew or release a lease only if we still hold it.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Connect to one Redis at `url`.
pub async fn connect(url: &str, config: &StoreConfig) -> Result<SharedStore, StoreError> {
    // Never echo credentials from the URL.
    let shown = redact_url(url);
    let client = redis::Client::open(url).map_err(|source| StoreError::Redis {
        url: shown.clone(),
        what: "invalid url",
        source,
    })?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let connect: Connect<redis::aio::ConnectionManager> = Arc::new(move || {
        let client = client.clone();
        let manager_config = manager_config.clone();
        Box::pin(async move {
            client
                .get_connection_manager_with_config(manager_config)
                .await
        })
    });
    let conn = connected(&shown, connect()).await?;
    Ok(Arc::new(
        RedisStore::ready(conn, connect, config, shown).await?,
    ))
}

/// Connect to the Redis Cluster that these seed nodes belong to (the
/// client learns the others, and follows failovers, from them).
pub async fn connect_cluster(
    nodes: &[String],
    config: &StoreConfig,
) -> Result<SharedStore, StoreError> {
    let shown = format!(
        "cluster ({})",
        nodes
            .iter()
            .map(|n| redact_url(n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let client = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(COMMAND_TIMEOUT)
        .build()
        .map_err(|source| StoreError::Redis {
            url: shown.clone(),
            what: "invalid cluster seed nodes",
            source,
        })?;
    let connect: Connect<redis::cluster_async::ClusterConnection> = Arc::new(move || {
        let client = client.clone();
        Box::pin(async move { client.get_async_connection().await })
    });
    let conn = connected(&shown, connect()).await?;
    Ok(Arc::new(
        RedisStore::ready(conn, connect, config, shown).await?,
    ))
}

/// The connection `connecting` makes, within [`CONNECT_TIMEOUT`].
async fn connected<C>(
    shown: &str,
    connecting: impl std::future::Future<Output = redis::RedisResult<C>>,
) -> Result<C, StoreError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| StoreError::Timeout {
            url: shown.to_owned(),
            what: "connecting",
            after: CONNECT_TIMEOUT,
        })?
        .map_err(|source| StoreError::Redis {
            url: shown.to_owned(),
            what: "cannot connect",
            source,
        })
}

impl<C: ConnectionLike + Clone + Send + Sync> RedisStore<C> {
    /// The store on `conn`, once it answers PING.
    async fn ready(
        mut conn: C,
        connect: Connect<C>,
        config: &StoreConfig,
        shown: String,
    ) -> Result<RedisStore<C>, StoreError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|source| StoreError::Redis {
                url: shown.clone(),
                what: "does not answer PING",
                source,
            })?;
        Ok(RedisStore {
            conns: Connections {
                first: conn,
                first_runtime: current_runtime(),
                connect,
                others: Mutex::new(HashMap::new()),
            },
            ttl_ms: config.ttl.as_millis() as u64,
            lease_ms: config.lease_ttl.as_millis() as u64,
            url_for_errors: shown,
        })
    }

    /// The connection for the runtime this runs on (see [`Connections`]).
    async fn conn(&self) -> Result<C, StoreError> {
        let conns = &self.conns;
        let Some(here) = current_runtime().filter(|r| Some(*r) != conns.first_runtime) else {
            return Ok(conns.first.clone());
        };
        let cell = conns
            .others
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(here)
            .or_default()
            .clone();
        // Failing (Redis unreachable just then) leaves the cell empty: the
        // command fails like any other, and the next one tries again.
        cell.get_or_try_init(|| async {
            match tokio::time::timeout(COMMAND_TIMEOUT, (conns.connect)()).await {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(source)) => Err(self.failed("cannot connect", source)),
                Err(_) => Err(self.timed_out("connecting", COMMAND_TIMEOUT)),
            }
        })
        .await
        .cloned()
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(self.failed("command failed", source)),
            Err(_) => Err(self.timed_out("a command", COMMAND_TIMEOUT)),
        }
    }

    /// A [`StoreError::Redis`] naming this store's (redacted) URL.
    fn failed(&self, what: &'static str, source: redis::RedisError) -> StoreError {
        StoreError::Redis {
            url: self.url_for_errors.clone(),
            what,
            source,
        }
    }

    /// A [`StoreError::Timeout`] naming this store's (redacted) URL.
    fn timed_out(&self, what: &'static str, after: Duration) -> StoreError {
        StoreError::Timeout {
            url: self.url_for_errors.clone(),
            what,
            after,
        }
    }
}

/// The events after `after` in these entries, each of which must hold
/// a batch (field `b`).
fn parse_entries(ids: Vec<redis::streams::StreamId>, after: u64) -> Result<Vec<Event>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for entry in ids {
        let seq: u64 = entry
            .id
            .split_once('-')
            .and_then(|(ms, _)| ms.parse().ok())
            .ok_or_else(|| StoreError::Corrupt(Corruption::BadEntryId(entry.id.clone())))?;
        let batch: Vec<u8> = entry
            .get("b")
            .ok_or_else(|| StoreError::Corrupt(Corruption::NoBatch(entry.id.clone())))?;
        out.extend(decode_batch(seq, &batch, after)?);
    }
    Ok(out)
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Read a stream's record, `change` it, and write it back with a fresh
    /// TTL (its events' too). The pump that runs the stream is the record's
    /// only writer.
    ///
    /// `first` goes out in the same round trip as the read, before it (the
    /// last events of a stream that is ending).
    async fn rewrite(
        &self,
        stream_id: &str,
        first: Option<redis::Pipeline>,
        change: impl FnOnce(&mut StreamRecord) + Send,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let mut read = first.unwrap_or_else(redis::pipe);
        read.cmd("GET").arg(record_key(stream_id));
        let (value,): (Option<String>,) = self.run(read.query_async(&mut conn)).await?;
        let Some(mut record) = value.map(|v| parse_record(&v)).transpose()? else {
            return Ok(());
        };
        change(&mut record);
        let value = serde_json::to_string(&record).map_err(StoreError::Encode)?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(record_key(stream_id))
            .arg(value)
            .arg("PX")
            .arg(self.ttl_ms)
            .ignore()
            .cmd("PEXPIRE")
            .arg(events_key(stream_id))
            .arg(self.ttl_ms)
            .ignore();
        self.run(pipe.query_async::<()>(&mut conn)).await
    }

    /// `events` appended with a fresh TTL, as commands of `pipe`.
    fn append_to(&self, pipe: &mut redis::Pipeline, stream_id: &str, events: &[Event]) {
        let Some(last) = events.last() else {
            return;
        };
        let key = events_key(stream_id);
        pipe.cmd("XADD")
            .arg(&key)
            .arg(format!("{}-0", last.seq))
            .arg("b")
            .arg(encode_batch(events))
            .ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(self.ttl_ms).ignore();
    }

    /// How a stream ended, written into its record.
    fn ended(
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> impl FnOnce(&mut StreamRecord) + Send {
        let reason = reason.map(str::to_owned);
        let instance = instance.to_owned();
        move |record| {
            record.status = status;
            record.reason = reason;
            record.updated_ms = now_ms();
            record.instance = instance;
        }
    }
}

fn parse_record(value: &str) -> Result<StreamRecord, StoreError> {
    serde_json::from_str(value).map_err(|source| StoreError::Decode {
        what: "stream record",
        source,
    })
}

#[async_trait]
impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn create(&self, record: &StreamRecord) -> Result<(), StoreError> {
        let value = serde_json::to_string(record).map_err(StoreError::Encode)?;
        // The record and its lease in one round trip. A lease someone else
        // holds is left as it is (a new id has none).
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(record_key(&record.id))
            .arg(value)
            .arg("PX")
            .arg(self.ttl_ms)
            .ignore()
            .cmd("SET")
            .arg(lease_key(&record.id))
            .arg(&record.instance)
            .arg("NX")
            .arg("PX")
            .arg(self.lease_ms)
            .ignore();
        let mut conn = self.conn().await?;
        self.run(pipe.query_async::<()>(&mut conn)).await
    }

    async fn append(&self, stream_id: &str, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.append_to(&mut pipe, stream_id, events);
        let mut conn = self.conn().await?;
        self.run(pipe.query_async::<()>(&mut conn)).await
    }

    async fn append_final(
        &self,
        stream_id: &str,
        events: &[Event],
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        // The events go out with the record's read: two round trips, not
        // three. The status is written only once the events are.
        let mut first = redis::pipe();
        self.append_to(&mut first, stream_id, events);
        self.rewrite(
            stream_id,
            Some(first),
            Self::ended(status, reason, instance),
        )
        .await
    }

    async fn set_status(
        &self,
        stream_id: &str,
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.rewrite(stream_id, None, Self::ended(status, reason, instance))
            .await
    }

    async fn set_upstream(
        &self,
        stream_id: &str,
        upstream: &str,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.rewrite(stream_id, None, |record| {
            record.upstream = upstream.to_owned();
            record.instance = instance.to_owned();
        })
        .await
    }

    async fn set_reattach(
        &self,
        stream_id: &str,
        reattach: Option<&Reattach>,
        _instance: &str,
    ) -> Result<(), StoreError> {
        self.rewrite(stream_id, None, |record| {
            record.reattach = reattach.cloned()
        })
        .await
    }

    async fn get(&self, stream_id: &str) -> Result<Option<StreamRecord>, StoreError> {
        let mut conn = self.conn().await?;
        let value: Option<String> = self.run(conn.get(record_key(stream_id))).await?;
        value.map(|v| parse_record(&v)).transpose()
    }

    async fn events_after(&self, stream_id: &str, after: u64) -> Result<Vec<Event>, StoreError> {
        let mut conn = self.conn().await?;
        let reply: StreamRangeReply = self
            .run(conn.xrange(
                events_key(stream_id),
                format!("{}-0", after.saturating_add(1)),
                "+",
            ))
            .await?;
        parse_entries(reply.ids, after)
    }

    async fn events_page(
        &self,
        stream_id: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut conn = self.conn().await?;
        let reply: StreamRangeReply = self
            .run(conn.xrange_count(
                events_key(stream_id),
                format!("{}-0", after.saturating_add(1)),
                "+",
                max.max(1),
            ))
            .await?;
        parse_entries(reply.ids, after)
    }

    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        entry: &IdempotencyEntry,
    ) -> Result<Option<IdempotencyEntry>, StoreError> {
        let redis_key = format!("tg:idem:{{{owner}:{key}}}");
        let value = serde_json::to_string(entry).map_err(StoreError::Encode)?;
        let mut conn = self.conn().await?;
        let set: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(&redis_key)
                    .arg(&value)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl_ms)
                    .query_async(&mut conn),
            )
            .await?;
        if set.is_some() {
            return Ok(None);
        }
        let existing: Option<String> = self.run(conn.get(&redis_key)).await?;
        Ok(existing.and_then(|v| serde_json::from_str(&v).ok()))
    }

    async fn release_idempotency(
        &self,
        owner: &str,
        key: &str,
        stream_id: &str,
    ) -> Result<(), StoreError> {
        let redis_key = format!("tg:idem:{{{owner}:{key}}}");
        let mut conn = self.conn().await?;
        let existing: Option<String> = self.run(conn.get(&redis_key)).await?;
        // Nobody else can claim the key while it is held, so between this
        // read and the delete it stays ours.
        let ours = existing
            .and_then(|v| serde_json::from_str::<IdempotencyEntry>(&v).ok())
            .is_some_and(|e| e.stream_id == stream_id);
        if ours {
            let _: i64 = self.run(conn.del(&redis_key)).await?;
        }
        Ok(())
    }

    async fn try_lease(&self, stream_id: &str, instance: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let set: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(lease_key(stream_id))
                    .arg(instance)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.lease_ms)
                    .query_async(&mut conn),
            )
            .await?;
        if set.is_some() {
            return Ok(true);
        }
        let holder: Option<String> = self.run(conn.get(lease_key(stream_id))).await?;
        Ok(holder.as_deref() == Some(instance))
    }

    async fn lease_alive(&self, stream_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        self.run(conn.exists(lease_key(stream_id))).await
    }

    async fn renew_leases(&self, stream_ids: &[String], instance: &str) -> Result<(), StoreError> {
        if stream_ids.is_empty() {
            return Ok(());
        }
        // One script per stream, each on its stream's slot (see the
        // module's note on slots).
        let conn = self.conn().await?;
        let renewals = stream_ids.iter().map(|id| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("EVAL")
                    .arg(RENEW)
                    .arg(1)
                    .arg(lease_key(id))
                    .arg(instance)
                    .arg(self.lease_ms)
                    .query_async::<i64>(&mut conn)
                    .await
            }
        });
        self.run(try_join_all(renewals)).await.map(|_| ())
    }

    async fn release_lease(&self, stream_id: &str, instance: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.run(
            redis::cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(lease_key(stream_id))
                .arg(instance)
                .query_async::<i64>(&mut conn),
        )
        .await
        .map(|_| ())
    }

    async fn follow(
        &self,
        stream_id: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<Event>, StoreError> {
        // Non-blocking XREADs on the shared multiplexed connection, with
        // the wait done here in tokio. XREAD BLOCK would hold a connection
        // for the whole wait (Redis answers a connection's commands in
        // order, so nothing else could use it): every follower would need
        // a connection of its own (one per master on a cluster), opened
        // per call as before or kept per follower (unbounded), or a pool
        // that makes followers queue behind each other's blocks. A plain
        // XREAD is one small pipelined command: no connection is opened,
        // it routes like any other command on a cluster, an idle follower
        // costs at most one read per FOLLOW_POLL_MAX (20 a second), and
        // new events reach it at most one pause late (10 ms right after
        // events, 50 ms at most).
        let options = StreamReadOptions::default().count(512);
        let key = [events_key(stream_id)];
        let from = [format!("{after}-0")];
        let until = tokio::time::Instant::now() + wait;
        let mut pause = FOLLOW_POLL_FIRST;
        loop {
            let mut conn = self.conn().await?;
            let reply: Option<StreamReadReply> =
                self.run(conn.xread_options(&key, &from, &options)).await?;
            let ids: Vec<_> = reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default();
            let now = tokio::time::Instant::now();
            if !ids.is_empty() || now >= until {
                return parse_entries(ids, after);
            }
            tokio::time::sleep_until(until.min(now + pause)).await;
            pause = (pause * 2).min(FOLLOW_POLL_MAX);
        }
    }

    async fn request_cancel(&self, stream_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.run(conn.pset_ex::<_, _, ()>(cancel_key(stream_id), 1, 60_000))
            .await
    }

    async fn cancel_requested(&self, stream_ids: &[String]) -> Result<Vec<String>, StoreError> {
        if stream_ids.is_empty() {
            return Ok(Vec::new());
        }
        // One EXISTS per stream, each on its stream's slot.
        let conn = self.conn().await?;
        let checks = stream_ids.iter().map(|id| {
            let mut conn = conn.clone();
            async move { conn.exists::<_, bool>(cancel_key(id)).await }
        });
        let flags: Vec<bool> = self.run(try_join_all(checks)).await?;
        Ok(stream_ids
            .iter()
            .zip(flags)
            .filter(|(_, f)| *f)
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        Ok(0) // every key carries its own TTL
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        self.run(
            redis::cmd("GET")
                .arg(format!("tg:meta:{key}"))
                .query_async(&mut conn),
        )
        .await
    }

    async fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.run(
            redis::cmd("SET")
                .arg(format!("tg:meta:{key}"))
                .arg(value)
                .query_async(&mut conn),
        )
        .await
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: () = self
            .run(
                redis::cmd("SET")
                    .arg("tg:probe")
                    .arg(now_ms())
                    .arg("EX")
                    .arg(60)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(()) // every acknowledged write is already in Redis
    }

    /// One set every replica reads: `SADD` / `SREM` race with no one.
    async fn add_background(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let count: u64 = self
            .run(
                redis::cmd("SCARD")
                    .arg(BACKGROUND_SET)
                    .query_async(&mut conn),
            )
            .await?;
        if count as usize >= crate::store::MAX_BACKGROUND {
            return Err(StoreError::TooManyBackground(crate::store::MAX_BACKGROUND));
        }
        let _: u64 = self
            .run(
                redis::cmd("SADD")
                    .arg(BACKGROUND_SET)
                    .arg(id)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    async fn remove_background(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: u64 = self
            .run(
                redis::cmd("SREM")
                    .arg(BACKGROUND_SET)
                    .arg(id)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    async fn background(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn().await?;
        self.run(
            redis::cmd("SMEMBERS")
                .arg(BACKGROUND_SET)
                .query_async(&mut conn),
        )
        .await
    }

    fn shared(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        for key in [
            events_key("s1"),
            record_key("s1"),
            lease_key("s1"),
            cancel_key("s1"),
        ] {
            assert!(key.contains("{s1}"), "{key}");
        }
    }

    #[test]
    fn entries_hold_batches_numbered_to_their_id() {
        let event = |seq: u64| Event {
            seq,
            name: None,
            data: format!("e{seq}").into(),
        };
        let entry = |id: &str, fields: Vec<(&str, Vec<u8>)>| redis::streams::StreamId {
            milliseconds_elapsed_from_delivery: None,
            delivered_count: None,
            id: id.into(),
            map: fields
                .into_iter()
                .map(|(k, v)| (k.to_owned(), redis::Value::BulkString(v)))
                .collect(),
        };
        let entries = || {
            vec![
                entry("1-0", vec![("b", encode_batch(&[event(1)]))]),
                entry(
                    "4-0",
                    vec![("b", encode_batch(&[event(2), event(3), event(4)]))],
                ),
                entry("5-0", vec![("b", encode_batch(&[event(5)]))]),
            ]
        };
        for after in 0..=5 {
            let got = parse_entries(entries(), after).unwrap();
            let want: Vec<Event> = (after + 1..=5).map(event).collect();
            assert_eq!(got, want, "after {after}");
        }
        let short = vec![entry(
            "1-0",
            vec![("b", encode_batch(&[event(1), event(2)]))],
        )];
        assert!(matches!(
            parse_entries(short, 0),
            Err(StoreError::Corrupt(Corruption::BatchTooLong { last: 1 }))
        ));
        // An entry without a batch (such as the one-event entries of early
        // versions, fields `n` and `d`) is corrupt.
        let unbatched = vec![entry("1-0", vec![("n", vec![]), ("d", b"e1".to_vec())])];
        assert!(matches!(
            parse_entries(unbatched, 0),
            Err(StoreError::Corrupt(Corruption::NoBatch(id))) if id == "1-0"
        ));
        let bad_id = vec![entry("x-0", vec![("b", encode_batch(&[event(1)]))])];
        assert!(matches!(
            parse_entries(bad_id, 0),
            Err(StoreError::Corrupt(Corruption::BadEntryId(_)))
        ));
    }

    #[tokio::test]
    async fn connect_errors_never_show_the_password() {
        let config = StoreConfig {
            kind: crate::config::StoreKind::Memory,
            ttl: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(5),
            max_bytes: 1 << 30,
        };
        // An invalid port fails before any connection is tried.
        let Err(e) = connect("redis://user:hunter2@host:notaport/0", &config).await else {
            panic!("an invalid URL connected");
        };
        let shown = e.to_string();
        assert!(matches!(e, StoreError::Redis { .. }), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://***@host:notaport/0"), "{shown}");
        let source = std::error::Error::source(&e).expect("a redis error as its source");
        assert!(source.downcast_ref::<redis::RedisError>().is_some());

        let timeout = StoreError::Timeout {
            url: redact_url("redis://:hunter2@host:6379"),
            what: "a command",
            after: COMMAND_TIMEOUT,
        };
        assert_eq!(
            timeout.to_string(),
            "store is unavailable: redis at redis://***@host:6379: a command timed out after 2s"
        );
    }

    #[tokio::test]
    async fn cluster_errors_never_show_the_password() {
        let config = StoreConfig {
            kind: crate::config::StoreKind::Memory,
            ttl: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(5),
            max_bytes: 1 << 30,
        };
        let nodes = [
            "redis://:hunter2@host:notaport".to_owned(),
            "redis://other:7000".to_owned(),
        ];
        let Err(e) = connect_cluster(&nodes, &config).await else {
            panic!("an invalid seed connected");
        };
        let shown = e.to_string();
        assert!(matches!(e, StoreError::Redis { .. }), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis at cluster (redis://***@host:notaport, redis://other:7000)"),
            "{shown}"
        );
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://user:pw@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }
}
