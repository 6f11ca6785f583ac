//! The drain: from SIGTERM (or `POST /admin/drain`) to a clean exit, with
//! every stream ending on purpose.
//!
//! One [`Drain`] lives in the app state. It owns the phase every handler
//! reads, the root token every stream's token is a child of, and the
//! `TaskTracker` every background task is spawned on, so nothing escapes
//! the drain. [`Drain::timeline`] walks the phases of DESIGN.md:
//!
//! ```text
//! signal ─▶ Draining (ready 503, still accepting) ─ pre_stop_delay ─▶
//! Refusing (new streams 503) ─ grace (from the signal) or idle ─▶
//! Deadline (streams get `server_restarting`, upstreams dropped, listener
//! closed) ─ exit_timeout ─▶ exit 0
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::DrainConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Readiness is 503; new streams are still accepted while load
    /// balancers notice.
    Draining,
    /// New streams are refused with 503; active ones go on.
    Refusing,
    /// The hard deadline passed: every stream has been told to resume.
    Deadline,
}

pub struct Drain {
    phase: watch::Sender<Phase>,
    /// Cancelled by the first signal or `/admin/drain`.
    requested: CancellationToken,
    /// Cancelled by a second signal: skip to the deadline.
    hurry: CancellationToken,
    /// Signals received: only a second *signal* hurries the drain (an
    /// `/admin/drain` before the kubelet's SIGTERM must not).
    signals: AtomicUsize,
    /// A deadline earlier than `start + grace`, from `/admin/drain` (a
    /// spot-preemption notice with less time left than the grace).
    sooner: watch::Sender<Option<Instant>>,
    /// The parent of every stream's token: cancelled at the deadline.
    pub streams: CancellationToken,
    /// Cancelled when the listener should close (after the deadline).
    pub close_listener: CancellationToken,
    /// Every background task; waited for before exit.
    pub tracker: TaskTracker,
    /// Non-streaming requests in flight (streams are counted by the registry).
    in_flight: AtomicUsize,
    started_at: Mutex<Option<Instant>>,
    /// Streams running when the timeline began, for `/metrics`.
    active_at_signal: AtomicUsize,
}

/// What the drain did, for the final log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct DrainReport {
    pub active_at_signal: usize,
    pub aborted_at_deadline: usize,
    pub hurried: bool,
    pub idle_early: bool,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain {
            phase: watch::Sender::new(Phase::Serving),
            requested: CancellationToken::new(),
            hurry: CancellationToken::new(),
            signals: AtomicUsize::new(0),
            sooner: watch::Sender::new(None),
            streams: CancellationToken::new(),
            close_listener: CancellationToken::new(),
            tracker: TaskTracker::new(),
            in_flight: AtomicUsize::new(0),
            started_at: Mutex::new(None),
            active_at_signal: AtomicUsize::new(0),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn ready(&self) -> bool {
        self.phase() == Phase::Serving
    }

    /// Whether new streams (and resumes that start a new upstream call) are
    /// accepted.
    pub fn accepting(&self) -> bool {
        self.phase() <= Phase::Draining
    }

    /// A signal: the first starts the drain (or joins one `/admin/drain`
    /// started), the second skips to the deadline.
    pub fn signal(&self, why: &str) {
        if self.signals.fetch_add(1, Ordering::AcqRel) >= 1 {
            tracing::warn!(trigger = why, "second signal: skipping to the deadline");
            self.hurry.cancel();
            return;
        }
        self.begin(why, None);
    }

    /// Start the drain, to end by `by` at the latest (never later than the
    /// configured grace allows). Idempotent: a drain under way keeps the
    /// earlier of its deadline and `by`. Returns whether it started now.
    pub fn begin(&self, why: &str, by: Option<Instant>) -> bool {
        if let Some(by) = by {
            self.sooner.send_if_modified(|sooner| match sooner {
                Some(at) if *at <= by => false,
                _ => {
                    *sooner = Some(by);
                    true
                }
            });
        }
        let Ok(mut at) = self.started_at.lock() else {
            return false;
        };
        if at.is_some() {
            tracing::info!(trigger = why, "drain already under way");
            return false;
        }
        *at = Some(Instant::now());
        drop(at);
        tracing::info!(trigger = why, "drain requested");
        self.requested.cancel();
        true
    }

    /// When the deadline falls, once the drain has started.
    pub fn deadline(&self, grace: Duration) -> Option<Instant> {
        let started = (*self.started_at.lock().ok()?)?;
        let configured = started + grace;
        Some(match *self.sooner.borrow() {
            Some(sooner) => sooner.min(configured),
            None => configured,
        })
    }

    pub fn requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    pub fn elapsed(&self) -> Duration {
        self.started_at
            .lock()
            .ok()
            .and_then(|at| at.map(|t| t.elapsed()))
            .unwrap_or_default()
    }

    /// The drain's series for `/metrics`: how long it has run (alert when
    /// it passes 60 s) and its streams, running at the signal and still.
    pub fn render(&self, out: &mut String, running: usize) {
        use std::fmt::Write;
        let draining = self.requested();
        let _ = writeln!(
            out,
            "# HELP tidegate_drain_seconds Seconds since the drain began (0 while serving).\n# TYPE tidegate_drain_seconds gauge\ntidegate_drain_seconds {:.3}",
            self.elapsed().as_secs_f64()
        );
        let _ = writeln!(
            out,
            "# HELP tidegate_drain_streams The drain's streams: running when it began, and running still (at the deadline they are told to resume: tidegate_streams_aborted_total{{type=\"server_restarting\"}}).\n# TYPE tidegate_drain_streams gauge\ntidegate_drain_streams{{state=\"at_signal\"}} {}\ntidegate_drain_streams{{state=\"running\"}} {}",
            self.active_at_signal.load(Ordering::Relaxed),
            if draining { running } else { 0 }
        );
    }

    /// Count a non-streaming request for as long as the guard lives.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self)
    }

    /// SIGTERM and SIGINT: the first starts the drain, the second hurries
    /// it. Ends when the listener closes. `signals`: from
    /// [`install_signals`], called before anything slow at start-up.
    pub async fn listen_for_signals(&self, signals: Option<Signals>) {
        #[cfg(unix)]
        {
            let Some(Signals { mut term, mut int }) = signals else {
                tracing::error!(
                    "cannot install signal handlers; only /admin/drain can start a drain"
                );
                return;
            };
            loop {
                tokio::select! {
                    // Kubernetes, systemd and most supervisors stop with SIGTERM.
                    _ = term.recv() => self.signal("SIGTERM"),
                    // Ctrl-C in a terminal.
                    _ = int.recv() => self.signal("SIGINT"),
                    _ = self.close_listener.cancelled() => return,
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = signals;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => self.signal("ctrl-c"),
                _ = self.close_listener.cancelled() => {}
            }
        }
    }

    /// Walk the timeline once the drain is requested. `active` counts the
    /// streams running now. Returns when the deadline has passed and the
    /// listener has been told to close.
    pub async fn timeline(&self, config: DrainConfig, active: impl Fn() -> usize) -> DrainReport {
        self.requested.cancelled().await;
        let start = Instant::now();
        let mut report = DrainReport {
            active_at_signal: active(),
            ..Default::default()
        };
        self.active_at_signal
            .store(report.active_at_signal, Ordering::Relaxed);
        self.phase.send_replace(Phase::Draining);
        tracing::info!(
            active_streams = report.active_at_signal,
            pre_stop_delay = ?config.pre_stop_delay,
            grace = ?config.grace,
            "drain: readiness is 503; still accepting during pre_stop_delay"
        );

        let mut sooner = self.sooner.subscribe();
        let deadline_now = |sooner: &watch::Receiver<Option<Instant>>| {
            let configured = start + config.grace;
            sooner.borrow().map_or(configured, |s| s.min(configured))
        };
        loop {
            // pre_stop_delay, cut short by a sooner deadline.
            let until = (start + config.pre_stop_delay).min(deadline_now(&sooner));
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = self.hurry.cancelled() => { report.hurried = true; break }
                _ = sooner.changed() => {}
            }
        }
        self.phase.send_replace(Phase::Refusing);
        tracing::info!(
            active_streams = active(),
            "drain: refusing new streams; active streams go on"
        );

        let mut tick = tokio::time::interval(Duration::from_millis(25));
        loop {
            if report.hurried {
                break;
            }
            let deadline = deadline_now(&sooner);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = sooner.changed() => {}
                _ = self.hurry.cancelled() => { report.hurried = true; break }
                _ = tick.tick() => {
                    if active() == 0 && self.in_flight.load(Ordering::Acquire) == 0 {
                        report.idle_early = true;
                        break;
                    }
                }
            }
        }
        report.aborted_at_deadline = active();
        self.phase.send_replace(Phase::Deadline);
        tracing::info!(
            finished_during_grace = report.active_at_signal.saturating_sub(report.aborted_at_deadline),
            aborting = report.aborted_at_deadline,
            early = report.idle_early,
            hurried = report.hurried,
            after = ?start.elapsed(),
            "drain: deadline; remaining streams get server_restarting and their upstreams are dropped"
        );
        self.streams.cancel();
        self.close_listener.cancel();
        report
    }
}

/// The signal streams, installed before anything slow at start-up so a
/// SIGTERM in the first milliseconds drains instead of killing.
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

/// Hold SIGTERM and SIGINT back (blocked, so they wait instead of killing
/// the process) until [`install_signals`] has handlers for them. Called
/// first thing in `main`, before the runtime's threads exist (they
/// inherit the mask and keep it: the main thread, which unblocks them,
/// takes the signals).
pub fn hold_signals() {
    #[cfg(unix)]
    // SAFETY: the set is initialised by sigemptyset before use; the calls
    // only change this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Install the handlers for SIGTERM and SIGINT, then let held signals in
/// (on this thread: call it on the thread that runs `block_on`).
pub fn install_signals() -> Option<Signals> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let installed = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some(Signals { term, int }),
            _ => None,
        };
        // SAFETY: as in `hold_signals`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        installed
    }
    #[cfg(not(unix))]
    {
        Some(Signals {})
    }
}

pub struct InFlight<'a>(&'a Drain);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn config() -> DrainConfig {
        DrainConfig {
            pre_stop_delay: Duration::from_secs(2),
            grace: Duration::from_secs(10),
            exit_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn phases_follow_the_timeline() {
        let drain = Arc::new(Drain::new());
        let active = Arc::new(AtomicUsize::new(3));
        let (d, a) = (drain.clone(), active.clone());
        let run = TaskTracker::new().spawn(async move {
            d.timeline(config(), move || a.load(Ordering::Relaxed))
                .await
        });
        assert!(drain.ready());
        drain.begin("test", None);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(drain.phase(), Phase::Draining);
        assert!(drain.accepting());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(drain.phase(), Phase::Refusing);
        assert!(!drain.accepting());
        assert!(!drain.streams.is_cancelled());
        tokio::time::sleep(Duration::from_secs(8)).await;
        let report = run.await.unwrap();
        assert!(drain.streams.is_cancelled());
        assert_eq!(report.aborted_at_deadline, 3);
        assert!(!report.idle_early);
    }

    #[tokio::test(start_paused = true)]
    async fn an_admin_drain_then_a_signal_does_not_hurry() {
        let drain = Arc::new(Drain::new());
        let d = drain.clone();
        let started = Instant::now();
        let run = TaskTracker::new().spawn(async move { d.timeline(config(), || 5).await });
        assert!(drain.begin("POST /admin/drain", None));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!drain.begin("POST /admin/drain", None), "idempotent");
        drain.signal("SIGTERM");
        let report = run.await.unwrap();
        assert!(!report.hurried);
        assert_eq!(started.elapsed(), Duration::from_secs(10), "the full grace");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sooner_deadline_only_shortens_and_the_earlier_one_wins() {
        let drain = Arc::new(Drain::new());
        let d = drain.clone();
        let started = Instant::now();
        let run = TaskTracker::new().spawn(async move { d.timeline(config(), || 5).await });
        // Longer than the grace: the grace holds.
        drain.begin("admin", Some(started + Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            drain.deadline(Duration::from_secs(10)),
            Some(started + Duration::from_secs(10))
        );
        // A notice with 3 s left: the deadline moves up.
        drain.begin("admin", Some(started + Duration::from_secs(4)));
        // A later notice does not move it back.
        drain.begin("admin", Some(started + Duration::from_secs(8)));
        let report = run.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(4));
        assert_eq!(report.aborted_at_deadline, 5);
        // The pre-stop delay is cut short too.
        let drain = Arc::new(Drain::new());
        let d = drain.clone();
        let started = Instant::now();
        let run = TaskTracker::new().spawn(async move { d.timeline(config(), || 5).await });
        drain.begin("admin", Some(started + Duration::from_secs(1)));
        run.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn ends_early_when_idle_and_hurries_on_second_signal() {
        let drain = Arc::new(Drain::new());
        let d = drain.clone();
        let run = TaskTracker::new().spawn(async move { d.timeline(config(), || 0).await });
        drain.begin("test", None);
        let report = run.await.unwrap();
        assert!(report.idle_early);

        let drain = Arc::new(Drain::new());
        let d = drain.clone();
        let started = Instant::now();
        let run = TaskTracker::new().spawn(async move { d.timeline(config(), || 5).await });
        drain.signal("first");
        tokio::time::sleep(Duration::from_millis(100)).await;
        drain.signal("second");
        let report = run.await.unwrap();
        assert!(report.hurried);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
