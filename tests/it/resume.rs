//! The store and resume path: a restart (SIGTERM or SIGKILL) becomes a blip,
//! and the answer is finished exactly once.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const FAST_DRAIN: &str = "[drain]\ngrace = \"1s\"\nexit_timeout = \"2s\"\n";

struct Interrupted {
    id: String,
    token: String,
    before: Vec<SseEvent>,
}

async fn start_and_interrupt(
    gw: &mut Gateway,
    request: &Value,
    signal: &str,
    after: usize,
) -> Interrupted {
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), request).await;
    assert_eq!(sse.status, 200);
    let id = sse.header("x-tidegate-stream-id");
    let token = sse.header("x-tidegate-resume-token");
    let mut before = sse.take(after).await;
    gw.proc.signal(signal);
    before.extend(sse.rest().await);
    gw.proc.exit(Duration::from_secs(10)).await;
    Interrupted { id, token, before }
}

async fn resume(gw: &Gateway, id: &str, token: &str, last: u64) -> Vec<SseEvent> {
    let last = last.to_string();
    let mut sse = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[("x-tidegate-resume-token", token), ("last-event-id", &last)],
    )
    .await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.header("x-tidegate-stream-id"), id);
    sse.rest().await
}

/// A mock, and a gateway on a fixed port with the embedded store, plus the
/// config its successor starts with.
async fn restartable() -> (std::path::PathBuf, Mock, String, Gateway) {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let cfg = config(&mock, &listen, &embedded(&dir), FAST_DRAIN);
    let gw = Gateway::start(&dir, &cfg).await;
    (dir, mock, cfg, gw)
}

/// A mock and a gateway on the embedded store, on any port.
async fn embedded_gateway() -> (std::path::PathBuf, Mock, Gateway) {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(
        &dir,
        &config(&mock, "127.0.0.1:0", &embedded(&dir), FAST_DRAIN),
    )
    .await;
    (dir, mock, gw)
}

#[tokio::test]
async fn sigterm_then_a_new_process_finishes_the_answer_exactly() {
    let (dir, mock, cfg, mut gw) = restartable().await;
    let request = chat(60, 40, "restart");
    let cut = start_and_interrupt(&mut gw, &request, "TERM", 5).await;
    let abort = cut
        .before
        .last()
        .and_then(SseEvent::error)
        .expect("server_restarting");
    assert_eq!(abort["type"], "server_restarting");
    let token = abort["resume_token"].as_str().unwrap().to_owned();
    assert_eq!(token, cut.token, "the event carries the header's token");
    let last: u64 = abort["last_event_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(Some(last), ids_of(&cut.before).last().copied());

    let gw = Gateway::start(&dir, &cfg).await;
    let after = resume(&gw, &cut.id, &token, last).await;
    assert!(after.last().is_some_and(SseEvent::is_done));
    let mut all = cut.before.clone();
    all.extend(after.iter().cloned());
    assert_contiguous(&ids_of(&all));
    assert_eq!(text_of(&all), mock.answer(&request).await);
    // One original call and exactly one continuation.
    assert_eq!(
        mock.stat("requests_started").await,
        2 + 1,
        "2 relayed calls + the answer() probe"
    );

    // The stream's state reads as completed, with the whole text.
    let state: Value = client()
        .get(gw.url(&format!("/v1/streams/{}/state", cut.id)))
        .header("x-tidegate-resume-token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["status"], "completed");
    assert_eq!(state["text"].as_str().unwrap(), text_of(&all));
    assert_eq!(state["finish_reason"], "stop");
}

#[tokio::test]
async fn sigkill_then_resume_from_the_clients_own_last_id() {
    let (dir, mock, cfg, mut gw) = restartable().await;
    let request = chat(50, 40, "crash");
    let cut = start_and_interrupt(&mut gw, &request, "KILL", 8).await;
    assert!(
        cut.before.iter().all(|e| e.error().is_none()),
        "a SIGKILL says nothing in-band"
    );
    let last = ids_of(&cut.before).last().copied().unwrap();
    assert!(last >= 8);

    let gw = Gateway::start(&dir, &cfg).await;
    // The record says running, but its process is gone: it reads interrupted.
    let state: Value = client()
        .get(gw.url(&format!("/v1/streams/{}/state?token={}", cut.id, cut.token)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["status"], "interrupted");
    let after = resume(&gw, &cut.id, &cut.token, last).await;
    let mut all = cut.before.clone();
    all.extend(after);
    assert!(all.last().is_some_and(SseEvent::is_done));
    assert_contiguous(&ids_of(&all));
    assert_eq!(text_of(&all), mock.answer(&request).await);
}

#[tokio::test]
async fn replay_tokens_cursors_and_concurrent_resumes() {
    let (dir, mock, cfg, mut gw) = restartable().await;

    // A completed stream replays whole from Last-Event-ID: 0.
    let request = chat(20, 0, "replay");
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let original = sse.rest().await;
    let replay = resume(&gw, &id, &token, 0).await;
    assert_eq!(ids_of(&replay), ids_of(&original));
    assert_eq!(text_of(&replay), text_of(&original));
    assert!(replay.last().is_some_and(SseEvent::is_done));

    // EventSource style: ?token= and ?after=; Last-Event-ID wins over ?after=.
    let url = gw.url(&format!("/v1/streams/{id}?token={token}&after=15"));
    let tail = Sse::get(&url, &[]).await.rest().await;
    assert_eq!(ids_of(&tail), (16..=22).collect::<Vec<_>>());
    let tail = Sse::get(&url, &[("last-event-id", "19")])
        .await
        .rest()
        .await;
    assert_eq!(ids_of(&tail), vec![20, 21, 22]);
    // Bearer works too.
    let tail = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("last-event-id", "20"),
        ],
    )
    .await
    .rest()
    .await;
    assert_eq!(ids_of(&tail), vec![21, 22]);

    // Wrong token, another stream's token, unknown stream, no token: 404 alike.
    let mut other = Sse::post(&gw.url("/v1/chat/completions"), &chat(3, 0, "other")).await;
    let other_token = other.header("x-tidegate-resume-token");
    other.rest().await;
    for (stream, tok) in [
        (id.as_str(), "wrong"),
        (id.as_str(), other_token.as_str()),
        ("tg_nope", token.as_str()),
        (id.as_str(), ""),
    ] {
        let r = client()
            .get(gw.url(&format!("/v1/streams/{stream}?token={tok}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "not_found");
    }

    // Two concurrent resumes of an interrupted stream start one continuation.
    gw.proc.kill().await;
    let mut gw = Gateway::start(&dir, &cfg).await;
    let request = chat(40, 40, "twice");
    let cut = start_and_interrupt(&mut gw, &request, "TERM", 4).await;
    let last = ids_of(&cut.before).last().copied().unwrap();
    let gw = Gateway::start(&dir, &cfg).await;
    let started_before = mock.stat("requests_started").await;
    let (a, b) = tokio::join!(
        resume(&gw, &cut.id, &cut.token, last),
        resume(&gw, &cut.id, &cut.token, last)
    );
    assert_eq!(
        mock.stat("requests_started").await,
        started_before + 1,
        "one continuation call"
    );
    let expected = mock.answer(&request).await;
    for after in [a, b] {
        let mut all = cut.before.clone();
        all.extend(after);
        assert_contiguous(&ids_of(&all));
        assert_eq!(text_of(&all), expected);
    }
}

#[tokio::test]
async fn expired_streams_are_gone() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let store = format!("{}\nttl = \"1s\"", embedded(&dir));
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", &store, FAST_DRAIN)).await;
    let created = std::time::Instant::now();
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &chat(3, 0, "expiring")).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    sse.rest().await;
    assert_eq!(
        Sse::get(&gw.url(&format!("/v1/streams/{id}?token={token}")), &[])
            .await
            .status,
        200
    );
    // Gone once its TTL has passed (polled: the sweep runs on its own time).
    let gone = eventually(Duration::from_secs(10), || async {
        let r = client()
            .get(gw.url(&format!("/v1/streams/{id}?token={token}")))
            .send()
            .await
            .unwrap();
        r.status().as_u16() == 404
    })
    .await;
    assert!(gone, "the stream outlived its TTL");
    assert!(
        created.elapsed() >= Duration::from_secs(1),
        "gone before its TTL"
    );
}

#[tokio::test]
async fn idempotency_keys_attach_instead_of_generating_again() {
    let (_dir, mock, gw) = embedded_gateway().await;
    let request = chat(30, 20, "idempotent");
    let post = |body: Value| {
        let url = gw.url("/v1/chat/completions");
        async move {
            client()
                .post(url)
                .header("idempotency-key", "k-1")
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let mut first = Sse::from(post(request.clone()).await).await;
    first.take(3).await;
    let mut second = Sse::from(post(request.clone()).await).await;
    assert_eq!(second.status, 200);
    assert_eq!(
        second.header("x-tidegate-stream-id"),
        first.header("x-tidegate-stream-id")
    );
    let (a, b) = tokio::join!(first.rest(), second.rest());
    assert_eq!(
        text_of(&b),
        mock.answer(&request).await,
        "the retry sees the whole answer"
    );
    assert_contiguous(&ids_of(&b));
    assert!(a.last().is_some_and(SseEvent::is_done));
    assert_eq!(
        mock.stat("requests_started").await,
        1 + 1,
        "one generation + the answer() probe"
    );

    let mut different = request.clone();
    different["max_tokens"] = json!(31);
    let r = post(different).await;
    assert_eq!(r.status().as_u16(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "idempotency_conflict");
}

#[tokio::test]
async fn delete_cancels_the_upstream() {
    let (_dir, mock, gw) = embedded_gateway().await;
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &chat(300, 20, "delete me")).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    sse.take(3).await;
    let r = client()
        .delete(gw.url(&format!("/v1/streams/{id}")))
        .header("x-tidegate-resume-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "cancelled");
    let rest = sse.rest().await;
    let error = rest
        .last()
        .and_then(SseEvent::error)
        .expect("cancelled event");
    assert_eq!(error["type"], "cancelled");
    assert_eq!(error["resume"], false);
    assert_eq!(
        mock.wait_for("requests_cancelled", 1, Duration::from_secs(2))
            .await,
        1
    );
    // A resume of a cancelled stream replays and ends cancelled again.
    let replay = resume(&gw, &id, &token, 0).await;
    assert_eq!(
        replay.last().and_then(SseEvent::error).unwrap()["type"],
        "cancelled"
    );
}

#[tokio::test]
async fn upstream_failure_mid_stream_is_resumed_by_continuation() {
    let (_dir, mock, gw) = embedded_gateway().await;
    let mut request = chat(30, 5, "flaky provider");
    request["mock"]["fail_after"] = json!(10);
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let before = sse.rest().await;
    let error = before
        .last()
        .and_then(SseEvent::error)
        .expect("upstream_failed");
    assert_eq!(error["type"], "upstream_failed");
    let last: u64 = error["last_event_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(last, 11, "the role chunk and 10 words");
    let after = resume(&gw, &id, &token, last).await;
    let mut all = before;
    all.extend(after);
    assert_contiguous(&ids_of(&all));
    assert_eq!(text_of(&all), mock.answer(&request).await);
}

#[tokio::test]
async fn disconnect_grace_keeps_generating_for_a_returning_client() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let extra = format!("{FAST_DRAIN}[streams]\non_client_disconnect = \"10s\"\n");
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", &embedded(&dir), &extra)).await;
    let request = chat(30, 20, "coming back");
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let before = sse.take(4).await;
    drop(sse);
    gw.proc
        .wait_log("the stream's last client left", Duration::from_secs(5))
        .await;
    let after = resume(&gw, &id, &token, 4).await;
    let mut all = before;
    all.extend(after);
    assert_contiguous(&ids_of(&all));
    assert_eq!(text_of(&all), mock.answer(&request).await);
    assert_eq!(
        mock.stat("requests_cancelled").await,
        0,
        "the upstream was never dropped"
    );
    assert_eq!(
        mock.stat("requests_started").await,
        1 + 1,
        "no continuation call"
    );
}

/// The replay of a long stream that is over goes a page at a time, each
/// read from the store once the client took the one before: a client that
/// reads nothing does not make the gateway hold the answer.
#[tokio::test]
async fn a_long_replay_to_a_client_that_does_not_read_is_not_held_in_memory() {
    use tokio::io::AsyncWriteExt;
    let (_dir, _mock, gw) = embedded_gateway().await;
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &chat(200_000, 0, "replay")).await;
    assert_eq!(sse.status, 200);
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let events = sse.rest().await;
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let bytes: usize = events.iter().map(|e| e.data.len()).sum();
    assert!(bytes > 30 << 20, "a long answer: {bytes} bytes");
    let before = gw.rss_mib();
    // Three clients replay it from the start and read nothing.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(&gw.proc.addr).await.unwrap();
        let head = format!(
            "GET /v1/streams/{id} HTTP/1.1\r\nhost: x\r\nx-tidegate-resume-token: {token}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        held.push(s);
    }
    // Their replays run until the sockets are full; the gateway's memory
    // is read while they stand there.
    let mut peak = before;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(gw.rss_mib());
    }
    println!(
        "RSS {before} MiB before the replays, {peak} MiB at most while 3 clients read nothing ({} MiB answer)",
        bytes >> 20
    );
    assert!(
        peak < before + 24,
        "the replays held the answer: RSS {before} -> {peak} MiB"
    );
    drop(held);
}
