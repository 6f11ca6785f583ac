//! `load`: the project's load tool. Drives N concurrent streaming chat
//! requests at a target (the mock directly, nginx in front of it, or
//! tidegate) and reports, as one JSON line:
//! requests/s of fixed-length answers, time to first chunk and the gap
//! between chunks at p50/p99 (µs), errors, stalls (a chunk later than
//! `--stall-factor` × its pacing, or 50 ms when unpaced), and the target's
//! RSS when `--pid` is given.
//!
//! ```text
//! cargo bench --bench load -- --url http://127.0.0.1:8080 --concurrency 64 --seconds 5 --words 50
//! ```
//!
//! `--hold` opens `--concurrency` long streams, prints `held` once all have
//! their first chunk, and waits for them to end (a drain): it then reports
//! how each ended and when the last abort event arrived (unix ms).

#![expect(
    clippy::disallowed_methods,
    reason = "a client tool: its tasks are its own"
)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a load tool whose setup fails should stop with the reason"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::sync::Mutex;

#[derive(Clone)]
struct Args {
    url: String,
    concurrency: usize,
    seconds: f64,
    requests: Option<u64>,
    words: u64,
    interval_ms: u64,
    stall_factor: f64,
    pid: Option<u32>,
    hold: bool,
    label: String,
    /// Where to write every TTFC and gap sample (µs) as JSON, so that runs
    /// can be pooled.
    samples: Option<String>,
}

fn parse() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:8080".into(),
        concurrency: 16,
        seconds: 5.0,
        requests: None,
        words: 50,
        interval_ms: 0,
        stall_factor: 10.0,
        pid: None,
        hold: false,
        label: String::new(),
        samples: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match flag.as_str() {
            "--url" => a.url = value(),
            "--concurrency" => a.concurrency = value().parse().unwrap_or(16),
            "--seconds" => a.seconds = value().parse().unwrap_or(5.0),
            "--requests" => a.requests = value().parse().ok(),
            "--words" => a.words = value().parse().unwrap_or(50),
            "--interval-ms" => a.interval_ms = value().parse().unwrap_or(0),
            "--stall-factor" => a.stall_factor = value().parse().unwrap_or(10.0),
            "--pid" => a.pid = value().parse().ok(),
            "--label" => a.label = value(),
            "--hold" => a.hold = true,
            "--samples" => a.samples = Some(value()),
            "--bench" => {} // added by `cargo bench`
            other => eprintln!("load: ignoring unknown argument {other}"),
        }
    }
    a
}

#[derive(Default)]
struct Totals {
    done: AtomicU64,
    errors: AtomicU64,
    stalls: AtomicU64,
    chunks: AtomicU64,
    aborted: AtomicU64,
    last_abort_ms: AtomicU64,
    first_chunk: AtomicU64,
}

struct Hists {
    ttfc: Histogram<u64>,
    gap: Histogram<u64>,
    /// Every sample, when `--samples` asks for them.
    raw: Option<(Vec<u64>, Vec<u64>)>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One streaming request; returns whether it finished with `[DONE]`.
async fn one(
    client: &reqwest::Client,
    args: &Args,
    n: u64,
    totals: &Totals,
    local: &mut Hists,
) -> bool {
    let body = format!(
        r#"{{"model":"bench","stream":true,"max_tokens":{},"messages":[{{"role":"user","content":"load test number {} of the tidegate relay"}}],"mock":{{"token_interval_ms":{}}}}}"#,
        args.words,
        n % 1000,
        args.interval_ms
    );
    let started = Instant::now();
    let Ok(mut response) = client
        .post(format!("{}/v1/chat/completions", args.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    else {
        return false;
    };
    if response.status() != 200 {
        return false;
    }
    let stall = if args.interval_ms == 0 {
        Duration::from_millis(50)
    } else {
        Duration::from_secs_f64(args.interval_ms as f64 / 1000.0 * args.stall_factor)
    };
    let mut last: Option<Instant> = None;
    let mut pending = Vec::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(c)) => c,
            _ => return false,
        };
        let at = Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(pos) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..pos + 2).collect();
            if event.starts_with(b":") || event.starts_with(b"retry:") {
                continue;
            }
            if event.windows(6).any(|w| w == b"[DONE]") {
                // Read to the end of the body so the connection goes back to
                // the pool: dropping it early would charge the next request a
                // new connection, for some targets and not others.
                while let Ok(Some(_)) = response.chunk().await {}
                return true;
            }
            if event.windows(8).any(|w| w == b"\"error\":") {
                totals.aborted.fetch_add(1, Ordering::Relaxed);
                totals.last_abort_ms.fetch_max(now_ms(), Ordering::Relaxed);
                return false;
            }
            totals.chunks.fetch_add(1, Ordering::Relaxed);
            match last {
                None => {
                    let us = started.elapsed().as_micros() as u64;
                    let _ = local.ttfc.record(us);
                    if let Some((ttfc, _)) = &mut local.raw {
                        ttfc.push(us);
                    }
                    totals.first_chunk.fetch_add(1, Ordering::Relaxed);
                }
                Some(prev) => {
                    let gap = at - prev;
                    let _ = local.gap.record(gap.as_micros() as u64);
                    if let Some((_, gaps)) = &mut local.raw {
                        gaps.push(gap.as_micros() as u64);
                    }
                    if gap > stall {
                        totals.stalls.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            last = Some(at);
        }
    }
}

fn new_hists(raw: bool) -> Hists {
    Hists {
        ttfc: Histogram::new(3).unwrap_or_else(|_| unreachable!()),
        gap: Histogram::new(3).unwrap_or_else(|_| unreachable!()),
        raw: raw.then(Default::default),
    }
}

#[tokio::main]
async fn main() {
    let args = parse();
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .timeout(Duration::from_secs(3600))
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"));
    let totals = Arc::new(Totals::default());
    let merged = Arc::new(Mutex::new(new_hists(args.samples.is_some())));
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let rss_before = args.pid.and_then(rss_kib);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, args, totals, merged, stop, issued) = (
            client.clone(),
            args.clone(),
            totals.clone(),
            merged.clone(),
            stop.clone(),
            issued.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut local = new_hists(args.samples.is_some());
            loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if args.requests.is_some_and(|max| n >= max) {
                    break;
                }
                if one(&client, &args, n, &totals, &mut local).await {
                    totals.done.fetch_add(1, Ordering::Relaxed);
                } else if !args.hold {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                }
                if args.hold {
                    break;
                }
            }
            let mut m = merged.lock().await;
            let _ = m.ttfc.add(&local.ttfc);
            let _ = m.gap.add(&local.gap);
            if let (Some((all_ttfc, all_gap)), Some((ttfc, gap))) = (&mut m.raw, local.raw) {
                all_ttfc.extend(ttfc);
                all_gap.extend(gap);
            }
        }));
    }
    let mut rss_peak = None;
    if args.hold {
        // Wait until every stream has its first chunk, then report the RSS.
        while totals.first_chunk.load(Ordering::Relaxed) < args.concurrency as u64 {
            if workers.iter().all(|w| w.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_peak = args.pid.and_then(rss_kib);
        println!(
            "held {} streams at {}",
            totals.first_chunk.load(Ordering::Relaxed),
            now_ms()
        );
    } else if args.requests.is_none() {
        tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
        rss_peak = args.pid.and_then(rss_kib);
        stop.store(true, Ordering::Relaxed);
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let m = merged.lock().await;
    let done = totals.done.load(Ordering::Relaxed);
    let json = serde_json::json!({
        "label": args.label,
        "concurrency": args.concurrency,
        "words": args.words,
        "interval_ms": args.interval_ms,
        "seconds": elapsed,
        "completed": done,
        "requests_per_s": done as f64 / elapsed,
        "chunks_per_s": totals.chunks.load(Ordering::Relaxed) as f64 / elapsed,
        "ttfc_p50_us": m.ttfc.value_at_quantile(0.5),
        "ttfc_p99_us": m.ttfc.value_at_quantile(0.99),
        "gap_p50_us": m.gap.value_at_quantile(0.5),
        "gap_p99_us": m.gap.value_at_quantile(0.99),
        "errors": totals.errors.load(Ordering::Relaxed),
        "stalls": totals.stalls.load(Ordering::Relaxed),
        "aborted": totals.aborted.load(Ordering::Relaxed),
        "last_abort_unix_ms": totals.last_abort_ms.load(Ordering::Relaxed),
        "rss_before_kib": rss_before,
        "rss_peak_kib": rss_peak,
    });
    if let (Some(path), Some((ttfc, gap))) = (&args.samples, &m.raw) {
        let raw = serde_json::json!({"ttfc_us": ttfc, "gap_us": gap});
        std::fs::write(path, raw.to_string()).expect("write the samples");
    }
    println!("{json}");
}
