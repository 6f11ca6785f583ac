//! OpenAI chat completions: `POST {base_url}/chat/completions`, spoken by
//! OpenAI and by most servers that host open models (vLLM, SGLang, Ollama,
//! llama.cpp, DeepSeek).
//!
//! Stream: unnamed `data:` events, each a `chat.completion.chunk` whose
//! `choices[0].delta.content` carries the text; `data: [DONE]` ends it and
//! is not itself an answer event. Errors: `{"error": {"message", "type",
//! "code"}}`, in a body and in-band.

use axum::http::{HeaderName, header};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Value, json};

use super::continuation::{Partial, Plan, plan_with};
use super::request::{self, RequestError, Summary};
use super::sse::{SseEvent, write_data};
use super::{Continuation, Terminal, Wire};
use crate::stream::Event;

pub struct OpenAiChat;

impl Wire for OpenAiChat {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn path(&self) -> &'static str {
        "/chat/completions"
    }

    fn validate<'a>(&self, body: &'a [u8]) -> Result<Summary<'a>, RequestError> {
        request::chat(body, false)
    }

    fn credential(&self, key: &str) -> (HeaderName, String) {
        (header::AUTHORIZATION, format!("Bearer {key}"))
    }

    fn terminal(&self, event: &SseEvent) -> Option<Terminal> {
        (event.data == b"[DONE]"[..]).then_some(Terminal::Sentinel)
    }

    fn skip_in_continuation(&self, _event: &SseEvent) -> bool {
        false
    }

    fn rewrite_continued(&self, data: Bytes, chunk_id: Option<&str>) -> Bytes {
        let Some(id) = chunk_id else {
            return data;
        };
        match serde_json::from_slice::<Value>(&data) {
            Ok(mut v)
                if v.get("id").and_then(Value::as_str) != Some(id) && v.get("id").is_some() =>
            {
                v["id"] = Value::String(id.to_owned());
                Bytes::from(v.to_string())
            }
            _ => data,
        }
    }

    fn partial(&self, events: &[Event]) -> Partial {
        let mut out = Partial::default();
        for event in events {
            out.last_seq = out.last_seq.max(event.seq);
            let Ok(v) = serde_json::from_slice::<Value>(&event.data) else {
                continue;
            };
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
        out
    }

    fn continuation(&self, original: &Value, style: Continuation, partial: &Partial) -> Plan {
        plan_with(original, style, partial, |request, message| match style {
            Continuation::ContinueFinalMessage => {
                request.insert("continue_final_message".into(), Value::Bool(true));
                request.insert("add_generation_prompt".into(), Value::Bool(false));
            }
            Continuation::Prefix => message["prefix"] = Value::Bool(true),
            Continuation::AssistantPrefix | Continuation::None => {}
        })
    }

    fn write_done(&self, out: &mut BytesMut) {
        out.put_slice(b"data: [DONE]\n\n");
    }

    fn write_abort(&self, out: &mut BytesMut, error: Value) {
        write_data(out, json!({ "error": error }).to_string().as_bytes());
    }

    fn error_body(&self, kind: &str, code: &str, message: &str) -> Value {
        json!({"error": {"message": message, "type": kind, "code": code}})
    }

    fn is_error_body(&self, body: &Value) -> bool {
        body.get("error").is_some_and(Value::is_object)
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
        let p = OpenAiChat.partial(&[chunk(1, "a"), chunk(2, " b"), chunk(3, "")]);
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
        let plan = |style| OpenAiChat.continuation(&original, style, &p);
        let Plan::Continue(v) = plan(Continuation::ContinueFinalMessage) else {
            panic!()
        };
        assert_eq!(v["max_tokens"], 8);
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["add_generation_prompt"], false);
        assert_eq!(
            v["messages"][1],
            json!({"role": "assistant", "content": "a b"})
        );
        let Plan::Continue(v) = plan(Continuation::Prefix) else {
            panic!()
        };
        assert_eq!(v["messages"][1]["prefix"], true);
        let Plan::Continue(v) = plan(Continuation::AssistantPrefix) else {
            panic!()
        };
        assert_eq!(
            v["messages"][1],
            json!({"role": "assistant", "content": "a b"})
        );
        assert_eq!(plan(Continuation::None), Plan::Unsupported);
        let spent = Partial {
            tokens: 10,
            ..p.clone()
        };
        assert_eq!(
            OpenAiChat.continuation(&original, Continuation::Prefix, &spent),
            Plan::AlreadyComplete
        );
    }

    #[test]
    fn rewrites_chunk_ids() {
        let out = OpenAiChat.rewrite_continued(r#"{"id":"new","x":1}"#.into(), Some("old"));
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["id"], "old");
    }

    #[test]
    fn frames_the_end_and_an_abort() {
        let mut out = BytesMut::new();
        OpenAiChat.write_done(&mut out);
        assert_eq!(&out[..], b"data: [DONE]\n\n");
        let mut out = BytesMut::new();
        OpenAiChat.write_abort(&mut out, json!({"type": "t"}));
        assert_eq!(&out[..], b"data: {\"error\":{\"type\":\"t\"}}\n\n");
    }
}
