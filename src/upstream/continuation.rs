//! Continuation: re-asking the provider with the original request plus the
//! partial answer as a prefix the model must continue, in the style the
//! upstream understands (`continue_final_message`, `prefix`,
//! `assistant_prefix`), and making its events look like the original's.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::{Continuation, Protocol};
use crate::relay::event::Event;
use crate::relay::sse::SseEvent;

/// What was already said, read back from the stored events.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Partial {
    pub text: String,
    /// Content events: the tokens already generated (one per chunk, as
    /// providers stream them).
    pub tokens: u64,
    /// The original chunk id (OpenAI `id`), reused on continued chunks.
    pub chunk_id: Option<String>,
    pub finish_reason: Option<String>,
    pub last_seq: u64,
}

/// The delta text of one event, if it carries any.
pub fn event_text(protocol: Protocol, event: &Event) -> Option<String> {
    let v: Value = serde_json::from_slice(&event.data).ok()?;
    match protocol {
        Protocol::OpenAi => v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
            .map(str::to_owned),
        Protocol::Anthropic => (v.get("type").and_then(Value::as_str)
            == Some("content_block_delta"))
        .then(|| {
            v.pointer("/delta/text")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .flatten(),
    }
}

pub fn partial(protocol: Protocol, events: &[Event]) -> Partial {
    let mut out = Partial::default();
    for event in events {
        out.last_seq = out.last_seq.max(event.seq);
        let Ok(v) = serde_json::from_slice::<Value>(&event.data) else {
            continue;
        };
        match protocol {
            Protocol::OpenAi => {
                if out.chunk_id.is_none() {
                    out.chunk_id = v.get("id").and_then(Value::as_str).map(str::to_owned);
                }
                if let Some(text) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    && !text.is_empty()
                {
                    out.text.push_str(text);
                    out.tokens += 1;
                }
                if let Some(reason) = v
                    .pointer("/choices/0/finish_reason")
                    .and_then(Value::as_str)
                {
                    out.finish_reason = Some(reason.to_owned());
                }
            }
            Protocol::Anthropic => match v.get("type").and_then(Value::as_str) {
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
            },
        }
    }
    out
}

/// What a resume of an interrupted stream should do.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Send this request and relay what comes back.
    Continue(Value),
    /// Nothing is left to generate (the token budget is spent).
    AlreadyComplete,
    /// This upstream cannot continue a partial answer.
    Unsupported,
}

pub fn plan(original: &Value, protocol: Protocol, style: Continuation, partial: &Partial) -> Plan {
    let mut body = original.clone();
    let Some(object) = body.as_object_mut() else {
        return Plan::Unsupported;
    };
    object.insert("stream".into(), Value::Bool(true));
    if partial.tokens == 0 && partial.text.is_empty() {
        // Nothing was said yet: asking again is a continuation of nothing.
        return Plan::Continue(body);
    }
    if style == Continuation::None || partial.finish_reason.is_some() {
        return match partial.finish_reason {
            Some(_) => Plan::AlreadyComplete,
            None => Plan::Unsupported,
        };
    }
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(max) = object.get(key).and_then(Value::as_u64) {
            let left = max.saturating_sub(partial.tokens);
            if left == 0 {
                return Plan::AlreadyComplete;
            }
            object.insert(key.into(), json!(left));
        }
    }
    let mut message = json!({"role": "assistant", "content": partial.text});
    match (protocol, style) {
        (Protocol::OpenAi, Continuation::ContinueFinalMessage) => {
            object.insert("continue_final_message".into(), Value::Bool(true));
            object.insert("add_generation_prompt".into(), Value::Bool(false));
        }
        (Protocol::OpenAi, Continuation::Prefix) => {
            message["prefix"] = Value::Bool(true);
        }
        _ => {}
    }
    match object.get_mut("messages").and_then(Value::as_array_mut) {
        Some(messages) => messages.push(message),
        None => return Plan::Unsupported,
    }
    Plan::Continue(body)
}

/// Events of a continuation that the client already has from the original
/// (Anthropic repeats the message and block openers).
pub fn skip_in_continuation(protocol: Protocol, event: &SseEvent) -> bool {
    protocol == Protocol::Anthropic
        && matches!(
            event.name.as_deref(),
            Some(b"message_start" | b"content_block_start" | b"ping")
        )
}

/// Give a continued chunk the original's id, so the answer reads as one.
pub fn rewrite(protocol: Protocol, data: Bytes, chunk_id: Option<&str>) -> Bytes {
    let (Protocol::OpenAi, Some(id)) = (protocol, chunk_id) else {
        return data;
    };
    match serde_json::from_slice::<Value>(&data) {
        Ok(mut v) if v.get("id").and_then(Value::as_str) != Some(id) && v.get("id").is_some() => {
            v["id"] = Value::String(id.to_owned());
            Bytes::from(v.to_string())
        }
        _ => data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, text: &str) -> Event {
        Event {
            seq,
            name: None,
            data: Bytes::from(
                json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}).to_string(),
            ),
        }
    }

    #[test]
    fn reads_back_the_partial_answer() {
        let p = partial(
            Protocol::OpenAi,
            &[chunk(1, "a"), chunk(2, " b"), chunk(3, "")],
        );
        assert_eq!(p.text, "a b");
        assert_eq!(p.tokens, 2);
        assert_eq!(p.chunk_id.as_deref(), Some("c1"));
        assert_eq!(p.last_seq, 3);
    }

    #[test]
    fn builds_each_style() {
        let original = json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 10, "stream": true});
        let p = Partial {
            text: "a b".into(),
            tokens: 2,
            chunk_id: None,
            finish_reason: None,
            last_seq: 2,
        };
        let Plan::Continue(v) = plan(
            &original,
            Protocol::OpenAi,
            Continuation::ContinueFinalMessage,
            &p,
        ) else {
            panic!()
        };
        assert_eq!(v["max_tokens"], 8);
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["add_generation_prompt"], false);
        assert_eq!(
            v["messages"][1],
            json!({"role": "assistant", "content": "a b"})
        );
        let Plan::Continue(v) = plan(&original, Protocol::OpenAi, Continuation::Prefix, &p) else {
            panic!()
        };
        assert_eq!(v["messages"][1]["prefix"], true);
        let Plan::Continue(v) = plan(
            &original,
            Protocol::OpenAi,
            Continuation::AssistantPrefix,
            &p,
        ) else {
            panic!()
        };
        assert_eq!(
            v["messages"][1],
            json!({"role": "assistant", "content": "a b"})
        );
        assert_eq!(
            plan(&original, Protocol::OpenAi, Continuation::None, &p),
            Plan::Unsupported
        );
        let spent = Partial {
            tokens: 10,
            ..p.clone()
        };
        assert_eq!(
            plan(&original, Protocol::OpenAi, Continuation::Prefix, &spent),
            Plan::AlreadyComplete
        );
    }

    #[test]
    fn rewrites_chunk_ids() {
        let out = rewrite(
            Protocol::OpenAi,
            r#"{"id":"new","x":1}"#.into(),
            Some("old"),
        );
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["id"], "old");
    }
}
