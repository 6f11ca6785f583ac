//! Configuration: the TOML file, its `TIDEGATE_*` environment overrides, and
//! the validated [`Config`] the rest of the gateway reads.
//!
//! Loading happens in two stages. The raw structs mirror the file exactly,
//! reject unknown keys and already hold typed values (enums, durations), so a
//! wrong value is reported with its full key path such as
//! `upstreams[0].protocol`. [`Config::from_raw`] then fills in the defaults,
//! resolves secrets from the environment and checks the rules that span
//! several keys, so no other module ever sees a string where it needs a
//! `Duration`. Every default lives in one block below.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

pub use crate::protocol::{Continuation, Protocol};

/// Where environment variables come from. Tests pass a `HashMap`; the binary
/// passes the process environment.
pub trait Env {
    /// Returns the variable's value, or `None` when it is unset or empty.
    fn var(&self, name: &str) -> Option<String>;
    /// Returns every variable with its value.
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

/// Why a configuration could not be loaded; every variant names the key or
/// the environment variable at fault.
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
    /// Builds an [`ConfigError::Invalid`] for `key`.
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------
// Defaults: every value a setting takes when the file leaves it out, and the
// built-in upstreams. Nothing else in this module spells a default.
// ---------------------------------------------------------------------------

/// The address the gateway listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The embedded store's directory by default.
pub const DEFAULT_DATA_DIR: &str = "./tidegate-data";
/// The largest request body accepted by default (4 MiB).
const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
/// How long new streams are still accepted after the signal, by default.
const DEFAULT_PRE_STOP_DELAY: Duration = Duration::ZERO;
/// The drain's hard deadline, counted from the signal, by default.
const DEFAULT_GRACE: Duration = Duration::from_secs(25);
/// How long the process may take to exit after the deadline, by default.
const DEFAULT_EXIT_TIMEOUT: Duration = Duration::from_secs(3);
/// The store used when `store.kind` is left out.
const DEFAULT_STORE_KIND: RawStoreKind = RawStoreKind::Embedded;
/// How long stored streams are kept, by default.
const DEFAULT_STORE_TTL: Duration = Duration::from_secs(15 * 60);
/// `store.max_bytes`: 1 GiB.
const DEFAULT_STORE_MAX_BYTES: u64 = 1 << 30;
/// How long a replica's claim on a stream lives without renewal, by default.
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// The `retry:` hint on resume streams by default.
const DEFAULT_RETRY_HINT: Duration = Duration::from_secs(2);
/// The interval between SSE heartbeats by default.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// What happens to the upstream request when the last client leaves, by
/// default.
const DEFAULT_ON_CLIENT_DISCONNECT: DisconnectPolicy = DisconnectPolicy::Cancel;

/// The settings an upstream takes for what its entry leaves out.
struct UpstreamDefaults {
    protocol: Protocol,
    models: &'static [&'static str],
    /// The continuation styles tried in order (a 400 falls to the next).
    continuation: &'static [Continuation],
    /// Per-model styles ahead of `continuation`: (model globs, styles).
    continuation_rules: RuleTable,
    connect_timeout: Duration,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    http2: bool,
}

/// `weight`: an upstream's share of its model group's traffic.
const DEFAULT_WEIGHT: u32 = 1;
/// `health_check_path`: the provider's models list, under the base URL.
const DEFAULT_HEALTH_PATH: &str = "/models";
/// `eject_after`: consecutive failures that eject an upstream.
const DEFAULT_EJECT_AFTER: u32 = 5;
/// `eject_for`: how long an ejected upstream rests before its half-open probe.
const DEFAULT_EJECT_FOR: Duration = Duration::from_secs(10);

/// The defaults of `[routing]`: 3 attempts, 200 ms then ×1.5 (with
/// jitter), at most 5 s between two, all within 10 s; one failover.
const ROUTING_DEFAULTS: RoutingConfig = RoutingConfig {
    attempts: 3,
    backoff: Duration::from_millis(200),
    backoff_multiplier: 1.5,
    max_backoff: Duration::from_secs(5),
    retry_within: Duration::from_secs(10),
    max_failovers: 1,
};

/// The defaults of an `[[upstreams]]` entry.
const UPSTREAM_DEFAULTS: UpstreamDefaults = UpstreamDefaults {
    protocol: Protocol::OpenAi,
    models: &["*"],
    continuation: &[Continuation::None],
    continuation_rules: &[],
    connect_timeout: Duration::from_secs(5),
    first_byte_timeout: Duration::from_secs(60),
    idle_timeout: Duration::from_secs(60),
    http2: false,
};

/// The environment variable whose key alone configures api.openai.com.
const OPENAI_KEY_ENV: &str = "OPENAI_API_KEY";
/// The name of the upstream [`OPENAI_KEY_ENV`] configures.
const OPENAI_NAME: &str = "openai";
/// The base URL of the upstream [`OPENAI_KEY_ENV`] configures.
const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// The settings of api.openai.com when [`OPENAI_KEY_ENV`] configures it: the
/// public API is further away and slower to start answering than a
/// self-hosted one, so its waits are longer; it has no prefill, so a
/// partial answer is continued by re-asking with it as context.
const OPENAI_UPSTREAM: UpstreamDefaults = UpstreamDefaults {
    continuation: OPENAI_STYLES,
    connect_timeout: Duration::from_secs(10),
    first_byte_timeout: Duration::from_secs(120),
    idle_timeout: Duration::from_secs(120),
    ..UPSTREAM_DEFAULTS
};

/// The name of the built-in mock provider of the zero-config demo.
const BUILTIN_MOCK_NAME: &str = "builtin-mock";
/// The settings of the built-in mock provider, which continues partial
/// answers the vLLM way.
const BUILTIN_MOCK_UPSTREAM: UpstreamDefaults = UpstreamDefaults {
    continuation: &[Continuation::ContinueFinalMessage],
    ..UPSTREAM_DEFAULTS
};

/// The name of the built-in mock's OpenAI Responses upstream.
const BUILTIN_MOCK_RESPONSES_NAME: &str = "builtin-mock-responses";
/// The built-in mock's Responses API, which has no prefill: a partial answer
/// is continued by re-asking with it as context.
const BUILTIN_MOCK_RESPONSES: UpstreamDefaults = UpstreamDefaults {
    protocol: Protocol::OpenAiResponses,
    continuation: &[Continuation::Instruct],
    ..UPSTREAM_DEFAULTS
};

/// The name of api.openai.com's Responses upstream, configured beside
/// [`OPENAI_NAME`] by [`OPENAI_KEY_ENV`].
const OPENAI_RESPONSES_NAME: &str = "openai-responses";

/// Per-model continuation styles as constants: (model globs, styles).
type RuleTable = &'static [(&'static [&'static str], &'static [Continuation])];

/// api.openai.com has no prefill: its answers are continued by re-asking.
const OPENAI_STYLES: &[Continuation] = &[Continuation::Instruct];
/// api.anthropic.com: prefill where the model takes it, else a re-ask
/// (a 400 refusing prefill falls back to it once).
const ANTHROPIC_STYLES: &[Continuation] = &[Continuation::AssistantPrefix, Continuation::Instruct];
/// Claude models that refuse prefill (4.6 and later): a re-ask at once.
const ANTHROPIC_NO_PREFILL: RuleTable = &[(
    &[
        "claude-*-4-6*",
        "claude-*-4-7*",
        "claude-*-4-8*",
        "claude-*-4-9*",
        "claude-opus-5*",
        "claude-sonnet-5*",
        "claude-haiku-5*",
        "claude-opus-6*",
        "claude-sonnet-6*",
        "claude-haiku-6*",
    ],
    &[Continuation::Instruct],
)];

/// The default styles of an upstream at `base_url`: the public providers'
/// own, else `none` (an operator names the style a self-hosted server takes).
fn default_styles(base_url: &str) -> (&'static [Continuation], RuleTable) {
    let host = reqwest::Url::parse(base_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    match host.as_str() {
        "api.openai.com" => (OPENAI_STYLES, &[]),
        "api.anthropic.com" => (ANTHROPIC_STYLES, ANTHROPIC_NO_PREFILL),
        _ => (UPSTREAM_DEFAULTS.continuation, &[]),
    }
}

/// Per-model continuation styles, ahead of the upstream's own.
#[derive(Debug, Clone, PartialEq)]
pub struct ContinuationRule {
    pub models: Vec<String>,
    pub styles: Vec<Continuation>,
}

/// `continuation = "style"` or `continuation = ["style", "fallback"]`.
#[derive(Debug)]
enum RawStyles {
    One(Continuation),
    Many(Vec<Continuation>),
}

impl<'de> Deserialize<'de> for RawStyles {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Styles;
        fn style<E: serde::de::Error>(name: &str) -> Result<Continuation, E> {
            Continuation::ALL
                .into_iter()
                .find(|s| s.as_str() == name)
                .ok_or_else(|| {
                    E::custom(format!(
                        "`{name}` is not a continuation style (one of: {})",
                        styles_text(&Continuation::ALL).replace(" → ", ", ")
                    ))
                })
        }
        impl<'de> serde::de::Visitor<'de> for Styles {
            type Value = RawStyles;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a continuation style, or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawStyles, E> {
                style(v).map(RawStyles::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawStyles, A::Error> {
                let mut out = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    out.push(style(&name)?);
                }
                Ok(RawStyles::Many(out))
            }
        }
        deserializer.deserialize_any(Styles)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContinuationRule {
    models: Vec<String>,
    continuation: RawStyles,
}

/// The names of `styles`, for check-config.
pub fn styles_text(styles: &[Continuation]) -> String {
    styles
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" → ")
}

/// Check a style list: not empty, `none` only alone, and only styles the
/// protocol can speak.
fn styles(raw: RawStyles, protocol: Protocol, at: &str) -> Result<Vec<Continuation>, ConfigError> {
    let list = match raw {
        RawStyles::One(style) => vec![style],
        RawStyles::Many(list) => list,
    };
    if list.is_empty() {
        return Err(ConfigError::invalid(at.to_owned(), "lists no style"));
    }
    if list.len() > 1 && list.contains(&Continuation::None) {
        return Err(ConfigError::invalid(
            at.to_owned(),
            "\"none\" means no continuation: it cannot be combined with other styles",
        ));
    }
    if protocol == Protocol::OpenAiResponses
        && let Some(style) = list
            .iter()
            .find(|s| !matches!(s, Continuation::Instruct | Continuation::None))
    {
        return Err(ConfigError::invalid(
            at.to_owned(),
            format!(
                "\"{}\" continues a trailing assistant message, which the Responses API does not take; \"openai_responses\" upstreams take \"instruct\" or \"none\"",
                style.as_str()
            ),
        ));
    }
    if protocol == Protocol::Anthropic
        && let Some(style) = list
            .iter()
            .find(|s| matches!(s, Continuation::ContinueFinalMessage | Continuation::Prefix))
    {
        return Err(ConfigError::invalid(
            at.to_owned(),
            format!(
                "\"{}\" is an OpenAI-compatible server's style; Anthropic upstreams take \"assistant_prefix\", \"instruct\" or \"none\"",
                style.as_str()
            ),
        ));
    }
    Ok(list)
}

impl UpstreamDefaults {
    /// Builds an upstream that takes every setting from these defaults.
    fn upstream(
        &self,
        name: &str,
        base_url: String,
        api_key_env: Option<String>,
        api_key: Option<Secret>,
    ) -> UpstreamConfig {
        UpstreamConfig {
            name: name.to_owned(),
            protocol: self.protocol,
            base_url,
            api_key_env,
            api_key,
            models: self.models(),
            continuation: self.continuation.to_vec(),
            continuation_rules: rules(self.continuation_rules),
            connect_timeout: self.connect_timeout,
            first_byte_timeout: self.first_byte_timeout,
            idle_timeout: self.idle_timeout,
            http2: self.http2,
            provider_background: false,
            weight: DEFAULT_WEIGHT,
            health: HealthConfig::default(),
        }
    }

    /// Returns the default model globs as owned strings.
    fn models(&self) -> Vec<String> {
        self.models.iter().map(|glob| (*glob).to_owned()).collect()
    }
}

/// Owned rules from a table of defaults.
fn rules(table: &[(&[&str], &[Continuation])]) -> Vec<ContinuationRule> {
    table
        .iter()
        .map(|(models, styles)| ContinuationRule {
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            styles: styles.to_vec(),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Stage one: the file as written, with typed values.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Listen>,
    max_body_bytes: Option<u64>,
    worker_threads: Option<u64>,
    scheduler: Option<Scheduler>,
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
    limits: RawLimits,
    #[serde(default)]
    cors: RawCors,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    canaries: Vec<RawCanary>,
    #[serde(default)]
    telemetry: RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<String>,
    otlp_headers_env: Option<String>,
    service_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    attempts: Option<u32>,
    backoff: Option<HumanDuration>,
    backoff_multiplier: Option<f64>,
    max_backoff: Option<HumanDuration>,
    retry_within: Option<HumanDuration>,
    max_failovers: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCanary {
    from: String,
    to: String,
    phases: Option<Vec<f64>>,
    hold: Option<HumanDuration>,
    min_requests: Option<u64>,
    min_success_rate: Option<f64>,
    max_error_rate: Option<f64>,
    max_ttft_p99: Option<HumanDuration>,
    max_duration_p99: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    allow_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    pre_stop_delay: Option<HumanDuration>,
    grace: Option<HumanDuration>,
    exit_timeout: Option<HumanDuration>,
}

/// The values of `store.kind`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawStoreKind {
    Memory,
    Embedded,
    Redis,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<RawStoreKind>,
    path: Option<String>,
    url: Option<String>,
    cluster: Option<Vec<String>>,
    ttl: Option<HumanDuration>,
    /// No longer used (the embedded store writes each append at once);
    /// accepted so that older configs load.
    #[allow(dead_code)]
    commit_interval: Option<HumanDuration>,
    lease_ttl: Option<HumanDuration>,
    max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResume {
    secret_env: Option<String>,
    retry_hint: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreams {
    heartbeat: Option<HumanDuration>,
    on_client_disconnect: Option<RawDisconnect>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    keys_env: Option<String>,
    resume_token_only: Option<bool>,
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
    protocol: Option<Protocol>,
    base_url: String,
    api_key_env: Option<String>,
    models: Option<Vec<String>>,
    continuation: Option<RawStyles>,
    continuation_rules: Option<Vec<RawContinuationRule>>,
    connect_timeout: Option<HumanDuration>,
    first_byte_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    http2: Option<bool>,
    provider_background: Option<bool>,
    weight: Option<u32>,
    health_check_path: Option<String>,
    health_check_interval: Option<HumanDuration>,
    eject_after: Option<u32>,
    eject_for: Option<HumanDuration>,
}

/// A duration written as text such as `"250ms"` or `"25s"`, read with
/// humantime.
#[derive(Debug, Clone, Copy)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |text| parse_duration(text).map(HumanDuration))
    }
}

/// Read a string and `parse` it; its message becomes the error at the key.
fn from_text<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(de::Error::custom)
}

/// Reads `value` when the file gives it, `default` otherwise.
fn duration_or(value: Option<HumanDuration>, default: Duration) -> Duration {
    value.map_or(default, |d| d.0)
}

/// Parses a humantime duration, explaining the expected form on failure.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like \"250ms\" or \"25s\": {e}"))
}

/// A socket address such as `127.0.0.1:8080`.
#[derive(Debug, Clone, Copy)]
struct Listen(SocketAddr);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |text| parse_listen(text).map(Listen))
    }
}

/// Parses a listen address, naming the expected form on failure.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not an address like 127.0.0.1:8080"))
}

/// `streams.on_client_disconnect`: `"cancel"` or a duration to keep going.
#[derive(Debug, Clone, Copy)]
struct RawDisconnect(DisconnectPolicy);

impl<'de> Deserialize<'de> for RawDisconnect {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |text| match text {
            "cancel" => Ok(RawDisconnect(DisconnectPolicy::Cancel)),
            _ => parse_duration(text)
                .map(|d| RawDisconnect(DisconnectPolicy::Grace(d)))
                .map_err(|_| format!("`{text}` is neither \"cancel\" nor a duration like \"10s\"")),
        })
    }
}

// ---------------------------------------------------------------------------
// Stage two: validated values.
// ---------------------------------------------------------------------------

/// The validated configuration every module reads. Its secrets are
/// [`Secret`]s, so its `Debug` output hides them.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Requests with a larger body are refused with 413 before parsing.
    pub max_body_bytes: usize,
    /// Runtime worker threads; `None` means one per CPU.
    pub worker_threads: Option<usize>,
    /// How client connections are spread over those threads.
    pub scheduler: Scheduler,
    pub drain: DrainConfig,
    pub store: StoreConfig,
    pub resume: ResumeConfig,
    pub streams: StreamsConfig,
    /// Client API keys; `None` means the gateway is open.
    pub auth_keys: Option<Vec<Secret>>,
    /// With client keys: whether a resume token alone opens its stream's
    /// routes (`[auth] resume_token_only`, for a browser `EventSource`,
    /// which cannot send a key). By default the owner's key is needed too.
    pub resume_token_only: bool,
    /// The token guarding `/admin/*`; `None` disables the admin routes.
    pub admin_token: Option<Secret>,
    /// What a peer (client or provider) may make the gateway hold or wait for.
    pub limits: LimitsConfig,
    /// Browser origins allowed to call `/v1/*` (CORS); empty: none (off).
    /// `"*"` allows any.
    pub cors_origins: Vec<String>,
    pub upstreams: Vec<UpstreamConfig>,
    pub routing: RoutingConfig,
    pub canaries: Vec<CanarySpec>,
    pub telemetry: TelemetryConfig,
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

/// Which partial-response store to open. `Debug` and `Display` hide any
/// password in a Redis URL.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Embedded {
        path: PathBuf,
    },
    Redis {
        url: String,
    },
    /// Redis Cluster, found from these seed nodes.
    RedisCluster {
        nodes: Vec<String>,
    },
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub ttl: Duration,
    /// How long a replica's claim on a stream lives without renewal (redis).
    pub lease_ttl: Duration,
    /// The most the memory and embedded stores hold: past it, finished
    /// streams go, oldest first, and a new stream is refused (503
    /// `store_full`) only when running streams alone fill it.
    pub max_bytes: u64,
}

/// How resume tokens are signed and how soon clients retry.
#[derive(Debug, Clone)]
pub struct ResumeConfig {
    /// The secret resume tokens are signed with, when configured.
    pub secret: Option<Secret>,
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
    /// Generate to the end whoever is attached: a background response
    /// (OpenAI Responses `background: true`). Not a config value.
    Keep,
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
    /// The continuation styles tried in order: a provider's 400 refusing
    /// one falls back to the next, once.
    pub continuation: Vec<Continuation>,
    /// Per-model styles, first match wins, ahead of `continuation`.
    pub continuation_rules: Vec<ContinuationRule>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    /// Speak HTTP/2 to the provider (prior knowledge on http://, required
    /// on https://): every stream multiplexed on a few connections.
    pub http2: bool,
    /// `openai_responses` only: ask the provider for background responses
    /// (`background`, `store`), so that an interrupted stream re-attaches
    /// to the provider's own (`starting_after`) instead of a continuation:
    /// no token generated twice. The provider keeps the response's data.
    pub provider_background: bool,
    /// This upstream's share of its model group's traffic (0: none, unless
    /// a canary gives it some).
    pub weight: u32,
    pub health: HealthConfig,
}

/// How an upstream's health is watched: passive ejection after
/// consecutive failures, a half-open probe after the rest, and optional
/// active checks.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// `GET base_url + path` answers 2xx when the provider is up.
    pub path: String,
    /// Active checks every `interval`; `None`: only the half-open probe.
    pub interval: Option<Duration>,
    /// Consecutive failures (connect errors, 5xx, 429, mid-stream
    /// failures, failed checks) that eject the upstream.
    pub eject_after: u32,
    /// How long an ejected upstream gets no traffic before its probe.
    pub eject_for: Duration,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            path: DEFAULT_HEALTH_PATH.to_owned(),
            interval: None,
            eject_after: DEFAULT_EJECT_AFTER,
            eject_for: DEFAULT_EJECT_FOR,
        }
    }
}

/// `[telemetry]`: OpenTelemetry traces, off unless an endpoint is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP traces URL, used as written
    /// (`http://127.0.0.1:4318/v1/traces`); `None`: no traces.
    pub otlp_endpoint: Option<String>,
    /// Headers every export carries (a vendor's API key): from the
    /// variable `otlp_headers_env` names, as `name=value,name=value`.
    pub otlp_headers: Vec<(String, Secret)>,
    /// Where the headers came from, for `check-config`.
    pub otlp_headers_env: Option<String>,
    /// The `service.name` resource attribute (default `tidegate`).
    pub service_name: String,
}

/// `[routing]`: retries before the first byte and failover after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingConfig {
    /// Attempts in all (the first one included) for a request that fails
    /// before any byte of an answer, where the provider said it did not
    /// start it (connect errors, 408, 409, 429, 5xx).
    pub attempts: u32,
    /// The wait before the second attempt; each next one ×`backoff_multiplier`,
    /// with jitter (a random half to the whole of it), at most `max_backoff`.
    pub backoff: Duration,
    pub backoff_multiplier: f64,
    pub max_backoff: Duration,
    /// No attempt starts later than this after the first (a `Retry-After`
    /// that points past it ends the retries).
    pub retry_within: Duration,
    /// Times one stream may move to another upstream of its group after
    /// its provider failed mid-answer.
    pub max_failovers: u32,
}

impl Default for RoutingConfig {
    fn default() -> RoutingConfig {
        ROUTING_DEFAULTS
    }
}

/// One `[[canaries]]` entry, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct CanarySpec {
    pub from: String,
    pub to: String,
    pub phases: Vec<f64>,
    pub hold: Duration,
    pub min_requests: u64,
    pub min_success_rate: f64,
    pub max_error_rate: f64,
    pub max_ttft_p99: Option<Duration>,
    pub max_duration_p99: Option<Duration>,
}

impl UpstreamConfig {
    /// The built-in mock provider of the zero-config demo, at `base_url`.
    pub fn builtin_mock(base_url: String) -> UpstreamConfig {
        BUILTIN_MOCK_UPSTREAM.upstream(BUILTIN_MOCK_NAME, base_url, None, None)
    }

    /// The built-in mock's Responses API, at `base_url`.
    pub fn builtin_mock_responses(base_url: String) -> UpstreamConfig {
        BUILTIN_MOCK_RESPONSES.upstream(BUILTIN_MOCK_RESPONSES_NAME, base_url, None, None)
    }
}

/// A string that never shows itself in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

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

    /// Parses `text`, applies the environment overrides of `env`, validates.
    pub fn from_toml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env_overrides(&mut value, env)?;
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(raw_error)?;
        Config::from_raw(raw, env)
    }

    /// Turns the file as written into validated values, section by section.
    fn from_raw(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
        let listen = match raw.listen {
            Some(Listen(address)) => address,
            None => parse_listen(DEFAULT_LISTEN).map_err(|m| ConfigError::invalid("listen", m))?,
        };
        let drain = drain(raw.drain)?;
        let store = store(raw.store)?;
        let resume = resume(raw.resume, &store.kind, env)?;
        let streams = streams(raw.streams)?;
        let resume_token_only = raw.auth.resume_token_only.unwrap_or(false);
        let auth_keys = auth(raw.auth, env)?;
        let admin_token = admin(raw.admin, env)?;
        let limits = limits(raw.limits)?;
        let cors_origins = cors(raw.cors)?;
        let upstreams = upstreams(raw.upstreams, env)?;
        let routing = routing(raw.routing)?;
        let canaries = canaries(raw.canaries, &upstreams)?;
        let telemetry = telemetry(raw.telemetry, env)?;
        let worker_threads = worker_threads(raw.worker_threads)?;
        Ok(Config {
            listen,
            max_body_bytes: raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES) as usize,
            worker_threads,
            scheduler: raw.scheduler.unwrap_or_default(),
            drain,
            store,
            resume,
            streams,
            auth_keys,
            resume_token_only,
            admin_token,
            limits,
            cors_origins,
            builtin_mock: upstreams.is_empty(),
            upstreams,
            routing,
            canaries,
            telemetry,
        })
    }

    /// The shutdown budget a supervisor must allow: from the signal to the
    /// last possible exit, plus a margin for the runtime to tear down.
    pub fn stop_budget(&self) -> Duration {
        self.drain.grace + self.drain.exit_timeout + Duration::from_secs(2)
    }
}

/// Validates `[cors] allow_origins`: `"*"` alone, or origins such as
/// `https://chat.example.com` (scheme, host, optional port; no path).
fn cors(raw: RawCors) -> Result<Vec<String>, ConfigError> {
    let origins = raw.allow_origins.unwrap_or_default();
    for origin in &origins {
        if origin == "*" {
            if origins.len() > 1 {
                return Err(ConfigError::invalid(
                    "cors.allow_origins",
                    "\"*\" allows every origin: it cannot be listed with others",
                ));
            }
            continue;
        }
        let ok = reqwest::Url::parse(origin).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some()
                && u.path() == "/"
                && !origin.ends_with('/')
        });
        if !ok {
            return Err(ConfigError::invalid(
                "cors.allow_origins",
                format!("`{origin}` is not an origin like https://chat.example.com"),
            ));
        }
    }
    Ok(origins)
}

/// Turns a deserialization error into a [`ConfigError`] naming the key path.
fn raw_error(error: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let key = error.path().to_string();
    let inner = error.into_inner();
    if key == "." {
        ConfigError::Parse(inner.to_string())
    } else {
        ConfigError::invalid(key, inner.message())
    }
}

/// Resolves the secret held by the environment variable `var`, which the
/// config key `key` names.
fn secret(env: &dyn Env, var: &str, key: &str) -> Result<String, ConfigError> {
    env.var(var).ok_or_else(|| ConfigError::MissingSecret {
        var: var.to_owned(),
        key: key.to_owned(),
    })
}

/// Validates the `[drain]` section.
fn drain(raw: RawDrain) -> Result<DrainConfig, ConfigError> {
    let drain = DrainConfig {
        pre_stop_delay: duration_or(raw.pre_stop_delay, DEFAULT_PRE_STOP_DELAY),
        grace: duration_or(raw.grace, DEFAULT_GRACE),
        exit_timeout: duration_or(raw.exit_timeout, DEFAULT_EXIT_TIMEOUT),
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
    Ok(drain)
}

/// A Redis URL of the config, at `key`.
fn redis_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            "must start with redis:// or rediss://",
        ))
    }
}

/// Validates the `[store]` section.
fn store(raw: RawStore) -> Result<StoreConfig, ConfigError> {
    if raw.cluster.is_some() && !matches!(raw.kind, Some(RawStoreKind::Redis)) {
        return Err(ConfigError::invalid(
            "store.cluster",
            "only with store.kind = \"redis\"",
        ));
    }
    let kind = match raw.kind.unwrap_or(DEFAULT_STORE_KIND) {
        RawStoreKind::Memory => StoreKind::Memory,
        RawStoreKind::Embedded => StoreKind::Embedded {
            path: PathBuf::from(raw.path.unwrap_or_else(|| DEFAULT_DATA_DIR.to_owned())),
        },
        RawStoreKind::Redis => match (raw.url, raw.cluster) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "store.cluster",
                    "give either store.url (one Redis) or store.cluster (the seed nodes of a Redis Cluster), not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    "store.url",
                    "required with store.kind = \"redis\" (or store.cluster for a Redis Cluster)",
                ));
            }
            (Some(url), None) => {
                redis_url("store.url", &url)?;
                StoreKind::Redis { url }
            }
            (None, Some(nodes)) => {
                if nodes.is_empty() {
                    return Err(ConfigError::invalid(
                        "store.cluster",
                        "must list at least one seed node",
                    ));
                }
                for (i, node) in nodes.iter().enumerate() {
                    redis_url(&format!("store.cluster[{i}]"), node)?;
                }
                StoreKind::RedisCluster { nodes }
            }
        },
    };
    if raw.max_bytes.is_some()
        && matches!(
            kind,
            StoreKind::Redis { .. } | StoreKind::RedisCluster { .. }
        )
    {
        return Err(ConfigError::invalid(
            "store.max_bytes",
            "only for the memory and embedded stores: bound a Redis store with Redis's own maxmemory (and an eviction policy) instead",
        ));
    }
    if raw.max_bytes == Some(0) {
        return Err(ConfigError::invalid(
            "store.max_bytes",
            "must be more than 0",
        ));
    }
    let store = StoreConfig {
        kind,
        ttl: duration_or(raw.ttl, DEFAULT_STORE_TTL),
        lease_ttl: duration_or(raw.lease_ttl, DEFAULT_LEASE_TTL),
        max_bytes: raw.max_bytes.unwrap_or(DEFAULT_STORE_MAX_BYTES),
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
    Ok(store)
}

/// Validates the `[resume]` section; a shared store needs a shared secret.
fn resume(raw: RawResume, store: &StoreKind, env: &dyn Env) -> Result<ResumeConfig, ConfigError> {
    let secret = match &raw.secret_env {
        Some(var) => Some(Secret(secret(env, var, "resume.secret_env")?)),
        None => None,
    };
    if matches!(
        store,
        StoreKind::Redis { .. } | StoreKind::RedisCluster { .. }
    ) && secret.is_none()
    {
        return Err(ConfigError::invalid(
            "resume.secret_env",
            "a shared store needs a shared resume secret: set resume.secret_env to the name of an environment variable holding it",
        ));
    }
    Ok(ResumeConfig {
        secret,
        retry_hint: duration_or(raw.retry_hint, DEFAULT_RETRY_HINT),
    })
}

/// Validates the `[streams]` section.
fn streams(raw: RawStreams) -> Result<StreamsConfig, ConfigError> {
    let streams = StreamsConfig {
        heartbeat: duration_or(raw.heartbeat, DEFAULT_HEARTBEAT),
        on_client_disconnect: raw
            .on_client_disconnect
            .map_or(DEFAULT_ON_CLIENT_DISCONNECT, |d| d.0),
    };
    if streams.heartbeat.is_zero() {
        return Err(ConfigError::invalid(
            "streams.heartbeat",
            "must be more than 0s",
        ));
    }
    Ok(streams)
}

/// Resolves the `[auth]` client keys: a comma-separated list in a variable.
fn auth(raw: RawAuth, env: &dyn Env) -> Result<Option<Vec<Secret>>, ConfigError> {
    let Some(var) = raw.keys_env else {
        return Ok(None);
    };
    let keys: Vec<Secret> = secret(env, &var, "auth.keys_env")?
        .split(',')
        .map(|k| Secret(k.trim().to_owned()))
        .filter(|k| !k.0.is_empty())
        .collect();
    if keys.is_empty() {
        return Err(ConfigError::invalid(
            "auth.keys_env",
            format!("{var} holds no key"),
        ));
    }
    Ok(Some(keys))
}

/// Validates `[telemetry]`: an `http(s)` endpoint, and headers read from
/// the environment as `name=value` pairs separated by commas.
fn telemetry(raw: RawTelemetry, env: &dyn Env) -> Result<TelemetryConfig, ConfigError> {
    if let Some(endpoint) = &raw.otlp_endpoint {
        let ok = reqwest::Url::parse(endpoint)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            return Err(ConfigError::invalid(
                "telemetry.otlp_endpoint",
                format!(
                    "`{endpoint}` is not an http(s) URL (the collector's OTLP/HTTP traces URL, such as http://127.0.0.1:4318/v1/traces)"
                ),
            ));
        }
    }
    let mut otlp_headers = Vec::new();
    if let Some(var) = &raw.otlp_headers_env {
        let text = secret(env, var, "telemetry.otlp_headers_env")?;
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, value)) = pair.split_once('=') else {
                return Err(ConfigError::invalid(
                    "telemetry.otlp_headers_env",
                    format!("${var} must be `name=value` pairs separated by commas"),
                ));
            };
            let name = name.trim();
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || axum::http::HeaderValue::from_str(value.trim()).is_err()
            {
                return Err(ConfigError::invalid(
                    "telemetry.otlp_headers_env",
                    format!("${var} holds a header name or value HTTP does not allow"),
                ));
            }
            otlp_headers.push((name.to_owned(), Secret(value.trim().to_owned())));
        }
    }
    let service_name = raw.service_name.unwrap_or_else(|| "tidegate".into());
    if service_name.is_empty() {
        return Err(ConfigError::invalid(
            "telemetry.service_name",
            "must not be empty",
        ));
    }
    Ok(TelemetryConfig {
        otlp_endpoint: raw.otlp_endpoint,
        otlp_headers,
        otlp_headers_env: raw.otlp_headers_env,
        service_name,
    })
}

/// Resolves the `[admin]` token.
fn admin(raw: RawAdmin, env: &dyn Env) -> Result<Option<Secret>, ConfigError> {
    raw.token_env
        .map(|var| secret(env, &var, "admin.token_env").map(Secret))
        .transpose()
}

// ---------------------------------------------------------------------------
// `[limits]`: every size and time a peer controls. Each default is safe for
// a production gateway; README's config reference lists them.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<u64>,
    header_read_timeout: Option<HumanDuration>,
    max_header_bytes: Option<u64>,
    body_read_timeout: Option<HumanDuration>,
    write_timeout: Option<HumanDuration>,
    max_streams: Option<u64>,
    max_streams_per_key: Option<u64>,
    max_json_depth: Option<u64>,
    max_event_bytes: Option<u64>,
    max_answer_bytes: Option<u64>,
    live_buffer_bytes: Option<u64>,
}

/// Validated `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Open client connections at most; more are answered 503 and closed.
    /// Lowered at start-up to half the open-file limit (the other half is
    /// for provider connections and the store).
    pub max_connections: usize,
    /// A client must send a request's whole head within this (slowloris).
    pub header_read_timeout: Duration,
    /// A request head larger than this is refused (431).
    pub max_header_bytes: usize,
    /// A request body must arrive within this (408).
    pub body_read_timeout: Duration,
    /// A write to a client that makes no progress this long closes it.
    pub write_timeout: Duration,
    /// Streams this process runs at once (503 + Retry-After beyond).
    pub max_streams: usize,
    /// Streams one client key runs at once (429 + Retry-After beyond);
    /// only with `[auth]` keys.
    pub max_streams_per_key: usize,
    /// JSON nesting deeper than this in a request is refused (400).
    pub max_json_depth: usize,
    /// A provider's SSE line or event larger than this ends the stream
    /// with `upstream_failed`.
    pub max_event_bytes: usize,
    /// A provider's whole answer larger than this ends the stream with
    /// `upstream_failed` (streaming) or a 502 (not streaming).
    pub max_answer_bytes: u64,
    /// Event bytes of a run kept in memory for its followers; a follower
    /// that falls further behind (a slow reader) catches up from the store.
    pub live_buffer_bytes: usize,
}

const DEFAULT_LIMITS: LimitsConfig = LimitsConfig {
    max_connections: 10_000,
    header_read_timeout: Duration::from_secs(10),
    max_header_bytes: 64 * 1024,
    body_read_timeout: Duration::from_secs(30),
    write_timeout: Duration::from_secs(30),
    max_streams: 5_000,
    max_streams_per_key: 500,
    max_json_depth: 64,
    max_event_bytes: 1024 * 1024,
    max_answer_bytes: 64 * 1024 * 1024,
    live_buffer_bytes: 256 * 1024,
};

impl Default for LimitsConfig {
    fn default() -> Self {
        DEFAULT_LIMITS
    }
}

/// Validates the `[limits]` section.
fn limits(raw: RawLimits) -> Result<LimitsConfig, ConfigError> {
    let d = DEFAULT_LIMITS;
    let count = |value: Option<u64>, default: usize, key: &str, min: u64| {
        let n = value.unwrap_or(default as u64);
        if n < min {
            return Err(ConfigError::invalid(
                format!("limits.{key}"),
                format!("must be at least {min}"),
            ));
        }
        usize::try_from(n).map_err(|_| ConfigError::invalid(format!("limits.{key}"), "too large"))
    };
    let time = |value: Option<HumanDuration>, default: Duration, key: &str| {
        let t = duration_or(value, default);
        if t.is_zero() {
            return Err(ConfigError::invalid(
                format!("limits.{key}"),
                "must be more than 0s",
            ));
        }
        Ok(t)
    };
    Ok(LimitsConfig {
        max_connections: count(raw.max_connections, d.max_connections, "max_connections", 1)?,
        header_read_timeout: time(
            raw.header_read_timeout,
            d.header_read_timeout,
            "header_read_timeout",
        )?,
        // hyper's smallest read buffer.
        max_header_bytes: count(
            raw.max_header_bytes,
            d.max_header_bytes,
            "max_header_bytes",
            8192,
        )?,
        body_read_timeout: time(
            raw.body_read_timeout,
            d.body_read_timeout,
            "body_read_timeout",
        )?,
        write_timeout: time(raw.write_timeout, d.write_timeout, "write_timeout")?,
        max_streams: count(raw.max_streams, d.max_streams, "max_streams", 1)?,
        max_streams_per_key: count(
            raw.max_streams_per_key,
            d.max_streams_per_key,
            "max_streams_per_key",
            1,
        )?,
        max_json_depth: count(raw.max_json_depth, d.max_json_depth, "max_json_depth", 2)?,
        max_event_bytes: count(
            raw.max_event_bytes,
            d.max_event_bytes,
            "max_event_bytes",
            1024,
        )?,
        max_answer_bytes: count(
            raw.max_answer_bytes,
            d.max_answer_bytes as usize,
            "max_answer_bytes",
            1024,
        )? as u64,
        live_buffer_bytes: count(
            raw.live_buffer_bytes,
            d.live_buffer_bytes,
            "live_buffer_bytes",
            1024,
        )?,
    })
}

/// Validates the `[[upstreams]]`; with none, `OPENAI_API_KEY` alone
/// configures api.openai.com.
fn upstreams(raw: Vec<RawUpstream>, env: &dyn Env) -> Result<Vec<UpstreamConfig>, ConfigError> {
    let mut upstreams = raw
        .into_iter()
        .enumerate()
        .map(|(index, raw)| upstream(index, raw, env))
        .collect::<Result<Vec<_>, _>>()?;
    if upstreams.is_empty()
        && let Some(key) = env.var(OPENAI_KEY_ENV)
    {
        upstreams.push(OPENAI_UPSTREAM.upstream(
            OPENAI_NAME,
            OPENAI_BASE_URL.to_owned(),
            Some(OPENAI_KEY_ENV.to_owned()),
            Some(Secret(key.clone())),
        ));
        upstreams.push(
            UpstreamDefaults {
                protocol: Protocol::OpenAiResponses,
                ..OPENAI_UPSTREAM
            }
            .upstream(
                OPENAI_RESPONSES_NAME,
                OPENAI_BASE_URL.to_owned(),
                Some(OPENAI_KEY_ENV.to_owned()),
                Some(Secret(key)),
            ),
        );
    }
    Ok(upstreams)
}

/// Validates one `[[upstreams]]` entry, the `index`th.
fn upstream(index: usize, raw: RawUpstream, env: &dyn Env) -> Result<UpstreamConfig, ConfigError> {
    let key = |field: &str| format!("upstreams[{index}].{field}");
    if raw.name.is_empty() {
        return Err(ConfigError::invalid(key("name"), "must not be empty"));
    }
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
        Some(var) => Some(Secret(secret(env, var, &key("api_key_env"))?)),
        None => None,
    };
    let defaults = &UPSTREAM_DEFAULTS;
    let models = raw.models.unwrap_or_else(|| defaults.models());
    if models.is_empty() {
        return Err(ConfigError::invalid(key("models"), "lists no model glob"));
    }
    let protocol = raw.protocol.unwrap_or(defaults.protocol);
    let (default_continuation, default_rules) = default_styles(&base_url);
    let continuation = match raw.continuation {
        Some(list) => styles(list, protocol, &key("continuation"))?,
        None => default_continuation.to_vec(),
    };
    let continuation_rules = match raw.continuation_rules {
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, rule)| {
                let at = key(&format!("continuation_rules[{i}]"));
                if rule.models.is_empty() {
                    return Err(ConfigError::invalid(at, "lists no model glob"));
                }
                Ok(ContinuationRule {
                    models: rule.models,
                    styles: styles(rule.continuation, protocol, &format!("{at}.continuation"))?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => rules(default_rules),
    };
    let provider_background = raw.provider_background.unwrap_or(false);
    if provider_background && protocol != Protocol::OpenAiResponses {
        return Err(ConfigError::invalid(
            key("provider_background"),
            "is only for `protocol = \"openai_responses\"` (the Responses API's background mode)",
        ));
    }
    Ok(UpstreamConfig {
        name: raw.name,
        protocol,
        base_url,
        api_key_env: raw.api_key_env,
        api_key,
        models,
        continuation,
        continuation_rules,
        connect_timeout: duration_or(raw.connect_timeout, defaults.connect_timeout),
        first_byte_timeout: duration_or(raw.first_byte_timeout, defaults.first_byte_timeout),
        idle_timeout: duration_or(raw.idle_timeout, defaults.idle_timeout),
        http2: raw.http2.unwrap_or(defaults.http2),
        provider_background,
        weight: raw.weight.unwrap_or(DEFAULT_WEIGHT),
        health: health(
            &key,
            raw.health_check_path,
            raw.health_check_interval,
            raw.eject_after,
            raw.eject_for,
        )?,
    })
}

/// Validates an upstream's health settings; `key` names its fields.
fn health(
    key: &dyn Fn(&str) -> String,
    path: Option<String>,
    interval: Option<HumanDuration>,
    eject_after: Option<u32>,
    eject_for: Option<HumanDuration>,
) -> Result<HealthConfig, ConfigError> {
    let d = HealthConfig::default();
    let path = path.unwrap_or(d.path);
    if !path.starts_with('/') {
        return Err(ConfigError::invalid(
            key("health_check_path"),
            "must start with / (it is joined to base_url)",
        ));
    }
    let interval = interval.map(|i| i.0);
    if interval.is_some_and(|i| i < Duration::from_millis(100)) {
        return Err(ConfigError::invalid(
            key("health_check_interval"),
            "must be at least 100ms",
        ));
    }
    let eject_after = eject_after.unwrap_or(d.eject_after);
    if eject_after == 0 {
        return Err(ConfigError::invalid(
            key("eject_after"),
            "must be at least 1",
        ));
    }
    let eject_for = duration_or(eject_for, d.eject_for);
    if eject_for.is_zero() {
        return Err(ConfigError::invalid(
            key("eject_for"),
            "must be more than 0s",
        ));
    }
    Ok(HealthConfig {
        path,
        interval,
        eject_after,
        eject_for,
    })
}

/// Validates `[routing]`.
fn routing(raw: RawRouting) -> Result<RoutingConfig, ConfigError> {
    let d = ROUTING_DEFAULTS;
    let attempts = raw.attempts.unwrap_or(d.attempts);
    if !(1..=10).contains(&attempts) {
        return Err(ConfigError::invalid(
            "routing.attempts",
            "must be from 1 (no retries) to 10",
        ));
    }
    let backoff_multiplier = raw.backoff_multiplier.unwrap_or(d.backoff_multiplier);
    if !(1.0..=10.0).contains(&backoff_multiplier) {
        return Err(ConfigError::invalid(
            "routing.backoff_multiplier",
            "must be from 1.0 to 10.0",
        ));
    }
    let max_failovers = raw.max_failovers.unwrap_or(d.max_failovers);
    if max_failovers > 10 {
        return Err(ConfigError::invalid(
            "routing.max_failovers",
            "must be from 0 (none) to 10",
        ));
    }
    Ok(RoutingConfig {
        attempts,
        backoff: duration_or(raw.backoff, d.backoff),
        backoff_multiplier,
        max_backoff: duration_or(raw.max_backoff, d.max_backoff),
        retry_within: duration_or(raw.retry_within, d.retry_within),
        max_failovers,
    })
}

/// The defaults of a `[[canaries]]` entry: the migration the founding
/// document describes.
pub const CANARY_PHASES: [f64; 5] = [1.0, 5.0, 25.0, 50.0, 100.0];
const CANARY_HOLD: Duration = Duration::from_secs(15 * 60);
const CANARY_MIN_REQUESTS: u64 = 100;
const CANARY_MIN_SUCCESS_RATE: f64 = 98.0;
const CANARY_MAX_ERROR_RATE: f64 = 2.0;
const CANARY_MAX_TTFT_P99: Duration = Duration::from_millis(500);

/// Validates `[[canaries]]`: both ends name upstreams of one model group
/// and protocol, one canary per `to`, phases rising percents.
fn canaries(
    raw: Vec<RawCanary>,
    upstreams: &[UpstreamConfig],
) -> Result<Vec<CanarySpec>, ConfigError> {
    let mut out: Vec<CanarySpec> = Vec::new();
    for (i, c) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("canaries[{i}].{field}");
        let find = |name: &str, field: &str| {
            upstreams.iter().find(|u| u.name == name).ok_or_else(|| {
                ConfigError::invalid(key(field), format!("names no upstream (`{name}`)"))
            })
        };
        let (from, to) = (find(&c.from, "from")?, find(&c.to, "to")?);
        if from.name == to.name {
            return Err(ConfigError::invalid(key("to"), "must differ from `from`"));
        }
        if from.protocol != to.protocol || from.models != to.models {
            return Err(ConfigError::invalid(
                key("to"),
                format!(
                    "`{}` and `{}` must serve the same models in the same protocol (one model group)",
                    from.name, to.name
                ),
            ));
        }
        if out
            .iter()
            .any(|o| o.to == c.to || o.from == c.to || o.to == c.from)
        {
            return Err(ConfigError::invalid(
                key("to"),
                "an upstream can be in one canary only",
            ));
        }
        let phases = c.phases.unwrap_or_else(|| CANARY_PHASES.to_vec());
        let rising = phases.windows(2).all(|w| w[0] < w[1]);
        if phases.is_empty() || !rising || phases.iter().any(|p| !(*p > 0.0 && *p <= 100.0)) {
            return Err(ConfigError::invalid(
                key("phases"),
                "must be rising percents, each more than 0 and at most 100",
            ));
        }
        let rate = |v: Option<f64>, d: f64, field: &str| match v.unwrap_or(d) {
            r if (0.0..=100.0).contains(&r) => Ok(r),
            _ => Err(ConfigError::invalid(
                key(field),
                "must be a percent from 0 to 100",
            )),
        };
        let min_requests = c.min_requests.unwrap_or(CANARY_MIN_REQUESTS);
        if min_requests == 0 {
            return Err(ConfigError::invalid(
                key("min_requests"),
                "must be at least 1",
            ));
        }
        out.push(CanarySpec {
            from: c.from,
            to: c.to,
            phases,
            hold: duration_or(c.hold, CANARY_HOLD),
            min_requests,
            min_success_rate: rate(
                c.min_success_rate,
                CANARY_MIN_SUCCESS_RATE,
                "min_success_rate",
            )?,
            max_error_rate: rate(c.max_error_rate, CANARY_MAX_ERROR_RATE, "max_error_rate")?,
            max_ttft_p99: Some(duration_or(c.max_ttft_p99, CANARY_MAX_TTFT_P99)),
            max_duration_p99: c.max_duration_p99.map(|d| d.0),
        });
    }
    Ok(out)
}

/// `scheduler`: how the runtime threads share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Each thread runs its own single-threaded runtime and serves the
    /// connections handed to it, with every task they start (the default).
    #[default]
    ThreadPerCore,
    /// One tokio runtime whose threads steal tasks from each other.
    WorkStealing,
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scheduler::ThreadPerCore => "thread_per_core",
            Scheduler::WorkStealing => "work_stealing",
        })
    }
}

/// Validates `worker_threads`: from 1 to 1024, or one per CPU when left out.
fn worker_threads(raw: Option<u64>) -> Result<Option<usize>, ConfigError> {
    match raw {
        None => Ok(None),
        Some(n @ 1..=1024) => Ok(Some(n as usize)),
        Some(_) => Err(ConfigError::invalid(
            "worker_threads",
            "must be from 1 to 1024 (leave it out for one per CPU)",
        )),
    }
}

// ---------------------------------------------------------------------------
// Environment overrides.
// ---------------------------------------------------------------------------

/// The top-level keys of the file, read off [`RawConfig`]'s `Deserialize`
/// impl so that a new section is an override target without being listed
/// twice. Variables such as `TIDEGATE_API_KEYS` or `TIDEGATE_RESUME_SECRET`
/// hold secrets, not config, so only names whose first segment is one of
/// these are read as overrides.
fn sections() -> &'static [&'static str] {
    match RawConfig::deserialize(FieldNames) {
        Err(FieldNamesError::Fields(fields)) => fields,
        _ => &[],
    }
}

/// A deserializer that only answers the field list a struct asks for.
struct FieldNames;

/// What [`FieldNames`] ends with: the field list, or anything else.
#[derive(Debug)]
enum FieldNamesError {
    /// The fields `deserialize_struct` was called with.
    Fields(&'static [&'static str]),
    /// The type asked for something other than a struct.
    NotAStruct,
}

impl fmt::Display for FieldNamesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("only reads the field names of a struct")
    }
}

impl std::error::Error for FieldNamesError {}

impl de::Error for FieldNamesError {
    fn custom<T: fmt::Display>(_: T) -> Self {
        FieldNamesError::NotAStruct
    }
}

impl<'de> Deserializer<'de> for FieldNames {
    type Error = FieldNamesError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(FieldNamesError::NotAStruct)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        Err(FieldNamesError::Fields(fields))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// Apply `TIDEGATE_SECTION__KEY=value` variables onto the parsed file.
/// A value is read as TOML when it parses as one (numbers, booleans, arrays)
/// and as a plain string otherwise (`20s`, `127.0.0.1:8080`).
fn apply_env_overrides(root: &mut toml::Table, env: &dyn Env) -> Result<(), ConfigError> {
    let sections = sections();
    let mut vars = env.vars();
    vars.sort();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("TIDEGATE_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if !sections.contains(&path[0].as_str()) {
            if path.len() > 1 {
                return Err(ConfigError::invalid(
                    name.as_str(),
                    format!(
                        "`{}` is not a config section (one of {})",
                        path[0],
                        sections.join(", ")
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

/// Sets the key at `path` (list entries by index) to `value`.
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

// ---------------------------------------------------------------------------
// Describing a configuration: `check-config`, the start-up log, `Debug`.
// ---------------------------------------------------------------------------

/// Everything `check-config` prints for a valid configuration: the effective
/// settings, the routing table, the drain timeline and the warnings.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    out.push_str("config OK\n");
    out.push_str(&format!("listen: {}\n", config.listen));
    out.push_str(&format!(
        "threads: {} ({})\n",
        config
            .worker_threads
            .map_or_else(|| "one per CPU".to_owned(), |n| n.to_string()),
        config.scheduler
    ));
    out.push_str(&format!(
        "store: {} (ttl {}{})\n",
        config.store.kind,
        humantime::format_duration(config.store.ttl),
        match config.store.kind {
            StoreKind::Memory | StoreKind::Embedded { .. } => {
                format!(", max {}", bytes_text(config.store.max_bytes))
            }
            StoreKind::Redis { .. } | StoreKind::RedisCluster { .. } => String::new(),
        }
    ));
    out.push_str(&format!(
        "client keys: {}\n",
        match &config.auth_keys {
            Some(keys) if config.resume_token_only => format!(
                "{} configured; a resume token alone opens its stream",
                keys.len()
            ),
            Some(keys) => format!(
                "{} configured; resuming needs the stream's token and its owner's key",
                keys.len()
            ),
            None => "none (the gateway is open)".into(),
        }
    ));
    out.push_str("routing (the first match's glob makes the model group; weights split it):\n");
    if config.builtin_mock {
        out.push_str(&format!(
            "  *  -> built-in mock provider (no upstream configured, {OPENAI_KEY_ENV} unset)\n"
        ));
    }
    for u in &config.upstreams {
        out.push_str(&format!(
            "  {:<24} -> {} ({}, {}, continuation = {}, credential {})\n",
            u.models.join(", "),
            u.name,
            u.base_url,
            u.protocol.as_str(),
            styles_text(&u.continuation),
            match &u.api_key_env {
                Some(var) => format!("from ${var}"),
                None => "passed through from the client".into(),
            }
        ));
        if u.provider_background {
            out.push_str(&format!(
                "  {:<24}    provider_background: the provider keeps each response (background, store); an interrupted stream re-attaches to it\n",
                ""
            ));
        }
        for rule in &u.continuation_rules {
            out.push_str(&format!(
                "  {:<24}    models {}: continuation = {}\n",
                "",
                rule.models.join(", "),
                styles_text(&rule.styles)
            ));
        }
        let h = &u.health;
        out.push_str(&format!(
            "  {:<24}    weight {}, ejected after {} failures in a row for {} then probed at {}{}\n",
            "",
            u.weight,
            h.eject_after,
            humantime::format_duration(h.eject_for),
            h.path,
            match h.interval {
                Some(i) => format!(", checked every {}", humantime::format_duration(i)),
                None => String::new(),
            }
        ));
    }
    let r = &config.routing;
    out.push_str(&format!(
        "retries before the first byte: {} attempts in all, {} then x{} (jittered, at most {}), within {}; failovers mid-answer: {}\n",
        r.attempts,
        humantime::format_duration(r.backoff),
        r.backoff_multiplier,
        humantime::format_duration(r.max_backoff),
        humantime::format_duration(r.retry_within),
        r.max_failovers,
    ));
    for c in &config.canaries {
        out.push_str(&format!(
            "canary {} -> {}: phases {:?} %, hold {}, verdict after {} requests: success >= {}%, errors <= {}%{}{}\n",
            c.from,
            c.to,
            c.phases,
            humantime::format_duration(c.hold),
            c.min_requests,
            c.min_success_rate,
            c.max_error_rate,
            c.max_ttft_p99
                .map(|d| format!(", ttft p99 <= {}", humantime::format_duration(d)))
                .unwrap_or_default(),
            c.max_duration_p99
                .map(|d| format!(", stream p99 <= {}", humantime::format_duration(d)))
                .unwrap_or_default(),
        ));
    }
    let t = &config.telemetry;
    out.push_str(&match &t.otlp_endpoint {
        Some(endpoint) => format!(
            "traces: OTLP/HTTP to {endpoint} as service {}{}\n",
            t.service_name,
            t.otlp_headers_env
                .as_ref()
                .map(|var| format!(", headers from ${var}"))
                .unwrap_or_default()
        ),
        None => "traces: off (set telemetry.otlp_endpoint)\n".into(),
    });
    out.push_str(&describe_timeline(&config.drain, config.stop_budget()));
    for warning in warnings(config) {
        out.push_str(&format!("warning: {warning}\n"));
    }
    out
}

/// A byte count as `check-config` shows it: `1 GiB`, `64 MiB`, `512 KiB`
/// when it is a whole number of them, else `1500 bytes`.
fn bytes_text(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    if n == 1 {
        "1 byte".into()
    } else {
        format!("{n} bytes")
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
    if matches!(
        config.store.kind,
        StoreKind::Memory | StoreKind::Embedded { .. }
    ) && config.store.max_bytes < config.limits.max_answer_bytes
    {
        out.push(format!(
            "store.max_bytes ({}) is less than limits.max_answer_bytes ({}): one long answer can fill the store, and new streams get 503 `store_full` while it runs",
            bytes_text(config.store.max_bytes),
            bytes_text(config.limits.max_answer_bytes)
        ));
    }
    for u in &config.upstreams {
        if u.continuation == [Continuation::None] {
            out.push(format!(
                "upstream `{}` has continuation = \"none\": a resumed stream replays what was stored, then ends `incomplete`",
                u.name
            ));
        }
    }
    out
}

/// Returns `url` with everything between the scheme and the last `@` (user
/// and password) replaced by `***`, so the text can be shown safely.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}"),
        None => url.to_owned(),
    }
}

impl fmt::Display for StoreKind {
    /// Writes `memory`, `embedded (./path)` or `redis (url)` with any
    /// password in the URL redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Memory => f.write_str("memory"),
            StoreKind::Embedded { path } => write!(f, "embedded ({})", path.display()),
            StoreKind::Redis { url } => write!(f, "redis ({})", redact_url(url)),
            StoreKind::RedisCluster { nodes } => {
                f.write_str("redis cluster (")?;
                for (i, node) in nodes.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(&redact_url(node))?;
                }
                f.write_str(")")
            }
        }
    }
}

impl fmt::Debug for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Memory => f.write_str("Memory"),
            StoreKind::Embedded { path } => f.debug_struct("Embedded").field("path", path).finish(),
            StoreKind::Redis { url } => f
                .debug_struct("Redis")
                .field("url", &redact_url(url))
                .finish(),
            StoreKind::RedisCluster { nodes } => f
                .debug_struct("RedisCluster")
                .field(
                    "nodes",
                    &nodes.iter().map(|n| redact_url(n)).collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
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
    fn the_scheduler_defaults_to_thread_per_core() {
        let c = Config::from_toml("", &env(&[])).unwrap();
        assert_eq!(c.scheduler, Scheduler::ThreadPerCore);
        let c = Config::from_toml(
            "scheduler = \"work_stealing\"\nworker_threads = 3",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.scheduler, Scheduler::WorkStealing);
        assert!(describe(&c).contains("threads: 3 (work_stealing)"));
        let err = Config::from_toml("scheduler = \"round_robin\"", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("scheduler"), "{err}");
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
        assert_eq!(c.upstreams[0].continuation, [Continuation::Prefix]);
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

    // ----- added with the typed raw stage -----

    const ONE_UPSTREAM: &str =
        "[[upstreams]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1/v1\"\n";

    /// Loads `text` with no environment, expecting an error, and returns it
    /// as text.
    fn error_of(text: &str) -> String {
        Config::from_toml(text, &env(&[])).unwrap_err().to_string()
    }

    #[test]
    fn every_default_is_applied() {
        let c = Config::from_toml("", &env(&[])).unwrap();
        assert_eq!(c.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(c.drain.pre_stop_delay, Duration::ZERO);
        assert_eq!(c.store.ttl, Duration::from_secs(15 * 60));
        assert_eq!(c.store.lease_ttl, Duration::from_secs(5));
        assert_eq!(c.resume.retry_hint, Duration::from_secs(2));
        assert!(c.resume.secret.is_none());
        assert_eq!(c.streams.heartbeat, Duration::from_secs(15));
        assert_eq!(c.streams.on_client_disconnect, DisconnectPolicy::Cancel);
        assert!(c.auth_keys.is_none());
        assert!(c.admin_token.is_none());

        let c = Config::from_toml(ONE_UPSTREAM, &env(&[])).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.protocol, Protocol::OpenAi);
        assert_eq!(u.models, ["*"]);
        assert_eq!(u.continuation, [Continuation::None]);
        assert_eq!(u.connect_timeout, Duration::from_secs(5));
        assert_eq!(u.first_byte_timeout, Duration::from_secs(60));
        assert_eq!(u.idle_timeout, Duration::from_secs(60));
        assert!(!u.http2);
        assert!(u.api_key.is_none() && u.api_key_env.is_none());
    }

    #[test]
    fn openai_upstream_keeps_its_longer_waits() {
        let c = Config::from_toml("", &env(&[("OPENAI_API_KEY", "sk-test")])).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.name, "openai");
        assert_eq!(u.protocol, Protocol::OpenAi);
        assert_eq!(u.api_key_env.as_deref(), Some("OPENAI_API_KEY"));
        assert_eq!(u.api_key, Some(Secret("sk-test".into())));
        assert_eq!(u.models, ["*"]);
        assert_eq!(u.continuation, [Continuation::Instruct]);
        assert_eq!(u.connect_timeout, Duration::from_secs(10));
        assert_eq!(u.first_byte_timeout, Duration::from_secs(120));
        assert_eq!(u.idle_timeout, Duration::from_secs(120));
        assert!(!u.http2);
        // A configured upstream wins over OPENAI_API_KEY.
        let c = Config::from_toml(ONE_UPSTREAM, &env(&[("OPENAI_API_KEY", "sk-test")])).unwrap();
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].name, "a");
    }

    #[test]
    fn cors_origins_are_checked() {
        let ok =
            "[cors]\nallow_origins = [\"https://chat.example.com\", \"http://127.0.0.1:3000\"]\n";
        let c = Config::from_toml(ok, &env(&[])).unwrap();
        assert_eq!(c.cors_origins.len(), 2);
        assert!(
            Config::from_toml("", &env(&[]))
                .unwrap()
                .cors_origins
                .is_empty()
        );
        for bad in [
            "[\"*\", \"https://a.example\"]",
            "[\"https://a.example/path\"]",
            "[\"chat.example.com\"]",
        ] {
            let text = format!("[cors]\nallow_origins = {bad}\n");
            let err = Config::from_toml(&text, &env(&[])).unwrap_err().to_string();
            assert!(err.contains("cors.allow_origins"), "{bad}: {err}");
        }
    }

    #[test]
    fn continuation_lists_rules_and_provider_defaults() {
        let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://x/v1\"\ncontinuation = [\"prefix\", \"instruct\"]\n[[upstreams.continuation_rules]]\nmodels = [\"big-*\"]\ncontinuation = \"instruct\"\n";
        let c = Config::from_toml(text, &env(&[])).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(
            u.continuation,
            [Continuation::Prefix, Continuation::Instruct]
        );
        assert_eq!(u.continuation_rules[0].models, ["big-*"]);
        assert_eq!(u.continuation_rules[0].styles, [Continuation::Instruct]);
        let text = describe(&c);
        assert!(text.contains("continuation = prefix → instruct"), "{text}");
        assert!(
            text.contains("models big-*: continuation = instruct"),
            "{text}"
        );
        // api.anthropic.com: prefill, then a re-ask; 4.6+ re-asks at once.
        let text = "[[upstreams]]\nname = \"c\"\nprotocol = \"anthropic\"\nbase_url = \"https://api.anthropic.com/v1\"\n";
        let u = &Config::from_toml(text, &env(&[])).unwrap().upstreams[0];
        assert_eq!(
            u.continuation,
            [Continuation::AssistantPrefix, Continuation::Instruct]
        );
        assert!(
            u.continuation_rules[0]
                .models
                .iter()
                .any(|g| g == "claude-*-4-6*")
        );
        for (bad, why) in [
            ("continuation = []", "lists no style"),
            (
                "continuation = [\"none\", \"instruct\"]",
                "cannot be combined",
            ),
        ] {
            let text = format!("[[upstreams]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n{bad}\n");
            let err = Config::from_toml(&text, &env(&[])).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let text = "[[upstreams]]\nname = \"c\"\nprotocol = \"anthropic\"\nbase_url = \"http://x/v1\"\ncontinuation = \"prefix\"\n";
        let err = Config::from_toml(text, &env(&[])).unwrap_err().to_string();
        assert!(err.contains("Anthropic upstreams take"), "{err}");
    }

    #[test]
    fn builtin_mock_takes_the_ordinary_defaults() {
        let u = UpstreamConfig::builtin_mock("http://127.0.0.1:9/v1".into());
        assert_eq!(u.name, "builtin-mock");
        assert_eq!(u.protocol, Protocol::OpenAi);
        assert_eq!(u.base_url, "http://127.0.0.1:9/v1");
        assert!(u.api_key.is_none() && u.api_key_env.is_none());
        assert_eq!(u.models, ["*"]);
        assert_eq!(u.continuation, [Continuation::ContinueFinalMessage]);
        assert_eq!(u.connect_timeout, Duration::from_secs(5));
        assert_eq!(u.first_byte_timeout, Duration::from_secs(60));
        assert_eq!(u.idle_timeout, Duration::from_secs(60));
        assert!(!u.http2);
    }

    #[test]
    fn enum_names_match_as_str() {
        for p in [Protocol::OpenAi, Protocol::Anthropic] {
            let text = format!(
                "[[upstreams]]\nname = \"a\"\nbase_url = \"http://x/v1\"\nprotocol = \"{}\"\n",
                p.as_str()
            );
            assert_eq!(
                Config::from_toml(&text, &env(&[])).unwrap().upstreams[0].protocol,
                p
            );
        }
        for k in [
            Continuation::ContinueFinalMessage,
            Continuation::Prefix,
            Continuation::AssistantPrefix,
            Continuation::Instruct,
            Continuation::None,
        ] {
            let text = format!(
                "[[upstreams]]\nname = \"a\"\nbase_url = \"http://x/v1\"\ncontinuation = \"{}\"\n",
                k.as_str()
            );
            assert_eq!(
                Config::from_toml(&text, &env(&[])).unwrap().upstreams[0].continuation,
                [k]
            );
        }
        for (kind, expected) in [
            ("memory", StoreKind::Memory),
            (
                "embedded",
                StoreKind::Embedded {
                    path: DEFAULT_DATA_DIR.into(),
                },
            ),
        ] {
            let c = Config::from_toml(&format!("[store]\nkind = \"{kind}\""), &env(&[])).unwrap();
            assert_eq!(c.store.kind, expected);
        }
    }

    #[test]
    fn bad_values_name_their_key_path() {
        let cases = [
            (
                format!("{ONE_UPSTREAM}protocol = \"grpc\"\n"),
                "`upstreams[0].protocol`",
                "grpc",
            ),
            (
                format!("{ONE_UPSTREAM}continuation = \"maybe\"\n"),
                "`upstreams[0].continuation`",
                "maybe",
            ),
            (
                format!("{ONE_UPSTREAM}idle_timeout = \"later\"\n"),
                "`upstreams[0].idle_timeout`",
                "later",
            ),
            (
                format!("{ONE_UPSTREAM}http2 = \"yes\"\n"),
                "`upstreams[0].http2`",
                "bool",
            ),
            ("[drain]\ngrace = \"soon\"".into(), "`drain.grace`", "soon"),
            ("[drain]\ngrace = 5".into(), "`drain.grace`", "integer"),
            ("[store]\nkind = \"disk\"".into(), "`store.kind`", "disk"),
            (
                "[store]\nttl = \"forever\"".into(),
                "`store.ttl`",
                "forever",
            ),
            (
                "[resume]\nretry_hint = \"x\"".into(),
                "`resume.retry_hint`",
                "x",
            ),
            (
                "[streams]\non_client_disconnect = \"never\"".into(),
                "`streams.on_client_disconnect`",
                "neither \"cancel\" nor a duration",
            ),
            ("max_body_bytes = \"big\"".into(), "`max_body_bytes`", "big"),
            (
                "listen = \"nowhere\"".into(),
                "`listen`",
                "not an address like 127.0.0.1:8080",
            ),
        ];
        for (text, key, detail) in cases {
            let err = error_of(&text);
            assert!(err.contains(key) && err.contains(detail), "{text}: {err}");
        }
        let err = Config::from_toml("", &env(&[("TIDEGATE_DRAIN__GRACE", "soon")])).unwrap_err();
        assert!(err.to_string().contains("`drain.grace`"), "{err}");
    }

    #[test]
    fn validation_rules_hold() {
        let cases = [
            (
                "[drain]\npre_stop_delay = \"30s\"\ngrace = \"10s\"",
                "drain.pre_stop_delay",
            ),
            ("[drain]\nexit_timeout = \"0s\"", "drain.exit_timeout"),
            ("[store]\nttl = \"0s\"", "store.ttl"),
            ("[store]\nlease_ttl = \"499ms\"", "store.lease_ttl"),
            ("[store]\nmax_bytes = 0", "store.max_bytes"),
            ("[store]\nmax_bytes = -1", "store.max_bytes"),
            ("[store]\nmax_bytes = \"1GiB\"", "store.max_bytes"),
            ("[streams]\nheartbeat = \"0s\"", "streams.heartbeat"),
            ("[store]\nkind = \"redis\"", "store.url"),
            ("[store]\nkind = \"redis\"\nurl = \"http://x\"", "store.url"),
            (
                "[store]\nkind = \"redis\"\nurl = \"redis://a\"\ncluster = [\"redis://b\"]",
                "store.cluster",
            ),
            ("[store]\nkind = \"redis\"\ncluster = []", "store.cluster"),
            (
                "[store]\nkind = \"redis\"\ncluster = [\"redis://a:7000\", \"a:7001\"]",
                "store.cluster[1]",
            ),
            ("[store]\ncluster = [\"redis://a:7000\"]", "store.cluster"),
            (
                "[[upstreams]]\nname = \"\"\nbase_url = \"http://x/v1\"",
                "upstreams[0].name",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nbase_url = \"ftp://x/v1\"",
                "upstreams[0].base_url",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nbase_url = \"http://x:99999/v1\"",
                "upstreams[0].base_url",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nbase_url = \"http://x/v1\"\nmodels = []",
                "upstreams[0].models",
            ),
            ("worker_threads = 1025", "worker_threads"),
        ];
        for (text, key) in cases {
            let err = error_of(text);
            assert!(err.contains(key), "{text}: {err}");
        }
        let c = Config::from_toml("[store]\nlease_ttl = \"500ms\"", &env(&[])).unwrap();
        assert_eq!(c.store.lease_ttl, Duration::from_millis(500));
    }

    #[test]
    fn disconnect_policy_is_cancel_or_a_duration() {
        let policy = |value: &str| {
            Config::from_toml(
                &format!("[streams]\non_client_disconnect = \"{value}\""),
                &env(&[]),
            )
            .unwrap()
            .streams
            .on_client_disconnect
        };
        assert_eq!(policy("cancel"), DisconnectPolicy::Cancel);
        assert_eq!(
            policy("10s"),
            DisconnectPolicy::Grace(Duration::from_secs(10))
        );
    }

    #[test]
    fn secrets_are_resolved_from_the_environment() {
        let file = "[auth]\nkeys_env = \"KEYS\"\n[admin]\ntoken_env = \"ADMIN\"\n[resume]\nsecret_env = \"RESUME\"\n";
        let vars = env(&[("KEYS", " k1, ,k2 "), ("ADMIN", "tok"), ("RESUME", "shh")]);
        let c = Config::from_toml(file, &vars).unwrap();
        assert_eq!(
            c.auth_keys,
            Some(vec![Secret("k1".into()), Secret("k2".into())])
        );
        assert_eq!(c.admin_token.as_ref().map(|t| t.0.as_str()), Some("tok"));
        assert_eq!(
            c.resume.secret.as_ref().map(|s| s.0.as_bytes()),
            Some(&b"shh"[..])
        );

        let err = Config::from_toml(
            file,
            &env(&[("KEYS", " , "), ("ADMIN", "t"), ("RESUME", "s")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("auth.keys_env") && err.contains("KEYS holds no key"),
            "{err}"
        );
        for missing in ["KEYS", "ADMIN", "RESUME"] {
            let mut vars = vars.clone();
            vars.remove(missing);
            let err = Config::from_toml(file, &vars).unwrap_err().to_string();
            assert!(err.contains(missing), "{err}");
        }
    }

    #[test]
    fn sections_come_from_the_raw_config() {
        assert_eq!(
            sections(),
            [
                "listen",
                "max_body_bytes",
                "worker_threads",
                "scheduler",
                "drain",
                "store",
                "resume",
                "streams",
                "auth",
                "admin",
                "limits",
                "cors",
                "upstreams",
                "routing",
                "canaries",
                "telemetry",
            ]
        );
        let c = Config::from_toml(
            "",
            &env(&[
                ("TIDEGATE_STORE__KIND", "memory"),
                ("TIDEGATE_MAX_BODY_BYTES", "1024"),
                ("TIDEGATE_RESUME_SECRET", "a secret, not an override"),
            ]),
        )
        .unwrap();
        assert_eq!(c.store.kind, StoreKind::Memory);
        assert_eq!(c.max_body_bytes, 1024);
        let err = Config::from_toml(ONE_UPSTREAM, &env(&[("TIDEGATE_UPSTREAMS__1__NAME", "b")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TIDEGATE_UPSTREAMS__1__NAME") && err.contains("no entry 1"),
            "{err}"
        );
    }

    #[test]
    fn describe_prints_what_check_config_printed() {
        let file = "[drain]\ngrace = \"40s\"\n[[upstreams]]\nname = \"v\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodels = [\"llama-*\"]\napi_key_env = \"V_KEY\"\n";
        let c = Config::from_toml(file, &env(&[("V_KEY", "sk-v")])).unwrap();
        let text = describe(&c);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "config OK");
        assert_eq!(lines[1], "listen: 127.0.0.1:8080");
        assert_eq!(lines[2], "threads: one per CPU (thread_per_core)");
        assert_eq!(
            lines[3],
            "store: embedded (./tidegate-data) (ttl 15m, max 1 GiB)"
        );
        assert_eq!(lines[4], "client keys: none (the gateway is open)");
        assert_eq!(
            lines[5],
            "routing (the first match's glob makes the model group; weights split it):"
        );
        assert_eq!(
            lines[6],
            "  llama-*                  -> v (http://127.0.0.1:1/v1, openai, continuation = none, credential from $V_KEY)"
        );
        assert!(text.contains(&describe_timeline(&c.drain, c.stop_budget())));
        assert!(
            text.contains("terminationGracePeriodSeconds >= 45"),
            "{text}"
        );
        assert!(text.contains("TimeoutStopSec >= 45s"), "{text}");
        assert!(text.contains("warning: the drain needs 45s"), "{text}");
        assert!(
            text.contains("warning: upstream `v` has continuation = \"none\""),
            "{text}"
        );
        assert!(text.ends_with('\n'));
        assert!(!text.contains("sk-v"));

        let c = Config::from_toml("[store]\nkind = \"memory\"", &env(&[])).unwrap();
        let text = describe(&c);
        assert!(
            text.contains("\nstore: memory (ttl 15m, max 1 GiB)\n"),
            "{text}"
        );
        assert!(!text.contains("store.max_bytes"), "{text}");
        assert!(text.contains(
            "\n  *  -> built-in mock provider (no upstream configured, OPENAI_API_KEY unset)\n"
        ));
        assert!(
            text.contains("\nwarning: store.kind = \"memory\""),
            "{text}"
        );

        let c = Config::from_toml(
            "[auth]\nkeys_env = \"KEYS\"",
            &env(&[("KEYS", "a,b"), ("OPENAI_API_KEY", "sk-o")]),
        )
        .unwrap();
        let text = describe(&c);
        assert!(
            text.contains("\nclient keys: 2 configured; resuming needs the stream's token and its owner's key\n"),
            "{text}"
        );
        let c = Config::from_toml(
            "[auth]\nkeys_env = \"KEYS\"\nresume_token_only = true",
            &env(&[("KEYS", "a")]),
        )
        .unwrap();
        assert!(c.resume_token_only);
        assert!(
            describe(&c)
                .contains("\nclient keys: 1 configured; a resume token alone opens its stream\n")
        );
        assert!(text.contains("-> openai (https://api.openai.com/v1, openai, continuation = instruct, credential from $OPENAI_API_KEY)"), "{text}");
        assert!(!text.contains("sk-o"));
    }

    #[test]
    fn store_max_bytes_bounds_the_local_stores_only() {
        let c = Config::from_toml("", &env(&[])).unwrap();
        assert_eq!(c.store.max_bytes, 1 << 30);
        for kind in ["memory", "embedded"] {
            let text = format!("[store]\nkind = \"{kind}\"\nmax_bytes = 1048576");
            let c = Config::from_toml(&text, &env(&[])).unwrap();
            assert_eq!(c.store.max_bytes, 1 << 20, "{kind}");
        }
        let c = Config::from_toml("", &env(&[("TIDEGATE_STORE__MAX_BYTES", "4096")])).unwrap();
        assert_eq!(c.store.max_bytes, 4096);
        let err = error_of("[store]\nmax_bytes = 0");
        assert!(
            err.contains("`store.max_bytes`") && err.contains("more than 0"),
            "{err}"
        );

        // Redis bounds itself: the key is refused there, not ignored.
        let secret = [("RS", "resume-secret")];
        let redis = "[resume]\nsecret_env = \"RS\"\n[store]\nkind = \"redis\"\n";
        for place in [
            "url = \"redis://127.0.0.1:6379\"",
            "cluster = [\"redis://10.0.0.1:7000\"]",
        ] {
            let text = format!("{redis}{place}\nmax_bytes = 1048576");
            let err = Config::from_toml(&text, &env(&secret))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`store.max_bytes`") && err.contains("maxmemory"),
                "{place}: {err}"
            );
            // Absent, all is well; and check-config shows no bound of ours.
            let c = Config::from_toml(&format!("{redis}{place}"), &env(&secret)).unwrap();
            let text = describe(&c);
            assert!(!text.contains("max "), "{text}");
        }
    }

    #[test]
    fn telemetry_is_off_by_default_and_its_headers_are_secrets() {
        let c = Config::from_toml("", &env(&[])).unwrap();
        assert_eq!(c.telemetry.otlp_endpoint, None);
        assert!(describe(&c).contains("traces: off"));
        let text = "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\notlp_headers_env = \"OH\"";
        let c = Config::from_toml(text, &env(&[("OH", "x-api-key=sekrit-123, x-team = blue")]))
            .unwrap();
        assert_eq!(c.telemetry.service_name, "tidegate");
        assert_eq!(c.telemetry.otlp_headers.len(), 2);
        assert_eq!(c.telemetry.otlp_headers[1].0, "x-team");
        assert_eq!(c.telemetry.otlp_headers[1].1.0, "blue");
        let shown = format!("{}{c:?}", describe(&c));
        assert!(
            shown.contains("traces: OTLP/HTTP to http://127.0.0.1:4318/v1/traces as service tidegate, headers from $OH"),
            "{shown}"
        );
        assert!(!shown.contains("sekrit"), "{shown}");
        for (bad, says) in [
            (
                "[telemetry]\notlp_endpoint = \"collector:4318\"",
                "not an http(s) URL",
            ),
            ("[telemetry]\nservice_name = \"\"", "must not be empty"),
            ("[telemetry]\notlp_headers_env = \"OH\"", "name=value"),
            ("[telemetry]\nexporter = \"grpc\"", "exporter"),
        ] {
            let err = Config::from_toml(bad, &env(&[("OH", "no-equals")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let err = Config::from_toml("[telemetry]\notlp_headers_env = \"MISSING\"", &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("MISSING"), "{err}");
    }

    #[test]
    fn check_config_shows_the_store_bound_and_warns_when_one_answer_fills_it() {
        let c = Config::from_toml(
            "[store]\nkind = \"memory\"\nmax_bytes = 16777216",
            &env(&[]),
        )
        .unwrap();
        let text = describe(&c);
        assert!(
            text.contains("\nstore: memory (ttl 15m, max 16 MiB)\n"),
            "{text}"
        );
        assert!(
            text.contains("\nwarning: store.max_bytes (16 MiB) is less than limits.max_answer_bytes (64 MiB): one long answer can fill the store"),
            "{text}"
        );
        let c = Config::from_toml(
            "[store]\nkind = \"memory\"\nmax_bytes = 16777216\n[limits]\nmax_answer_bytes = 16777216",
            &env(&[]),
        )
        .unwrap();
        assert!(!describe(&c).contains("store.max_bytes"));
        assert_eq!(bytes_text(1 << 30), "1 GiB");
        assert_eq!(bytes_text(3 << 20), "3 MiB");
        assert_eq!(bytes_text(1536), "1536 bytes");
        assert_eq!(bytes_text(1), "1 byte");
    }

    #[test]
    fn a_redis_password_never_shows() {
        let file = "[store]\nkind = \"redis\"\nurl = \"redis://user:hunter2@cache.internal:6379/0\"\n[resume]\nsecret_env = \"RS\"\n";
        let c = Config::from_toml(file, &env(&[("RS", "resume-secret")])).unwrap();
        let text = describe(&c);
        assert!(
            text.contains("\nstore: redis (redis://***@cache.internal:6379/0) (ttl 15m)\n"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", c.store).contains("hunter2"));
        // The value the store connects with is untouched.
        assert_eq!(
            c.store.kind,
            StoreKind::Redis {
                url: "redis://user:hunter2@cache.internal:6379/0".into()
            }
        );
    }

    #[test]
    fn a_redis_cluster_is_its_seed_nodes_and_hides_passwords() {
        let file = "[store]\nkind = \"redis\"\ncluster = [\"redis://:hunter2@10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\n[resume]\nsecret_env = \"RS\"\n";
        let c = Config::from_toml(file, &env(&[("RS", "resume-secret")])).unwrap();
        let text = describe(&c);
        assert!(
            text.contains(
                "\nstore: redis cluster (redis://***@10.0.0.1:7000, redis://10.0.0.2:7000) (ttl 15m)\n"
            ),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!format!("{:?}", c.store).contains("hunter2"));
        assert_eq!(
            c.store.kind,
            StoreKind::RedisCluster {
                nodes: vec![
                    "redis://:hunter2@10.0.0.1:7000".into(),
                    "redis://10.0.0.2:7000".into()
                ]
            }
        );
        // Shared like a single Redis: it needs a shared resume secret.
        let bare = "[store]\nkind = \"redis\"\ncluster = [\"redis://a:7000\"]";
        assert!(
            error_of(bare).contains("resume.secret_env"),
            "{}",
            error_of(bare)
        );
    }

    #[test]
    fn redact_url_hides_user_and_password() {
        assert_eq!(redact_url("redis://:pw@host:6379"), "redis://***@host:6379");
        assert_eq!(redact_url("rediss://u:p@w@host"), "rediss://***@host");
        assert_eq!(redact_url("redis://host:6379/1"), "redis://host:6379/1");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn debug_shows_no_secret() {
        let file = "[auth]\nkeys_env = \"KEYS\"\n[admin]\ntoken_env = \"ADMIN\"\n[resume]\nsecret_env = \"RESUME\"\n[[upstreams]]\nname = \"a\"\nbase_url = \"http://x/v1\"\napi_key_env = \"UP\"\n";
        let vars = env(&[
            ("KEYS", "client-key-one,client-key-two"),
            ("ADMIN", "admin-token-value"),
            ("RESUME", "resume-secret-value"),
            ("UP", "upstream-key-value"),
        ]);
        let c = Config::from_toml(file, &vars).unwrap();
        let debug = format!("{c:?}");
        let bytes = format!("{:?}", b"resume-secret-value");
        for secret in [
            "client-key-one",
            "client-key-two",
            "admin-token-value",
            "resume-secret-value",
            "upstream-key-value",
            bytes.trim_matches(|c| c == '[' || c == ']'),
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(
            debug.contains("auth_keys: Some([<redacted>, <redacted>])"),
            "{debug}"
        );
        assert!(debug.contains("admin_token: Some(<redacted>)"), "{debug}");
        assert!(debug.contains("secret: Some(<redacted>)"), "{debug}");
    }
}
