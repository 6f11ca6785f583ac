//! The `redis` store: shared by every replica.
//!
//! Per stream, under one hash tag so Redis Cluster keeps them on one slot:
//! - `tg:{id}:ev`: a Redis Stream, one entry per append (the batch of
//!   consecutive events the pump wrote together, field `b`) with the
//!   explicit id `<last seq>-0`: XRANGE from `<n+1>-0` and XREAD after
//!   `<n>-0` both return exactly the entries holding events after `n`
//!   (XADD to append, XRANGE to replay, XREAD BLOCK to follow live from
//!   another replica);
//! - `tg:{id}:rec`: the record as JSON;
//! - `tg:{id}:lease`: the replica running it, with a TTL it renews;
//! - `tg:{id}:cancel`: a `DELETE` that arrived at another replica.
//!
//! Idempotency keys live under `tg:idem:{<owner>:<key>}`. Every key has a
//! TTL. Appends from all streams share one multiplexed connection, which
//! pipelines whatever is in flight: that is the group commit.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};

use super::{Corruption, Store, StoreError, decode_batch, encode_batch};
use crate::config::StoreConfig;
use crate::stream::{Event, IdempotencyEntry, Status, StreamRecord, now_ms};

/// How long one Redis command may take before the store reports itself
/// unavailable (a stream then ends with `store_failed`, never hangs).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// How long connecting at startup (with its retries) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    ttl_ms: u64,
    lease_ms: u64,
    url_for_errors: String,
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

/// Renew or release a lease only if we still hold it.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

impl RedisStore {
    pub async fn connect(url: &str, config: &StoreConfig) -> Result<RedisStore, StoreError> {
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
        let mut conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            client.get_connection_manager_with_config(manager_config),
        )
        .await
        .map_err(|_| StoreError::Timeout {
            url: shown.clone(),
            what: "connecting",
            after: CONNECT_TIMEOUT,
        })?
        .map_err(|source| StoreError::Redis {
            url: shown.clone(),
            what: "cannot connect",
            source,
        })?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|source| StoreError::Redis {
                url: shown.clone(),
                what: "does not answer PING",
                source,
            })?;
        Ok(RedisStore {
            client,
            conn,
            ttl_ms: config.ttl.as_millis() as u64,
            lease_ms: config.lease_ttl.as_millis() as u64,
            url_for_errors: shown,
        })
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

    /// The events after `after` in these entries, each of which must hold
    /// a batch (field `b`).
    fn parse_entries(
        ids: Vec<redis::streams::StreamId>,
        after: u64,
    ) -> Result<Vec<Event>, StoreError> {
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
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create(&self, record: &StreamRecord) -> Result<(), StoreError> {
        let value = serde_json::to_string(record).map_err(StoreError::Encode)?;
        let mut conn = self.conn.clone();
        self.run(conn.pset_ex::<_, _, ()>(record_key(&record.id), value, self.ttl_ms))
            .await
    }

    async fn append(&self, stream_id: &str, events: &[Event]) -> Result<(), StoreError> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        let key = events_key(stream_id);
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(&key)
            .arg(format!("{}-0", last.seq))
            .arg("b")
            .arg(encode_batch(events))
            .ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(self.ttl_ms).ignore();
        let mut conn = self.conn.clone();
        self.run(pipe.query_async::<()>(&mut conn)).await
    }

    async fn set_status(
        &self,
        stream_id: &str,
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        let Some(mut record) = self.get(stream_id).await? else {
            return Ok(());
        };
        record.status = status;
        record.reason = reason.map(str::to_owned);
        record.updated_ms = now_ms();
        record.instance = instance.to_owned();
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
        let mut conn = self.conn.clone();
        self.run(pipe.query_async::<()>(&mut conn)).await
    }

    async fn get(&self, stream_id: &str) -> Result<Option<StreamRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let value: Option<String> = self.run(conn.get(record_key(stream_id))).await?;
        value
            .map(|v| {
                serde_json::from_str(&v).map_err(|source| StoreError::Decode {
                    what: "stream record",
                    source,
                })
            })
            .transpose()
    }

    async fn events_after(&self, stream_id: &str, after: u64) -> Result<Vec<Event>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: StreamRangeReply = self
            .run(conn.xrange(
                events_key(stream_id),
                format!("{}-0", after.saturating_add(1)),
                "+",
            ))
            .await?;
        Self::parse_entries(reply.ids, after)
    }

    async fn events_page(
        &self,
        stream_id: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: StreamRangeReply = self
            .run(conn.xrange_count(
                events_key(stream_id),
                format!("{}-0", after.saturating_add(1)),
                "+",
                max.max(1),
            ))
            .await?;
        Self::parse_entries(reply.ids, after)
    }

    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        entry: &IdempotencyEntry,
    ) -> Result<Option<IdempotencyEntry>, StoreError> {
        let redis_key = format!("tg:idem:{{{owner}:{key}}}");
        let value = serde_json::to_string(entry).map_err(StoreError::Encode)?;
        let mut conn = self.conn.clone();
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

    async fn try_lease(&self, stream_id: &str, instance: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
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
        let mut conn = self.conn.clone();
        self.run(conn.exists(lease_key(stream_id))).await
    }

    async fn renew_leases(&self, stream_ids: &[String], instance: &str) -> Result<(), StoreError> {
        if stream_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in stream_ids {
            pipe.cmd("EVAL")
                .arg(RENEW)
                .arg(1)
                .arg(lease_key(id))
                .arg(instance)
                .arg(self.lease_ms)
                .ignore();
        }
        let mut conn = self.conn.clone();
        self.run(pipe.query_async::<()>(&mut conn)).await
    }

    async fn release_lease(&self, stream_id: &str, instance: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
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
        // XREAD BLOCK holds its connection: followers get one of their own
        // so the shared connection never waits behind them.
        let mut conn = self
            .run(self.client.get_multiplexed_async_connection())
            .await?;
        let options = StreamReadOptions::default()
            .block(wait.as_millis() as usize)
            .count(512);
        let deadline = wait + COMMAND_TIMEOUT;
        let reply: Option<StreamReadReply> = match tokio::time::timeout(
            deadline,
            conn.xread_options(&[events_key(stream_id)], &[format!("{after}-0")], &options),
        )
        .await
        {
            Ok(r) => r.map_err(|source| self.failed("XREAD failed", source))?,
            Err(_) => return Err(self.timed_out("XREAD", deadline)),
        };
        let ids = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        Self::parse_entries(ids, after)
    }

    async fn request_cancel(&self, stream_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.run(conn.pset_ex::<_, _, ()>(cancel_key(stream_id), 1, 60_000))
            .await
    }

    async fn cancel_requested(&self, stream_ids: &[String]) -> Result<Vec<String>, StoreError> {
        if stream_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in stream_ids {
            pipe.exists(cancel_key(id));
        }
        let mut conn = self.conn.clone();
        let flags: Vec<bool> = self.run(pipe.query_async(&mut conn)).await?;
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

    async fn probe(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
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
            let got = RedisStore::parse_entries(entries(), after).unwrap();
            let want: Vec<Event> = (after + 1..=5).map(event).collect();
            assert_eq!(got, want, "after {after}");
        }
        let short = vec![entry(
            "1-0",
            vec![("b", encode_batch(&[event(1), event(2)]))],
        )];
        assert!(matches!(
            RedisStore::parse_entries(short, 0),
            Err(StoreError::Corrupt(Corruption::BatchTooLong { last: 1 }))
        ));
        // An entry without a batch (such as the one-event entries of early
        // versions, fields `n` and `d`) is corrupt.
        let unbatched = vec![entry("1-0", vec![("n", vec![]), ("d", b"e1".to_vec())])];
        assert!(matches!(
            RedisStore::parse_entries(unbatched, 0),
            Err(StoreError::Corrupt(Corruption::NoBatch(id))) if id == "1-0"
        ));
        let bad_id = vec![entry("x-0", vec![("b", encode_batch(&[event(1)]))])];
        assert!(matches!(
            RedisStore::parse_entries(bad_id, 0),
            Err(StoreError::Corrupt(Corruption::BadEntryId(_)))
        ));
    }

    #[tokio::test]
    async fn connect_errors_never_show_the_password() {
        let config = StoreConfig {
            kind: crate::config::StoreKind::Memory,
            ttl: Duration::from_secs(60),
            commit_interval: Duration::ZERO,
            lease_ttl: Duration::from_secs(5),
        };
        // An invalid port fails before any connection is tried.
        let Err(e) = RedisStore::connect("redis://user:hunter2@host:notaport/0", &config).await
        else {
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

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://user:pw@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }
}
