//! Start-up and shutdown: build the state, serve until the drain's deadline,
//! then close the listener, wait for bodies and tasks within
//! `drain.exit_timeout`, flush the store, and return.

use std::collections::HashSet;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout_at};

use crate::api::{self, AppState};
use crate::config::{Config, UpstreamConfig};
use crate::drain::Drain;
use crate::relay::{Relay, Settings};
use crate::store::{self, StoreError};
use crate::stream::AbortKind;
use crate::token::{TokenSigner, hash_hex, random_string};
use crate::upstream::{BuildError, Upstream, Upstreams};

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
    };
    let relay = Arc::new(Relay::new(
        store.clone(),
        Upstreams::new(upstreams),
        TokenSigner::new(secret),
        drain.clone(),
        settings,
        random_string(9),
    ));
    log_startup(&config, &listener, store.name());
    let drain_config = config.drain;
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
            .spawn(async move { drain.listen_for_signals().await });
    }
    drain.tracker.spawn(sweep(store.clone(), drain.clone()));
    if store.shared() {
        drain
            .tracker
            .spawn(keep_leases(relay.clone(), drain.clone(), lease_every));
    }

    // Rule: serve `into_make_service`, so each connection gets a clone of
    // the router (a reference count), not a rebuilt route table
    // (benches/OPTIMISATIONS.md, "held streams").
    let serve = axum::serve(
        listener.tap_io(crate::net::no_delay),
        api::app(state).into_make_service(),
    )
    .with_graceful_shutdown(drain.close_listener.clone().cancelled_owned())
    .into_future();
    tokio::pin!(serve);
    let aborted_before = relay.metrics.aborted(AbortKind::ServerRestarting);
    let report = tokio::select! {
        result = &mut serve => {
            // axum::serve only returns on a listener error before a drain.
            result?;
            return Ok(());
        }
        report = drain.timeline(drain_config, || relay.registry.len()) => report,
    };
    let deadline = Instant::now();
    let exit_by = deadline + drain_config.exit_timeout;

    // Bodies end by themselves at the deadline; the listener is closed.
    let connections_closed = timeout_at(exit_by, &mut serve).await.is_ok();
    let closed_after = deadline.elapsed();
    drain.tracker.close();
    let tasks_done = timeout_at(exit_by, drain.tracker.wait()).await.is_ok();
    let tasks_after = deadline.elapsed();
    let flushed = match timeout_at(exit_by, store.flush()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "store flush failed at exit");
            false
        }
        Err(_) => false,
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
