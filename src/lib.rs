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
//! From the bottom up; a module uses only those above it in this list.
//!
//! - [`stream`]: what every layer says about a stream — its events, its
//!   record and status, how it ended;
//! - [`token`]: resume tokens, random ids, key hashes;
//! - [`protocol`]: one file per wire protocol (OpenAI chat, Anthropic
//!   Messages) behind the [`protocol::Wire`] trait, and the SSE framing they
//!   share; pure code, no I/O;
//! - [`config`]: the TOML file, `TIDEGATE_*` overrides, validated [`config::Config`];
//! - [`store`]: the partial-response store (memory, embedded, redis);
//! - [`upstream`]: providers as transport — clients, credentials, timeouts,
//!   the HTTP/1.1 pool, routing by model;
//! - [`metrics`], [`drain`], [`net`]: counters, the shutdown timeline,
//!   socket settings;
//! - [`mock`]: `tidegate mock-upstream`, the deterministic provider (it
//!   shares no protocol code with the gateway, so it cannot agree with it
//!   by accident);
//! - [`relay`]: a stream's whole life — start, pump, follow, resume,
//!   continue, cancel;
//! - [`api`]: the HTTP routes and the one error type at the edge;
//! - [`workers`]: the thread-per-core runtimes that serve client connections;
//! - [`server`]: start-up, serving, and the orderly exit after a drain.
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
pub mod trace;
pub mod upstream;
pub mod workers;
