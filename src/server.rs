//! Start-up and shutdown: build the state, serve until the drain's deadline,
//! then close the listener, wait for bodies and tasks within
//! `drain.exit_timeout`, flush the store, and return.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::config::{Config, LimitsConfig, Scheduler, UpstreamConfig};
use crate::drain::Drain;
use crate::relay::{Relay, Settings};
use crate::store::{self, StoreError};
use crate::stream::AbortKind;
use crate::token::{TokenSigner, hash_hex, random_string};
use crate::upstream::{BuildError, Upstream, Upstreams};
use crate::workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("upstream `{name}`: {source}")]
    Client {
        name: String,
        #[source]
        source: BuildError,
    },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("telemetry: {0}")]
    Telemetry(String),
}

/// Options that are not configuration: how this process is run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Serve the demo chat page at `/`.
    pub ui: bool,
}

/// Serve on `listener` until a drain completes. Returns when it is time to
/// exit 0.
pub async fn run(
    listener: TcpListener,
    mut config: Config,
    options: RunOptions,
) -> Result<(), ServeError> {
    // Before anything slow (opening the store): a SIGTERM from here on
    // drains rather than kills.
    let signals = crate::drain::install_signals();
    let drain = Arc::new(Drain::new());
    let store = store::open(&config.store).await?;

    if config.builtin_mock {
        let mock_listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = mock_listener.local_addr()?;
        tracing::warn!(
            "NO UPSTREAM CONFIGURED and OPENAI_API_KEY is not set: routing every model to the built-in mock provider at http://{address}/v1 (answers are made-up words). Configure [[upstreams]] or set OPENAI_API_KEY for real answers."
        );
        config
            .upstreams
            .push(UpstreamConfig::builtin_mock(format!("http://{address}/v1")));
        config
            .upstreams
            .push(UpstreamConfig::builtin_mock_responses(format!(
                "http://{address}/v1"
            )));
        let stop = drain.close_listener.clone();
        drain.tracker.spawn(async move {
            crate::mock::serve(
                mock_listener,
                crate::mock::router(None),
                stop.cancelled_owned(),
            )
            .await;
        });
    }

    let mut upstreams = Vec::new();
    for u in &config.upstreams {
        let upstream = Upstream::new(u.clone()).map_err(|source| ServeError::Client {
            name: u.name.clone(),
            source,
        })?;
        upstreams.push(Arc::new(upstream));
    }
    let secret = match (&config.resume.secret, store.local_secret()) {
        (Some(secret), _) => secret.0.clone().into_bytes(),
        (None, Some(local)) => local,
        (None, None) => {
            tracing::info!(
                "no resume secret configured: resume tokens are valid for this process only"
            );
            random_string(32).into_bytes()
        }
    };
    let key_hashes = config.auth_keys.as_ref().map(|keys| {
        keys.iter()
            .map(|k| hash_hex(k.0.as_bytes()))
            .collect::<HashSet<_>>()
    });
    let settings = Settings {
        heartbeat: config.streams.heartbeat,
        on_client_disconnect: config.streams.on_client_disconnect,
        retry_hint: config.resume.retry_hint,
        limits: config.limits,
        keyed: config.auth_keys.is_some(),
        routing: config.routing,
    };
    let traces = crate::trace::Tracing::start(&config.telemetry, tokio::runtime::Handle::current())
        .map_err(ServeError::Telemetry)?;
    let mut relay = Relay::new(
        store.clone(),
        Upstreams::with_canaries(upstreams, &config.canaries),
        TokenSigner::new(secret),
        drain.clone(),
        settings,
        random_string(9),
    );
    relay.tracing = traces.clone();
    let relay = Arc::new(relay);
    log_startup(&config, &listener, store.name());
    let workers = match config.scheduler {
        Scheduler::ThreadPerCore => {
            let threads = config.worker_threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            Some(Arc::new(Workers::start(threads)?))
        }
        Scheduler::WorkStealing => None,
    };
    let drain_config = config.drain;
    let limits = config.limits;
    let lease_every = config.store.lease_ttl / 3;
    let state = Arc::new(AppState {
        config,
        relay: relay.clone(),
        drain: drain.clone(),
        key_hashes,
        ui: options.ui,
    });

    {
        let drain = drain.clone();
        drain
            .tracker
            .clone()
            .spawn(async move { drain.listen_for_signals(signals).await });
    }
    drain.tracker.spawn(sweep(store.clone(), drain.clone()));
    drain
        .tracker
        .spawn(crate::relay::background::run(relay.clone()));
    // A canary resumes the phase it was in (kept in the store).
    for rollout in relay.upstreams.rollouts() {
        rollout.adopt(&store).await;
    }
    if !relay.upstreams.rollouts().is_empty() {
        drain.tracker.spawn(crate::upstream::rollout::run(
            relay.upstreams.rollouts().to_vec(),
            store.clone(),
            drain.close_listener.clone(),
        ));
    }
    // Every upstream: its half-open probe once ejected, and its active
    // checks when it has any (an idle watcher costs nothing).
    for upstream in relay.upstreams.all() {
        drain.tracker.spawn(crate::upstream::health::watch(
            upstream.clone(),
            drain.close_listener.clone(),
        ));
    }
    if store.shared() {
        drain
            .tracker
            .spawn(keep_leases(relay.clone(), drain.clone(), lease_every));
    }

    let max_connections = connection_cap(limits.max_connections);
    let serve = serve(
        listener,
        api::app(state),
        drain.clone(),
        limits,
        max_connections,
        workers,
    );
    tokio::pin!(serve);
    let aborted_before = relay.metrics.aborted(AbortKind::ServerRestarting);
    let report = tokio::select! {
        result = &mut serve => {
            // `serve` returns once the listener is closed, which only the
            // timeline does; this branch is for completeness.
            result?;
            return Ok(());
        }
        report = drain.timeline(drain_config, || relay.registry.len()) => report,
    };
    let deadline = Instant::now();
    let exit_by = deadline + drain_config.exit_timeout;
    // The store's last sync must not wait behind a client that stopped
    // reading: connections and tasks get the exit budget minus this share,
    // the flush gets the rest.
    let flush_from = exit_by - drain_config.exit_timeout / 3;

    // Bodies end by themselves at the deadline; the listener is closed.
    let connections_closed = timeout_at(flush_from, &mut serve).await.is_ok();
    let closed_after = deadline.elapsed();
    drain.tracker.close();
    let tasks_done = timeout_at(flush_from, drain.tracker.wait()).await.is_ok();
    let tasks_after = deadline.elapsed();
    let flushed = match timeout_at(exit_by, store.flush()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "store flush failed at exit");
            false
        }
        Err(_) => false,
    };
    // The last spans, in what is left of the exit budget.
    let traces_exported = match traces {
        Some(traces) => {
            let within = exit_by.saturating_duration_since(Instant::now());
            let export = tokio::task::spawn_blocking(move || traces.shutdown(within));
            matches!(timeout_at(exit_by, export).await, Ok(Ok(true)))
        }
        None => true,
    };
    let dropped = relay.metrics.aborted(AbortKind::ServerRestarting) - aborted_before;
    tracing::info!(
        active_at_signal = report.active_at_signal,
        finished_during_grace = report.active_at_signal.saturating_sub(report.aborted_at_deadline),
        aborted_at_deadline = report.aborted_at_deadline,
        upstreams_dropped = dropped,
        connections_closed,
        connections_closed_after = ?closed_after,
        tasks_done,
        tasks_done_after = ?tasks_after,
        store_flushed = flushed,
        traces_exported,
        since_signal = ?drain.elapsed(),
        exit_after_deadline = ?deadline.elapsed(),
        "drain complete; exiting"
    );
    Ok(())
}

fn log_startup(config: &Config, listener: &TcpListener, store: &str) {
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    for u in &config.upstreams {
        tracing::info!(
            upstream = %u.name,
            protocol = u.protocol.as_str(),
            base_url = %u.base_url,
            models = ?u.models,
            continuation = %crate::config::styles_text(&u.continuation),
            credential = if u.api_key.is_some() { "from api_key_env" } else { "client's own (passed through)" },
            "upstream"
        );
    }
    if config.auth_keys.is_none() {
        if config.listen.ip().is_loopback() {
            tracing::info!(
                "no client keys ([auth] keys_env): the gateway is open to anyone who can reach {address}"
            );
        } else {
            tracing::warn!(
                "NO CLIENT KEYS on a non-loopback address ({address}): anyone who reaches it can spend your provider credit; set [auth] keys_env"
            );
        }
    }
    for warning in crate::config::warnings(config) {
        tracing::warn!("{warning}");
    }
    tracing::info!(%address, store, grace = ?config.drain.grace, "tidegate serving");
}

/// Spawns hyper's connection tasks (HTTP/2 streams) on the drain's tracker.
#[derive(Clone)]
struct Tracked(TaskTracker);

impl<F> hyper::rt::Executor<F> for Tracked
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// The configured connection cap, lowered to half the open-file limit: the
/// other half is for provider connections and the store's files, so that
/// `accept` never fails for want of a descriptor.
fn connection_cap(configured: usize) -> usize {
    let files = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let cap = usize::try_from(files / 2).unwrap_or(usize::MAX).max(16);
    if configured > cap {
        tracing::warn!(
            configured,
            open_file_limit = files,
            using = cap,
            "limits.max_connections is above half the open-file limit; using half of it"
        );
        cap
    } else {
        configured
    }
}

/// How many refusals (503 to a connection over the cap) may be written at
/// once; beyond that a connection over the cap is closed unanswered.
const MAX_REFUSING: usize = 256;

/// Accept connections until the listener must close, then shut the open
/// ones down gracefully (each finishes its request; bodies end by
/// themselves at the drain deadline) and return once they are closed.
///
/// Each connection must send its first bytes and then its whole request
/// head within `header_read_timeout`, and a write that makes no progress
/// for `write_timeout` closes it. At most `max_connections` are open;
/// one more is answered 503 with `Retry-After` and closed, so the
/// process never runs out of descriptors and `/healthz/live` answers as
/// soon as a slot frees. An `accept` error backs off instead of spinning.
async fn serve(
    listener: TcpListener,
    router: Router,
    drain: Arc<Drain>,
    limits: LimitsConfig,
    max_connections: usize,
    workers: Option<Arc<Workers>>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(Tracked(drain.tracker.clone()));
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(limits.write_timeout);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let close = drain.close_listener.clone();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = close.cancelled() => break,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: wait for some to free up.
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = close.cancelled() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        crate::net::no_delay(&mut stream);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                drain.tracker.spawn(async move {
                    refuse(stream).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let builder = builder.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let close = close.clone();
        let serve_one = async move |stream: TcpStream| {
            let _slot = slot;
            let spoke = tokio::select! {
                spoke = crate::net::wait_for_preface(&stream, limits.header_read_timeout) => spoke,
                _ = close.cancelled() => false,
            };
            if !spoke {
                return;
            }
            let io = TokioIo::new(crate::net::WriteTimeout::new(stream, limits.write_timeout));
            let connection = builder.serve_connection(io, service).into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        };
        let Some(workers) = &workers else {
            drain.tracker.spawn(serve_one(stream));
            continue;
        };
        // Registered again with the worker's reactor, on its thread.
        match stream.into_std() {
            Ok(socket) => {
                let tracker = drain.tracker.clone();
                workers.spawn(move |counted| {
                    tracker.spawn(async move {
                        let _counted = counted;
                        match TcpStream::from_std(socket) {
                            Ok(stream) => serve_one(stream).await,
                            Err(e) => {
                                tracing::debug!(error = %e, "cannot hand a connection to a worker")
                            }
                        }
                    });
                });
            }
            Err(e) => tracing::debug!(error = %e, "cannot hand a connection to a worker"),
        }
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// `accept` errors that concern one connection only (it was reset before
/// we took it): take the next one at once.
fn is_per_connection(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::Interrupted
    )
}

/// Answer a connection over the cap: a liveness probe (`GET
/// /healthz/live`) still gets its 200, anything else 503 with
/// `Retry-After`; then the connection is closed. The request is read
/// (a little, briefly) first, so the close does not reset the connection
/// before the client reads the answer.
async fn refuse(mut stream: TcpStream) {
    const LIVE: &str = r#"{"status":"live"}"#;
    const BUSY: &str = r#"{"error":{"message":"too many open connections; retry shortly","type":"server_overloaded","code":"too_many_connections"}}"#;
    let exchange = async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        let read_head = async {
            while head.len() < 4096 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), read_head).await;
        let live =
            head.starts_with(b"GET /healthz/live ") || head.starts_with(b"GET /healthz/live?");
        let (status, body, retry) = if live {
            ("200 OK", LIVE, "")
        } else {
            ("503 Service Unavailable", BUSY, "retry-after: 1\r\n")
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{retry}connection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut buf).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), exchange).await;
}

/// Delete expired records every so often, until the listener closes.
async fn sweep(store: store::SharedStore, drain: Arc<Drain>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = drain.close_listener.cancelled() => return,
        }
        match store.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(expired = n, "swept expired streams"),
            Err(e) => tracing::warn!(error = %e, "store sweep failed"),
        }
    }
}

/// Shared stores: renew this replica's leases, and honour `DELETE`s that
/// reached another replica.
async fn keep_leases(relay: Arc<Relay>, drain: Arc<Drain>, every: Duration) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = drain.close_listener.cancelled() => return,
        }
        let ids = relay.registry.ids();
        if let Err(e) = relay.store.renew_leases(&ids, &relay.instance).await {
            tracing::warn!(error = %e, "lease renewal failed");
        }
        match relay.store.cancel_requested(&ids).await {
            Ok(cancelled) => {
                for id in cancelled {
                    if let Some(live) = relay.registry.get(&id) {
                        live.cancel(AbortKind::Cancelled);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cancel check failed"),
        }
    }
}
