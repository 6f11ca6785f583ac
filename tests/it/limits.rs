//! Limits on what a client can make the gateway hold: silent and slow
//! sockets (slowloris), bodies that stop half-way, more connections than
//! the gateway may keep, and more concurrent streams than a process or a
//! key may run. Each answer is a clear status in the protocol's shape.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::common::*;

/// Whether the gateway closes `stream` within `limit` (reads drain
/// whatever it answered first).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn connect(gw: &Gateway) -> TcpStream {
    TcpStream::connect(&gw.proc.addr).await.unwrap()
}

/// The status of a GET with a fresh connection, or 0 if it failed.
async fn status_of(url: &str) -> u16 {
    match client().get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Poll `url` until it answers `want`, at most `limit`.
async fn wait_status(url: &str, want: u16, limit: Duration) -> u16 {
    let until = Instant::now() + limit;
    loop {
        let got = status_of(url).await;
        if got == want || Instant::now() >= until {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn silent_and_slow_header_sockets_are_closed() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let extra = "[limits]\nheader_read_timeout = \"1s\"";
    let gw = Gateway::start(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", extra),
    )
    .await;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(connect(&gw).await);
    }
    // Half an HTTP/2 preface, then nothing.
    let mut half_preface = connect(&gw).await;
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // A head at one byte every 100 ms (slowloris).
    let mut slow = connect(&gw).await;
    slow.write_all(b"GET /healthz/live HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = slow.into_split();
    let drip = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    for s in &mut silent {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "a silent socket is still open after {:?}",
            started.elapsed()
        );
    }
    assert!(closed_within(&mut half_preface, Duration::from_secs(5)).await);
    let mut buf = [0u8; 1024];
    let slow_closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(slow_closed.is_ok(), "the slow head is still being read");
    assert!(started.elapsed() < Duration::from_secs(6));
    drip.abort();
    // The gateway still serves.
    assert_eq!(status_of(&gw.url("/healthz/live")).await, 200);
}

#[tokio::test]
async fn a_body_that_stops_half_way_gets_408() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let extra = "[limits]\nbody_read_timeout = \"1s\"";
    let gw = Gateway::start(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", extra),
    )
    .await;
    let mut s = connect(&gw).await;
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within 5 s to a body that stopped");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
}

#[tokio::test]
async fn over_the_connection_cap_liveness_answers_and_the_rest_get_503() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let extra = "[limits]\nmax_connections = 16\nheader_read_timeout = \"30s\"";
    let gw = Gateway::start(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", extra),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(connect(&gw).await);
    }
    let ready = gw.url("/healthz/ready");
    assert_eq!(wait_status(&ready, 503, Duration::from_secs(5)).await, 503);
    let r = client().get(&ready).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_connections");
    // Liveness answers even at the cap.
    for _ in 0..5 {
        assert_eq!(status_of(&gw.url("/healthz/live")).await, 200);
    }
    drop(held);
    assert_eq!(wait_status(&ready, 200, Duration::from_secs(5)).await, 200);
}

#[tokio::test]
async fn concurrent_streams_are_capped_per_process_and_per_key() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let extra =
        "[auth]\nkeys_env = \"TG_TEST_KEYS\"\n[limits]\nmax_streams = 2\nmax_streams_per_key = 1";
    let gw = Gateway::start_with(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", extra),
        &[],
        &[("TG_TEST_KEYS", "key-a,key-b,key-c")],
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let request = chat(200, 50, "limits");
    let post = |key: &'static str| client().post(&url).bearer_auth(key).json(&request).send();
    let a = Sse::from(post("key-a").await.unwrap()).await;
    assert_eq!(a.status, 200);
    let again = post("key-a").await.unwrap();
    assert_eq!(again.status().as_u16(), 429);
    assert_eq!(again.headers()["retry-after"], "1");
    let v: Value = again.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_streams");
    let b = Sse::from(post("key-b").await.unwrap()).await;
    assert_eq!(b.status, 200);
    let c = post("key-c").await.unwrap();
    assert_eq!(c.status().as_u16(), 503);
    assert_eq!(c.headers()["retry-after"], "1");
    // A stream that ends gives its place back.
    drop(a);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let r = post("key-c").await.unwrap();
        if r.status().as_u16() == 200 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the place of a finished stream was not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
}

/// A whole answer and a continuation are generations too: they take a
/// place under the stream caps like a new stream does.
#[tokio::test]
async fn whole_answers_and_continuations_count_against_the_stream_caps() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let extra =
        "[auth]\nkeys_env = \"TG_TEST_KEYS\"\n[limits]\nmax_streams = 10\nmax_streams_per_key = 1";
    let gw = Gateway::start_with(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", extra),
        &[],
        &[("TG_TEST_KEYS", "key-a,key-b")],
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let post = |body: Value| client().post(&url).bearer_auth("key-a").json(&body).send();

    // A stream the provider cuts: interrupted, to be continued.
    let mut cut = chat(12, 0, "caps");
    cut["mock"] = serde_json::json!({"cut_after_events": 4, "fail_id": "caps-cut"});
    let mut first = Sse::from(post(cut).await.unwrap()).await;
    assert_eq!(first.status, 200);
    let (id, token) = (
        first.header("x-tidegate-stream-id"),
        first.header("x-tidegate-resume-token"),
    );
    let events = first.rest().await;
    let last = events.last().unwrap();
    assert_eq!(
        last.json()["error"]["type"],
        "upstream_failed",
        "{events:?}"
    );
    let cursor = events
        .iter()
        .filter_map(|e| e.id)
        .max()
        .unwrap()
        .to_string();

    // key-a's one place taken by a running stream.
    let running = Sse::from(post(chat(200, 50, "caps")).await.unwrap()).await;
    assert_eq!(running.status, 200);

    let mut whole = chat(5, 0, "caps");
    whole["stream"] = Value::Bool(false);
    let r = post(whole.clone()).await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        429,
        "a whole answer past the key's cap"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_streams", "{v}");

    let resume = || {
        client()
            .get(gw.url(&format!("/v1/streams/{id}")))
            .bearer_auth("key-a")
            .header("x-tidegate-resume-token", &token)
            .header("last-event-id", &cursor)
            .send()
    };
    let r = resume().await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        429,
        "a continuation past the key's cap"
    );
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(
        mock.stat("requests_started").await,
        2,
        "nothing more reached the provider"
    );

    // Another key is not held back by key-a's cap.
    let r = client()
        .post(&url)
        .bearer_auth("key-b")
        .json(&whole)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Once the running stream is gone, both go through.
    drop(running);
    let until = Instant::now() + Duration::from_secs(5);
    let resumed = loop {
        let r = resume().await.unwrap();
        if r.status().as_u16() == 200 {
            break Sse::from(r).await;
        }
        assert_eq!(r.status().as_u16(), 429);
        assert!(
            Instant::now() < until,
            "the running stream's place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut resumed = resumed;
    let rest = resumed.rest().await;
    assert_eq!(rest.last().unwrap().data, "[DONE]", "{rest:?}");
    let r = post(whole).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn deep_json_and_invalid_utf8_are_refused_at_the_gateway() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", "kind = \"memory\"", "")).await;
    let deep = {
        let mut b = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"#.to_vec();
        b.extend(std::iter::repeat_n(b'[', 100_000));
        b.extend(std::iter::repeat_n(b']', 100_000));
        b.extend(b"}]}");
        b
    };
    let utf8 = b"{\"model\":\"m\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec();
    for (path, body) in [
        ("/v1/chat/completions", deep.clone()),
        ("/v1/chat/completions", utf8.clone()),
        ("/v1/messages", utf8),
    ] {
        let r = client()
            .post(gw.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let v: Value = r.json().await.unwrap();
        if path == "/v1/messages" {
            assert_eq!(v["type"], "error", "{v}");
        } else {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        }
    }
    assert_eq!(
        mock.stat("requests_started").await,
        0,
        "nothing reached the provider"
    );
}
