//! `store.max_bytes`: a memory or embedded store holds at most that much
//! stream data. A new stream makes room by evicting finished streams,
//! oldest first; when running streams alone fill the store, it is refused
//! with 503 `store_full` before its provider is asked. Each scenario runs
//! against both local stores.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// Small enough that a few dozen short answers, or one long one, fill it.
const MAX_BYTES: u64 = 32 * 1024;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Memory,
    Embedded,
}

impl Kind {
    fn store_lines(self, dir: &Path) -> String {
        let kind = match self {
            Kind::Memory => "kind = \"memory\"".to_owned(),
            Kind::Embedded => embedded(dir),
        };
        format!("{kind}\nmax_bytes = {MAX_BYTES}")
    }
}

/// A gateway on `kind` with a small `store.max_bytes`, an Anthropic route
/// for `claude-*` and an OpenAI one for the rest, both to `mock`. The idle
/// timeout is long: a stalled answer stays running until it is cancelled.
async fn gateway(kind: Kind, dir: &Path, mock: &Mock) -> Gateway {
    let text = format!(
        r#"listen = "127.0.0.1:0"
[store]
{}

[[upstreams]]
name = "claude"
protocol = "anthropic"
base_url = "{base}"
models = ["claude-*"]
continuation = "assistant_prefix"
idle_timeout = "60s"

[[upstreams]]
name = "mock"
protocol = "openai"
base_url = "{base}"
models = ["*"]
continuation = "continue_final_message"
first_byte_timeout = "5s"
idle_timeout = "60s"
"#,
        kind.store_lines(dir),
        base = mock.base_url(),
    );
    Gateway::start(dir, &text).await
}

/// A finished stream as its first client saw it.
struct Seen {
    id: String,
    token: String,
    events: Vec<SseEvent>,
}

/// Run `request` to its end; it must be admitted and end with `[DONE]`.
async fn run_to_end(gw: &Gateway, request: &Value) -> Seen {
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), request).await;
    assert_eq!(sse.status, 200, "a new stream was refused");
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let events = sse.rest().await;
    assert!(
        events.last().is_some_and(SseEvent::is_done),
        "{id} did not finish: {events:?}"
    );
    Seen { id, token, events }
}

/// What `GET /v1/streams/{id}/state` answers, and its body.
async fn state(gw: &Gateway, id: &str, token: &str) -> (u16, Value) {
    let r = client()
        .get(gw.url(&format!("/v1/streams/{id}/state")))
        .header("x-tidegate-resume-token", token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The events as compared between a first run and its replay.
fn wire(events: &[SseEvent]) -> Vec<(Option<u64>, Option<String>, String)> {
    events
        .iter()
        .map(|e| (e.id, e.event.clone(), e.data.clone()))
        .collect()
}

fn data_bytes(events: &[SseEvent]) -> u64 {
    events.iter().map(|e| e.data.len() as u64).sum()
}

/// Many finished streams: each new one is still admitted, the oldest are
/// evicted (gone for resume and `/state`), and the newest replays exactly.
async fn finished_streams_make_room_oldest_first(kind: Kind) {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = gateway(kind, &dir, &mock).await;
    let mut seen = Vec::new();
    for i in 0..40 {
        seen.push(run_to_end(&gw, &chat(8, 0, &format!("capacity {i}"))).await);
    }
    let written: u64 = seen.iter().map(|s| data_bytes(&s.events)).sum();
    assert!(
        written > 2 * MAX_BYTES,
        "the streams hold {written} bytes: too few to overflow {MAX_BYTES}"
    );
    assert_eq!(mock.stat("requests_started").await, 40);

    let oldest = &seen[0];
    let (status, body) = state(&gw, &oldest.id, &oldest.token).await;
    assert_eq!(
        status, 404,
        "{kind:?}: the oldest finished stream is still held: {body}"
    );
    let resume = client()
        .get(gw.url(&format!("/v1/streams/{}", oldest.id)))
        .header("x-tidegate-resume-token", &oldest.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resume.status().as_u16(), 404);
    let v: Value = resume.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");

    let newest = seen.last().unwrap();
    let (status, body) = state(&gw, &newest.id, &newest.token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed");
    let mut replay = Sse::get(
        &gw.url(&format!("/v1/streams/{}", newest.id)),
        &[("x-tidegate-resume-token", &newest.token)],
    )
    .await;
    assert_eq!(replay.status, 200);
    assert_eq!(wire(&replay.rest().await), wire(&newest.events));
    // A replay starts no generation.
    assert_eq!(mock.stat("requests_started").await, 40);
}

/// A running stream that alone fills the store: a new stream is refused
/// with 503 `store_full` in each protocol's shape, and its provider is
/// never asked; an idempotent retry of the running one still joins it;
/// once the running stream is over, a new stream is admitted again.
async fn running_streams_alone_fill_the_store(kind: Kind) {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = gateway(kind, &dir, &mock).await;
    let small = run_to_end(&gw, &chat(8, 0, "capacity small")).await;

    // A long answer that stalls after 400 words, with an Idempotency-Key.
    let mut long = chat(2000, 0, "capacity held");
    long["mock"] = json!({"stall_after": 400});
    let post_long = || {
        client()
            .post(gw.url("/v1/chat/completions"))
            .header("idempotency-key", "capacity-held")
            .json(&long)
            .send()
    };
    let mut held = Sse::from(post_long().await.unwrap()).await;
    assert_eq!(held.status, 200);
    let (held_id, held_token) = (
        held.header("x-tidegate-stream-id"),
        held.header("x-tidegate-resume-token"),
    );
    // What its client was sent is in the store (write-ahead).
    let first = held.take(400).await;
    assert_eq!(first.len(), 400, "the long answer ended early: {first:?}");
    assert!(!first.iter().any(SseEvent::is_done));
    assert!(
        data_bytes(&first) >= MAX_BYTES,
        "the running stream holds {} bytes: too few to fill {MAX_BYTES}",
        data_bytes(&first)
    );
    let asked = mock.stat("requests_started").await;
    assert_eq!(asked, 2);

    // OpenAI: 503 store_full, in OpenAI's error shape.
    let refused = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(8, 0, "capacity refused"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503, "{kind:?}: admitted");
    assert_eq!(refused.headers()["retry-after"], "1");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "store_full", "{v}");
    assert_eq!(v["error"]["type"], "server_overloaded", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("full"),
        "{v}"
    );

    // Anthropic: the same refusal, in Anthropic's error shape.
    let refused = client()
        .post(gw.url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": "claude-test",
            "max_tokens": 8,
            "stream": true,
            "messages": [{"role": "user", "content": "capacity refused, anthropic style"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "server_overloaded", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("full"),
        "{v}"
    );

    // A refused request with an Idempotency-Key: the key is not left
    // pointing at a stream that never started (its retry, below, starts it).
    let keyed = |text: &'static str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .header("idempotency-key", "capacity-retry")
            .json(&chat(8, 0, text))
            .send()
    };
    assert_eq!(
        keyed("capacity keyed").await.unwrap().status().as_u16(),
        503
    );

    // Neither refusal reached the provider.
    assert_eq!(mock.stat("requests_started").await, asked);
    // The finished stream went to make room before the refusal.
    assert_eq!(state(&gw, &small.id, &small.token).await.0, 404);

    // An idempotent retry of the running stream joins it: it adds nothing.
    let mut joined = Sse::from(post_long().await.unwrap()).await;
    assert_eq!(joined.status, 200);
    assert_eq!(joined.header("x-tidegate-stream-id"), held_id);
    assert_eq!(wire(&joined.take(10).await), wire(&first[..10]));
    drop(joined);
    assert_eq!(mock.stat("requests_started").await, asked);

    // Once it is over (cancelled), a new stream is admitted again.
    let cancel = client()
        .delete(gw.url(&format!("/v1/streams/{held_id}")))
        .header("x-tidegate-resume-token", &held_token)
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success(), "{}", cancel.status());
    let over = eventually(Duration::from_secs(5), || async {
        state(&gw, &held_id, &held_token).await.1["status"] == "cancelled"
    })
    .await;
    assert!(over, "the cancelled stream is still recorded as running");
    let rest = held.rest().await;
    assert_eq!(
        rest.last()
            .and_then(SseEvent::error)
            .map(|e| e["type"].clone()),
        Some(json!("cancelled")),
        "{rest:?}"
    );
    let after = run_to_end(&gw, &chat(8, 0, "capacity after")).await;
    assert_eq!(mock.stat("requests_started").await, asked + 1);
    // The cancelled stream was evicted to admit it; the new one is held.
    assert_eq!(state(&gw, &held_id, &held_token).await.0, 404);
    assert_eq!(state(&gw, &after.id, &after.token).await.0, 200);
    // The refused keyed request, retried with its key: a new stream.
    let mut retried = Sse::from(keyed("capacity keyed").await.unwrap()).await;
    assert_eq!(retried.status, 200, "the retry of a refused key");
    assert!(retried.rest().await.last().is_some_and(SseEvent::is_done));
    assert_eq!(mock.stat("requests_started").await, asked + 2);
}

#[tokio::test]
async fn memory_finished_streams_make_room_oldest_first() {
    finished_streams_make_room_oldest_first(Kind::Memory).await;
}

#[tokio::test]
async fn embedded_finished_streams_make_room_oldest_first() {
    finished_streams_make_room_oldest_first(Kind::Embedded).await;
}

#[tokio::test]
async fn memory_running_streams_alone_fill_the_store() {
    running_streams_alone_fill_the_store(Kind::Memory).await;
}

#[tokio::test]
async fn embedded_running_streams_alone_fill_the_store() {
    running_streams_alone_fill_the_store(Kind::Embedded).await;
}
