//! The drain's hard cases: `/admin/drain` followed by the supervisor's
//! SIGTERM, a drain notice with less time than the grace, the final store
//! flush with a client that stopped reading, and a SIGTERM in the first
//! milliseconds of start-up.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::common::*;

const ADMIN: (&str, &str) = ("TG_TEST_ADMIN", "s3cret-admin");

async fn gateway(dir: &std::path::Path, mock: &Mock, drain: &str) -> Gateway {
    let extra = format!("{drain}\n[admin]\ntoken_env = \"{}\"\n", ADMIN.0);
    Gateway::start_with(
        dir,
        &config(mock, "127.0.0.1:0", &embedded(dir), &extra),
        &[],
        &[ADMIN],
    )
    .await
}

async fn admin_drain(gw: &Gateway, body: Option<Value>) -> Value {
    let mut r = client().post(gw.url("/admin/drain")).bearer_auth(ADMIN.1);
    if let Some(body) = body {
        r = r.json(&body);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    r.json().await.unwrap()
}

#[tokio::test]
async fn admin_drain_then_sigterm_keeps_the_grace() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let mut gw = gateway(
        &dir,
        &mock,
        "[drain]\ngrace = \"10s\"\nexit_timeout = \"2s\"",
    )
    .await;
    // About 1.5 s of answer.
    let request = chat(30, 50, "pre-stop hook");
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
    assert_eq!(sse.status, 200);
    let first = sse.take(2).await;
    // The preStop hook, then the kubelet's SIGTERM, then a retried hook.
    admin_drain(&gw, None).await;
    gw.proc.signal("TERM");
    let again = admin_drain(&gw, None).await;
    assert_eq!(again["started_now"], false);
    let mut events = first;
    events.extend(sse.rest().await);
    assert!(
        events.last().is_some_and(SseEvent::is_done),
        "the stream was cut: {:?}",
        events.last()
    );
    assert_eq!(text_of(&events), mock.answer(&request).await);
    assert!(gw.proc.exit(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn a_drain_notice_shortens_the_grace_and_the_earlier_deadline_wins() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let mut gw = gateway(
        &dir,
        &mock,
        "[drain]\ngrace = \"30s\"\nexit_timeout = \"2s\"",
    )
    .await;
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &chat(400, 50, "spot")).await;
    assert_eq!(sse.status, 200);
    sse.take(2).await;
    let started = Instant::now();
    let v = admin_drain(&gw, Some(json!({"grace": "1s"}))).await;
    assert!(v["grace_ms"].as_u64().unwrap() <= 1000, "{v}");
    // A later notice with more time does not move the deadline back.
    let v = admin_drain(&gw, Some(json!({"grace": "20s"}))).await;
    assert!(v["grace_ms"].as_u64().unwrap() <= 1000, "{v}");
    let rest = sse.rest().await;
    let error = rest
        .last()
        .and_then(SseEvent::error)
        .expect("an abort event");
    assert_eq!(error["type"], "server_restarting");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the stream ran {took:?} after a 1 s notice"
    );
    assert!(gw.proc.exit(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn a_bad_drain_notice_is_a_400_and_starts_nothing() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = gateway(&dir, &mock, "[drain]\ngrace = \"5s\"").await;
    let r = client()
        .post(gw.url("/admin/drain"))
        .bearer_auth(ADMIN.1)
        .json(&json!({"grace": "soon"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let ready = client().get(gw.url("/healthz/ready")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
}

#[tokio::test]
async fn the_store_is_flushed_before_exit_even_with_a_stuck_client() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let mut gw = gateway(
        &dir,
        &mock,
        "[drain]\ngrace = \"1s\"\nexit_timeout = \"1500ms\"",
    )
    .await;
    // A client that sends its request and never reads a byte.
    let mut stuck = tokio::net::TcpStream::connect(&gw.proc.addr).await.unwrap();
    let body = serde_json::to_vec(&chat(20000, 0, "nobody reads")).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stuck.write_all(head.as_bytes()).await.unwrap();
    stuck.write_all(&body).await.unwrap();
    mock.wait_for("requests_started", 1, Duration::from_secs(5))
        .await;
    // The stream is under way and its client reads nothing.
    let relaying = eventually(Duration::from_secs(5), || async {
        gw.metric("tidegate_events_relayed_total").await >= 100.0
    })
    .await;
    assert!(relaying, "the stuck client's stream never got going");
    gw.proc.signal("TERM");
    assert!(gw.proc.exit(Duration::from_secs(10)).await.success());
    let log = gw.proc.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("drain complete"))
        .unwrap_or_else(|| panic!("no drain line:\n{log}"));
    assert!(line.contains("store_flushed=true"), "{line}");
    drop(stuck);
}

#[tokio::test]
async fn sigterm_in_the_first_milliseconds_still_drains() {
    let dir = tempdir();
    let config_path = dir.join("early.toml");
    std::fs::write(
        &config_path,
        format!("listen = \"127.0.0.1:0\"\n[store]\n{}\n", embedded(&dir)),
    )
    .unwrap();
    for delay_ms in [2u64, 4, 6, 8, 10, 15, 20] {
        let mut child = tokio::process::Command::new(BIN)
            .args(["serve", "--config", config_path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap().to_string();
        // From the moment `main` holds SIGTERM back, or has its handler
        // (before that, the process is the loader's, and no program can
        // catch a signal there).
        let status_file = format!("/proc/{pid}/status");
        let held = eventually(Duration::from_secs(10), || {
            let status_file = status_file.clone();
            async move {
                let mask = |s: &str, field: &str| {
                    s.lines()
                        .find_map(|l| l.strip_prefix(field))
                        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                        .unwrap_or(0)
                };
                std::fs::read_to_string(&status_file).is_ok_and(|s| {
                    (mask(&s, "SigBlk:") | mask(&s, "SigCgt:")) & (1 << (libc::SIGTERM - 1)) != 0
                })
            }
        })
        .await;
        assert!(held, "the gateway never held SIGTERM back");
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("exits")
            .unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "SIGTERM {delay_ms} ms after start: {status:?}"
        );
    }
}
