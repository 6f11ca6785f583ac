//! Fault injection under load: SIGKILL in a loop (10 rounds of 20 streams),
//! every stream resumed, after a restart on the same store, to the exact
//! text the provider would have given in one go.

use crate::common::*;

#[tokio::test]
async fn sigkill_in_a_loop_under_load_every_stream_resumes_exactly() {
    const ROUNDS: usize = 10;
    const STREAMS: usize = 20;
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let cfg = config(&mock, "127.0.0.1:0", &embedded(&dir), "");
    let mut resumed = 0;
    for round in 0..ROUNDS {
        let mut gw = Gateway::start(&dir, &cfg).await;
        let url = gw.url("/v1/chat/completions");
        let mut tasks = Vec::new();
        for i in 0..STREAMS {
            let request = chat(30, 20, &format!("round {round} stream {i}"));
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut sse = Sse::post(&url, &request).await;
                assert_eq!(sse.status, 200);
                let before = sse.take(3).await;
                let id = sse.header("x-tidegate-stream-id");
                let token = sse.header("x-tidegate-resume-token");
                // Keep reading until the connection breaks under the kill.
                let mut all = before;
                while let Some(e) = sse.next().await {
                    all.push(e);
                    if all.len() >= 12 {
                        break;
                    }
                }
                (request, id, token, all, sse)
            }));
        }
        let mut cut = Vec::new();
        for t in tasks {
            cut.push(t.await.unwrap());
        }
        gw.proc.kill().await;
        let mut gw = Gateway::start(&dir, &cfg).await;
        for (request, id, token, before, sse) in cut {
            drop(sse);
            let last = ids_of(&before).last().copied().unwrap_or(0);
            let mut resume = Sse::get(
                &gw.url(&format!("/v1/streams/{id}")),
                &[
                    ("x-tidegate-resume-token", &token),
                    ("last-event-id", &last.to_string()),
                ],
            )
            .await;
            assert_eq!(resume.status, 200, "round {round}: resume of {id}");
            let mut all = before;
            all.extend(resume.rest().await);
            assert!(
                all.last().is_some_and(SseEvent::is_done),
                "round {round} {id}: {:?}",
                all.last()
            );
            assert_contiguous(&ids_of(&all));
            assert_eq!(
                text_of(&all),
                mock.answer(&request).await,
                "round {round} {id}"
            );
            resumed += 1;
        }
        // Gone before the next round opens the same store.
        gw.proc.kill().await;
    }
    assert_eq!(resumed, ROUNDS * STREAMS);
}

/// `program` as root: directly when we are root, else through `sudo -n`
/// (the test suite installs its packages the same way).
fn as_root(program: &str) -> std::process::Command {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if uid == "0" {
        std::process::Command::new(program)
    } else {
        let mut c = std::process::Command::new("sudo");
        c.args(["-n", program]);
        c
    }
}

/// Unmounts the small filesystem however the test ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = as_root("umount").arg("-l").arg(&self.0).status();
    }
}

/// A real small disk: a tmpfs of `size` mounted at `dir/small`, owned by
/// us (mounting needs root or sudo, as the suite's package installs do).
fn small_disk(dir: &std::path::Path, size: &str) -> (std::path::PathBuf, Mounted) {
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let ids = |flag: &str| {
        std::process::Command::new("id")
            .arg(flag)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let options = format!("size={size},mode=0700,uid={},gid={}", ids("-u"), ids("-g"));
    let mounted = as_root("mount")
        .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "cannot mount a tmpfs (this test needs root or sudo)"
    );
    (small.clone(), Mounted(small))
}

#[tokio::test]
async fn a_full_disk_ends_streams_with_store_failed_and_readiness_turns_503() {
    let dir = tempdir();
    // A real full disk: an 8 MiB tmpfs.
    let (small, _mount) = small_disk(&dir, "8m");
    let mock = Mock::start(&dir).await;
    let store = format!(
        "kind = \"embedded\"\npath = \"{}\"",
        small.join("data").display()
    );
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", &store, "")).await;
    let ready = gw.url("/healthz/ready");
    assert_eq!(
        client().get(&ready).send().await.unwrap().status().as_u16(),
        200
    );
    let mut store_failed = None;
    for i in 0..200 {
        let mut sse = Sse::post(
            &gw.url("/v1/chat/completions"),
            &chat(4000, 0, &format!("fill {i}")),
        )
        .await;
        if sse.status == 503 {
            break;
        }
        assert_eq!(sse.status, 200);
        let events = sse.rest().await;
        let last = events.last().expect("an end");
        if let Some(error) = last.error() {
            assert_eq!(error["type"], "store_failed", "{error}");
            store_failed = Some(error);
            break;
        }
        assert!(last.is_done());
    }
    let error = store_failed.expect("the disk never filled");
    assert_eq!(error["resume"], true);
    let r = client().get(&ready).send().await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        503,
        "readiness while the store takes no write"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["status"], "store_unavailable");
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(5, 0, "after"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "store_unavailable");
    // Liveness stays 200: the process itself is fine.
    assert_eq!(
        client()
            .get(gw.url("/healthz/live"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    drop(gw);
}

/// A stream relayed while the disk filled: what it asked, its id and
/// resume token, and the events its client got.
struct Relayed {
    request: serde_json::Value,
    id: String,
    token: String,
    events: Vec<SseEvent>,
}

#[tokio::test]
async fn a_full_disk_recovers_without_a_restart_once_space_is_freed() {
    let dir = tempdir();
    // 32 MiB, half of it held by a file the "operator" deletes later.
    let (small, _mount) = small_disk(&dir, "32m");
    let filler = small.join("filler");
    std::fs::write(&filler, vec![0x5a_u8; 16 << 20]).unwrap();
    let mock = Mock::start(&dir).await;
    let store = format!(
        "kind = \"embedded\"\npath = \"{}\"",
        small.join("data").display()
    );
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", &store, "")).await;
    let ready = gw.url("/healthz/ready");
    let readiness = || async { client().get(&ready).send().await.unwrap().status().as_u16() };
    assert_eq!(readiness().await, 200);

    // Fill the disk until a stream ends with store_failed.
    let mut completed = Vec::new();
    let mut failed = None;
    for i in 0..400 {
        let request = chat(4000, 0, &format!("fill {i}"));
        let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
        assert_eq!(
            sse.status,
            200,
            "stream {i} after {} completed",
            completed.len()
        );
        let (id, token) = (
            sse.header("x-tidegate-stream-id"),
            sse.header("x-tidegate-resume-token"),
        );
        let events = sse.rest().await;
        let last = events.last().expect("an end").clone();
        let relayed = Relayed {
            request,
            id,
            token,
            events,
        };
        if let Some(error) = last.error() {
            assert_eq!(error["type"], "store_failed", "{error}");
            assert_eq!(error["resume"], true, "{error}");
            failed = Some(relayed);
            break;
        }
        assert!(last.is_done());
        completed.push(relayed);
    }
    let failed = failed.expect("the disk never filled");
    assert!(!completed.is_empty(), "the first stream already failed");
    assert_eq!(readiness().await, 503, "readiness while the disk is full");

    // The operator frees space; the gateway is not restarted.
    std::fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = readiness().await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness still {status} 30 s after the disk got room again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // A new stream runs to its end.
    let request = chat(300, 0, "after the disk got room");
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
    assert_eq!(sse.status, 200);
    let events = sse.rest().await;
    assert!(
        events.last().is_some_and(SseEvent::is_done),
        "{:?}",
        events.last()
    );
    assert_eq!(text_of(&events), mock.answer(&request).await);

    // The stream the full disk cut resumes to the exact text.
    let seen = ids_of(&failed.events).last().copied().unwrap_or(0);
    let mut resume = Sse::get(
        &gw.url(&format!("/v1/streams/{}", failed.id)),
        &[
            ("x-tidegate-resume-token", &failed.token),
            ("last-event-id", &seen.to_string()),
        ],
    )
    .await;
    assert_eq!(resume.status, 200, "resume of {}", failed.id);
    // The abort frame is not part of the answer.
    let mut all: Vec<SseEvent> = failed
        .events
        .iter()
        .filter(|e| e.error().is_none())
        .cloned()
        .collect();
    all.extend(resume.rest().await);
    assert!(
        all.last().is_some_and(SseEvent::is_done),
        "{:?}",
        all.last()
    );
    assert_contiguous(&ids_of(&all));
    assert_eq!(text_of(&all), mock.answer(&failed.request).await);

    // What was acknowledged before the disk filled is still there: the
    // first and the last completed streams replay in full.
    for done in [&completed[0], &completed[completed.len() - 1]] {
        let mut replay = Sse::get(
            &gw.url(&format!("/v1/streams/{}", done.id)),
            &[("x-tidegate-resume-token", &done.token)],
        )
        .await;
        assert_eq!(replay.status, 200, "replay of {}", done.id);
        let events = replay.rest().await;
        assert_eq!(ids_of(&events), ids_of(&done.events), "{}", done.id);
        assert_eq!(text_of(&events), text_of(&done.events), "{}", done.id);
    }
    drop(gw);
}

/// A store on a disk that is read-only (remounted so after a fault, or
/// mounted so by mistake): the gateway says so and names the path, instead
/// of serving streams it cannot write ahead; what was written before is
/// intact once the disk is writable again.
#[tokio::test]
async fn a_read_only_disk_is_refused_clearly_and_its_data_kept() {
    let dir = tempdir();
    let (small, _mount) = small_disk(&dir, "32m");
    let mock = Mock::start(&dir).await;
    let data = small.join("data");
    let store = format!("kind = \"embedded\"\npath = \"{}\"", data.display());
    let cfg = config(&mock, "127.0.0.1:0", &store, "[drain]\ngrace = \"1s\"\n");
    let mut gw = Gateway::start(&dir, &cfg).await;
    let before = chat(200, 0, "before read-only");
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &before).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let first = sse.rest().await;
    assert!(first.last().is_some_and(SseEvent::is_done));
    gw.proc.signal("TERM");
    assert!(
        gw.proc
            .exit(std::time::Duration::from_secs(10))
            .await
            .success()
    );

    let remount = |mode: &str| {
        let ok = as_root("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&small)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot remount {mode}");
    };
    remount("ro");
    let log = dir.join("read-only.log");
    let config_path = dir.join("read-only.toml");
    std::fs::write(&config_path, &cfg).unwrap();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::process::Command::new(BIN)
            .args(["serve", "--config", config_path.to_str().unwrap()])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::piped())
            .output(),
    )
    .await
    .expect("a gateway on a read-only store exits")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("on a read-only disk: {:?}; {}", out.status, stderr.trim());
    assert!(!out.status.success(), "started on a read-only store");
    assert!(
        stderr.contains(data.to_str().unwrap()) && stderr.to_lowercase().contains("read-only"),
        "the error names the path and says why: {stderr}"
    );

    remount("rw");
    let gw = Gateway::start(&dir, &cfg).await;
    let mut replay = Sse::get(&gw.url(&format!("/v1/streams/{id}?token={token}")), &[]).await;
    assert_eq!(replay.status, 200);
    let events = replay.rest().await;
    assert_eq!(ids_of(&events), ids_of(&first));
    assert_eq!(text_of(&events), mock.answer(&before).await);
}
