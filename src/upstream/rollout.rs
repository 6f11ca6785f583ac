//! Canary rollouts at run time: the weights a canary's percent gives its
//! two upstreams, the outcomes it judges, its automatic verdicts (a tick a
//! second), the operator's advance/hold/rollback, and its state kept in the
//! store — so it survives a restart, and replicas on one Redis share it (a
//! replica adopts a newer state another wrote; each judges on its own
//! sample).
//!
//! The decisions themselves are [`super::canary`]'s, pure.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Upstream;
use super::canary::{Canary, Outcome as Verdict, Persisted, Side, Transition};
use crate::config::CanarySpec;
use crate::metrics::Counter;
use crate::store::SharedStore;

/// How often verdicts are asked for (and a shared state looked at) at
/// least; an outcome asks for one sooner, at most every [`SETTLE`].
pub const TICK: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_millis(50);

/// What the store keeps: the state and a version that orders writes.
#[derive(Serialize, Deserialize)]
struct Kept {
    version: u64,
    state: Persisted,
}

/// One canary between two upstreams of a group.
pub struct Rollout {
    pub from: Arc<Upstream>,
    pub to: Arc<Upstream>,
    inner: Mutex<Inner>,
    /// Woken by each outcome: a verdict may be due.
    wake: tokio::sync::Notify,
    /// Phase changes by kind: advanced, held, rolled back, completed.
    pub advanced: Counter,
    pub held: Counter,
    pub rolled_back: Counter,
    pub completed: Counter,
}

struct Inner {
    canary: Canary,
    /// The version of the state this replica holds (0: never stored).
    version: u64,
}

impl Rollout {
    pub fn new(spec: CanarySpec, from: Arc<Upstream>, to: Arc<Upstream>, now: u64) -> Rollout {
        let rollout = Rollout {
            from,
            to,
            inner: Mutex::new(Inner {
                canary: Canary::new(spec, now),
                version: 0,
            }),
            wake: tokio::sync::Notify::new(),
            advanced: Counter::default(),
            held: Counter::default(),
            rolled_back: Counter::default(),
            completed: Counter::default(),
        };
        rollout.apply();
        rollout
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store key of its state.
    fn key(&self) -> String {
        format!("canary-{}", hex::encode(self.to.config.name.as_bytes()))
    }

    pub fn percent(&self) -> f64 {
        self.lock().canary.percent()
    }

    /// Give the two upstreams the canary's split of their weights (both
    /// weights together; 100 when both are 0).
    fn apply(&self) {
        let percent = self.percent();
        let total = f64::from(self.from.config.weight + self.to.config.weight);
        let total = if total > 0.0 { total } else { 100.0 };
        self.to.set_weight(Some(total * percent / 100.0));
        self.from
            .set_weight(Some(total * (100.0 - percent) / 100.0));
    }

    /// Count one request's outcome, if `upstream` is one of its sides.
    pub fn record(&self, upstream: &Upstream, verdict: Verdict) {
        let side = if std::ptr::eq(upstream, &*self.to) {
            Side::To
        } else if std::ptr::eq(upstream, &*self.from) {
            Side::From
        } else {
            return;
        };
        self.lock().canary.record(side, verdict);
        self.wake.notify_one();
    }

    pub fn snapshot(&self) -> Value {
        self.lock().canary.snapshot()
    }

    /// Log, count and apply a transition, and keep the new state.
    async fn changed(&self, store: &SharedStore, t: &Transition, by: &str) {
        let (kept, key) = {
            let mut inner = self.lock();
            inner.version += 1;
            (
                Kept {
                    version: inner.version,
                    state: inner.canary.persisted(),
                },
                self.key(),
            )
        };
        let state = t.state.as_str();
        match state {
            "rolled_back" => self.rolled_back.inc(),
            "complete" => self.completed.inc(),
            "held" => self.held.inc(),
            _ => self.advanced.inc(),
        }
        tracing::warn!(
            alert = "canary",
            from = %self.from.config.name,
            to = %self.to.config.name,
            from_percent = t.from_percent,
            to_percent = t.to_percent,
            state,
            by,
            "canary {}: {}% → {}% ({state}): {}",
            self.to.config.name,
            t.from_percent,
            t.to_percent,
            t.reason
        );
        self.apply();
        match serde_json::to_string(&kept) {
            Ok(text) => {
                if let Err(e) = store.put_meta(&key, &text).await {
                    tracing::error!(error = %e, canary = %self.to.config.name, "cannot keep the canary's state; a restart starts it again");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode the canary's state"),
        }
    }

    /// Adopt the state in the store when it is newer than ours (at start,
    /// and on every tick when replicas share the store).
    pub async fn adopt(&self, store: &SharedStore) {
        let text = match store.get_meta(&self.key()).await {
            Ok(Some(text)) => text,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, canary = %self.to.config.name, "cannot read the canary's state");
                return;
            }
        };
        let Ok(kept) = serde_json::from_str::<Kept>(&text) else {
            tracing::warn!(canary = %self.to.config.name, "the canary's stored state is unreadable; keeping ours");
            return;
        };
        {
            let mut inner = self.lock();
            if kept.version <= inner.version {
                return;
            }
            let spec = inner.canary.spec().clone();
            inner.canary = Canary::restore(spec, &kept.state);
            inner.version = kept.version;
        }
        self.apply();
    }

    /// The automatic verdict, if one is due.
    pub async fn tick(&self, store: &SharedStore, now: u64) {
        if store.shared() {
            self.adopt(store).await;
        }
        let t = self.lock().canary.tick(now);
        if let Some(t) = t {
            self.changed(store, &t, "automatic").await;
        }
    }

    /// An operator's `advance`, `hold` or `rollback`: the new snapshot, or
    /// why it cannot be done.
    pub async fn operate(
        &self,
        store: &SharedStore,
        action: &str,
        now: u64,
    ) -> Result<Value, OperateError> {
        if store.shared() {
            self.adopt(store).await;
        }
        let done = {
            let mut inner = self.lock();
            match action {
                "advance" => inner.canary.advance(now),
                "hold" => inner.canary.hold(now),
                "rollback" => inner.canary.rollback(now),
                other => return Err(OperateError::UnknownAction(other.to_owned())),
            }
        };
        let t = done.map_err(OperateError::Refused)?;
        self.changed(store, &t, "operator").await;
        Ok(self.snapshot())
    }
}

/// Why an operator's request was not carried out.
#[derive(Debug)]
pub enum OperateError {
    UnknownAction(String),
    /// The canary's state does not allow it (e.g. advance when complete).
    Refused(String),
}

/// Every rollout's ticks until `stop`.
pub async fn run(
    rollouts: Vec<Arc<Rollout>>,
    store: SharedStore,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let woken =
            futures_util::future::select_all(rollouts.iter().map(|r| Box::pin(r.wake.notified())));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
            _ = woken => {}
        }
        let now = crate::stream::now_ms();
        for r in &rollouts {
            r.tick(&store, now).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SETTLE) => {}
        }
    }
}

/// The canaries' series for `/metrics`.
pub fn render(out: &mut String, rollouts: &[Arc<Rollout>]) {
    use std::fmt::Write;
    if rollouts.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP tidegate_canary_percent The share of its group's traffic a canary's upstream gets now.\n# TYPE tidegate_canary_percent gauge"
    );
    for r in rollouts {
        let _ = writeln!(
            out,
            "tidegate_canary_percent{{to=\"{}\"}} {}",
            r.to.config.name,
            r.percent()
        );
    }
    let _ = writeln!(
        out,
        "# HELP tidegate_canary_transitions_total Canary phase changes: advanced, held, rolled_back, completed.\n# TYPE tidegate_canary_transitions_total counter"
    );
    for r in rollouts {
        for (kind, c) in [
            ("advanced", &r.advanced),
            ("held", &r.held),
            ("rolled_back", &r.rolled_back),
            ("completed", &r.completed),
        ] {
            let _ = writeln!(
                out,
                "tidegate_canary_transitions_total{{to=\"{}\",kind=\"{kind}\"}} {}",
                r.to.config.name,
                c.get()
            );
        }
    }
}
