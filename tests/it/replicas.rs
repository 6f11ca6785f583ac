//! Many replicas on a real Redis behind a real load balancer (haproxy):
//! live follow across replicas, one continuation for concurrent resumes,
//! Redis failures, and a rolling restart that loses nothing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::common::*;

pub const SECRET: (&str, &str) = ("TG_TEST_RESUME_SECRET", "shared-secret-for-tests");

/// A real `redis-server` on a loopback port, without persistence.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Redis {
    /// On a fresh port. Another test may take the port `free_port` gave
    /// before the server binds it; a server that exits is started again on
    /// another (at most 5 times).
    pub async fn start(dir: &Path) -> Redis {
        for _ in 0..5 {
            let port = free_port();
            let mut child = Redis::spawn(dir, port);
            if wait_for_port(&mut child, port).await {
                return Redis { child, port };
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        panic!("redis-server did not listen in 5 attempts");
    }

    /// On `port` (a restart of one that was stopped).
    pub async fn start_on(dir: &Path, port: u16) -> Redis {
        let mut child = Redis::spawn(dir, port);
        assert!(
            wait_for_port(&mut child, port).await,
            "redis-server does not listen on {port}"
        );
        Redis { child, port }
    }

    fn spawn(dir: &Path, port: u16) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Whether `child` listens on `port` within 10 s (false at once if it exits).
async fn wait_for_port(child: &mut Child, port: u16) -> bool {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

pub fn redis_config(mock: &Mock, port: u16, redis: &Redis) -> String {
    let store = format!(
        "kind = \"redis\"\nurl = \"{}\"\nlease_ttl = \"1500ms\"",
        redis.url()
    );
    let extra = format!(
        "[drain]\ngrace = \"1s\"\nexit_timeout = \"2s\"\n[resume]\nsecret_env = \"{}\"\n",
        SECRET.0
    );
    config(mock, &format!("127.0.0.1:{port}"), &store, &extra)
}

async fn replica(dir: &Path, config: &str) -> Gateway {
    Gateway::start_with(dir, config, &[], &[SECRET]).await
}

/// haproxy in front of the replicas, health-checking readiness.
struct Balancer {
    child: Child,
    port: u16,
    /// haproxy's own stats page (CSV at `/stats;csv`).
    stats_port: u16,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Balancer {
    async fn start(dir: &Path, backends: &[u16]) -> Balancer {
        let port = free_port();
        let stats_port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!("    server r{i} 127.0.0.1:{p} check inter 100ms fall 1 rise 1\n")
            })
            .collect();
        let cfg = format!(
            "global\n    maxconn 4096\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n    retries 3\n    option redispatch\n\
             frontend stats\n    bind 127.0.0.1:{stats_port}\n    stats enable\n    stats uri /stats\n\
             frontend front\n    bind 127.0.0.1:{port}\n    default_backend gateways\n\
             backend gateways\n    balance roundrobin\n    option httpchk GET /healthz/ready\n{servers}"
        );
        let path: PathBuf = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let mut child = Command::new("haproxy")
            .args(["-f", path.to_str().unwrap(), "-db"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy is installed (scripts/test installs it)");
        assert!(
            wait_for_port(&mut child, port).await,
            "haproxy does not listen on {port}: {}",
            std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default()
        );
        Balancer {
            child,
            port,
            stats_port,
        }
    }

    /// Poll haproxy's stats until `n` gateways pass its health check.
    async fn wait_up(&self, n: usize) {
        let url = format!("http://127.0.0.1:{}/stats;csv", self.stats_port);
        let up = eventually(Duration::from_secs(10), || async {
            let Ok(r) = client().get(&url).send().await else {
                return false;
            };
            let csv = r.text().await.unwrap_or_default();
            let servers = csv
                .lines()
                .filter(|l| l.starts_with("gateways,r") && l.split(',').nth(17) == Some("UP"));
            servers.count() >= n
        })
        .await;
        assert!(up, "haproxy never saw {n} gateways up");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// What a resuming client saw of one stream.
struct Outcome {
    events: Vec<SseEvent>,
    interruptions: u64,
}

/// A client that resumes through `base` on `server_restarting` or a cut
/// connection, from the last id it has, until the stream ends. Bounded.
async fn resuming_client(base: String, request: Value) -> Outcome {
    let mut sse = loop {
        match client()
            .post(format!("{base}/v1/chat/completions"))
            .json(&request)
            .send()
            .await
        {
            Ok(r) if r.status().as_u16() == 200 => break Sse::from(r).await,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let id = sse.header("x-tidegate-stream-id");
    let token = sse.header("x-tidegate-resume-token");
    let mut events: Vec<SseEvent> = Vec::new();
    for interruptions in 0..200 {
        while let Some(event) = sse.next().await {
            if let Some(error) = event.error() {
                assert_eq!(error["resume"], true, "unexpected abort {error}");
                break;
            }
            if event.is_done() {
                return Outcome {
                    events,
                    interruptions,
                };
            }
            events.push(event);
        }
        let last = events.last().and_then(|e| e.id).unwrap_or(0).to_string();
        sse = loop {
            let r = client()
                .get(format!("{base}/v1/streams/{id}"))
                .header("x-tidegate-resume-token", &token)
                .header("last-event-id", &last)
                .send()
                .await;
            match r {
                Ok(r) if r.status().as_u16() == 200 => break Sse::from(r).await,
                Ok(r) => assert!(
                    matches!(r.status().as_u16(), 502 | 503),
                    "resume answered {}",
                    r.status()
                ),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
    }
    panic!("stream {id} did not finish");
}

#[tokio::test]
async fn rolling_restart_through_a_load_balancer_loses_nothing() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let redis = Redis::start(&dir).await;
    let (pa, pb) = (free_port(), free_port());
    let (ca, cb) = (
        redis_config(&mock, pa, &redis),
        redis_config(&mock, pb, &redis),
    );
    let mut a = replica(&dir, &ca).await;
    let mut b = replica(&dir, &cb).await;
    let lb = Balancer::start(&dir, &[pa, pb]).await;
    lb.wait_up(2).await;

    const STREAMS: usize = 24;
    let mut clients = Vec::new();
    let mut requests = Vec::new();
    for i in 0..STREAMS {
        let request = chat(120, 40, &format!("rolling {i}"));
        requests.push(request.clone());
        clients.push(tokio::spawn(resuming_client(lb.url(""), request)));
    }
    mock.wait_for("requests_started", STREAMS as u64, Duration::from_secs(10))
        .await;
    // Every stream is relaying before the first restart.
    let going = eventually(Duration::from_secs(10), || async {
        a.metric("tidegate_events_relayed_total").await
            + b.metric("tidegate_events_relayed_total").await
            >= (STREAMS * 3) as f64
    })
    .await;
    assert!(going, "the streams did not get going");

    // Drain and restart A, then B.
    a.proc.signal("TERM");
    assert!(a.proc.exit(Duration::from_secs(10)).await.success());
    a = replica(&dir, &ca).await;
    lb.wait_up(2).await;
    b.proc.signal("TERM");
    assert!(b.proc.exit(Duration::from_secs(10)).await.success());
    b = replica(&dir, &cb).await;

    let mut interruptions = 0;
    for (task, request) in clients.into_iter().zip(&requests) {
        let outcome = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("bounded")
            .unwrap();
        assert_contiguous(&ids_of(&outcome.events));
        assert_eq!(text_of(&outcome.events), mock.answer(request).await);
        interruptions += outcome.interruptions;
    }
    let upstream_calls = mock.stat("requests_started").await - STREAMS as u64; // minus answer() probes
    println!(
        "rolling restart: {STREAMS} streams, {interruptions} interruptions, {upstream_calls} upstream calls"
    );
    assert!(interruptions > 0, "the restarts interrupted some streams");
    assert!(
        upstream_calls <= STREAMS as u64 + interruptions,
        "{upstream_calls} upstream calls for {STREAMS} streams and {interruptions} interruptions"
    );
    drop((a, b));
}

#[tokio::test]
async fn a_stream_on_one_replica_is_followed_live_from_another() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let redis = Redis::start(&dir).await;
    let a = replica(&dir, &redis_config(&mock, 0, &redis)).await;
    let b = replica(&dir, &redis_config(&mock, 0, &redis)).await;
    let request = chat(40, 30, "followed");
    let mut on_a = Sse::post(&a.url("/v1/chat/completions"), &request).await;
    let (id, token) = (
        on_a.header("x-tidegate-stream-id"),
        on_a.header("x-tidegate-resume-token"),
    );
    let first = on_a.take(5).await;
    let mut on_b = Sse::get(
        &b.url(&format!("/v1/streams/{id}")),
        &[("x-tidegate-resume-token", &token), ("last-event-id", "2")],
    )
    .await;
    assert_eq!(on_b.status, 200);
    let (rest_a, from_b) = tokio::join!(on_a.rest(), on_b.rest());
    assert!(
        from_b.last().is_some_and(SseEvent::is_done),
        "B ends when A's stream ends"
    );
    let mut all_a = first.clone();
    all_a.extend(rest_a);
    assert_eq!(
        ids_of(&from_b),
        (3..=42).collect::<Vec<_>>(),
        "B replays after 2, then follows with no gap"
    );
    assert_eq!(text_of(&from_b), text_of(&all_a[2..]));
    assert_eq!(
        mock.stat("requests_started").await,
        1,
        "following starts no generation"
    );

    // DELETE on B cancels a stream running on A.
    let mut on_a = Sse::post(
        &a.url("/v1/chat/completions"),
        &chat(400, 30, "cancel from b"),
    )
    .await;
    let (id, token) = (
        on_a.header("x-tidegate-stream-id"),
        on_a.header("x-tidegate-resume-token"),
    );
    on_a.take(2).await;
    let r = client()
        .delete(b.url(&format!("/v1/streams/{id}")))
        .header("x-tidegate-resume-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let rest = on_a.rest().await;
    assert_eq!(
        rest.last().and_then(SseEvent::error).expect("cancelled")["type"],
        "cancelled"
    );
}

#[tokio::test]
async fn concurrent_resumes_on_two_replicas_start_one_continuation() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let redis = Redis::start(&dir).await;
    let a = replica(&dir, &redis_config(&mock, 0, &redis)).await;
    let b = replica(&dir, &redis_config(&mock, 0, &redis)).await;
    let mut request = chat(40, 20, "two resumes");
    request["mock"]["fail_after"] = json!(6);
    let mut sse = Sse::post(&a.url("/v1/chat/completions"), &request).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let before = sse.rest().await;
    assert_eq!(
        before.last().and_then(SseEvent::error).unwrap()["type"],
        "upstream_failed"
    );
    let resume = |gw: &Gateway| {
        let url = gw.url(&format!("/v1/streams/{id}"));
        let token = token.clone();
        async move {
            Sse::get(
                &url,
                &[("x-tidegate-resume-token", &token), ("last-event-id", "6")],
            )
            .await
            .rest()
            .await
        }
    };
    let (x, y) = tokio::join!(resume(&a), resume(&b));
    assert_eq!(
        mock.stat("requests_started").await,
        2,
        "the original call and one continuation"
    );
    let expected = mock.answer(&request).await;
    for after in [x, y] {
        let mut all = before[..6].to_vec();
        all.extend(after);
        assert!(all.last().is_some_and(SseEvent::is_done));
        assert_contiguous(&ids_of(&all));
        assert_eq!(text_of(&all), expected);
    }
}

#[tokio::test]
async fn redis_failures_are_loud() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    // Down at start-up: a clear error naming the URL, exit 69.
    let port = free_port();
    let cfg_path = dir.join("down.toml");
    let down = format!("redis://127.0.0.1:{port}");
    std::fs::write(
        &cfg_path,
        config(
            &mock,
            "127.0.0.1:0",
            &format!("kind = \"redis\"\nurl = \"{down}\""),
            "[resume]\nsecret_env = \"TG_TEST_RESUME_SECRET\"\n",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config", cfg_path.to_str().unwrap()])
        .env(SECRET.0, SECRET.1)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&down), "{stderr}");

    // Lost mid-stream: the stream ends with an in-band store_failed event,
    // the upstream is dropped, nothing is cut silently.
    let mut redis = Redis::start(&dir).await;
    let gw = replica(&dir, &redis_config(&mock, 0, &redis)).await;
    let mut sse = Sse::post(
        &gw.url("/v1/chat/completions"),
        &chat(400, 20, "redis dies"),
    )
    .await;
    sse.take(5).await;
    redis.stop().await;
    let rest = sse.rest().await;
    let error = rest
        .last()
        .and_then(SseEvent::error)
        .expect("an abort event, not a silent cut");
    assert_eq!(error["type"], "store_failed");
    // What the client was sent is in the store: once it is back, a resume
    // can continue from there.
    assert_eq!(error["resume"], true);
    assert_eq!(
        mock.wait_for("requests_cancelled", 1, Duration::from_secs(3))
            .await,
        1
    );
    // New streams are refused with a clear 503 while Redis is gone.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(5, 0, "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "store_unavailable");
    // Readiness says so too, while liveness stays 200.
    let ready = client().get(gw.url("/healthz/ready")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let live = client().get(gw.url("/healthz/live")).send().await.unwrap();
    assert_eq!(live.status().as_u16(), 200);

    // Redis back on its port: new streams work again, without restarting
    // the gateway.
    let _redis = Redis::start_on(&dir, redis.port).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &chat(5, 0, "back")).await;
        if sse.status == 200 {
            let events = sse.rest().await;
            assert!(events.last().is_some_and(SseEvent::is_done), "{events:?}");
            let ready = client().get(gw.url("/healthz/ready")).send().await.unwrap();
            assert_eq!(ready.status().as_u16(), 200, "ready again");
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "new streams still fail 10 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
