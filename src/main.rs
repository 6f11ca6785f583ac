//! The `tidegate` binary: parse arguments, load config, set up logging, and
//! hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidegate::config::{Config, ProcessEnv};

/// Exit code for a configuration error (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;
/// Exit code for a dependency that is not there (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// mimalloc rather than glibc's malloc: the relay allocates and frees small
/// buffers per event (benches/OPTIMISATIONS.md, "allocator").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tidegate",
    version,
    about = "A streaming SSE gateway for LLM traffic that drains, stores and resumes streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// TOML config file; without one, embedded defaults (see README).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on, overriding the config's `listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Serve the demo chat page at `/`.
        #[arg(long)]
        ui: bool,
    },
    /// Run the deterministic mock provider (OpenAI and Anthropic APIs).
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: String,
        /// Demand this key (`Authorization: Bearer` or `x-api-key`), like a
        /// real provider; read from the environment so it stays out of `ps`.
        #[arg(long, env = "TIDEGATE_MOCK_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Demand the key held in this environment variable instead.
        #[arg(long)]
        api_key_env: Option<String>,
        /// Answer this share (0 to 1) of generation requests with
        /// `--fail-status` before generating (1 in 10 for 0.1, evenly).
        #[arg(long, value_parser = fail_rate)]
        fail_rate: Option<f64>,
        /// The status of those failures (default 503).
        #[arg(long, value_parser = clap::value_parser!(u16).range(400..600))]
        fail_status: Option<u16>,
        /// Wait this long before every response head.
        #[arg(long)]
        latency_ms: Option<u64>,
        /// Cut every streaming answer once it holds this many units.
        #[arg(long)]
        die_after: Option<u64>,
        /// Pace answers by this much when the request does not say.
        #[arg(long)]
        token_interval_ms: Option<u64>,
        /// Answer every request (the models list too) with `--fail-status`.
        #[arg(long)]
        down: bool,
    },
    /// Validate a config, print the effective settings and drain timeline.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // `serve`: a SIGTERM from now on waits for the drain's handler instead
    // of killing the process (server::run installs it first thing). First
    // thing in `main`, so a signal in the first milliseconds of a start
    // still drains; one that comes before `main` runs cannot be held.
    if std::env::args_os().nth(1).is_some_and(|c| c == "serve") {
        tidegate::drain::hold_signals();
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve { config, listen, ui } => serve(config, listen, ui),
        Command::MockUpstream {
            listen,
            api_key,
            api_key_env,
            fail_rate,
            fail_status,
            latency_ms,
            die_after,
            token_interval_ms,
            down,
        } => {
            let faults = tidegate::mock::Faults {
                fail_rate,
                fail_status,
                latency_ms,
                die_after,
                token_interval_ms,
                down,
            };
            match api_key_env {
                None => mock(listen, api_key, faults),
                Some(var) => match std::env::var(&var) {
                    Ok(key) if !key.is_empty() => mock(listen, Some(key), faults),
                    _ => {
                        eprintln!(
                            "tidegate mock-upstream: --api-key-env {var}: the variable is not set"
                        );
                        ExitCode::from(EXIT_CONFIG)
                    }
                },
            }
        }
        Command::CheckConfig { config } => check(config),
    }
}

fn load(path: Option<PathBuf>, listen: Option<String>) -> Result<Config, ExitCode> {
    let mut config = Config::load(path.as_deref(), &ProcessEnv).map_err(|e| {
        eprintln!("tidegate: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    if let Some(listen) = listen {
        config.listen = listen.parse().map_err(|_| {
            eprintln!("tidegate: invalid value for `--listen`: `{listen}` is not an address like 127.0.0.1:8080");
            ExitCode::from(EXIT_CONFIG)
        })?;
    }
    Ok(config)
}

/// `threads`: the runtime's workers (`None`: one per CPU); `Some(0)` for
/// a single-threaded runtime (the gateway's own when its client
/// connections are served by thread-per-core workers).
fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = match threads {
        Some(0) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("tidegate: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

fn serve(path: Option<PathBuf>, listen: Option<String>, ui: bool) -> ExitCode {
    let config = match load(path, listen) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Many concurrent streams need many descriptors: take what we may.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    // Thread per core: this runtime keeps the listener and the drain's
    // timeline; the workers `server::run` starts serve the connections.
    let threads = match config.scheduler {
        tidegate::config::Scheduler::ThreadPerCore => Some(0),
        tidegate::config::Scheduler::WorkStealing => config.worker_threads,
    };
    let runtime = match runtime(threads) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tidegate: cannot listen on {}: {e}", config.listen);
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        if let Ok(address) = listener.local_addr() {
            println!("listening on http://{address}");
        }
        match tidegate::server::run(listener, config, tidegate::server::RunOptions { ui }).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tidegate: {e}");
                ExitCode::from(EXIT_UNAVAILABLE)
            }
        }
    })
}

fn mock(listen: String, api_key: Option<String>, faults: tidegate::mock::Faults) -> ExitCode {
    let runtime = match runtime(None) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tidegate mock-upstream: cannot listen on {listen}: {e}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        if let Ok(address) = listener.local_addr() {
            println!("listening on http://{address}");
            tracing::info!(%address, "mock provider serving /v1/chat/completions, /v1/messages, /v1/responses (+ /{{id}}, /{{id}}/cancel), /mock/stats, /mock/requests");
        }
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let stop = async {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => tokio::select! { _ = term.recv() => {}, _ = stop => {} },
                Err(_) => stop.await,
            }
        };
        tidegate::mock::serve(listener, tidegate::mock::router_with(api_key, faults), stop).await;
        ExitCode::SUCCESS
    })
}

/// `--fail-rate`: a share from 0 to 1.
fn fail_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{text}` is not a share from 0 to 1")),
    }
}

/// `check-config`: load and validate the config, then print what it means.
fn check(path: Option<PathBuf>) -> ExitCode {
    let config = match load(path, None) {
        Ok(c) => c,
        Err(code) => return code,
    };
    print!("{}", tidegate::config::describe(&config));
    ExitCode::SUCCESS
}
