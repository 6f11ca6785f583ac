//! Hostile and broken providers: what one can make the gateway hold or
//! wait for is bounded, and each case ends with a clear error — a status
//! before the first event, `upstream_failed` in-band after it. The provider
//! here is a raw socket in the test, so it can send what no real one would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::common::*;

#[derive(Clone, Copy)]
enum Behaviour {
    /// A 200 event stream whose first line never ends (64 KiB writes).
    EndlessLine,
    /// A 200 event stream of events, as fast as it can, forever.
    EndlessEvents,
    /// A 200 event stream that only sends `: keepalive` comments.
    OnlyComments,
    /// A 200 event stream that sends one event, then a byte a second of a
    /// line that never ends.
    Drip,
    /// 200 `text/html`.
    Html,
    /// 302 with a `Location`.
    Redirect,
    /// Status 999.
    Status999,
    /// 500 with an endless body.
    EndlessErrorBody,
    /// 200 `application/json` with an endless body (non-streaming).
    EndlessJson,
    /// A 200 event stream of this many events as fast as it can, then
    /// `[DONE]`.
    Finite(usize),
}

/// A provider on loopback; counts the body bytes it managed to write.
struct Provider {
    addr: String,
    written: Arc<AtomicU64>,
}

impl Provider {
    async fn start(behaviour: Behaviour) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let written = Arc::new(AtomicU64::new(0));
        let count = written.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move { serve(s, behaviour, count).await });
            }
        });
        Provider { addr, written }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }
}

async fn read_request(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";

const CHUNK: &str = r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"word "}}]}"#;

/// Write `block` again and again (pausing `pause` between) until the
/// gateway closes the connection.
async fn write_forever(s: &mut TcpStream, block: &[u8], pause: Duration, written: &AtomicU64) {
    loop {
        if s.write_all(block).await.is_err() {
            return;
        }
        written.fetch_add(block.len() as u64, Ordering::SeqCst);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

async fn serve(mut s: TcpStream, behaviour: Behaviour, written: Arc<AtomicU64>) {
    read_request(&mut s).await;
    let write_forever = async |s: &mut TcpStream, block: &[u8], pause: Duration| {
        write_forever(s, block, pause, &written).await
    };
    match behaviour {
        Behaviour::EndlessLine => {
            let _ = s.write_all(SSE_HEAD).await;
            let _ = s.write_all(b"data: ").await;
            write_forever(&mut s, &[b'x'; 64 * 1024], Duration::ZERO).await;
        }
        Behaviour::EndlessEvents => {
            let _ = s.write_all(SSE_HEAD).await;
            let block: Vec<u8> = std::iter::repeat_n(format!("{CHUNK}\n\n"), 200)
                .collect::<String>()
                .into_bytes();
            write_forever(&mut s, &block, Duration::ZERO).await;
        }
        Behaviour::OnlyComments => {
            let _ = s.write_all(SSE_HEAD).await;
            let _ = s.write_all(format!("{CHUNK}\n\n").as_bytes()).await;
            write_forever(&mut s, b": keepalive\n\n", Duration::from_millis(100)).await;
        }
        Behaviour::Drip => {
            let _ = s.write_all(SSE_HEAD).await;
            let _ = s.write_all(format!("{CHUNK}\n\ndata: ").as_bytes()).await;
            write_forever(&mut s, b"x", Duration::from_millis(100)).await;
        }
        Behaviour::Html => {
            let body = "<html><body>Welcome to nginx!</body></html>";
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
        }
        Behaviour::Redirect => {
            let _ = s
                .write_all(b"HTTP/1.1 302 Found\r\nlocation: https://login.example/\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
        Behaviour::Status999 => {
            let _ = s
                .write_all(b"HTTP/1.1 999 Odd\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                .await;
        }
        Behaviour::EndlessErrorBody => {
            let _ = s
                .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n")
                .await;
            write_forever(&mut s, &[b'e'; 64 * 1024], Duration::ZERO).await;
        }
        Behaviour::Finite(n) => {
            let _ = s.write_all(SSE_HEAD).await;
            let block: Vec<u8> = std::iter::repeat_n(format!("{CHUNK}\n\n"), 500)
                .collect::<String>()
                .into_bytes();
            for _ in 0..n / 500 {
                if s.write_all(&block).await.is_err() {
                    return;
                }
                written.fetch_add(block.len() as u64, Ordering::SeqCst);
            }
            let _ = s.write_all(b"data: [DONE]\n\n").await;
            written.fetch_add(1, Ordering::SeqCst);
        }
        Behaviour::EndlessJson => {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"a\":\"")
                .await;
            write_forever(&mut s, &[b'j'; 64 * 1024], Duration::ZERO).await;
        }
    }
}

/// A gateway in front of `provider`, with `limits` lines.
async fn gateway(dir: &std::path::Path, provider: &Provider, limits: &str) -> Gateway {
    let config = format!(
        r#"listen = "127.0.0.1:0"
[limits]
{limits}
[store]
kind = "memory"
[[upstreams]]
name = "hostile"
base_url = "http://{}/v1"
first_byte_timeout = "2s"
idle_timeout = "1s"
"#,
        provider.addr
    );
    Gateway::start(dir, &config).await
}

/// The gateway's resident memory, in MiB.
fn rss_mib(gw: &Gateway) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.proc.pid())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

fn stream_request() -> Value {
    json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
}

/// Stream a request; the events and how long the stream took.
async fn stream(gw: &Gateway) -> (u16, Vec<SseEvent>, Duration) {
    let started = Instant::now();
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &stream_request()).await;
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

#[tokio::test]
async fn a_line_that_never_ends_is_cut_at_the_event_limit() {
    let dir = tempdir();
    let provider = Provider::start(Behaviour::EndlessLine).await;
    let gw = gateway(&dir, &provider, "max_event_bytes = 1048576").await;
    let before = rss_mib(&gw);
    let (status, events, took) = stream(&gw).await;
    assert_eq!(status, 200);
    ended_with(&events, "upstream_failed");
    let after = rss_mib(&gw);
    eprintln!(
        "endless line: provider wrote {} MiB; gateway RSS {before} -> {after} MiB; ended after {took:?}",
        provider.written() >> 20
    );
    assert!(
        provider.written() < 64 << 20,
        "the gateway read {} bytes",
        provider.written()
    );
    assert!(after < before + 32, "RSS grew from {before} to {after} MiB");
}

#[tokio::test]
async fn an_answer_past_its_size_limit_ends_with_upstream_failed() {
    let dir = tempdir();
    let provider = Provider::start(Behaviour::EndlessEvents).await;
    let gw = gateway(&dir, &provider, "max_answer_bytes = 4194304").await;
    let (status, events, _) = stream(&gw).await;
    assert_eq!(status, 200);
    ended_with(&events, "upstream_failed");
    assert!(events.len() > 100, "{} events", events.len());
    assert!(
        provider.written() < 64 << 20,
        "the gateway read {} bytes",
        provider.written()
    );
}

#[tokio::test]
async fn comments_and_drips_do_not_keep_a_stream_alive() {
    for behaviour in [Behaviour::OnlyComments, Behaviour::Drip] {
        let dir = tempdir();
        let provider = Provider::start(behaviour).await;
        let gw = gateway(&dir, &provider, "").await;
        let (status, events, took) = stream(&gw).await;
        assert_eq!(status, 200);
        ended_with(&events, "upstream_failed");
        // idle_timeout is 1 s; the provider would go on for ever.
        assert!(took < Duration::from_secs(4), "held for {took:?}");
    }
}

async fn first_error(gw: &Gateway, stream: bool) -> (u16, Value) {
    let mut request = stream_request();
    request["stream"] = json!(stream);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&request)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn html_redirects_and_odd_statuses_are_clear_502s() {
    let dir = tempdir();
    let html = Provider::start(Behaviour::Html).await;
    let gw = gateway(&dir, &html, "").await;
    let (status, v) = first_error(&gw, true).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "upstream_failed", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text/html"),
        "{v}"
    );

    for (behaviour, words) in [
        (Behaviour::Redirect, "redirect"),
        (Behaviour::Status999, "999"),
    ] {
        let provider = Provider::start(behaviour).await;
        let gw = gateway(&dir, &provider, "").await;
        for stream in [true, false] {
            let (status, v) = first_error(&gw, stream).await;
            assert_eq!(status, 502, "stream {stream}: {v}");
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
    let provider = Provider::start(Behaviour::EndlessErrorBody).await;
    let gw = gateway(&dir, &provider, "").await;
    for stream in [true, false] {
        let started = Instant::now();
        let (status, _) = first_error(&gw, stream).await;
        assert_eq!(status, 500);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }
    // Two reads of at most 64 KiB each, plus what sockets buffer.
    assert!(
        provider.written() < 32 << 20,
        "the gateway read {} bytes",
        provider.written()
    );
}

#[tokio::test]
async fn a_non_streaming_answer_past_its_limit_is_a_502() {
    let dir = tempdir();
    let provider = Provider::start(Behaviour::EndlessJson).await;
    let gw = gateway(&dir, &provider, "max_answer_bytes = 4194304").await;
    let before = rss_mib(&gw);
    let (status, v) = first_error(&gw, false).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "upstream_failed", "{v}");
    let after = rss_mib(&gw);
    eprintln!(
        "endless JSON: provider wrote {} MiB; RSS {before} -> {after} MiB",
        provider.written() >> 20
    );
    assert!(
        provider.written() < 64 << 20,
        "the gateway read {} bytes",
        provider.written()
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_is_not_buffered_in_memory() {
    let dir = tempdir();
    const EVENTS: usize = 1_200_000;
    let provider = Provider::start(Behaviour::Finite(EVENTS)).await;
    let config = format!(
        r#"listen = "127.0.0.1:0"
[limits]
max_answer_bytes = 1073741824
write_timeout = "120s"
[store]
{}
[[upstreams]]
name = "fast"
base_url = "http://{}/v1"
idle_timeout = "10s"
"#,
        embedded(&dir),
        provider.addr
    );
    let gw = Gateway::start(&dir, &config).await;
    let before = rss_mib(&gw);
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&stream_request())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // Read nothing until the provider has sent the whole answer.
    let block = (CHUNK.len() as u64 + 2) * 500;
    let total = block * (EVENTS as u64 / 500) + 1;
    let until = Instant::now() + Duration::from_secs(60);
    while provider.written() < total {
        assert!(
            Instant::now() < until,
            "the provider was held back: {} of {total} bytes",
            provider.written()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = rss_mib(&gw);
    eprintln!(
        "slow reader: provider sent {} MiB while the client read nothing; gateway RSS {before} -> {held} MiB",
        total >> 20
    );
    // Now read it all: every event once, in order, then [DONE].
    let mut sse = Sse::from(response).await;
    let events = sse.rest().await;
    assert!(
        events.last().is_some_and(SseEvent::is_done),
        "{:?}",
        events.last()
    );
    assert_contiguous(&ids_of(&events));
    assert_eq!(ids_of(&events).len(), EVENTS);
    // Before the live window: 8 -> 353 MiB for this answer. What is left
    // (~130 MiB) is the embedded store's write buffers (fjall memtables
    // and journal), not the client's stream.
    assert!(held < before + 200, "RSS grew from {before} to {held} MiB");
}
