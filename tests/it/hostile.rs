//! Hostile and broken providers: what one can make the gateway hold or
//! wait for is bounded, and each case ends with a clear error — a status
//! before the first event, `upstream_failed` in-band after it. The provider
//! is the strict mock, told by `mock.hostile` (or `mock.status`) to send
//! what no real one would; it counts the body bytes it wrote, and stops
//! (counted as cancelled) when the gateway hangs up.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::common::*;

/// A gateway in front of `mock`, with `limits` lines.
async fn gateway(dir: &std::path::Path, mock: &Mock, limits: &str) -> Gateway {
    let config = format!(
        r#"listen = "127.0.0.1:0"
[limits]
{limits}
[store]
kind = "memory"
[[upstreams]]
name = "hostile"
base_url = "{}"
first_byte_timeout = "2s"
idle_timeout = "1s"
"#,
        mock.base_url()
    );
    Gateway::start(dir, &config).await
}

fn request(stream: bool, mock: Value) -> Value {
    json!({
        "model": "m",
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
        "mock": mock,
    })
}

/// Stream a request; the events and how long the stream took.
async fn stream(gw: &Gateway, mock: Value) -> (u16, Vec<SseEvent>, Duration) {
    let started = Instant::now();
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request(true, mock)).await;
    let events = sse.rest().await;
    (sse.status, events, started.elapsed())
}

fn ended_with(events: &[SseEvent], kind: &str) {
    let last = events.last().expect("some event");
    let error = last
        .error()
        .unwrap_or_else(|| panic!("the last event is no error: {last:?}"));
    assert_eq!(error["type"], kind, "{error}");
}

/// Once the gateway has hung up on every endless answer (the mock then
/// stops writing it), the body bytes the mock wrote in all.
async fn written_when_dropped(mock: &Mock) -> u64 {
    let started = mock.stat("requests_started").await;
    assert!(started > 0, "the mock was asked nothing");
    let cancelled = mock
        .wait_for("requests_cancelled", started, Duration::from_secs(10))
        .await;
    assert_eq!(
        cancelled, started,
        "the gateway still holds a connection to the endless provider"
    );
    mock.stat("bytes_sent").await
}

#[tokio::test]
async fn a_line_that_never_ends_is_cut_at_the_event_limit() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = gateway(&dir, &mock, "max_event_bytes = 1048576").await;
    let before = gw.rss_mib();
    let (status, events, took) = stream(&gw, json!({"hostile": "endless_line"})).await;
    assert_eq!(status, 200);
    ended_with(&events, "upstream_failed");
    let after = gw.rss_mib();
    let written = written_when_dropped(&mock).await;
    let mock_rss = mock.proc.rss_mib();
    eprintln!(
        "endless line: provider wrote {} MiB; gateway RSS {before} -> {after} MiB; ended after {took:?}; the mock's RSS {mock_rss} MiB",
        written >> 20
    );
    assert!(written < 64 << 20, "the gateway read {written} bytes");
    assert!(after < before + 32, "RSS grew from {before} to {after} MiB");
    // The mock writes one fixed block again and again.
    assert!(mock_rss < 32, "the mock holds {mock_rss} MiB");
}

#[tokio::test]
async fn an_answer_past_its_size_limit_ends_with_upstream_failed() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = gateway(&dir, &mock, "max_answer_bytes = 4194304").await;
    let (status, events, _) = stream(&gw, json!({"hostile": "endless_stream"})).await;
    assert_eq!(status, 200);
    ended_with(&events, "upstream_failed");
    assert!(events.len() > 100, "{} events", events.len());
    let written = written_when_dropped(&mock).await;
    let mock_rss = mock.proc.rss_mib();
    eprintln!(
        "endless stream: provider wrote {} MiB; {} events relayed; the mock's RSS {mock_rss} MiB",
        written >> 20,
        events.len()
    );
    assert!(mock_rss < 32, "the mock holds {mock_rss} MiB");
    assert!(written < 64 << 20, "the gateway read {written} bytes");
}

#[tokio::test]
async fn comments_and_drips_do_not_keep_a_stream_alive() {
    for hostile in ["comments_only", "drip"] {
        let dir = tempdir();
        let mock = Mock::start(&dir).await;
        let gw = gateway(&dir, &mock, "").await;
        let (status, events, took) = stream(&gw, json!({"hostile": hostile})).await;
        assert_eq!(status, 200, "{hostile}");
        ended_with(&events, "upstream_failed");
        // idle_timeout is 1 s; the provider would go on for ever.
        assert!(
            took < Duration::from_secs(4),
            "{hostile}: held for {took:?}"
        );
        written_when_dropped(&mock).await;
    }
}

async fn first_error(gw: &Gateway, stream: bool, mock: Value) -> (u16, Value) {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&request(stream, mock))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn html_redirects_and_odd_statuses_are_clear_502s() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = gateway(&dir, &mock, "").await;
    let (status, v) = first_error(&gw, true, json!({"hostile": "html"})).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "upstream_failed", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text/html"),
        "{v}"
    );

    for (knob, words) in [
        (json!({"hostile": "redirect"}), "redirect"),
        (json!({"status": 999}), "999"),
    ] {
        for stream in [true, false] {
            let (status, v) = first_error(&gw, stream, knob.clone()).await;
            assert_eq!(status, 502, "{knob} stream {stream}: {v}");
            assert_eq!(v["error"]["code"], "upstream_bad_status", "{v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains(words),
                "{v}"
            );
        }
    }
}

#[tokio::test]
async fn an_endless_error_body_is_not_read_past_its_limit() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = gateway(&dir, &mock, "").await;
    for stream in [true, false] {
        let started = Instant::now();
        let (status, _) = first_error(&gw, stream, json!({"hostile": "endless_error_body"})).await;
        assert_eq!(status, 500);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }
    // Two reads of at most 64 KiB each, plus what sockets buffer.
    let written = written_when_dropped(&mock).await;
    eprintln!("endless error body: provider wrote {} KiB", written >> 10);
    assert!(written < 32 << 20, "the gateway read {written} bytes");
}

#[tokio::test]
async fn a_non_streaming_answer_past_its_limit_is_a_502() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = gateway(&dir, &mock, "max_answer_bytes = 4194304").await;
    let before = gw.rss_mib();
    let (status, v) = first_error(&gw, false, json!({"hostile": "endless_json"})).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "upstream_failed", "{v}");
    let after = gw.rss_mib();
    let written = written_when_dropped(&mock).await;
    eprintln!(
        "endless JSON: provider wrote {} MiB; RSS {before} -> {after} MiB",
        written >> 20
    );
    assert!(written < 64 << 20, "the gateway read {written} bytes");
}

#[tokio::test]
async fn a_client_that_does_not_read_is_not_buffered_in_memory() {
    let dir = tempdir();
    // ~120 MiB of chunks (the mock's are ~230 bytes each).
    const EVENTS: u64 = 550_000;
    let mock = Mock::start(&dir).await;
    let config = format!(
        r#"listen = "127.0.0.1:0"
[limits]
max_answer_bytes = 1073741824
write_timeout = "120s"
[store]
{}
[[upstreams]]
name = "fast"
base_url = "{}"
idle_timeout = "10s"
"#,
        embedded(&dir),
        mock.base_url()
    );
    let gw = Gateway::start(&dir, &config).await;
    let before = gw.rss_mib();
    // The role chunk, the first word and EVENTS copies of it, two more
    // words, the finish chunk, [DONE]: as fast as the gateway takes them.
    let flood = json!({"hostile": "endless_stream", "hostile_events": EVENTS, "words": 3});
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&request(true, flood))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // Read nothing until the provider has sent the whole answer.
    let completed = mock
        .wait_for("requests_completed", 1, Duration::from_secs(60))
        .await;
    assert_eq!(
        completed,
        1,
        "the provider was held back: {} events sent",
        mock.stat("events_sent").await
    );
    let sent = mock.stat("events_sent").await;
    assert_eq!(sent, EVENTS + 6);
    let held = gw.rss_mib();
    let mock_rss = mock.proc.rss_mib();
    eprintln!(
        "slow reader: provider sent {} MiB while the client read nothing; gateway RSS {before} -> {held} MiB; the mock's RSS {mock_rss} MiB",
        mock.stat("bytes_sent").await >> 20
    );
    assert!(mock_rss < 32, "the mock holds {mock_rss} MiB");
    // Now read it all: every event once, in order, then [DONE].
    let mut sse = Sse::from(response).await;
    let events = sse.rest().await;
    assert!(
        events.last().is_some_and(SseEvent::is_done),
        "{:?}",
        events.last()
    );
    assert_contiguous(&ids_of(&events));
    assert_eq!(ids_of(&events).len() as u64, sent - 1, "all but [DONE]");
    // Before the live window: 8 -> 353 MiB for this answer (with the
    // fjall store, ~130 MiB of it was its memtables and journal).
    assert!(held < before + 200, "RSS grew from {before} to {held} MiB");
}
