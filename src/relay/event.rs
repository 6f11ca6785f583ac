//! Relayed events, the ways a stream ends, and their SSE framing.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::json;

use crate::config::Protocol;

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
    /// A resume that cannot continue (continuation = "none").
    Incomplete,
    /// Every client went away (not sent to anyone: nobody is there).
    ClientGone,
}

impl AbortKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AbortKind::ServerRestarting => "server_restarting",
            AbortKind::UpstreamFailed => "upstream_failed",
            AbortKind::StoreFailed => "store_failed",
            AbortKind::Cancelled => "cancelled",
            AbortKind::Incomplete => "incomplete",
            AbortKind::ClientGone => "client_gone",
        }
    }

    pub fn parse(text: &str) -> Option<AbortKind> {
        Some(match text {
            "server_restarting" => AbortKind::ServerRestarting,
            "upstream_failed" => AbortKind::UpstreamFailed,
            "store_failed" => AbortKind::StoreFailed,
            "cancelled" => AbortKind::Cancelled,
            "incomplete" => AbortKind::Incomplete,
            "client_gone" => AbortKind::ClientGone,
            _ => return None,
        })
    }

    /// Whether a resume can finish the answer.
    pub fn resumable(self) -> bool {
        matches!(
            self,
            AbortKind::ServerRestarting | AbortKind::UpstreamFailed | AbortKind::ClientGone
        )
    }

    fn message(self) -> &'static str {
        match self {
            AbortKind::ServerRestarting => "the gateway is restarting; resume this stream",
            AbortKind::UpstreamFailed => {
                "the provider failed mid-stream; resume this stream to continue"
            }
            AbortKind::StoreFailed => "the partial-response store failed; the stream cannot go on",
            AbortKind::Cancelled => "the stream was cancelled",
            AbortKind::Incomplete => {
                "the answer was interrupted and this provider cannot continue it"
            }
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

/// What an abort event needs to tell the client how to resume.
#[derive(Debug, Clone)]
pub struct StreamIdentity {
    pub id: String,
    pub resume_token: String,
    pub protocol: Protocol,
}

/// About how many bytes [`write_frame`] writes for `event`, to reserve.
pub fn frame_size(event: &Event) -> usize {
    event.data.len() + event.name.as_ref().map_or(0, |n| n.len() + 8) + 40
}

/// Append one event as an SSE frame, `id:` first.
pub fn write_frame(out: &mut BytesMut, event: &Event) {
    out.put_slice(b"id: ");
    out.put_slice(itoa::Buffer::new().format(event.seq).as_bytes());
    out.put_u8(b'\n');
    if let Some(name) = &event.name {
        out.put_slice(b"event: ");
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
    }
    let mut rest = &event.data[..];
    while let Some(at) = memchr::memchr(b'\n', rest) {
        data_line(out, &rest[..at]);
        rest = &rest[at + 1..];
    }
    data_line(out, rest);
    out.put_u8(b'\n');
}

fn data_line(out: &mut BytesMut, line: &[u8]) {
    out.put_slice(b"data: ");
    out.put_slice(line);
    out.put_u8(b'\n');
}

/// The body's last frame.
pub fn end_frame(out: &mut BytesMut, end: End, who: &StreamIdentity, last_event_id: u64) {
    match end {
        End::Done => {
            if who.protocol == Protocol::OpenAi {
                out.put_slice(b"data: [DONE]\n\n");
            }
        }
        End::Abort(kind) => {
            let error = abort_object(kind, who, last_event_id);
            match who.protocol {
                Protocol::OpenAi => {
                    out.put_slice(b"data: ");
                    out.put_slice(json!({ "error": error }).to_string().as_bytes());
                }
                Protocol::Anthropic => {
                    out.put_slice(b"event: error\ndata: ");
                    out.put_slice(
                        json!({"type": "error", "error": error})
                            .to_string()
                            .as_bytes(),
                    );
                }
            }
            out.put_slice(b"\n\n");
        }
    }
}

/// The error object of an in-band abort event (and of a 503 at the deadline).
pub fn abort_object(
    kind: AbortKind,
    who: &StreamIdentity,
    last_event_id: u64,
) -> serde_json::Value {
    json!({
        "type": kind.as_str(),
        "code": kind.as_str(),
        "message": kind.message(),
        "resume": kind.resumable(),
        "stream_id": who.id,
        "resume_token": who.resume_token,
        "last_event_id": last_event_id.to_string(),
        "resume_url": format!("/v1/streams/{}", who.id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(protocol: Protocol) -> StreamIdentity {
        StreamIdentity {
            id: "s1".into(),
            resume_token: "t".into(),
            protocol,
        }
    }

    #[test]
    fn frames() {
        let mut out = BytesMut::new();
        write_frame(
            &mut out,
            &Event {
                seq: 3,
                name: None,
                data: Bytes::from_static(b"{\"a\":1}"),
            },
        );
        assert_eq!(&out[..], b"id: 3\ndata: {\"a\":1}\n\n");
        let mut out = BytesMut::new();
        write_frame(
            &mut out,
            &Event {
                seq: 4,
                name: Some("ping".into()),
                data: Bytes::from_static(b"a\nb"),
            },
        );
        assert_eq!(&out[..], b"id: 4\nevent: ping\ndata: a\ndata: b\n\n");
    }

    #[test]
    fn abort_event_shape() {
        let mut out = BytesMut::new();
        end_frame(
            &mut out,
            End::Abort(AbortKind::ServerRestarting),
            &who(Protocol::OpenAi),
            57,
        );
        let text = std::str::from_utf8(&out).unwrap();
        assert!(!text.contains("id:"));
        let v: serde_json::Value =
            serde_json::from_str(text.trim().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["error"]["type"], "server_restarting");
        assert_eq!(v["error"]["code"], "server_restarting");
        assert_eq!(v["error"]["resume"], true);
        assert_eq!(v["error"]["last_event_id"], "57");
        assert_eq!(v["error"]["resume_url"], "/v1/streams/s1");
        let mut out = BytesMut::new();
        end_frame(
            &mut out,
            End::Abort(AbortKind::Cancelled),
            &who(Protocol::Anthropic),
            2,
        );
        assert!(out.starts_with(b"event: error\ndata: {"));
        let mut out = BytesMut::new();
        end_frame(&mut out, End::Done, &who(Protocol::Anthropic), 2);
        assert!(out.is_empty());
    }
}
