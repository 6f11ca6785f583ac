//! Socket settings shared by the gateway's listener and the mock provider's.

/// Every event is small and latency-bound: never let Nagle hold one back
/// waiting for the peer's delayed ACK.
pub fn no_delay(stream: &mut tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}
