//! Counters behind `GET /metrics`, in Prometheus' text format.
//!
//! A handful of atomics rendered by hand: the exporter crates would bring a
//! registry and an HTTP server we do not need for this many series.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::stream::{AbortKind, End};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Metrics {
    pub streams_started: Counter,
    pub streams_completed: Counter,
    aborted: [Counter; AbortKind::ALL.len()],
    pub events_relayed: Counter,
    pub upstream_requests: Counter,
    pub upstream_errors: Counter,
    pub store_errors: Counter,
    pub resumes: Counter,
    pub continuations: Counter,
    pub continuation_fallbacks: Counter,
    /// Interrupted streams re-attached to the provider's background response.
    pub reattaches: Counter,
    /// Streams moved to another upstream mid-answer.
    pub failovers: Counter,
    pub rejected_draining: Counter,
    pub non_streaming: Counter,
}

impl Metrics {
    pub fn stream_ended(&self, end: End) {
        match end {
            End::Done => self.streams_completed.inc(),
            End::Abort(kind) => {
                if let Some(i) = AbortKind::ALL.iter().position(|k| *k == kind) {
                    self.aborted[i].inc();
                }
            }
        }
    }

    pub fn aborted(&self, kind: AbortKind) -> u64 {
        AbortKind::ALL
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.aborted[i].get())
    }

    pub fn render(&self, active_streams: usize, draining: bool) -> String {
        let mut out = String::with_capacity(2048);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "tidegate_streams_started_total",
            "Streams started (first runs).",
            self.streams_started.get(),
        );
        counter(
            "tidegate_streams_completed_total",
            "Runs that finished with the provider's end.",
            self.streams_completed.get(),
        );
        counter(
            "tidegate_events_relayed_total",
            "Events written ahead to the store and relayed.",
            self.events_relayed.get(),
        );
        counter(
            "tidegate_upstream_requests_total",
            "Requests sent to providers (first runs and continuations).",
            self.upstream_requests.get(),
        );
        counter(
            "tidegate_upstream_errors_total",
            "Provider failures before or during a stream.",
            self.upstream_errors.get(),
        );
        counter(
            "tidegate_store_errors_total",
            "Failed store writes.",
            self.store_errors.get(),
        );
        counter(
            "tidegate_resumes_total",
            "Resume requests served.",
            self.resumes.get(),
        );
        counter(
            "tidegate_continuations_total",
            "Continuation calls started for interrupted streams.",
            self.continuations.get(),
        );
        counter(
            "tidegate_continuation_fallbacks_total",
            "Continuations retried in the next style after the provider refused one with a 400.",
            self.continuation_fallbacks.get(),
        );
        counter(
            "tidegate_reattaches_total",
            "Interrupted streams re-attached to their provider's own background response (no token generated again).",
            self.reattaches.get(),
        );
        counter(
            "tidegate_failovers_total",
            "Streams moved to another upstream of their group after their provider failed mid-answer.",
            self.failovers.get(),
        );
        counter(
            "tidegate_rejected_draining_total",
            "Requests refused with 503 while draining.",
            self.rejected_draining.get(),
        );
        counter(
            "tidegate_non_streaming_requests_total",
            "Non-streaming requests passed through.",
            self.non_streaming.get(),
        );
        let _ = writeln!(
            out,
            "# HELP tidegate_streams_aborted_total Runs that ended with an in-band abort, by type.\n# TYPE tidegate_streams_aborted_total counter"
        );
        for (i, kind) in AbortKind::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "tidegate_streams_aborted_total{{type=\"{}\"}} {}",
                kind.as_str(),
                self.aborted[i].get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP tidegate_streams_active Streams running in this process.\n# TYPE tidegate_streams_active gauge\ntidegate_streams_active {active_streams}"
        );
        let _ = writeln!(
            out,
            "# HELP tidegate_draining Whether the drain has begun.\n# TYPE tidegate_draining gauge\ntidegate_draining {}",
            u8::from(draining)
        );
        out
    }
}
