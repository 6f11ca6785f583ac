//! # tidegate
//!
//! A streaming SSE gateway for LLM traffic that owns the moment a stream has
//! to stop half-way: a deploy, a scale-down, a client that walks away, a
//! provider that dies. Every stream ends on purpose (`[DONE]` or an in-band
//! abort event saying how to resume), nothing is generated for nobody, and an
//! interrupted answer can be finished from the partial-response store.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, `TIDEGATE_*` overrides, validated [`config::Config`];
//! - [`server`]: start-up, serving, and the orderly exit after a drain;
//! - [`drain`]: SIGTERM → readiness 503 → refuse new streams → deadline → exit;
//! - [`api`]: the HTTP routes and the one error type at the edge;
//! - [`relay`]: one stream's life — the pump that talks to the provider and
//!   writes ahead to the store, and the subscribers that replay and follow it;
//! - [`upstream`]: providers, credentials, timeouts, and continuation requests;
//! - [`store`]: the partial-response store (memory, embedded, redis) and
//!   resume tokens;
//! - [`mock`]: `tidegate mock-upstream`, the deterministic provider;
//! - [`metrics`]: Prometheus counters.
//!
//! See `ARCHITECTURE.md` for the life of a stream and the invariants.

pub mod api;
pub mod config;
pub mod drain;
pub mod metrics;
pub mod mock;
pub mod net;
pub mod protocol;
pub mod relay;
pub mod server;
pub mod store;
pub mod stream;
pub mod token;
pub mod upstream;
