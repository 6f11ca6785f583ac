//! The spine: relay, cancellation, failures, bad input, config errors.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

async fn setup(extra: &str) -> (std::path::PathBuf, Mock, Gateway) {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", extra),
    )
    .await;
    (dir, mock, gw)
}

#[tokio::test]
async fn relays_the_exact_text_with_ids_and_done() {
    let (_dir, mock, gw) = setup("").await;
    let request = chat(50, 0, "relay");
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
    assert_eq!(sse.status, 200);
    assert!(sse.header("x-tidegate-stream-id").starts_with("tg_"));
    assert!(!sse.header("x-tidegate-resume-token").is_empty());
    assert!(sse.header("content-type").starts_with("text/event-stream"));
    let events = sse.rest().await;
    assert!(
        events.last().is_some_and(SseEvent::is_done),
        "ends with [DONE]"
    );
    assert_contiguous(&ids_of(&events));
    assert_eq!(
        ids_of(&events).len(),
        52,
        "the role chunk, 50 words and the finish chunk"
    );
    assert_eq!(text_of(&events), mock.answer(&request).await);

    // Non-streaming requests pass through as the provider's JSON.
    let mut plain = request.clone();
    plain["stream"] = json!(false);
    let v: Value = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&plain)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        text_of(&events)
    );
}

#[tokio::test]
async fn http2_upstream_carries_every_stream_on_few_connections() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let config = config(&mock, "127.0.0.1:0", "kind = \"memory\"", "") + "http2 = true\n";
    let gw = Gateway::start(&dir, &config).await;
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.proc.pid()))
            .unwrap()
            .count()
    };
    // Once it serves (its worker threads and their runtimes are up).
    let ready = client().get(gw.url("/healthz/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let before = fds();
    let requests: Vec<Value> = (0..20).map(|i| chat(40, 25, &format!("h2-{i}"))).collect();
    let mut streams = Vec::new();
    for request in &requests {
        let mut sse = Sse::post(&gw.url("/v1/chat/completions"), request).await;
        assert_eq!(sse.status, 200);
        let first = sse.take(1).await;
        assert_eq!(first.len(), 1);
        streams.push((sse, first));
    }
    // 20 client sockets are open; over HTTP/1.1 there would be 20 upstream
    // sockets too.
    let during = fds();
    assert!(
        during < before + 20 + 5,
        "{before} descriptors before, {during} with 20 streams open"
    );
    for ((mut sse, mut events), request) in streams.into_iter().zip(&requests) {
        events.extend(sse.rest().await);
        assert!(events.last().is_some_and(SseEvent::is_done));
        assert_contiguous(&ids_of(&events));
        assert_eq!(
            ids_of(&events).len(),
            42,
            "the role chunk, 40 words and the finish chunk"
        );
        assert_eq!(text_of(&events), mock.answer(request).await);
    }
}

#[tokio::test]
async fn provider_connections_are_reused_and_a_provider_restart_is_invisible() {
    let dir = tempdir();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["mock-upstream", "--listen", listen.as_str()];
    let mut mock = Mock {
        proc: spawn(&args, &[], &dir.join("mock-1.log")).await,
    };
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", "kind = \"memory\"", "")).await;
    // The gateway's established connections to the mock's port: its
    // sockets (by inode, from /proc/PID/fd) in /proc/net/tcp, whose rows
    // give the remote address as hex `ADDR:PORT` and the state (01).
    let upstream_sockets = || {
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", gw.proc.pid()))
            .expect("fds")
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|link| {
                let link = link.to_string_lossy().into_owned();
                Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect();
        let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        let to_mock = format!(":{port:04X}");
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                f.len() > 9
                    && f[2].ends_with(&to_mock)
                    && f[3] == "01"
                    && inodes.contains(&f[9].to_owned())
            })
            .count()
    };
    let one = |topic: String| {
        let url = gw.url("/v1/chat/completions");
        async move {
            let request = chat(30, 0, &topic);
            let mut sse = Sse::post(&url, &request).await;
            assert_eq!(sse.status, 200);
            let events = sse.rest().await;
            assert!(events.last().is_some_and(SseEvent::is_done), "{topic}");
            (request, text_of(&events))
        }
    };
    for i in 0..5 {
        let (request, text) = one(format!("reuse-{i}")).await;
        assert_eq!(text, mock.answer(&request).await);
    }
    // One after another, the streams shared one kept-alive connection (the
    // test's own `answer` calls do not keep theirs).
    assert_eq!(upstream_sockets(), 1, "one pooled provider connection");

    // The provider restarts: the idle connection in the pool is dead.
    mock.proc.signal("TERM");
    mock.proc.exit(Duration::from_secs(5)).await;
    let mock = Mock {
        proc: spawn(&args, &[], &dir.join("mock-2.log")).await,
    };
    for i in 0..3 {
        let (request, text) = one(format!("after-restart-{i}")).await;
        assert_eq!(text, mock.answer(&request).await);
    }
    assert_eq!(mock.stat("requests_completed").await, 3 + 3);
}

#[tokio::test]
async fn client_disconnect_drops_the_upstream() {
    let (_dir, mock, gw) = setup("").await;
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &chat(200, 20, "leaving")).await;
    assert_eq!(sse.take(5).await.len(), 5);
    assert_eq!(mock.stat("requests_cancelled").await, 0);
    let left = Instant::now();
    drop(sse);
    let cancelled = mock
        .wait_for("requests_cancelled", 1, Duration::from_secs(2))
        .await;
    assert_eq!(cancelled, 1, "the mock saw the upstream request dropped");
    println!(
        "client gone -> upstream dropped seen by the mock after {:?}",
        left.elapsed()
    );
    assert!(left.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn upstream_errors_before_the_first_byte_become_statuses() {
    let (_dir, _mock, gw) = setup("").await;
    // The provider answers 500 / 429: same status, OpenAI error body.
    for status in [500u16, 429] {
        let mut req = chat(5, 0, "fail");
        req["mock"]["status"] = json!(status);
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .json(&req)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    // First-byte timeout (2s in the test config): 504.
    let mut req = chat(5, 0, "slow");
    req["mock"]["delay_ms"] = json!(4000);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn unreachable_upstream_is_a_502() {
    let dir = tempdir();
    let port = free_port(); // nothing listens there
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[store]\nkind = \"memory\"\n[[upstreams]]\nname = \"gone\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n"
    );
    let gw = Gateway::start(&dir, &config).await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(5, 0, "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable");
    assert_eq!(v["error"]["type"], "upstream_error");
}

#[tokio::test]
async fn provider_dying_or_stalling_mid_stream_ends_with_upstream_failed() {
    let (_dir, _mock, gw) = setup("").await;
    for knob in ["fail_after", "stall_after"] {
        let mut req = chat(30, 5, knob);
        req["mock"][knob] = json!(7);
        let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &req).await;
        assert_eq!(sse.status, 200);
        let events = sse.rest().await;
        let last = events.last().expect("some events");
        let error = last
            .error()
            .unwrap_or_else(|| panic!("{knob}: last event is an abort, got {last:?}"));
        assert_eq!(error["type"], "upstream_failed", "{knob}");
        assert_eq!(error["code"], "upstream_failed");
        assert_eq!(error["resume"], true);
        assert_eq!(
            error["stream_id"].as_str().unwrap(),
            sse.header("x-tidegate-stream-id")
        );
        // The role chunk, then the 7 words.
        assert_eq!(error["last_event_id"], "8");
        assert!(last.id.is_none(), "the abort event has no id");
        assert_contiguous(&ids_of(&events));
        assert_eq!(ids_of(&events).len(), 8);
        assert!(!events.iter().any(SseEvent::is_done));
    }
}

#[tokio::test]
async fn bad_input_gets_openai_shaped_errors() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let mut cfg = config(
        &mock,
        "127.0.0.1:0",
        "kind = \"memory\"",
        "max_body_bytes = 4096",
    );
    cfg = cfg.replace("models = [\"*\"]", "models = [\"mock-*\"]");
    let gw = Gateway::start(&dir, &cfg).await;
    let url = gw.url("/v1/chat/completions");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (client().post(&url).body("{not json"), 400, "invalid_json"),
        (
            client().post(&url).json(&json!({"model": "mock-x"})),
            400,
            "invalid_request",
        ),
        (
            client()
                .post(&url)
                .json(&json!({"messages": [{"role": "user", "content": "hi"}]})),
            400,
            "invalid_request",
        ),
        (
            client()
                .post(&url)
                .json(&json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})),
            404,
            "model_not_found",
        ),
        (
            client().post(&url).body(format!(
                "{{\"model\":\"mock-x\",\"pad\":\"{}\"}}",
                "x".repeat(8000)
            )),
            413,
            "request_too_large",
        ),
        (client().get(gw.url("/v2/nothing")), 404, "not_found"),
    ];
    for (request, status, code) in cases {
        let r = request.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "expected {status} for {code}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(v["error"]["type"].is_string());
    }
}

#[tokio::test]
async fn config_errors_exit_64_and_name_the_problem() {
    let dir = tempdir();
    let cases = [
        ("[drain]\ngrac = \"1s\"\n", vec![], "grac"),
        (
            "[[upstreams]]\nname = \"v\"\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key_env = \"TIDEGATE_TEST_MISSING_KEY\"\n",
            vec![],
            "TIDEGATE_TEST_MISSING_KEY",
        ),
        ("", vec![("TIDEGATE_DRAIN__GRACE", "soon")], "drain.grace"),
        (
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:1\"\n",
            vec![],
            "resume.secret_env",
        ),
    ];
    for (i, (text, env, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        for command in ["serve", "check-config"] {
            let out = std::process::Command::new(BIN)
                .args([command, "--config", path.to_str().unwrap()])
                .envs(env.iter().copied())
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(64), "{command} {text}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(needle),
                "{command}: `{needle}` not in {stderr}"
            );
        }
    }
    // A good config: check-config prints routing and the drain timeline.
    let path = dir.join("good.toml");
    std::fs::write(&path, "[drain]\ngrace = \"40s\"\n[[upstreams]]\nname = \"v\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodels = [\"llama-*\"]\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("llama-*"), "{stdout}");
    assert!(
        stdout.contains("terminationGracePeriodSeconds >= 45"),
        "{stdout}"
    );
    assert!(stdout.contains("TimeoutStopSec >= 45s"), "{stdout}");
    assert!(stdout.contains("warning: the drain needs 45s"), "{stdout}");
}

#[tokio::test]
async fn zero_config_serves_the_builtin_mock() {
    let dir = tempdir();
    let port = free_port();
    let mut proc = spawn_in(&dir, &["serve", "--listen", &format!("127.0.0.1:{port}")]).await;
    let mut sse = Sse::post(
        &format!("{}/v1/chat/completions", proc.url()),
        &chat(8, 0, "demo"),
    )
    .await;
    let events = sse.rest().await;
    assert!(events.last().is_some_and(SseEvent::is_done));
    assert_eq!(ids_of(&events).len(), 10, "role, 8 words, finish");
    assert!(
        proc.log_text().contains("built-in mock provider"),
        "says so loudly"
    );
    assert!(
        dir.join("tidegate-data").exists(),
        "embedded store in ./tidegate-data"
    );
    proc.signal("TERM");
    assert!(proc.exit(Duration::from_secs(10)).await.success());
}

/// Start the binary with `dir` as its working directory and no config.
async fn spawn_in(dir: &std::path::Path, args: &[&str]) -> Proc {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};
    let log = dir.join("zero.log");
    let mut child = tokio::process::Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("OPENAI_API_KEY")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    Proc {
        child,
        addr: line.trim_start_matches("listening on http://").to_owned(),
        log,
    }
}

#[tokio::test]
async fn idle_streams_get_heartbeats_and_metrics_count_them() {
    let (_dir, _mock, gw) = setup("[streams]\nheartbeat = \"100ms\"\n").await;
    let mut response = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(3, 350, "quiet"))
        .send()
        .await
        .unwrap();
    let mut raw = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
    // A comment line between frames, never followed by a blank line of
    // its own: a blank line after an `id:` would make the official SDKs'
    // decoders dispatch an empty event (openai-python then fails on it).
    assert!(
        raw.contains("\n\n: ping\n") && raw.contains(": ping\nid: "),
        "{raw}"
    );
    assert!(!raw.contains(": ping\n\n"), "{raw}");
    assert!(raw.trim_end().ends_with("data: [DONE]"));
    for (name, want) in [
        ("tidegate_streams_started_total", 1.0),
        ("tidegate_streams_completed_total", 1.0),
        ("tidegate_events_relayed_total", 5.0),
        ("tidegate_streams_active", 0.0),
    ] {
        assert_eq!(gw.metric(name).await, want, "{name}");
    }
}
