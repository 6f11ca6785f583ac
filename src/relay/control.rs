//! A stream's state, and its cancellation, by id and resume token.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use serde::Serialize;

use super::{Access, Relay, RelayError, protocol_of};
use crate::protocol::continuation::ToolCall;
use crate::stream::{AbortKind, Event, Status, StreamRecord};

/// What `GET /v1/streams/{id}/state` answers.
#[derive(Debug, Serialize)]
pub struct StreamState {
    pub id: String,
    pub status: &'static str,
    pub reason: Option<String>,
    pub last_seq: u64,
    /// Every choice's text, in choice order.
    pub text: String,
    /// The first choice's finish reason.
    pub finish_reason: Option<String>,
    /// Per choice (Anthropic: the one message): text, reasoning, refusal,
    /// tool calls, finish reason.
    pub choices: Vec<ChoiceState>,
    pub protocol: String,
    pub upstream: String,
    #[serde(rename = "created_at_ms")]
    pub created_ms: u64,
    #[serde(rename = "updated_at_ms")]
    pub updated_ms: u64,
}

/// One choice of a stream, as `/state` reports it.
#[derive(Debug, Serialize)]
pub struct ChoiceState {
    pub index: u32,
    pub text: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reasoning: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub refusal: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<String>,
}

/// How long a cancel waits for the pump to record the end, so that a state
/// read right after its answer agrees.
const CANCEL_SETTLE: Duration = Duration::from_secs(2);

/// A stream as the store holds it.
pub struct Stored {
    pub record: StreamRecord,
    /// Where it stands: `Running` only while a process runs it.
    pub status: Status,
    pub events: Vec<Event>,
}

impl Relay {
    /// The stream's record, where it stands, and its stored events.
    pub async fn stored(&self, id: &str, access: Access<'_>) -> Result<Stored, RelayError> {
        let record = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| self.unknown(id, access))?;
        self.allows(access, id, &record.owner)?;
        let events = self.store.events_after(id, 0).await?;
        let local = self.registry.get(id).is_some();
        let status = match record.status {
            Status::Running if !local && !self.store.lease_alive(id).await? => Status::Interrupted,
            other => other,
        };
        Ok(Stored {
            record,
            status,
            events,
        })
    }

    /// The stream's record and what its stored events say so far.
    pub async fn state(&self, id: &str, access: Access<'_>) -> Result<StreamState, RelayError> {
        let Stored {
            record,
            status,
            events,
        } = self.stored(id, access).await?;
        let partial = protocol_of(&record).wire().partial(&events);
        Ok(StreamState {
            id: record.id,
            status: status.as_str(),
            reason: record.reason,
            last_seq: partial.last_seq,
            text: partial.text(),
            finish_reason: partial.finish_reason().map(str::to_owned),
            choices: partial
                .choices
                .into_iter()
                .map(|c| ChoiceState {
                    index: c.index,
                    text: c.content,
                    reasoning: c.reasoning,
                    refusal: c.refusal,
                    tool_calls: c.tool_calls,
                    finish_reason: c.finish_reason,
                })
                .collect(),
            protocol: record.protocol,
            upstream: record.upstream,
            created_ms: record.created_ms,
            updated_ms: record.updated_ms,
        })
    }

    /// Cancel the stream wherever it runs; answer its status after.
    /// `credential`: the client's provider key headers, for cancelling the
    /// provider's own background response of an interrupted stream on an
    /// upstream without a key of its own.
    pub async fn cancel(
        self: &Arc<Self>,
        id: &str,
        access: Access<'_>,
        credential: &HeaderMap,
    ) -> Result<&'static str, RelayError> {
        if let Some(live) = self.registry.get(id) {
            self.allows(access, id, &live.owner)?;
            live.cancel(AbortKind::Cancelled);
            let mut changes = live.watch();
            let _ = tokio::time::timeout(CANCEL_SETTLE, async {
                while live.end().is_none() {
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        } else {
            let record = self
                .store
                .get(id)
                .await?
                .ok_or_else(|| self.unknown(id, access))?;
            self.allows(access, id, &record.owner)?;
            if self.store.shared()
                && record.status == Status::Running
                && self.store.lease_alive(id).await?
            {
                self.store.request_cancel(id).await?;
            } else if matches!(record.status, Status::Running | Status::Interrupted) {
                self.store
                    .set_status(id, Status::Cancelled, Some("cancelled"), &self.instance)
                    .await?;
                // Nobody runs it, but its provider may still be generating.
                if let (Some(reattach), Some(upstream)) =
                    (&record.reattach, self.upstreams.named(&record.upstream))
                {
                    self.cancel_provider_response(upstream, &reattach.response, credential);
                }
            }
        }
        Ok(self
            .store
            .get(id)
            .await?
            .map_or("cancelled", |r| r.status.as_str()))
    }
}
