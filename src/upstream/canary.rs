//! A canary rollout's decisions, pure: phases of rising percent, judged on
//! the requests of the current phase, advanced when a phase held long
//! enough on a big enough sample, rolled back the moment the sample shows a
//! threshold crossed. No clock is read here: `now` is wall-clock
//! milliseconds, passed in (the state is kept and shared by replicas).
//!
//! Figures are per phase and reset at every change. A side keeps counts and
//! the latest [`SAMPLES`] times to first token and stream durations, for
//! p99s (of a bounded sample: the most recent requests).

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::CanarySpec;

/// Times kept per side for its p99s.
pub const SAMPLES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Advancing,
    Held,
    RolledBack,
    Complete,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Advancing => "advancing",
            State::Held => "held",
            State::RolledBack => "rolled_back",
            State::Complete => "complete",
        }
    }

    fn parse(text: &str) -> State {
        match text {
            "held" => State::Held,
            "rolled_back" => State::RolledBack,
            "complete" => State::Complete,
            _ => State::Advancing,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    From,
    To,
}

/// How one request went, as a canary counts it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The provider finished the answer.
    Success { ttft: Duration, duration: Duration },
    /// The provider failed (before or after its first byte).
    Error { ttft: Option<Duration> },
    /// The client left, or the request was refused for itself: no verdict.
    Neutral,
}

/// A phase change: what the gateway logs as an alert and counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from_percent: f64,
    pub to_percent: f64,
    pub state: State,
    pub reason: String,
}

/// What is kept in the store (figures are not: a restart starts the
/// phase's sample again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub phase: usize,
    pub state: String,
    pub phase_started_ms: u64,
}

/// One side's figures in the current phase.
#[derive(Debug, Default, Clone)]
struct Figures {
    successes: u64,
    errors: u64,
    ttfts: VecDeque<Duration>,
    durations: VecDeque<Duration>,
}

fn keep(samples: &mut VecDeque<Duration>, d: Duration) {
    if samples.len() == SAMPLES {
        samples.pop_front();
    }
    samples.push_back(d);
}

/// The 99th percentile (nearest rank) of `samples`.
fn p99(samples: &VecDeque<Duration>) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted: Vec<Duration> = samples.iter().copied().collect();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64) * 0.99).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

impl Figures {
    fn requests(&self) -> u64 {
        self.successes + self.errors
    }

    fn rate(&self, n: u64) -> Option<f64> {
        let all = self.requests();
        (all > 0).then(|| n as f64 * 100.0 / all as f64)
    }

    fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Success { ttft, duration } => {
                self.successes += 1;
                keep(&mut self.ttfts, ttft);
                keep(&mut self.durations, duration);
            }
            Outcome::Error { ttft } => {
                self.errors += 1;
                if let Some(t) = ttft {
                    keep(&mut self.ttfts, t);
                }
            }
            Outcome::Neutral => {}
        }
    }

    fn json(&self) -> Value {
        let round = |v: f64| (v * 10.0).round() / 10.0;
        let ms = |d: Option<Duration>| d.map(|d| round(d.as_secs_f64() * 1000.0));
        json!({
            "requests": self.requests(),
            "success_rate": self.rate(self.successes).map(round),
            "error_rate": self.rate(self.errors).map(round),
            "ttft_p99_ms": ms(p99(&self.ttfts)),
            "duration_p99_ms": ms(p99(&self.durations)),
        })
    }
}

pub struct Canary {
    spec: CanarySpec,
    phase: usize,
    state: State,
    phase_started_ms: u64,
    from: Figures,
    to: Figures,
}

impl Canary {
    pub fn new(spec: CanarySpec, now: u64) -> Canary {
        Canary {
            spec,
            phase: 0,
            state: State::Advancing,
            phase_started_ms: now,
            from: Figures::default(),
            to: Figures::default(),
        }
    }

    pub fn spec(&self) -> &CanarySpec {
        &self.spec
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The share of the group's traffic `to` gets now.
    pub fn percent(&self) -> f64 {
        match self.state {
            State::RolledBack => 0.0,
            State::Complete => 100.0,
            _ => self.spec.phases.get(self.phase).copied().unwrap_or(100.0),
        }
    }

    pub fn record(&mut self, side: Side, outcome: Outcome) {
        match side {
            Side::From => self.from.record(outcome),
            Side::To => self.to.record(outcome),
        }
    }

    /// Move to `phase` in `state`, starting its figures afresh.
    fn go(&mut self, phase: usize, state: State, now: u64, reason: String) -> Transition {
        let from_percent = self.percent();
        self.phase = phase;
        self.state = state;
        self.phase_started_ms = now;
        self.from = Figures::default();
        self.to = Figures::default();
        Transition {
            from_percent,
            to_percent: self.percent(),
            state,
            reason,
        }
    }

    /// The first threshold the `to` side's sample crosses, as alert text.
    fn crossed(&self) -> Option<String> {
        let f = &self.to;
        let n = f.requests();
        let s = &self.spec;
        if let Some(rate) = f.rate(f.successes)
            && rate < s.min_success_rate
        {
            return Some(format!(
                "success rate {rate:.1}% over {n} requests fell under min_success_rate {}%",
                s.min_success_rate
            ));
        }
        if let Some(rate) = f.rate(f.errors)
            && rate > s.max_error_rate
        {
            return Some(format!(
                "error rate {rate:.1}% over {n} requests passed max_error_rate {}%",
                s.max_error_rate
            ));
        }
        for (what, key, limit, samples) in [
            (
                "time to first token",
                "max_ttft_p99",
                s.max_ttft_p99,
                &f.ttfts,
            ),
            (
                "stream duration",
                "max_duration_p99",
                s.max_duration_p99,
                &f.durations,
            ),
        ] {
            if let (Some(limit), Some(p)) = (limit, p99(samples))
                && p > limit
            {
                return Some(format!(
                    "{what} p99 {p:?} over {n} requests passed {key} {limit:?}"
                ));
            }
        }
        None
    }

    /// The automatic verdict: roll back on a crossed threshold, advance a
    /// phase that held, once `to` has `min_requests` in the phase. Only an
    /// advancing canary moves by itself.
    pub fn tick(&mut self, now: u64) -> Option<Transition> {
        if self.state != State::Advancing || self.to.requests() < self.spec.min_requests {
            return None;
        }
        if let Some(why) = self.crossed() {
            return Some(self.go(self.phase, State::RolledBack, now, why));
        }
        let held_for = now.saturating_sub(self.phase_started_ms);
        if held_for < self.spec.hold.as_millis() as u64 {
            return None;
        }
        let n = self.to.requests();
        let why = format!(
            "the phase held {} over {n} requests within every threshold",
            humantime::format_duration(Duration::from_millis(held_for))
        );
        Some(self.next(now, why))
    }

    /// The next phase, or complete after the last.
    fn next(&mut self, now: u64, why: String) -> Transition {
        if self.phase + 1 >= self.spec.phases.len() {
            self.go(self.phase, State::Complete, now, why)
        } else {
            self.go(self.phase + 1, State::Advancing, now, why)
        }
    }

    /// An operator's advance: the next phase (a held canary goes on, a
    /// rolled-back one starts again at the first phase).
    pub fn advance(&mut self, now: u64) -> Result<Transition, String> {
        match self.state {
            State::Complete => Err("the canary is complete: there is no next phase".into()),
            State::RolledBack => Ok(self.go(
                0,
                State::Advancing,
                now,
                "an operator restarted the rolled-back canary".into(),
            )),
            State::Advancing | State::Held => Ok(self.next(now, "an operator advanced it".into())),
        }
    }

    /// An operator's hold: no automatic move, at the current percent.
    pub fn hold(&mut self, now: u64) -> Result<Transition, String> {
        if self.state != State::Advancing {
            return Err(format!(
                "the canary is {}: only an advancing one can be held",
                self.state.as_str()
            ));
        }
        Ok(self.go(self.phase, State::Held, now, "an operator held it".into()))
    }

    /// An operator's rollback: percent 0.
    pub fn rollback(&mut self, now: u64) -> Result<Transition, String> {
        if self.state == State::RolledBack {
            return Err("the canary is rolled back already".into());
        }
        Ok(self.go(
            self.phase,
            State::RolledBack,
            now,
            "an operator rolled it back".into(),
        ))
    }

    /// The `GET /admin/canary` object.
    pub fn snapshot(&self) -> Value {
        let mut sides = serde_json::Map::new();
        sides.insert(self.spec.from.clone(), self.from.json());
        sides.insert(self.spec.to.clone(), self.to.json());
        json!({
            "from": self.spec.from,
            "to": self.spec.to,
            "percent": self.percent(),
            "state": self.state.as_str(),
            "phase": self.phase,
            "phase_started_ms": self.phase_started_ms,
            "sides": sides,
        })
    }

    pub fn persisted(&self) -> Persisted {
        Persisted {
            phase: self.phase,
            state: self.state.as_str().into(),
            phase_started_ms: self.phase_started_ms,
        }
    }

    /// From a kept state; a phase the spec no longer has is clamped to
    /// its last, an unknown state reads as advancing.
    pub fn restore(spec: CanarySpec, p: &Persisted) -> Canary {
        let last = spec.phases.len().saturating_sub(1);
        Canary {
            phase: p.phase.min(last),
            state: State::parse(&p.state),
            phase_started_ms: p.phase_started_ms,
            spec,
            from: Figures::default(),
            to: Figures::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CanarySpec {
        CanarySpec {
            from: "legacy".into(),
            to: "next".into(),
            phases: vec![1.0, 5.0, 25.0, 50.0, 100.0],
            hold: Duration::from_secs(60),
            min_requests: 100,
            min_success_rate: 98.0,
            max_error_rate: 2.0,
            max_ttft_p99: Some(Duration::from_millis(500)),
            max_duration_p99: None,
        }
    }

    fn ok(ms: u64) -> Outcome {
        Outcome::Success {
            ttft: Duration::from_millis(ms),
            duration: Duration::from_millis(ms * 10),
        }
    }

    #[test]
    fn a_healthy_canary_advances_through_every_phase_and_completes() {
        let mut c = Canary::new(spec(), 0);
        let mut now = 0;
        let mut seen = vec![c.percent()];
        while c.state() != State::Complete {
            for _ in 0..100 {
                c.record(Side::To, ok(100));
                c.record(Side::From, ok(100));
            }
            assert_eq!(c.tick(now + 59_999), None, "not before the hold");
            now += 60_000;
            let t = c.tick(now).expect("advances");
            assert!(t.reason.contains("held"), "{}", t.reason);
            seen.push(c.percent());
        }
        assert_eq!(seen, [1.0, 5.0, 25.0, 50.0, 100.0, 100.0]);
        assert_eq!(c.tick(now + 1_000_000), None, "complete is final");
    }

    #[test]
    fn ten_percent_failures_roll_back_once_the_sample_is_there_and_not_before() {
        let mut c = Canary::new(spec(), 0);
        for i in 0..99 {
            c.record(
                Side::To,
                if i % 10 == 0 {
                    Outcome::Error { ttft: None }
                } else {
                    ok(10)
                },
            );
            assert_eq!(c.tick(10), None, "no verdict under min_requests");
        }
        c.record(Side::To, ok(10));
        let t = c.tick(10).expect("rolled back");
        assert_eq!(t.state, State::RolledBack);
        assert_eq!((t.from_percent, t.to_percent), (1.0, 0.0));
        assert!(t.reason.contains("success rate 90.0%"), "{}", t.reason);
        assert_eq!(c.percent(), 0.0);
        assert_eq!(c.tick(1_000_000), None, "rolled back is final");
    }

    #[test]
    fn a_slow_first_token_rolls_back_and_neutral_outcomes_count_for_nothing() {
        let mut c = Canary::new(spec(), 0);
        for i in 0..100 {
            c.record(Side::To, Outcome::Neutral);
            c.record(Side::To, ok(if i < 98 { 100 } else { 900 }));
        }
        let t = c.tick(1).expect("rolled back");
        assert!(t.reason.contains("time to first token p99"), "{}", t.reason);
    }

    #[test]
    fn a_small_sample_never_advances_however_long_it_holds() {
        let mut c = Canary::new(spec(), 0);
        for _ in 0..99 {
            c.record(Side::To, ok(1));
        }
        assert_eq!(c.tick(u64::MAX / 2), None);
        assert_eq!(c.percent(), 1.0);
    }

    #[test]
    fn operators_advance_hold_and_roll_back() {
        let mut c = Canary::new(spec(), 0);
        assert_eq!(c.advance(1).unwrap().to_percent, 5.0);
        assert_eq!(c.hold(2).unwrap().state, State::Held);
        assert!(c.hold(3).is_err());
        for _ in 0..200 {
            c.record(Side::To, ok(1));
        }
        assert_eq!(c.tick(u64::MAX / 2), None, "held: no automatic move");
        let t = c.advance(4).unwrap();
        assert_eq!((t.to_percent, t.state), (25.0, State::Advancing));
        assert_eq!(c.rollback(5).unwrap().to_percent, 0.0);
        assert!(c.rollback(6).is_err());
        let t = c.advance(7).unwrap();
        assert_eq!((t.to_percent, t.state), (1.0, State::Advancing));
        for _ in 0..5 {
            c.advance(8).unwrap();
        }
        assert_eq!(c.state(), State::Complete);
        assert!(c.advance(9).is_err());
    }

    #[test]
    fn the_kept_state_restores_and_is_clamped_to_the_spec() {
        let mut c = Canary::new(spec(), 0);
        c.advance(10).unwrap();
        c.hold(20).unwrap();
        let kept = c.persisted();
        let text = serde_json::to_string(&kept).unwrap();
        let back: Persisted = serde_json::from_str(&text).unwrap();
        let r = Canary::restore(spec(), &back);
        assert_eq!((r.percent(), r.state()), (5.0, State::Held));
        let mut short = spec();
        short.phases = vec![50.0];
        let p = Persisted {
            phase: 4,
            state: "nonsense".into(),
            phase_started_ms: 0,
        };
        let r = Canary::restore(short, &p);
        assert_eq!((r.percent(), r.state()), (50.0, State::Advancing));
    }

    #[test]
    fn the_snapshot_has_no_nan_and_the_samples_stay_bounded() {
        let mut c = Canary::new(spec(), 0);
        let empty = c.snapshot();
        assert_eq!(empty["sides"]["next"]["requests"], 0);
        assert!(empty["sides"]["next"]["success_rate"].is_null());
        assert!(empty["sides"]["legacy"]["ttft_p99_ms"].is_null());
        for i in 0..100_000u64 {
            c.record(Side::To, ok(i % 7));
        }
        assert_eq!(c.to.ttfts.len(), SAMPLES);
        assert_eq!(c.to.durations.len(), SAMPLES);
        let s = c.snapshot();
        assert_eq!(s["sides"]["next"]["requests"], 100_000);
        assert_eq!(s["sides"]["next"]["success_rate"], 100.0);
        assert_eq!(s["state"], "advancing");
        assert_eq!(s["percent"], 1.0);
    }
}
