//! The relay against the built-in mock provider on loopback, over a store
//! that counts its calls: what a resume reads, and that it finishes the
//! answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::HeaderMap;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::start::NewStream;
use super::{Access, Attached, Relay, Settings};
use crate::config::{DisconnectPolicy, UpstreamConfig};
use crate::drain::Drain;
use crate::protocol::Protocol;
use crate::store::memory::MemoryStore;
use crate::store::{Store, StoreError};
use crate::stream::{Event, IdempotencyEntry, Status, StreamRecord};
use crate::token::TokenSigner;
use crate::upstream::{Upstream, Upstreams};

/// A memory store that counts the reads a resume could repeat.
struct Counting {
    inner: MemoryStore,
    gets: AtomicU64,
    event_reads: AtomicU64,
}

impl Counting {
    fn reads(&self) -> (u64, u64) {
        (
            self.gets.swap(0, Ordering::SeqCst),
            self.event_reads.swap(0, Ordering::SeqCst),
        )
    }
}

#[async_trait]
impl Store for Counting {
    async fn create(&self, record: &StreamRecord) -> Result<(), StoreError> {
        self.inner.create(record).await
    }
    async fn append(&self, id: &str, events: &[Event]) -> Result<(), StoreError> {
        self.inner.append(id, events).await
    }
    async fn set_status(
        &self,
        id: &str,
        status: Status,
        reason: Option<&str>,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.inner.set_status(id, status, reason, instance).await
    }
    async fn set_upstream(
        &self,
        id: &str,
        upstream: &str,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.inner.set_upstream(id, upstream, instance).await
    }
    async fn set_reattach(
        &self,
        id: &str,
        reattach: Option<&crate::stream::Reattach>,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.inner.set_reattach(id, reattach, instance).await
    }
    async fn get(&self, id: &str) -> Result<Option<StreamRecord>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(id).await
    }
    async fn events_after(&self, id: &str, after: u64) -> Result<Vec<Event>, StoreError> {
        self.event_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.events_after(id, after).await
    }
    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        entry: &IdempotencyEntry,
    ) -> Result<Option<IdempotencyEntry>, StoreError> {
        self.inner.claim_idempotency(owner, key, entry).await
    }
    async fn release_idempotency(
        &self,
        owner: &str,
        key: &str,
        stream_id: &str,
    ) -> Result<(), StoreError> {
        self.inner.release_idempotency(owner, key, stream_id).await
    }
    async fn try_lease(&self, id: &str, instance: &str) -> Result<bool, StoreError> {
        self.inner.try_lease(id, instance).await
    }
    async fn lease_alive(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.lease_alive(id).await
    }
    async fn renew_leases(&self, ids: &[String], instance: &str) -> Result<(), StoreError> {
        self.inner.renew_leases(ids, instance).await
    }
    async fn release_lease(&self, id: &str, instance: &str) -> Result<(), StoreError> {
        self.inner.release_lease(id, instance).await
    }
    async fn sweep(&self) -> Result<usize, StoreError> {
        self.inner.sweep().await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
    async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.get_meta(key).await
    }
    async fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.inner.put_meta(key, value).await
    }
    fn shared(&self) -> bool {
        false
    }
    fn name(&self) -> &'static str {
        "counting"
    }
}

/// A relay whose one upstream is the mock, served on loopback until the
/// drain's listener token is cancelled.
async fn relay(store: Arc<Counting>) -> Arc<Relay> {
    let drain = Arc::new(Drain::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = drain.close_listener.clone();
    drain.tracker.spawn(crate::mock::serve(
        listener,
        crate::mock::router(None),
        stop.cancelled_owned(),
    ));
    let upstream = Upstream::new(UpstreamConfig::builtin_mock(format!("http://{address}/v1")));
    let settings = Settings {
        heartbeat: Duration::from_secs(15),
        on_client_disconnect: DisconnectPolicy::Cancel,
        retry_hint: Duration::from_secs(2),
        limits: crate::config::LimitsConfig::default(),
        keyed: false,
        routing: crate::config::RoutingConfig::default(),
    };
    Arc::new(Relay::new(
        store,
        Upstreams::new(vec![Arc::new(upstream.unwrap())]),
        TokenSigner::new(b"test".to_vec()),
        drain,
        settings,
        "test".into(),
    ))
}

/// What a client's body said: the event ids, the text, and how it ended.
#[derive(Debug, Default, PartialEq)]
struct Read {
    ids: Vec<u64>,
    text: String,
    end: String,
}

async fn read(attached: Attached) -> Read {
    let body = attached.into_body();
    let chunks: Vec<_> = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the body ends");
    let raw: String = chunks
        .into_iter()
        .map(|c| String::from_utf8(c.unwrap().to_vec()).unwrap())
        .collect();
    let mut out = Read::default();
    for frame in raw.split("\n\n").filter(|f| !f.trim().is_empty()) {
        let mut data = String::new();
        for line in frame.lines() {
            if let Some(id) = line.strip_prefix("id: ") {
                out.ids.push(id.parse().unwrap());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        if data == "[DONE]" {
            out.end = "done".into();
        } else if let Ok(v) = serde_json::from_str::<Value>(&data) {
            if let Some(kind) = v.pointer("/error/type").and_then(Value::as_str) {
                out.end = kind.into();
            }
            if let Some(t) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                out.text.push_str(t);
            }
        }
    }
    out
}

/// A streaming request to the mock, with its knobs.
fn request(mock: Value) -> String {
    json!({
        "model": "m",
        "messages": [{"role": "user", "content": "one two three four five six seven"}],
        "stream": true,
        "mock": mock,
    })
    .to_string()
}

/// Start a stream and read its body to the end.
async fn start(relay: &Arc<Relay>, body: String) -> (String, Read) {
    let headers = HeaderMap::new();
    let upstream = relay.upstreams.named("builtin-mock").unwrap().clone();
    let attached = relay
        .start(NewStream {
            continuable: true,
            tools: false,
            protocol: Protocol::OpenAi,
            upstream,
            body: body.into(),
            client_headers: &headers,
            owner: "anonymous".into(),
            idempotency_key: None,
            model: "mock-model".into(),
            route_key: None,
            background: false,
            upstream_body: None,
        })
        .await
        .unwrap();
    let id = attached.who().id.clone();
    (id, read(attached).await)
}

#[tokio::test]
async fn a_resume_reads_the_record_once_and_the_events_once() {
    let store = Arc::new(Counting {
        inner: MemoryStore::new(Duration::from_secs(900)),
        gets: AtomicU64::new(0),
        event_reads: AtomicU64::new(0),
    });
    let relay = relay(store.clone()).await;
    let (_, whole) = start(&relay, request(json!({"words": 8}))).await;
    assert_eq!(whole.end, "done");
    assert_eq!(whole.text.split(' ').count(), 8, "{whole:?}");

    // The same answer, cut by the provider after three words.
    let (id, cut) = start(&relay, request(json!({"words": 8, "fail_after": 3}))).await;
    assert_eq!(cut.end, "upstream_failed", "{cut:?}");
    assert!(whole.text.starts_with(&cut.text) && cut.text.len() < whole.text.len());
    let token = relay.signer.sign(&id, "anonymous");
    store.reads();

    // Interrupted: the resume continues it, from the start of the answer.
    let resumed = relay
        .resume(&id, Access::Token(&token), 0, true, &HeaderMap::new())
        .await;
    let resumed = read(resumed.unwrap()).await;
    assert_eq!(resumed.end, "done");
    assert_eq!(resumed.text, whole.text);
    let n = resumed.ids.len() as u64;
    assert_eq!(resumed.ids, (1..=n).collect::<Vec<_>>());
    assert_eq!(store.reads(), (1, 1), "record reads, event reads");

    // Completed: the resume replays what the client lacks after its cursor.
    let replayed = relay
        .resume(&id, Access::Token(&token), 2, true, &HeaderMap::new())
        .await;
    let replayed = read(replayed.unwrap()).await;
    assert_eq!(replayed.end, "done");
    assert_eq!(replayed.ids, (3..=n).collect::<Vec<_>>());
    assert_eq!(store.reads(), (1, 1), "record reads, event reads");

    // A wrong token is the same answer as no stream, after one record read.
    let wrong = relay
        .resume(&id, Access::Token("nope"), 0, true, &HeaderMap::new())
        .await;
    assert!(matches!(wrong, Err(super::RelayError::NotFound)));
    let unknown = relay
        .resume("tg_none", Access::Token(&token), 0, true, &HeaderMap::new())
        .await;
    assert!(matches!(unknown, Err(super::RelayError::NotFound)));
    assert_eq!(store.reads(), (2, 0));

    relay.drain.close_listener.cancel();
}
