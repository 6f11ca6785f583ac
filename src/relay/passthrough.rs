//! `stream: false`: the provider's JSON answer, passed through whole. At
//! the drain deadline a request still waiting ends with
//! `server_restarting` instead of hanging.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use bytes::Bytes;

use super::{Relay, RelayError};
use crate::upstream::{
    ReadAtMostError, TransportError, Upstream, UpstreamError, passed_headers, read_at_most,
};

/// A provider's whole answer.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    /// The provider's headers a client is shown.
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Relay {
    pub async fn passthrough(
        &self,
        upstream: &Arc<Upstream>,
        body: Bytes,
        client_headers: &HeaderMap,
        owner: &str,
    ) -> Result<Answer, RelayError> {
        self.admit()?;
        // A whole answer is a generation too: it counts against the
        // stream limits while it is awaited.
        let _permit = self.stream_permit(owner)?;
        let _in_flight = self.drain.in_flight();
        self.metrics.non_streaming.inc();
        self.metrics.upstream_requests.inc();
        let call = async {
            let response = upstream.send(body, client_headers).await?;
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
            let headers = passed_headers(response.headers());
            let name = || upstream.config.name.clone();
            let after = upstream.config.idle_timeout;
            // Read while it fits in `limits.max_answer_bytes`: a larger
            // answer is refused, not held.
            let limit = self.settings.limits.max_answer_bytes;
            let cap = usize::try_from(limit).unwrap_or(usize::MAX);
            let body = match read_at_most(response, cap, after).await {
                Ok((_, true)) => {
                    return Err(UpstreamError::TooLarge {
                        upstream: name(),
                        limit,
                    });
                }
                Ok((body, false)) => body,
                Err(ReadAtMostError::Transport(e)) => {
                    // The head came: the provider failed while sending.
                    return Err(UpstreamError::Body {
                        upstream: name(),
                        source: TransportError::Pooled(e),
                    });
                }
                Err(ReadAtMostError::Timeout) => {
                    return Err(UpstreamError::Timeout {
                        upstream: name(),
                        after,
                        connecting: false,
                    });
                }
            };
            Ok(Answer {
                status,
                content_type,
                headers,
                body,
            })
        };
        tokio::select! {
            result = call => result.map_err(RelayError::Upstream),
            _ = self.drain.streams.cancelled() => Err(RelayError::ServerRestarting),
        }
    }
}
