#![expect(
    clippy::disallowed_methods,
    reason = "tests spawn client tasks; the ban guards the gateway's own tasks, which must stay in the drain's tracker"
)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test harness whose setup fails should stop the test with the reason"
)]
//! Integration tests: the real binary over real sockets on loopback.
//! One test binary keeps the build fast; each module is one capability.

mod anthropic;
mod auth;
mod capacity;
mod cluster;
mod common;
mod continuation;
mod cors;
mod drain;
mod drain_hard;
mod faults;
mod hostile;
mod limits;
mod relay;
mod replicas;
mod responses;
mod resume;
mod routing;
mod telemetry;
mod tokens;
