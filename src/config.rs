//! Configuration: the TOML file, its `TIDEGATE_*` environment overrides, and
//! the validated [`Config`] the rest of the gateway reads.
//!
//! Loading happens in two stages. The raw structs mirror the file exactly and
//! reject unknown keys; [`Config::from_raw`] turns them into validated values
//! (durations parsed, secrets resolved from the environment, globs checked),
//! so no other module ever sees a string where it needs a `Duration`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::protocol::{Continuation, Protocol};

/// Where environment variables come from. Tests pass a `HashMap`; the binary
/// passes the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned().filter(|v| !v.is_empty())
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("environment variable {var} is not set (needed by `{key}`)")]
    MissingSecret { var: String, key: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------
// Stage one: the file as written.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
    worker_threads: Option<u64>,
    #[serde(default)]
    drain: RawDrain,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    resume: RawResume,
    #[serde(default)]
    streams: RawStreams,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    pre_stop_delay: Option<String>,
    grace: Option<String>,
    exit_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<String>,
    path: Option<String>,
    url: Option<String>,
    ttl: Option<String>,
    commit_interval: Option<String>,
    lease_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResume {
    secret_env: Option<String>,
    retry_hint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreams {
    heartbeat: Option<String>,
    on_client_disconnect: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    keys_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    protocol: Option<String>,
    base_url: String,
    api_key_env: Option<String>,
    models: Option<Vec<String>>,
    continuation: Option<String>,
    connect_timeout: Option<String>,
    first_byte_timeout: Option<String>,
    idle_timeout: Option<String>,
    http2: Option<bool>,
}

// ---------------------------------------------------------------------------
// Stage two: validated values.
// ---------------------------------------------------------------------------

/// The validated configuration every module reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Requests with a larger body are refused with 413 before parsing.
    pub max_body_bytes: usize,
    /// Runtime worker threads; `None` means one per CPU.
    pub worker_threads: Option<usize>,
    pub drain: DrainConfig,
    pub store: StoreConfig,
    pub resume: ResumeConfig,
    pub streams: StreamsConfig,
    /// Client API keys; `None` means the gateway is open.
    pub auth_keys: Option<Vec<String>>,
    /// The token guarding `/admin/*`; `None` disables the admin routes.
    pub admin_token: Option<String>,
    pub upstreams: Vec<UpstreamConfig>,
    /// Set when no upstream was configured and the built-in mock must be
    /// started in-process (the zero-config demo).
    pub builtin_mock: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainConfig {
    pub pre_stop_delay: Duration,
    pub grace: Duration,
    pub exit_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Embedded { path: PathBuf },
    Redis { url: String },
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub ttl: Duration,
    /// How long the embedded store's group commit may wait to gather more
    /// events into one write. Zero: write as soon as the writer is free.
    pub commit_interval: Duration,
    /// How long a replica's claim on a stream lives without renewal (redis).
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct ResumeConfig {
    /// The secret resume tokens are signed with, when configured.
    pub secret: Option<Vec<u8>>,
    pub secret_env: Option<String>,
    /// The `retry:` hint on resume streams: long enough to land after a restart.
    pub retry_hint: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectPolicy {
    /// Drop the upstream request as soon as the last client is gone.
    Cancel,
    /// Keep generating into the store this long so a reconnecting client
    /// resumes without a continuation call.
    Grace(Duration),
}

#[derive(Debug, Clone, Copy)]
pub struct StreamsConfig {
    pub heartbeat: Duration,
    pub on_client_disconnect: DisconnectPolicy,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub protocol: Protocol,
    /// Without a trailing slash, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    pub api_key_env: Option<String>,
    /// The resolved credential. Never logged: `Debug` is implemented by hand
    /// on [`Secret`].
    pub api_key: Option<Secret>,
    pub models: Vec<String>,
    pub continuation: Continuation,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    /// Speak HTTP/2 to the provider (prior knowledge on http://, required
    /// on https://): every stream multiplexed on a few connections.
    pub http2: bool,
}

impl UpstreamConfig {
    /// The built-in mock provider of the zero-config demo, at `base_url`.
    pub fn builtin_mock(base_url: String) -> UpstreamConfig {
        UpstreamConfig {
            name: "builtin-mock".into(),
            protocol: Protocol::OpenAi,
            base_url,
            api_key_env: None,
            api_key: None,
            models: vec!["*".into()],
            continuation: Continuation::ContinueFinalMessage,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            http2: false,
        }
    }
}

/// A string that never shows itself in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./tidegate-data";

/// Top-level keys an environment override may name. Variables such as
/// `TIDEGATE_API_KEYS` or `TIDEGATE_RESUME_SECRET` hold secrets, not config,
/// so only names whose first segment is listed here are read as overrides.
const SECTIONS: &[&str] = &[
    "listen",
    "max_body_bytes",
    "worker_threads",
    "drain",
    "store",
    "resume",
    "streams",
    "auth",
    "admin",
    "upstreams",
];

impl Config {
    /// Read the file (when given), apply environment overrides, validate.
    pub fn load(path: Option<&std::path::Path>, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Config::from_toml(&text, env)
    }

    pub fn from_toml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env_overrides(&mut value, env)?;
        let raw: RawConfig = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        Config::from_raw(raw, env)
    }

    fn from_raw(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
        let listen_text = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::invalid(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8080"),
            )
        })?;

        let drain = DrainConfig {
            pre_stop_delay: duration("drain.pre_stop_delay", raw.drain.pre_stop_delay, "0s")?,
            grace: duration("drain.grace", raw.drain.grace, "25s")?,
            exit_timeout: duration("drain.exit_timeout", raw.drain.exit_timeout, "3s")?,
        };
        if drain.pre_stop_delay > drain.grace {
            return Err(ConfigError::invalid(
                "drain.pre_stop_delay",
                "must not be longer than drain.grace (the deadline counts from the signal)",
            ));
        }
        if drain.exit_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "drain.exit_timeout",
                "must be more than 0s",
            ));
        }

        let kind = match raw.store.kind.as_deref().unwrap_or("embedded") {
            "memory" => StoreKind::Memory,
            "embedded" => StoreKind::Embedded {
                path: PathBuf::from(
                    raw.store
                        .path
                        .unwrap_or_else(|| DEFAULT_DATA_DIR.to_owned()),
                ),
            },
            "redis" => {
                let url = raw.store.url.ok_or_else(|| {
                    ConfigError::invalid("store.url", "required with store.kind = \"redis\"")
                })?;
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(ConfigError::invalid(
                        "store.url",
                        "must start with redis:// or rediss://",
                    ));
                }
                StoreKind::Redis { url }
            }
            other => {
                return Err(ConfigError::invalid(
                    "store.kind",
                    format!("`{other}` is not one of memory, embedded, redis"),
                ));
            }
        };
        let store = StoreConfig {
            kind,
            ttl: duration("store.ttl", raw.store.ttl, "15m")?,
            commit_interval: duration("store.commit_interval", raw.store.commit_interval, "0ms")?,
            lease_ttl: duration("store.lease_ttl", raw.store.lease_ttl, "5s")?,
        };
        if store.ttl.is_zero() {
            return Err(ConfigError::invalid("store.ttl", "must be more than 0s"));
        }
        if store.lease_ttl < Duration::from_millis(500) {
            return Err(ConfigError::invalid(
                "store.lease_ttl",
                "must be at least 500ms",
            ));
        }

        let secret = match &raw.resume.secret_env {
            Some(var) => Some(
                env.var(var)
                    .ok_or_else(|| ConfigError::MissingSecret {
                        var: var.clone(),
                        key: "resume.secret_env".into(),
                    })?
                    .into_bytes(),
            ),
            None => None,
        };
        if matches!(store.kind, StoreKind::Redis { .. }) && secret.is_none() {
            return Err(ConfigError::invalid(
                "resume.secret_env",
                "a shared store needs a shared resume secret: set resume.secret_env to the name of an environment variable holding it",
            ));
        }
        let resume = ResumeConfig {
            secret,
            secret_env: raw.resume.secret_env,
            retry_hint: duration("resume.retry_hint", raw.resume.retry_hint, "2s")?,
        };

        let on_client_disconnect = match raw.streams.on_client_disconnect.as_deref() {
            None | Some("cancel") => DisconnectPolicy::Cancel,
            Some(text) => DisconnectPolicy::Grace(
                parse_duration("streams.on_client_disconnect", text).map_err(|_| {
                    ConfigError::invalid(
                        "streams.on_client_disconnect",
                        format!("`{text}` is neither \"cancel\" nor a duration like \"10s\""),
                    )
                })?,
            ),
        };
        let streams = StreamsConfig {
            heartbeat: duration("streams.heartbeat", raw.streams.heartbeat, "15s")?,
            on_client_disconnect,
        };
        if streams.heartbeat.is_zero() {
            return Err(ConfigError::invalid(
                "streams.heartbeat",
                "must be more than 0s",
            ));
        }

        let auth_keys = match &raw.auth.keys_env {
            Some(var) => {
                let keys: Vec<String> = env
                    .var(var)
                    .ok_or_else(|| ConfigError::MissingSecret {
                        var: var.clone(),
                        key: "auth.keys_env".into(),
                    })?
                    .split(',')
                    .map(|k| k.trim().to_owned())
                    .filter(|k| !k.is_empty())
                    .collect();
                if keys.is_empty() {
                    return Err(ConfigError::invalid(
                        "auth.keys_env",
                        format!("{var} holds no key"),
                    ));
                }
                Some(keys)
            }
            None => None,
        };
        let admin_token = match &raw.admin.token_env {
            Some(var) => Some(env.var(var).ok_or_else(|| ConfigError::MissingSecret {
                var: var.clone(),
                key: "admin.token_env".into(),
            })?),
            None => None,
        };

        let mut upstreams = Vec::new();
        for (index, raw) in raw.upstreams.into_iter().enumerate() {
            upstreams.push(upstream(index, raw, env)?);
        }
        if upstreams.is_empty()
            && let Some(key) = env.var("OPENAI_API_KEY")
        {
            upstreams.push(UpstreamConfig {
                name: "openai".into(),
                protocol: Protocol::OpenAi,
                base_url: "https://api.openai.com/v1".into(),
                api_key_env: Some("OPENAI_API_KEY".into()),
                api_key: Some(Secret(key)),
                models: vec!["*".into()],
                continuation: Continuation::None,
                connect_timeout: Duration::from_secs(10),
                first_byte_timeout: Duration::from_secs(120),
                idle_timeout: Duration::from_secs(120),
                http2: false,
            });
        }
        let builtin_mock = upstreams.is_empty();
        let worker_threads = match raw.worker_threads {
            None => None,
            Some(n @ 1..=1024) => Some(n as usize),
            Some(_) => {
                return Err(ConfigError::invalid(
                    "worker_threads",
                    "must be from 1 to 1024 (leave it out for one per CPU)",
                ));
            }
        };

        Ok(Config {
            listen,
            max_body_bytes: raw.max_body_bytes.unwrap_or(4 * 1024 * 1024) as usize,
            worker_threads,
            drain,
            store,
            resume,
            streams,
            auth_keys,
            admin_token,
            upstreams,
            builtin_mock,
        })
    }

    /// The shutdown budget a supervisor must allow: from the signal to the
    /// last possible exit, plus a margin for the runtime to tear down.
    pub fn stop_budget(&self) -> Duration {
        self.drain.grace + self.drain.exit_timeout + Duration::from_secs(2)
    }
}

fn upstream(index: usize, raw: RawUpstream, env: &dyn Env) -> Result<UpstreamConfig, ConfigError> {
    let key = |field: &str| format!("upstreams[{index}].{field}");
    if raw.name.is_empty() {
        return Err(ConfigError::invalid(key("name"), "must not be empty"));
    }
    let protocol = match raw.protocol.as_deref().unwrap_or("openai") {
        "openai" => Protocol::OpenAi,
        "anthropic" => Protocol::Anthropic,
        other => {
            return Err(ConfigError::invalid(
                key("protocol"),
                format!("`{other}` is not one of openai, anthropic"),
            ));
        }
    };
    let base_url = raw.base_url.trim_end_matches('/').to_owned();
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err(ConfigError::invalid(
            key("base_url"),
            "must start with http:// or https://",
        ));
    }
    if let Err(e) = reqwest::Url::parse(&base_url) {
        return Err(ConfigError::invalid(
            key("base_url"),
            format!("is not a valid URL: {e}"),
        ));
    }
    let api_key = match &raw.api_key_env {
        Some(var) => Some(Secret(env.var(var).ok_or_else(|| {
            ConfigError::MissingSecret {
                var: var.clone(),
                key: key("api_key_env"),
            }
        })?)),
        None => None,
    };
    let models = raw.models.unwrap_or_else(|| vec!["*".into()]);
    if models.is_empty() {
        return Err(ConfigError::invalid(key("models"), "lists no model glob"));
    }
    let continuation = match raw.continuation.as_deref().unwrap_or("none") {
        "continue_final_message" => Continuation::ContinueFinalMessage,
        "prefix" => Continuation::Prefix,
        "assistant_prefix" => Continuation::AssistantPrefix,
        "none" => Continuation::None,
        other => {
            return Err(ConfigError::invalid(
                key("continuation"),
                format!(
                    "`{other}` is not one of continue_final_message, prefix, assistant_prefix, none"
                ),
            ));
        }
    };
    Ok(UpstreamConfig {
        connect_timeout: duration(&key("connect_timeout"), raw.connect_timeout, "5s")?,
        first_byte_timeout: duration(&key("first_byte_timeout"), raw.first_byte_timeout, "60s")?,
        idle_timeout: duration(&key("idle_timeout"), raw.idle_timeout, "60s")?,
        http2: raw.http2.unwrap_or(false),
        name: raw.name,
        protocol,
        base_url,
        api_key_env: raw.api_key_env,
        api_key,
        models,
        continuation,
    })
}

fn duration(key: &str, value: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    parse_duration(key, value.as_deref().unwrap_or(default))
}

fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("`{text}` is not a duration like \"250ms\" or \"25s\": {e}"),
        )
    })
}

/// Apply `TIDEGATE_SECTION__KEY=value` variables onto the parsed file.
/// A value is read as TOML when it parses as one (numbers, booleans, arrays)
/// and as a plain string otherwise (`20s`, `127.0.0.1:8080`).
fn apply_env_overrides(root: &mut toml::Table, env: &dyn Env) -> Result<(), ConfigError> {
    let mut vars = env.vars();
    vars.sort();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("TIDEGATE_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if !SECTIONS.contains(&path[0].as_str()) {
            if path.len() > 1 {
                return Err(ConfigError::invalid(
                    name.as_str(),
                    format!(
                        "`{}` is not a config section (one of {})",
                        path[0],
                        SECTIONS.join(", ")
                    ),
                ));
            }
            continue; // a secret such as TIDEGATE_API_KEYS, not an override
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        set_path(root, &path, parsed)
            .map_err(|message| ConfigError::invalid(name.as_str(), message))?;
    }
    Ok(())
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (head, rest) = path.split_first().ok_or("empty override path")?;
    if rest.is_empty() {
        table.insert(head.clone(), value);
        return Ok(());
    }
    let child = table
        .entry(head.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match child {
        toml::Value::Table(t) => set_path(t, rest, value),
        toml::Value::Array(items) => {
            let index: usize = rest[0].parse().map_err(|_| {
                format!(
                    "`{}` is a list: name an index, e.g. {}__0__…",
                    head,
                    head.to_uppercase()
                )
            })?;
            let item = items
                .get_mut(index)
                .ok_or_else(|| format!("`{head}` has no entry {index}"))?;
            match item {
                toml::Value::Table(t) if rest.len() > 1 => set_path(t, &rest[1..], value),
                _ => Err(format!("cannot override `{head}[{index}]` as a whole")),
            }
        }
        _ => Err(format!("`{head}` is not a section")),
    }
}

/// Text for `check-config` and the start-up log: the drain timeline and the
/// supervisor settings it needs.
pub fn describe_timeline(drain: &DrainConfig, stop_budget: Duration) -> String {
    let fmt = |d: Duration| humantime::format_duration(d).to_string();
    let accept_until = drain.pre_stop_delay;
    let mut out = String::new();
    out.push_str("drain timeline (from SIGTERM/SIGINT or POST /admin/drain):\n");
    out.push_str("  t=0s            readiness /healthz/ready answers 503; liveness stays 200\n");
    out.push_str(&format!(
        "  t=0s..{:<9} new streams still accepted (drain.pre_stop_delay) while load balancers notice\n",
        fmt(accept_until)
    ));
    out.push_str(&format!(
        "  t={:<13} new streams refused: 503 + Retry-After + Connection: close; active streams go on\n",
        fmt(accept_until)
    ));
    out.push_str(&format!(
        "  t={:<13} hard deadline (drain.grace): remaining streams persisted, sent `server_restarting`, upstreams dropped, listener closed\n",
        fmt(drain.grace)
    ));
    out.push_str(&format!(
        "  t<={:<12} process exits 0 (deadline + drain.exit_timeout)\n",
        fmt(drain.grace + drain.exit_timeout)
    ));
    let secs = stop_budget.as_secs_f64().ceil() as u64;
    out.push_str(&format!(
        "supervisor settings this needs: Kubernetes terminationGracePeriodSeconds >= {secs} (plus any preStop sleep); systemd TimeoutStopSec >= {secs}s\n"
    ));
    out
}

/// Settings that are legal but likely a mistake in production.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if config.drain.grace < Duration::from_secs(5) {
        out.push(format!(
            "drain.grace is {}: most answers will be cut at a deploy; 20s–60s is typical",
            humantime::format_duration(config.drain.grace)
        ));
    }
    if config.stop_budget() > Duration::from_secs(30) {
        out.push(format!(
            "the drain needs {}s, more than Kubernetes' default terminationGracePeriodSeconds (30): set it explicitly",
            config.stop_budget().as_secs_f64().ceil()
        ));
    }
    if config.auth_keys.is_none() && !config.listen.ip().is_loopback() {
        out.push(format!(
            "listening on {} without client keys ([auth] keys_env): anyone who reaches it can spend your provider credit",
            config.listen
        ));
    }
    if matches!(config.store.kind, StoreKind::Memory) {
        out.push(
            "store.kind = \"memory\": interrupted answers cannot be resumed after a restart".into(),
        );
    }
    for u in &config.upstreams {
        if u.continuation == Continuation::None {
            out.push(format!(
                "upstream `{}` has continuation = \"none\": a resumed stream replays what was stored, then ends `incomplete`",
                u.name
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_config_gives_documented_defaults() {
        let c = Config::from_toml("", &env(&[])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.drain.grace, Duration::from_secs(25));
        assert_eq!(c.drain.exit_timeout, Duration::from_secs(3));
        assert_eq!(
            c.store.kind,
            StoreKind::Embedded {
                path: "./tidegate-data".into()
            }
        );
        assert!(c.builtin_mock);
    }

    #[test]
    fn openai_key_routes_to_openai() {
        let c = Config::from_toml("", &env(&[("OPENAI_API_KEY", "sk-test")])).unwrap();
        assert!(!c.builtin_mock);
        assert_eq!(c.upstreams[0].base_url, "https://api.openai.com/v1");
        assert_eq!(format!("{:?}", c.upstreams[0].api_key), "Some(<redacted>)");
    }

    #[test]
    fn worker_threads_default_to_one_per_cpu_and_are_bounded() {
        assert_eq!(
            Config::from_toml("", &env(&[])).unwrap().worker_threads,
            None
        );
        let c = Config::from_toml("", &env(&[("TIDEGATE_WORKER_THREADS", "1")])).unwrap();
        assert_eq!(c.worker_threads, Some(1));
        let err = Config::from_toml("worker_threads = 0", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("worker_threads"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[drain]\ngrac = \"1s\"", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("grac"), "{err}");
        let err = Config::from_toml("lisen = \"x\"", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn env_overrides_apply() {
        let file = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1/v1\"\n";
        let c = Config::from_toml(
            file,
            &env(&[
                ("TIDEGATE_DRAIN__GRACE", "20s"),
                ("TIDEGATE_LISTEN", "0.0.0.0:9000"),
                ("TIDEGATE_UPSTREAMS__0__CONTINUATION", "prefix"),
                ("TIDEGATE_API_KEYS", "not-config"),
            ]),
        )
        .unwrap();
        assert_eq!(c.drain.grace, Duration::from_secs(20));
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.upstreams[0].continuation, Continuation::Prefix);
        let err = Config::from_toml("", &env(&[("TIDEGATE_DRAN__GRACE", "1s")])).unwrap_err();
        assert!(err.to_string().contains("TIDEGATE_DRAN__GRACE"), "{err}");
    }

    #[test]
    fn missing_secret_names_the_variable() {
        let file =
            "[[upstreams]]\nname = \"a\"\nbase_url = \"http://x/v1\"\napi_key_env = \"VLLM_KEY\"\n";
        let err = Config::from_toml(file, &env(&[])).unwrap_err();
        assert!(err.to_string().contains("VLLM_KEY"), "{err}");
        let err = Config::from_toml(
            "[store]\nkind=\"redis\"\nurl=\"redis://127.0.0.1\"",
            &env(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("resume.secret_env"), "{err}");
    }

    #[test]
    fn bad_durations_are_explained() {
        let err = Config::from_toml("[drain]\ngrace = \"soon\"", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("drain.grace"), "{err}");
    }
}
