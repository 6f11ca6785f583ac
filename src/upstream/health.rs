//! An upstream's health and the figures routing decides on: the circuit
//! breaker (closed → open after `eject_after` consecutive failures →
//! half-open probe after `eject_for` → closed when the probe answers), the
//! optional active checks, and per-upstream counters and histograms.
//!
//! A failure is the provider's fault: it could not be reached, answered
//! 408/409/429/5xx, or failed, stalled or broke off mid-answer. A 4xx caused
//! by the request, or a client that leaves, says nothing about the
//! provider.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::HealthConfig;
use crate::metrics::Counter;

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Serving.
    Closed,
    /// Ejected: no traffic until the probe at `until` answers.
    Open { until: Instant },
    /// Ejected, its probe in flight.
    HalfOpen,
}

/// One upstream's health: its breaker and the streak of failures.
pub struct Health {
    config: HealthConfig,
    breaker: Mutex<Breaker>,
    failures: AtomicU32,
    /// Woken when the breaker opens, so the probe task sleeps until due.
    pub(super) opened: Notify,
}

impl Health {
    pub fn new(config: HealthConfig) -> Health {
        Health {
            config,
            breaker: Mutex::new(Breaker::Closed),
            failures: AtomicU32::new(0),
            opened: Notify::new(),
        }
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    pub fn breaker(&self) -> Breaker {
        self.breaker.lock().map_or(Breaker::Closed, |b| *b)
    }

    /// Whether routing may send this upstream traffic.
    pub fn available(&self) -> bool {
        self.breaker() == Breaker::Closed
    }

    /// A request or check that the provider answered well.
    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// A failure of the provider's; `true` when it ejected the upstream.
    pub fn failure(&self) -> bool {
        let streak = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < self.config.eject_after {
            return false;
        }
        let Ok(mut breaker) = self.breaker.lock() else {
            return false;
        };
        if *breaker != Breaker::Closed {
            return false;
        }
        *breaker = Breaker::Open {
            until: Instant::now() + self.config.eject_for,
        };
        drop(breaker);
        self.opened.notify_one();
        true
    }

    /// When the breaker is open, the moment its probe is due.
    pub(super) fn probe_due(&self) -> Option<Instant> {
        match self.breaker() {
            Breaker::Open { until } => Some(until),
            _ => None,
        }
    }

    /// The probe starts: half-open.
    pub(super) fn probing(&self) {
        if let Ok(mut b) = self.breaker.lock() {
            *b = Breaker::HalfOpen;
        }
    }

    /// The probe's answer: closed again, or open for another rest.
    pub(super) fn probed(&self, up: bool) {
        if let Ok(mut b) = self.breaker.lock() {
            *b = if up {
                self.failures.store(0, Ordering::Relaxed);
                Breaker::Closed
            } else {
                Breaker::Open {
                    until: Instant::now() + self.config.eject_for,
                }
            };
        }
    }
}

/// Histogram bounds in seconds, for time to first token and stream length.
const BOUNDS: [f64; 12] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A Prometheus histogram of durations.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// The series of `name` with `labels` (`upstream="x"`), cumulative.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut total = 0;
        for (bound, bucket) in BOUNDS.iter().zip(&self.buckets) {
            total += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {total}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// How one request to an upstream ended, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The provider finished the answer.
    Completed,
    /// The provider failed (before or after the first byte).
    Failed,
    /// The provider refused the request (a 4xx of the request's making).
    Rejected,
    /// The client left, the drain or `DELETE` ended it.
    Cancelled,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Completed,
        Outcome::Failed,
        Outcome::Rejected,
        Outcome::Cancelled,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Rejected => "rejected",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Per-upstream figures behind `/metrics`.
#[derive(Default)]
pub struct UpstreamStats {
    /// Requests sent (retries and continuations included).
    pub requests: Counter,
    outcomes: [Counter; 4],
    /// Requests sent again after this upstream failed before the first byte.
    pub retries: Counter,
    /// Streams that moved from this upstream to another mid-answer.
    pub failovers: Counter,
    /// Times the breaker opened.
    pub ejections: Counter,
    /// Events relayed from this upstream.
    pub events: Counter,
    /// Of those, events that came while no client was attached: generated
    /// for nobody unless a client resumes (the cost of a late drop, or of
    /// `on_client_disconnect = "keep"`).
    pub unattended: Counter,
    pub ttft: Histogram,
    pub duration: Histogram,
}

impl UpstreamStats {
    pub fn outcome(&self, outcome: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.outcomes[i].inc();
        }
    }

    pub fn outcomes(&self, outcome: Outcome) -> u64 {
        Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.outcomes[i].get())
    }
}

/// Render every upstream's series (one HELP/TYPE per metric).
pub fn render(out: &mut String, upstreams: &[std::sync::Arc<super::Upstream>]) {
    let label = |u: &super::Upstream| format!("upstream=\"{}\"", escape(&u.config.name));
    let mut counter = |name: &str, help: &str, values: &mut dyn Iterator<Item = (String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, v) in values {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    counter(
        "tidegate_upstream_requests_total",
        "Requests sent to the upstream (retries and continuations included).",
        &mut upstreams.iter().map(|u| (label(u), u.stats.requests.get())),
    );
    counter(
        "tidegate_upstream_outcomes_total",
        "How the upstream's requests ended: completed, failed (the provider's fault), rejected (4xx), cancelled.",
        &mut upstreams.iter().flat_map(|u| {
            Outcome::ALL.into_iter().map(move |o| {
                (
                    format!("{},outcome=\"{}\"", label(u), o.as_str()),
                    u.stats.outcomes(o),
                )
            })
        }),
    );
    counter(
        "tidegate_upstream_retries_total",
        "Requests sent again after the upstream failed before the first byte.",
        &mut upstreams.iter().map(|u| (label(u), u.stats.retries.get())),
    );
    counter(
        "tidegate_upstream_failovers_total",
        "Streams moved from the upstream to another mid-answer.",
        &mut upstreams
            .iter()
            .map(|u| (label(u), u.stats.failovers.get())),
    );
    counter(
        "tidegate_upstream_ejections_total",
        "Times the upstream's circuit breaker opened.",
        &mut upstreams
            .iter()
            .map(|u| (label(u), u.stats.ejections.get())),
    );
    counter(
        "tidegate_upstream_events_total",
        "Events relayed from the upstream.",
        &mut upstreams.iter().map(|u| (label(u), u.stats.events.get())),
    );
    counter(
        "tidegate_upstream_events_unattended_total",
        "Events relayed from the upstream while no client was attached (generated for nobody unless one resumes).",
        &mut upstreams
            .iter()
            .map(|u| (label(u), u.stats.unattended.get())),
    );
    let _ = writeln!(
        out,
        "# HELP tidegate_upstream_available Whether the upstream's breaker lets traffic through (0: ejected).\n# TYPE tidegate_upstream_available gauge"
    );
    for u in upstreams {
        let _ = writeln!(
            out,
            "tidegate_upstream_available{{{}}} {}",
            label(u),
            u8::from(u.health.available())
        );
    }
    for (name, help, pick) in [
        (
            "tidegate_upstream_ttft_seconds",
            "Time from sending the request to the first event, per upstream.",
            (|u: &super::Upstream| &u.stats.ttft) as fn(&super::Upstream) -> &Histogram,
        ),
        (
            "tidegate_upstream_stream_seconds",
            "Time from sending the request to the provider's end, per upstream (completed runs).",
            |u: &super::Upstream| &u.stats.duration,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for u in upstreams {
            pick(u).render(out, name, &label(u));
        }
    }
}

/// A label value as Prometheus' text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Watch `upstream` until `stop`: the half-open probe whenever its breaker
/// is open and due, and the active check every `health_check_interval`
/// when one is set.
pub async fn watch(
    upstream: std::sync::Arc<super::Upstream>,
    stop: tokio_util::sync::CancellationToken,
) {
    let health = &upstream.health;
    let interval = health.config.interval;
    let mut next_check = interval.map(|i| Instant::now() + i);
    loop {
        let wake = match (health.probe_due(), next_check) {
            (Some(due), _) => Some(due),
            (None, check) => check,
        };
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = health.opened.notified() => continue,
            _ = sleep => {}
        }
        if let Some(due) = health.probe_due() {
            if Instant::now() < due {
                continue;
            }
            health.probing();
            let up = upstream.check().await;
            health.probed(up);
            if up {
                tracing::warn!(alert = "upstream_restored", upstream = %upstream.config.name, "the half-open probe answered: the upstream takes traffic again");
            } else {
                tracing::warn!(upstream = %upstream.config.name, rest = ?health.config.eject_for, "the half-open probe failed: the upstream stays ejected");
            }
            continue;
        }
        if let Some(i) = interval {
            next_check = Some(Instant::now() + i);
            if upstream.check().await {
                health.success();
            } else if health.failure() {
                upstream.ejected("its health check failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(after: u32) -> Health {
        Health::new(HealthConfig {
            eject_after: after,
            eject_for: Duration::from_secs(60),
            ..HealthConfig::default()
        })
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_streak() {
        let h = health(3);
        assert!(!h.failure());
        assert!(!h.failure());
        h.success();
        assert!(!h.failure());
        assert!(!h.failure());
        assert!(h.available());
        assert!(h.failure(), "the third in a row ejects");
        assert!(!h.available());
        assert!(!h.failure(), "an open breaker is not opened twice");
        h.probing();
        assert_eq!(h.breaker(), Breaker::HalfOpen);
        assert!(!h.available(), "half-open takes no traffic");
        h.probed(false);
        assert!(matches!(h.breaker(), Breaker::Open { .. }));
        h.probed(true);
        assert!(h.available());
        assert!(!h.failure(), "the streak starts again after the probe");
    }

    #[test]
    fn histograms_are_cumulative() {
        let hist = Histogram::default();
        hist.observe(Duration::from_millis(10));
        hist.observe(Duration::from_millis(300));
        hist.observe(Duration::from_secs(1000));
        let mut out = String::new();
        hist.render(&mut out, "x", "upstream=\"a\"");
        assert!(
            out.contains("x_bucket{upstream=\"a\",le=\"0.025\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{upstream=\"a\",le=\"0.5\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{upstream=\"a\",le=\"300\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{upstream=\"a\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_count{upstream=\"a\"} 3\n"), "{out}");
    }
}
