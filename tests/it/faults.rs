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

#[tokio::test]
async fn a_full_disk_ends_streams_with_store_failed_and_readiness_turns_503() {
    let dir = tempdir();
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    // A real full disk: an 8 MiB tmpfs, owned by us (mounting needs root
    // or sudo, as the suite's package installs do).
    let ids = |flag: &str| {
        std::process::Command::new("id")
            .arg(flag)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let options = format!("size=8m,mode=0700,uid={},gid={}", ids("-u"), ids("-g"));
    let mounted = as_root("mount")
        .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "cannot mount a tmpfs (this test needs root or sudo)"
    );
    let _mount = Mounted(small.clone());
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
