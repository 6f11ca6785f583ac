//! Integration tests: the real binary over real sockets on loopback.
//! One test binary keeps the build fast; each module is one capability.

mod common;
mod drain;
mod relay;
mod resume;
