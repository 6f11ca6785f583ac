//! Background responses (OpenAI Responses `background: true`) are
//! generated with no client attached, and an interrupted one is continued
//! with no client either: the store lists them, and every process looks
//! at the list — once at start, then every [`EVERY`] — and continues each
//! one nobody runs, the way a queue redelivers a job whose worker died. On
//! a shared store the lease decides which replica takes it.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;

use super::{Access, Relay, RelayError};
use crate::stream::Status;

/// How often the list is looked at.
pub const EVERY: Duration = Duration::from_secs(1);

impl Relay {
    /// Continue every background response that nobody runs; forget those
    /// that are over. Returns how many were continued.
    pub async fn redeliver(self: &Arc<Self>) -> usize {
        let ids = match self.store.background().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the background responses");
                return 0;
            }
        };
        let mut continued = 0;
        for id in ids {
            if self.registry.get(&id).is_some() || !self.drain.accepting() {
                continue;
            }
            let record = match self.store.get(&id).await {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!(stream = %id, error = %e, "cannot read a background response");
                    continue;
                }
            };
            let running = match &record {
                None => false,
                Some(r) => match r.status {
                    Status::Completed | Status::Failed | Status::Cancelled => false,
                    Status::Running => {
                        if self.store.lease_alive(&id).await.unwrap_or(true) {
                            continue;
                        }
                        true
                    }
                    Status::Interrupted => true,
                },
            };
            let Some(record) = record.filter(|_| running) else {
                // Over, or expired: nothing more to do for it.
                if let Err(e) = self.store.remove_background(&id).await {
                    tracing::warn!(stream = %id, error = %e, "cannot forget a background response");
                }
                continue;
            };
            // A resume with no client: its body is dropped at once, and
            // the run (which keeps going whoever is attached) goes on.
            match self
                .resume(
                    &id,
                    Access::Owner(&record.owner),
                    u64::MAX,
                    false,
                    &HeaderMap::new(),
                )
                .await
            {
                Ok(_) => {
                    continued += 1;
                    tracing::info!(stream = %id, "continuing an interrupted background response");
                }
                Err(RelayError::CredentialRequired { upstream }) => {
                    tracing::warn!(stream = %id, %upstream, "a background response on an upstream that uses the client's own key waits for its client to resume it");
                }
                Err(e) => {
                    tracing::warn!(stream = %id, error = %e, "cannot continue a background response")
                }
            }
        }
        continued
    }
}

/// Redeliver until the listener closes.
pub async fn run(relay: Arc<Relay>) {
    loop {
        relay.redeliver().await;
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = relay.drain.close_listener.cancelled() => return,
        }
    }
}
