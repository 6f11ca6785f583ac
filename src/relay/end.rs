//! How a client's body ends: the protocol's own end (`[DONE]`), or an
//! in-band abort event that says how to resume.

use bytes::BytesMut;
use serde_json::json;

use crate::protocol::Protocol;
use crate::stream::{AbortKind, End};

/// Who a stream is to its clients: what its abort event and response head
/// carry.
#[derive(Debug, Clone)]
pub struct StreamIdentity {
    pub id: String,
    pub resume_token: String,
    pub protocol: Protocol,
    /// Whether its upstream can continue it: without, no abort says
    /// `resume: true` (a resume could only replay).
    pub continuable: bool,
}

/// The body's last frame. `detail`: what the abort says beyond its kind.
pub fn end_frame(
    out: &mut BytesMut,
    end: End,
    who: &StreamIdentity,
    last_event_id: u64,
    detail: Option<&str>,
) {
    let wire = who.protocol.wire();
    match end {
        End::Done => wire.write_done(out),
        End::Abort(kind) => wire.write_abort(out, abort_object(kind, who, last_event_id, detail)),
    }
}

/// The error object of an in-band abort event.
pub fn abort_object(
    kind: AbortKind,
    who: &StreamIdentity,
    last_event_id: u64,
    detail: Option<&str>,
) -> serde_json::Value {
    let resume = kind.resumable() && who.continuable;
    let base = if kind.resumable() && !resume {
        // Never "resume this stream" when a resume could only replay.
        let what = kind.message().split(';').next().unwrap_or_default();
        format!(
            "{what}; this upstream does not continue interrupted answers (continuation = \"none\")"
        )
    } else {
        kind.message().to_owned()
    };
    let message = match detail {
        Some(detail) => format!("{base}: {detail}"),
        None => base,
    };
    json!({
        "type": kind.as_str(),
        "code": kind.as_str(),
        "message": message,
        "resume": resume,
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
            continuable: true,
        }
    }

    #[test]
    fn abort_event_shape() {
        let mut out = BytesMut::new();
        end_frame(
            &mut out,
            End::Abort(AbortKind::ServerRestarting),
            &who(Protocol::OpenAi),
            57,
            None,
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
            Some("why"),
        );
        assert!(out.starts_with(b"event: error\ndata: {"));
        let mut out = BytesMut::new();
        end_frame(&mut out, End::Done, &who(Protocol::Anthropic), 2, None);
        assert!(out.is_empty());
    }
}
