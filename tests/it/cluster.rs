//! Replicas on a real Redis Cluster (3 masters, 3 replicas, on loopback):
//! streams in different slots written, replayed and followed live from
//! another replica, across a master failover. And a follower on one Redis
//! that opens no connection per read.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::common::*;
use crate::replicas::Redis;

const SECRET: (&str, &str) = ("TG_TEST_RESUME_SECRET", "shared-secret-for-tests");

/// `redis-cli -p port args…`'s output; panics if it fails.
async fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("redis-cli is installed (package redis-tools, scripts/test installs it)");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of `field` in an INFO-like `field:value` reply.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// Poll `check` every 50 ms until it holds, at most `limit`.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Six `redis-server`s in cluster mode (3 masters, 3 replicas), each in
/// its own directory; all killed on drop.
struct Cluster {
    nodes: Vec<(Child, u16)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.start_kill();
        }
    }
}

/// One shard: the master's port, its replica's port, its slot ranges.
#[derive(Debug, Clone)]
struct Shard {
    master: u16,
    replica: u16,
    slots: Vec<(u16, u16)>,
}

impl Cluster {
    /// One cluster-mode `redis-server` in `node_dir`, listening. Its ports
    /// come from `free_port`, which another test may take before the server
    /// binds them: a server that exits instead of listening is started
    /// again on fresh ports (at most 5 times).
    async fn node(node_dir: &Path) -> (Child, u16) {
        std::fs::create_dir_all(node_dir).unwrap();
        for _ in 0..5 {
            let (port, bus) = (free_port(), free_port());
            let _ = std::fs::remove_file(node_dir.join("nodes.conf"));
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "1000"])
                .args(["--save", "", "--appendonly", "no"])
                .current_dir(node_dir)
                .stdout(std::fs::File::create(node_dir.join("log")).unwrap())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server is installed (scripts/test installs it)");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return (child, port);
                }
                if child.try_wait().ok().flatten().is_some() || Instant::now() >= deadline {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let log = std::fs::read_to_string(node_dir.join("log")).unwrap_or_default();
        panic!("redis-server did not listen in 5 attempts; its last log:\n{log}");
    }

    async fn start(dir: &Path) -> Cluster {
        let mut nodes = Vec::new();
        for i in 0..6 {
            nodes.push(Cluster::node(&dir.join(format!("redis-{i}"))).await);
        }
        let cluster = Cluster { nodes };
        let addrs: Vec<String> = cluster.ports().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli runs");
        assert!(out.status.success(), "cluster create: {out:?}");
        for port in cluster.ports() {
            until("cluster_state:ok", Duration::from_secs(15), || async move {
                field(&cli(port, &["CLUSTER", "INFO"]).await, "cluster_state").as_deref()
                    == Some("ok")
            })
            .await;
        }
        // Every master has a replica in sync (a failover needs it).
        let nodes = &cluster;
        until("replicas in sync", Duration::from_secs(15), || async move {
            for shard in nodes.shards().await {
                if shard.replica == 0 {
                    return false;
                }
                let info = cli(shard.replica, &["INFO", "replication"]).await;
                if field(&info, "master_link_status").as_deref() != Some("up") {
                    return false;
                }
            }
            true
        })
        .await;
        cluster
    }

    /// SIGKILL the node on `port`; it leaves the cluster's process list.
    async fn kill(&mut self, port: u16) {
        let at = self.nodes.iter().position(|(_, p)| *p == port).unwrap();
        let (mut child, _) = self.nodes.remove(at);
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes.iter().map(|(_, p)| *p)
    }

    /// The seed nodes tidegate is given: three of the six.
    fn seeds(&self) -> String {
        self.ports()
            .take(3)
            .map(|p| format!("\"redis://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The shards as `CLUSTER NODES` on the first node that answers sees
    /// them.
    async fn shards(&self) -> Vec<Shard> {
        let text = cli(self.nodes[0].1, &["CLUSTER", "NODES"]).await;
        let port_of = |addr: &str| -> u16 {
            addr.split(['@', ','])
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap()
        };
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let mut shards = Vec::new();
        for m in lines.iter().filter(|l| l[2].contains("master")) {
            let slots = m[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                    None => (r.parse().unwrap(), r.parse().unwrap()),
                })
                .collect::<Vec<(u16, u16)>>();
            if slots.is_empty() {
                continue;
            }
            let replica = lines
                .iter()
                .find(|l| l[3] == m[0] && !l[2].contains("fail"))
                .map(|l| port_of(l[1]))
                .unwrap_or(0);
            shards.push(Shard {
                master: port_of(m[1]),
                replica,
                slots,
            });
        }
        assert_eq!(shards.len(), 3, "{text}");
        shards
    }

    /// The shard holding stream `id`'s keys.
    async fn shard_of(&self, id: &str) -> Shard {
        let key = format!("tg:{{{id}}}:ev");
        let slot: u16 = cli(self.nodes[0].1, &["CLUSTER", "KEYSLOT", &key])
            .await
            .trim()
            .parse()
            .unwrap();
        self.shards()
            .await
            .into_iter()
            .find(|s| s.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .unwrap_or_else(|| panic!("no shard holds slot {slot}"))
    }
}

fn cluster_config(mock: &Mock, store: &str) -> String {
    let extra = format!(
        "[drain]\ngrace = \"1s\"\nexit_timeout = \"2s\"\n[resume]\nsecret_env = \"{}\"\n",
        SECRET.0
    );
    config(mock, "127.0.0.1:0", store, &extra)
}

async fn replica(dir: &Path, config: &str) -> Gateway {
    Gateway::start_with(dir, config, &[], &[SECRET]).await
}

/// A stream started on a replica: its id, token, request and what its
/// client has read so far.
struct Started {
    id: String,
    token: String,
    request: Value,
    sse: Sse,
    events: Vec<SseEvent>,
}

async fn start(gw: &Gateway, request: Value, first: usize) -> Started {
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
    assert_eq!(sse.status, 200);
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let events = sse.take(first).await;
    Started {
        id,
        token,
        request,
        sse,
        events,
    }
}

/// Read `sse` to its end; on a `store_failed` abort (which must say
/// `resume: true`) or a cut, resume from the last id held, through the
/// gateways in turn (from `after` if it has none), until `[DONE]`. Returns every event with an id, and
/// how many times it had to resume. Bounded.
async fn read_to_done(
    gateways: [&Gateway; 2],
    id: &str,
    token: &str,
    after: u64,
    mut sse: Sse,
    mut events: Vec<SseEvent>,
) -> (Vec<SseEvent>, usize) {
    for resumes in 0..40 {
        while let Some(event) = sse.next().await {
            if let Some(error) = event.error() {
                assert_eq!(error["type"], "store_failed", "unexpected abort {error}");
                assert_eq!(error["resume"], true, "{error}");
                break;
            }
            if event.is_done() {
                return (events, resumes);
            }
            events.push(event);
        }
        let last = events
            .last()
            .and_then(|e| e.id)
            .unwrap_or(after)
            .to_string();
        let gw = gateways[resumes % 2];
        sse = loop {
            let r = client()
                .get(gw.url(&format!("/v1/streams/{id}")))
                .header("x-tidegate-resume-token", token)
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

/// The whole stream replayed from `gw` (it is over).
async fn replay(gw: &Gateway, id: &str, token: &str) -> Vec<SseEvent> {
    let mut sse = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[("x-tidegate-resume-token", token), ("last-event-id", "0")],
    )
    .await;
    assert_eq!(sse.status, 200);
    let events = sse.rest().await;
    assert!(events.last().is_some_and(SseEvent::is_done), "{events:?}");
    events
}

#[tokio::test]
async fn streams_live_across_slots_and_a_master_failover() {
    let began = Instant::now();
    let dir = tempdir();
    let mut cluster = Cluster::start(&dir).await;
    println!("cluster up in {:?}", began.elapsed());
    let mock = Mock::start(&dir).await;
    let store = format!(
        "kind = \"redis\"\ncluster = [{}]\nlease_ttl = \"1500ms\"",
        cluster.seeds()
    );
    let a = replica(&dir, &cluster_config(&mock, &store)).await;
    let b = replica(&dir, &cluster_config(&mock, &store)).await;

    // Streams on A until they span two masters (3 s each, twice the
    // lease), and one more that a DELETE on B cancels: the cancel check
    // (one EXISTS per slot) must reach A while the others still run.
    let mut running: Vec<Started> = Vec::new();
    let mut masters = std::collections::BTreeSet::new();
    for i in 0..12 {
        let s = start(&a, chat(120, 25, &format!("slot {i}")), 2).await;
        masters.insert(cluster.shard_of(&s.id).await.master);
        running.push(s);
        if masters.len() >= 2 && running.len() >= 3 {
            break;
        }
    }
    assert!(masters.len() >= 2, "12 streams on one master");
    let mut doomed = start(&a, chat(400, 30, "cancel me from b"), 2).await;
    let r = client()
        .delete(b.url(&format!("/v1/streams/{}", doomed.id)))
        .header("x-tidegate-resume-token", &doomed.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let doomed_rest = doomed.sse.rest().await;
    assert_eq!(
        doomed_rest
            .last()
            .and_then(SseEvent::error)
            .expect("cancelled")["type"],
        "cancelled"
    );
    for s in &running {
        let record = cli(
            cluster.shard_of(&s.id).await.master,
            &["GET", &format!("tg:{{{}}}:rec", s.id)],
        )
        .await;
        assert!(
            record.contains("\"status\":\"running\""),
            "the cancel landed only after stream {} ended: {record}",
            s.id
        );
    }
    // Past the lease's TTL (A's client reads on to event 80, 2 s in), B
    // must still see A's leases alive (renewed, one script per slot) and
    // follow rather than continue.
    let first = &mut running[0];
    while first.events.last().and_then(|e| e.id).unwrap_or(0) < 80 {
        let event = first.sse.next().await.expect("the stream runs on");
        first.events.push(event);
    }
    let mut followers = Vec::new();
    for s in &running {
        let sse = Sse::get(
            &b.url(&format!("/v1/streams/{}", s.id)),
            &[
                ("x-tidegate-resume-token", &s.token),
                ("last-event-id", "2"),
            ],
        )
        .await;
        assert_eq!(sse.status, 200);
        followers.push(sse);
    }
    let (ends, follows) = tokio::join!(
        futures_util::future::join_all(running.iter_mut().map(|s| s.sse.rest())),
        futures_util::future::join_all(followers.iter_mut().map(Sse::rest)),
    );
    assert_eq!(
        mock.stat("requests_started").await,
        running.len() as u64 + 1,
        "B followed A's streams and started no continuation"
    );
    for ((s, rest), from_b) in running.iter().zip(ends).zip(follows) {
        assert!(rest.last().is_some_and(SseEvent::is_done), "{rest:?}");
        assert!(from_b.last().is_some_and(SseEvent::is_done), "{from_b:?}");
        let mut on_a = s.events.clone();
        on_a.extend(rest);
        assert_contiguous(&ids_of(&on_a[..on_a.len() - 1]));
        let answer = mock.answer(&s.request).await;
        assert_eq!(text_of(&on_a), answer);
        assert_eq!(ids_of(&from_b), (3..=122).collect::<Vec<_>>());
        assert_eq!(text_of(&from_b), text_of(&on_a[2..]), "B followed live");
        assert_eq!(text_of(&replay(&b, &s.id, &s.token).await), answer);
    }
    println!(
        "{} streams on {} masters, followed and replayed, at {:?}",
        running.len(),
        masters.len(),
        began.elapsed()
    );

    // A failover of the master holding a running stream, while streams
    // run on A and one of them is followed live from B.
    let mut running = Vec::new();
    for i in 0..4 {
        running.push(start(&a, chat(100, 25, &format!("failover {i}")), 3).await);
    }
    let target = cluster.shard_of(&running[0].id).await;
    let followed = Sse::get(
        &b.url(&format!("/v1/streams/{}", running[0].id)),
        &[
            ("x-tidegate-resume-token", &running[0].token),
            ("last-event-id", "3"),
        ],
    )
    .await;
    assert_eq!(followed.status, 200);
    let failover_at = Instant::now();
    let reply = cli(target.replica, &["CLUSTER", "FAILOVER"]).await;
    assert_eq!(reply.trim(), "OK");
    let promoted = target.replica;
    until(
        "the replica is promoted",
        Duration::from_secs(10),
        || async move {
            field(&cli(promoted, &["INFO", "replication"]).await, "role").as_deref()
                == Some("master")
        },
    )
    .await;
    println!(
        "failover of {} to {} took {:?}",
        target.master,
        target.replica,
        failover_at.elapsed()
    );
    let (first_id, first_token) = (running[0].id.clone(), running[0].token.clone());
    let (a_ref, b_ref, mock_ref) = (&a, &b, &mock);
    let readers = running.into_iter().map(|s| async move {
        let (a, b, mock) = (a_ref, b_ref, mock_ref);
        let answer = mock.answer(&s.request).await;
        let (events, resumes) = read_to_done([a, b], &s.id, &s.token, 0, s.sse, s.events).await;
        assert_contiguous(&ids_of(&events));
        assert_eq!(
            text_of(&events),
            answer,
            "stream {} across the failover",
            s.id
        );
        resumes
    });
    let (resumes, (from_b, follow_resumes)) = tokio::join!(
        futures_util::future::join_all(readers),
        read_to_done([&b, &a], &first_id, &first_token, 3, followed, Vec::new()),
    );
    assert_eq!(
        ids_of(&from_b),
        (4..=102).collect::<Vec<_>>(),
        "the follower on B got the rest, without gap or repeat"
    );
    let first_answer = text_of(&replay(&a, &first_id, &first_token).await);
    assert!(first_answer.ends_with(&text_of(&from_b)));
    println!(
        "across the failover: resumes per stream {resumes:?}, follower {follow_resumes}, at {:?}",
        began.elapsed()
    );

    // A master killed while streams run on A, one followed from B: its
    // replica takes over after the node timeout (1 s); writes to its
    // slots fail meanwhile, so a stream there ends with `store_failed`,
    // `resume: true`, and resumes to the exact text once it is promoted.
    let mut running = Vec::new();
    for i in 0..4 {
        running.push(start(&a, chat(100, 25, &format!("killed master {i}")), 3).await);
    }
    let victim = cluster.shard_of(&running[0].id).await;
    let heir = victim.replica;
    until(
        "the heir is in sync",
        Duration::from_secs(10),
        || async move {
            field(
                &cli(heir, &["INFO", "replication"]).await,
                "master_link_status",
            )
            .as_deref()
                == Some("up")
        },
    )
    .await;
    let followed = Sse::get(
        &b.url(&format!("/v1/streams/{}", running[0].id)),
        &[
            ("x-tidegate-resume-token", &running[0].token),
            ("last-event-id", "3"),
        ],
    )
    .await;
    assert_eq!(followed.status, 200);
    let killed_at = Instant::now();
    cluster.kill(victim.master).await;
    until(
        "the heir is promoted",
        Duration::from_secs(15),
        || async move {
            field(&cli(heir, &["INFO", "replication"]).await, "role").as_deref() == Some("master")
        },
    )
    .await;
    println!(
        "killed master {}; {} promoted after {:?}",
        victim.master,
        heir,
        killed_at.elapsed()
    );
    let (first_id, first_token) = (running[0].id.clone(), running[0].token.clone());
    let readers = running.into_iter().map(|s| async move {
        let (a, b, mock) = (a_ref, b_ref, mock_ref);
        let answer = mock.answer(&s.request).await;
        let (events, resumes) = read_to_done([a, b], &s.id, &s.token, 0, s.sse, s.events).await;
        assert_contiguous(&ids_of(&events));
        assert_eq!(text_of(&events), answer, "stream {} across the kill", s.id);
        resumes
    });
    let (resumes, (from_b, follow_resumes)) = tokio::join!(
        futures_util::future::join_all(readers),
        read_to_done([&b, &a], &first_id, &first_token, 3, followed, Vec::new()),
    );
    assert_eq!(ids_of(&from_b).first(), Some(&4));
    assert_eq!(ids_of(&from_b).last(), Some(&102));
    assert_contiguous(&ids_of(&from_b).iter().map(|i| i - 3).collect::<Vec<_>>());
    let first_answer = text_of(&replay(&a, &first_id, &first_token).await);
    assert!(first_answer.ends_with(&text_of(&from_b)));
    println!(
        "across the kill: resumes per stream {resumes:?}, follower {follow_resumes}, at {:?}",
        began.elapsed()
    );

    // New streams after the failover, without restarting tidegate: on
    // both replicas, until one lands on the promoted master.
    let mut on_promoted = false;
    for i in 0..40 {
        let gw = [&a, &b][i % 2];
        let s = start(gw, chat(5, 0, &format!("after {i}")), 0).await;
        let (events, resumes) = read_to_done([&a, &b], &s.id, &s.token, 0, s.sse, s.events).await;
        assert_eq!(
            resumes, 0,
            "a new stream after the failover was interrupted"
        );
        let answer = mock.answer(&s.request).await;
        assert_eq!(text_of(&events), answer);
        assert_eq!(
            text_of(&replay([&b, &a][i % 2], &s.id, &s.token).await),
            answer
        );
        // The master promoted last: the first promoted one may be the
        // master that was killed since.
        if cluster.shard_of(&s.id).await.master == heir {
            on_promoted = true;
            break;
        }
    }
    assert!(on_promoted, "40 new streams, none on the promoted master");
    println!("done at {:?}", began.elapsed());
    drop((a, b, cluster));
}

#[tokio::test]
async fn a_follower_opens_no_connection_per_read() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let redis = Redis::start(&dir).await;
    let store = format!("kind = \"redis\"\nurl = \"{}\"", redis.url());
    let a = replica(&dir, &cluster_config(&mock, &store)).await;
    let b = replica(&dir, &cluster_config(&mock, &store)).await;
    // 120 events, 25 ms apart: about 3 s of live follow from B.
    let s = start(&a, chat(120, 25, "counted connections"), 2).await;
    let mut on_b = Sse::get(
        &b.url(&format!("/v1/streams/{}", s.id)),
        &[
            ("x-tidegate-resume-token", &s.token),
            ("last-event-id", "2"),
        ],
    )
    .await;
    assert_eq!(on_b.status, 200);
    let first = on_b.take(1).await;
    assert_eq!(ids_of(&first), [3]);
    let connections = || async {
        field(
            &cli(redis.port, &["INFO", "stats"]).await,
            "total_connections_received",
        )
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
    };
    let before = connections().await;
    let followed = Instant::now();
    let rest = on_b.rest().await;
    let elapsed = followed.elapsed();
    // Minus the connection of this INFO's own redis-cli.
    let opened = connections().await - before - 1;
    assert!(rest.last().is_some_and(SseEvent::is_done), "{rest:?}");
    assert_eq!(ids_of(&rest), (4..=122).collect::<Vec<_>>());
    println!("B followed for {elapsed:?} and opened {opened} Redis connections");
    assert!(elapsed > Duration::from_secs(2), "{elapsed:?}");
    assert_eq!(opened, 0, "following opened connections");
}
