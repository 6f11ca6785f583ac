//! The drain against the real binary: SIGTERM under load, a second signal,
//! `/admin/drain`, and non-streaming requests at the deadline.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

const GRACE: &str = "[drain]\npre_stop_delay = \"0s\"\ngrace = \"2s\"\nexit_timeout = \"2s\"\n";

#[tokio::test]
async fn sigterm_under_load_ends_every_stream_on_purpose() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let mut gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", &embedded(&dir), GRACE)).await;
    let url = gw.url("/v1/chat/completions");

    // 12 short streams (~1s) and 12 long ones (~20s), paced at 50ms a word.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let long = i % 2 == 1;
        let request = chat(if long { 400 } else { 20 }, 50, &format!("stream {i}"));
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut sse = Sse::post(&url, &request).await;
            assert_eq!(sse.status, 200);
            let events = sse.rest().await;
            (long, request, sse.header("x-tidegate-stream-id"), events)
        }));
    }
    // Let every stream get going, then SIGTERM.
    mock.wait_for("requests_started", 24, Duration::from_secs(10))
        .await;
    let going = eventually(Duration::from_secs(10), || async {
        gw.metric("tidegate_events_relayed_total").await >= 24.0 * 3.0
    })
    .await;
    assert!(going, "the streams did not get going");
    let signalled = Instant::now();
    gw.proc.signal("TERM");

    // Readiness turns 503 at once; liveness stays 200; new streams are refused.
    let unready = eventually(Duration::from_secs(1), || async {
        let ready = client().get(gw.url("/healthz/ready")).send().await.unwrap();
        ready.status().as_u16() == 503
    })
    .await;
    assert!(unready, "readiness still 200 a second after SIGTERM");
    gw.proc
        .wait_log("drain: refusing new streams", Duration::from_secs(1))
        .await;
    let live = client().get(gw.url("/healthz/live")).send().await.unwrap();
    assert_eq!(live.status().as_u16(), 200);
    let refused = client()
        .post(&url)
        .json(&chat(5, 0, "late"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["connection"], "close");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "draining");
    // The drain's own series, for the alert on a shutdown that runs long.
    assert_eq!(
        gw.metric("tidegate_drain_streams{state=\"at_signal\"}")
            .await,
        24.0
    );
    assert!(gw.metric("tidegate_drain_seconds").await > 0.0);
    assert_eq!(gw.metric("tidegate_draining").await, 1.0);

    let status = gw.proc.exit(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit code 0, got {status:?}");
    assert!(
        took < Duration::from_millis(4500),
        "exit within grace + exit_timeout, took {took:?}"
    );
    println!("SIGTERM to exit: {took:?}");

    assert_eq!(
        mock.stat("requests_completed").await,
        12,
        "the short streams completed upstream"
    );
    let mut long_streams = 0;
    for task in tasks {
        let (long, request, header_id, events) = task.await.unwrap();
        let last = events.last().expect("events");
        assert_contiguous(&ids_of(&events));
        if long {
            long_streams += 1;
            let error = last
                .error()
                .unwrap_or_else(|| panic!("long stream ends with an abort, got {last:?}"));
            assert_eq!(error["type"], "server_restarting");
            assert_eq!(error["code"], "server_restarting");
            assert_eq!(error["resume"], true);
            assert_eq!(error["stream_id"].as_str().unwrap(), header_id);
            assert!(!error["resume_token"].as_str().unwrap().is_empty());
            assert_eq!(
                error["resume_url"].as_str().unwrap(),
                format!("/v1/streams/{header_id}")
            );
            let last_id = ids_of(&events).last().copied().unwrap_or(0);
            assert_eq!(error["last_event_id"], last_id.to_string());
            assert!(last.id.is_none());
            assert!(!events.iter().any(SseEvent::is_done));
        } else {
            assert!(last.is_done(), "short stream finishes with [DONE]");
            assert_eq!(text_of(&events), mock.answer(&request).await);
        }
    }
    assert_eq!(long_streams, 12);
    let cancelled = mock
        .wait_for("requests_cancelled", 12, Duration::from_secs(3))
        .await;
    assert_eq!(cancelled, 12, "every long upstream request was dropped");
    let log = gw.proc.log_text();
    assert!(log.contains("drain complete"), "{log}");
}

#[tokio::test]
async fn a_second_signal_skips_to_the_deadline() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let long = "[drain]\ngrace = \"30s\"\nexit_timeout = \"2s\"\n";
    let mut gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", &embedded(&dir), long)).await;
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &chat(400, 50, "second")).await;
    sse.take(3).await;
    gw.proc.signal("TERM");
    gw.proc
        .wait_log("drain requested", Duration::from_secs(5))
        .await;
    let second = Instant::now();
    gw.proc.signal("INT");
    let events = sse.rest().await;
    let error = events
        .last()
        .and_then(SseEvent::error)
        .expect("abort event");
    assert_eq!(error["type"], "server_restarting");
    assert!(gw.proc.exit(Duration::from_secs(5)).await.success());
    assert!(
        second.elapsed() < Duration::from_secs(4),
        "did not wait for the 30s grace"
    );
}

#[tokio::test]
async fn admin_drain_needs_the_token() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let extra = format!("{GRACE}[admin]\ntoken_env = \"TG_TEST_ADMIN\"\n");
    let mut gw = Gateway::start_with(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", &extra),
        &[],
        &[("TG_TEST_ADMIN", "s3cret-admin")],
    )
    .await;
    let url = gw.url("/admin/drain");
    let r = client().post(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = client()
        .post(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        client()
            .get(gw.url("/healthz/ready"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    let r = client()
        .post(&url)
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert!(gw.proc.exit(Duration::from_secs(5)).await.success());
    assert!(
        !gw.proc.log_text().contains("s3cret-admin"),
        "the token never reaches the log"
    );

    // Without a configured token the route is absent.
    let gw = Gateway::start(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", GRACE),
    )
    .await;
    let r = client()
        .post(gw.url("/admin/drain"))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test]
async fn non_streaming_requests_at_the_deadline_get_503_server_restarting() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let cfg = config(
        &mock,
        "127.0.0.1:0",
        "kind = \"memory\"",
        "[drain]\ngrace = \"1s\"\nexit_timeout = \"2s\"\n",
    )
    .replace(
        "first_byte_timeout = \"2s\"",
        "first_byte_timeout = \"30s\"",
    );
    let mut gw = Gateway::start(&dir, &cfg).await;
    let mut req = chat(5, 0, "slow plain");
    req["stream"] = json!(false);
    req["mock"]["delay_ms"] = json!(10_000);
    let url = gw.url("/v1/chat/completions");
    let pending = tokio::spawn(async move { client().post(url).json(&req).send().await.unwrap() });
    mock.wait_for("requests_started", 1, Duration::from_secs(5))
        .await;
    gw.proc.signal("TERM");
    let r = pending.await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_restarting");
    assert!(gw.proc.exit(Duration::from_secs(5)).await.success());
}
