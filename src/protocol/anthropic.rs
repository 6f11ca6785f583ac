//! Anthropic Messages: `POST {base_url}/messages`.
//!
//! Stream: named events (`message_start`, `content_block_start`,
//! `content_block_delta`, `content_block_stop`, `message_delta`,
//! `message_stop`, `ping`, `error`); `message_stop` is the answer's last
//! event. Requests need `max_tokens` and an `anthropic-version` header; the
//! key goes in `x-api-key`. Errors: `{"type": "error", "error": {"type",
//! "message"}}`, in a body and as `event: error` in a stream.

use axum::http::{HeaderName, HeaderValue};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Value, json};

use super::continuation::{Partial, Plan, plan_with};
use super::request::{self, RequestError, Summary};
use super::sse::{SseEvent, write_data};
use super::{Continuation, Terminal, Wire};
use crate::stream::Event;

pub struct AnthropicMessages;

/// The API version sent when the client names none.
static REQUIRED_HEADERS: [(HeaderName, HeaderValue); 1] = [(
    HeaderName::from_static("anthropic-version"),
    HeaderValue::from_static("2023-06-01"),
)];

impl Wire for AnthropicMessages {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn path(&self) -> &'static str {
        "/messages"
    }

    fn validate<'a>(&self, body: &'a [u8]) -> Result<Summary<'a>, RequestError> {
        request::chat(body, true)
    }

    fn credential(&self, key: &str) -> (HeaderName, String) {
        (HeaderName::from_static("x-api-key"), key.to_owned())
    }

    fn required_headers(&self) -> &'static [(HeaderName, HeaderValue)] {
        &REQUIRED_HEADERS
    }

    fn terminal(&self, event: &SseEvent) -> Option<Terminal> {
        event.name_is("message_stop").then_some(Terminal::Last)
    }

    fn skip_in_continuation(&self, event: &SseEvent) -> bool {
        matches!(
            event.name.as_deref(),
            Some(b"message_start" | b"content_block_start" | b"ping")
        )
    }

    fn rewrite_continued(&self, data: Bytes, _chunk_id: Option<&str>) -> Bytes {
        data
    }

    fn partial(&self, events: &[Event]) -> Partial {
        let mut out = Partial::default();
        for event in events {
            out.last_seq = out.last_seq.max(event.seq);
            let Ok(v) = serde_json::from_slice::<Value>(&event.data) else {
                continue;
            };
            match v.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    out.chunk_id = v
                        .pointer("/message/id")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
                Some("content_block_delta") => {
                    if let Some(text) = v.pointer("/delta/text").and_then(Value::as_str) {
                        out.text.push_str(text);
                        out.tokens += 1;
                    }
                }
                Some("message_delta") => {
                    out.finish_reason = v
                        .pointer("/delta/stop_reason")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
                _ => {}
            }
        }
        out
    }

    fn continuation(&self, original: &Value, style: Continuation, partial: &Partial) -> Plan {
        // Every style but `none` is a trailing assistant message here.
        plan_with(original, style, partial, |_, _| {})
    }

    fn write_done(&self, _out: &mut BytesMut) {
        // `message_stop`, relayed, was the end.
    }

    fn write_abort(&self, out: &mut BytesMut, error: Value) {
        out.put_slice(b"event: error\n");
        write_data(
            out,
            json!({"type": "error", "error": error})
                .to_string()
                .as_bytes(),
        );
    }

    fn error_body(&self, kind: &str, _code: &str, message: &str) -> Value {
        json!({"type": "error", "error": {"type": kind, "message": message}})
    }

    fn is_error_body(&self, body: &Value) -> bool {
        body.get("type").and_then(Value::as_str) == Some("error")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, name: &str, data: Value) -> Event {
        Event {
            seq,
            name: Some(name.into()),
            data: Bytes::from(data.to_string()),
        }
    }

    #[test]
    fn reads_back_the_partial_answer() {
        let p = AnthropicMessages.partial(&[
            event(1, "message_start", json!({"type": "message_start", "message": {"id": "msg_1"}})),
            event(2, "content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a"}})),
            event(3, "content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " b"}})),
        ]);
        assert_eq!(p.text, "a b");
        assert_eq!(p.tokens, 2);
        assert_eq!(p.chunk_id.as_deref(), Some("msg_1"));
        assert_eq!(p.last_seq, 3);
        assert_eq!(p.finish_reason, None);
    }

    #[test]
    fn frames_an_abort_as_an_error_event() {
        let mut out = BytesMut::new();
        AnthropicMessages.write_abort(&mut out, json!({"type": "t"}));
        let text = std::str::from_utf8(&out).unwrap();
        let data = text
            .strip_prefix("event: error\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .unwrap();
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v, json!({"type": "error", "error": {"type": "t"}}));
        let mut out = BytesMut::new();
        AnthropicMessages.write_done(&mut out);
        assert!(out.is_empty());
    }
}
