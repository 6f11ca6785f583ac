//! What a stream is, in the words every layer shares: its events, its
//! record, where it stands and how it ended. Pure data, no I/O: the store
//! keeps these, the relay makes them, the protocols frame them, and none of
//! those needs another to name them.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One upstream SSE event as relayed: numbered per stream from 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    /// The SSE `event:` name (Anthropic names every event; OpenAI none).
    pub name: Option<Box<str>>,
    /// The `data:` payload, untouched.
    pub data: Bytes,
}

/// Why a stream ended without finishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortKind {
    /// The gateway reached its drain deadline.
    ServerRestarting,
    /// The provider failed, stalled or closed mid-stream.
    UpstreamFailed,
    /// The store refused a write: continuing would break write-ahead.
    StoreFailed,
    /// `DELETE /v1/streams/{id}`.
    Cancelled,
    /// A resume that cannot continue (continuation = "none", or a cut no
    /// provider can continue from).
    Incomplete,
    /// The provider refused the request with a 4xx (a continuation's, or
    /// in its stream): asking again would fail the same way.
    UpstreamRejected,
    /// Every client went away (not sent to anyone: nobody is there).
    ClientGone,
}

impl AbortKind {
    /// Every kind, for counters.
    pub const ALL: [AbortKind; 7] = [
        AbortKind::ServerRestarting,
        AbortKind::UpstreamFailed,
        AbortKind::StoreFailed,
        AbortKind::Cancelled,
        AbortKind::Incomplete,
        AbortKind::UpstreamRejected,
        AbortKind::ClientGone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AbortKind::ServerRestarting => "server_restarting",
            AbortKind::UpstreamFailed => "upstream_failed",
            AbortKind::StoreFailed => "store_failed",
            AbortKind::Cancelled => "cancelled",
            AbortKind::Incomplete => "incomplete",
            AbortKind::UpstreamRejected => "upstream_rejected",
            AbortKind::ClientGone => "client_gone",
        }
    }

    pub fn parse(text: &str) -> Option<AbortKind> {
        AbortKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether a resume can finish the answer. A store failure can: what
    /// the client was sent is in the store (write-ahead), so once the
    /// store takes writes again a resume continues from there.
    pub fn resumable(self) -> bool {
        matches!(
            self,
            AbortKind::ServerRestarting
                | AbortKind::UpstreamFailed
                | AbortKind::ClientGone
                | AbortKind::StoreFailed
        )
    }

    /// What the abort event tells the client.
    pub fn message(self) -> &'static str {
        match self {
            AbortKind::ServerRestarting => "the gateway is restarting; resume this stream",
            AbortKind::UpstreamFailed => {
                "the provider failed mid-stream; resume this stream to continue"
            }
            AbortKind::StoreFailed => {
                "the partial-response store failed; resume this stream once it is back"
            }
            AbortKind::Cancelled => "the stream was cancelled",
            AbortKind::Incomplete => {
                "the answer was interrupted and this provider cannot continue it"
            }
            AbortKind::UpstreamRejected => "the provider refused to continue this answer",
            AbortKind::ClientGone => "the client went away",
        }
    }
}

/// How a stream's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Finished: OpenAI bodies close with `data: [DONE]`.
    Done,
    Abort(AbortKind),
}

/// Where a stream stands. `Running` is only true while its owner lives: a
/// record left `Running` by a dead process reads as interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Completed,
    Interrupted,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Interrupted => "interrupted",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// The status and reason a run's `end` is recorded with.
    pub fn of_end(end: End) -> (Status, Option<&'static str>) {
        match end {
            End::Done => (Status::Completed, None),
            End::Abort(kind) => {
                let status = match kind {
                    AbortKind::Cancelled => Status::Cancelled,
                    AbortKind::Incomplete | AbortKind::UpstreamRejected => Status::Failed,
                    AbortKind::ServerRestarting
                    | AbortKind::UpstreamFailed
                    | AbortKind::StoreFailed
                    | AbortKind::ClientGone => Status::Interrupted,
                };
                (status, Some(kind.as_str()))
            }
        }
    }

    /// How the body of a stream that stands here, and is not running,
    /// ends after its replay. `reason` is the recorded abort kind.
    pub fn end_after_replay(self, reason: Option<&str>) -> End {
        let reason = reason.and_then(|r| AbortKind::parse(reason_kind(r)));
        match self {
            Status::Completed => End::Done,
            Status::Cancelled => End::Abort(AbortKind::Cancelled),
            // Records of versions that stored a store failure as failed.
            Status::Failed
                if matches!(
                    reason,
                    Some(AbortKind::StoreFailed | AbortKind::UpstreamRejected)
                ) =>
            {
                End::Abort(reason.unwrap_or(AbortKind::Incomplete))
            }
            Status::Failed => End::Abort(AbortKind::Incomplete),
            Status::Running | Status::Interrupted => End::Abort(
                reason
                    .filter(|k| k.resumable())
                    .unwrap_or(AbortKind::ServerRestarting),
            ),
        }
    }
}

/// A recorded reason is the abort kind, then optionally `": "` and what
/// the client was told (a provider's message, why a cut cannot be
/// continued).
pub fn reason_kind(reason: &str) -> &str {
    reason.split_once(": ").map_or(reason, |(kind, _)| kind)
}

/// The detail of a recorded reason, if it has one.
pub fn reason_detail(reason: &str) -> Option<&str> {
    reason.split_once(": ").map(|(_, detail)| detail)
}

/// One stream's record: what resume needs besides the events themselves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRecord {
    pub id: String,
    /// A hash of the client key, never the key.
    pub owner: String,
    /// `openai` or `anthropic`: how events are framed and continued.
    pub protocol: String,
    /// The upstream that served it, by name, so a continuation goes there.
    pub upstream: String,
    /// The original request body, for the continuation call.
    pub request: String,
    /// The non-secret headers the original carried to the provider
    /// (`anthropic-version`, `anthropic-beta`, `openai-organization`,
    /// `openai-project`), sent again with a continuation. Never a key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The original carried the client's own provider key (never stored):
    /// a continuation on an upstream without a key needs it presented again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_credential: bool,
    pub status: Status,
    /// Why the stream ended when it ended badly (the abort event's type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The process (replica) that runs it while `Running`.
    pub instance: String,
    /// The provider's own background response the answer is being made
    /// in (an upstream with `provider_background`): an interrupted stream
    /// re-attaches to it instead of being continued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reattach: Option<Reattach>,
}

/// A provider's background response a stream's events come from, one for
/// one: the stream's event `seq` is the provider's `sequence_number` plus
/// `offset`, so the provider's stream resumes after
/// `last stored seq - offset`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reattach {
    /// The provider's response id.
    pub response: String,
    pub offset: u64,
}

impl Reattach {
    /// The provider's `starting_after` for a stream that has events up to
    /// `last_seq`; `None`: from its first event.
    pub fn starting_after(&self, last_seq: u64) -> Option<u64> {
        last_seq.checked_sub(self.offset)
    }
}

/// What `Idempotency-Key` maps to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdempotencyEntry {
    pub stream_id: String,
    /// A hash of the request body: the same key with another body is a 409.
    pub body_hash: String,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_is_recorded_as_resumable() {
        let (status, reason) = Status::of_end(End::Abort(AbortKind::StoreFailed));
        assert_eq!(status, Status::Interrupted);
        assert_eq!(reason, Some("store_failed"));
        assert!(AbortKind::StoreFailed.resumable());
        assert_eq!(
            status.end_after_replay(reason),
            End::Abort(AbortKind::StoreFailed),
            "one stored status, one end"
        );
    }

    #[test]
    fn abort_kinds_round_trip() {
        for kind in AbortKind::ALL {
            assert_eq!(AbortKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(AbortKind::parse("nope"), None);
    }
}
