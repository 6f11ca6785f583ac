//! The relay: one stream's life from the upstream's first byte to `[DONE]`
//! or an in-band abort event.
//!
//! - [`event`]: relayed events, how streams end, and their SSE frames;
//! - [`live`]: streams running in this process, shared by every client that
//!   follows them (the original request, resumes, idempotent retries);
//! - [`pump`]: the one task per stream that talks to the provider and writes
//!   ahead to the store;
//! - [`sse`]: decoding the provider's event stream into shared slices;
//! - [`subscriber`]: a client's SSE body: replay from the store, then follow.

pub mod event;
pub mod live;
pub mod pump;
pub mod sse;
pub mod subscriber;
