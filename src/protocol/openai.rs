//! OpenAI chat completions: `POST {base_url}/chat/completions`, spoken by
//! OpenAI and by most servers that host open models (vLLM, SGLang, Ollama,
//! llama.cpp, DeepSeek).
//!
//! Stream: unnamed `data:` events, each a `chat.completion.chunk` whose
//! `choices[0].delta.content` carries the text; `data: [DONE]` ends it and
//! is not itself an answer event. Errors: `{"error": {"message", "type",
//! "code"}}`, in a body and in-band.

use std::sync::LazyLock;

use axum::http::{HeaderName, header};
use bytes::{BufMut, Bytes, BytesMut};
use memchr::memmem;
use serde_json::{Map, Value, json};

use super::continuation::{
    Held, Hold, INSTRUCT_PROMPT, Leg, Out, Overlap, Partial, Plan, SkipShown, Splice, base_request,
    lower_budget, prefill_message, push_messages,
};
use super::request::{self, RequestError, Summary};
use super::sse::{SseEvent, write_data};
use super::{Continuation, ProviderError, Terminal, Wire};
use crate::stream::Event;

pub struct OpenAiChat;

/// The reasoning fields OpenAI-compatible servers stream (DeepSeek and
/// vLLM `reasoning_content`; newer vLLM and OpenRouter `reasoning`).
const REASONING: [&str; 2] = ["reasoning_content", "reasoning"];

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

    fn provider_error(&self, event: &SseEvent) -> Option<ProviderError> {
        // Cheap first: only an object whose first key is `error` is parsed
        // (a chunk's first key is its `id`).
        let rest = event.data.trim_ascii_start().strip_prefix(b"{")?;
        if !rest.trim_ascii_start().starts_with(b"\"error\"") {
            return None;
        }
        let v: Value = serde_json::from_slice(&event.data).ok()?;
        let error = v.get("error").filter(|e| e.is_object())?;
        if v.get("choices").is_some() {
            return None;
        }
        let kind = error.get("type").and_then(Value::as_str).unwrap_or("");
        Some(ProviderError {
            message: error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the provider sent an error mid-stream")
                .to_owned(),
            // A request the provider found wrong fails again when re-asked.
            resumable: !matches!(kind, "invalid_request_error" | "invalid_request"),
        })
    }

    fn hold(&self) -> Box<dyn Hold> {
        Box::<ToolCallHold>::default()
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
            if let Some(tokens) = v
                .pointer("/usage/completion_tokens")
                .and_then(Value::as_u64)
            {
                out.usage_output = Some(tokens);
            }
            for choice in v
                .get("choices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
                let c = out.choice(index);
                if let Some(delta) = choice.get("delta") {
                    let text = |key: &str| {
                        delta
                            .get(key)
                            .and_then(Value::as_str)
                            .filter(|t| !t.is_empty())
                    };
                    if delta.get("role").is_some() {
                        c.started = true;
                    }
                    if let Some(t) = text("content") {
                        c.content.push_str(t);
                        c.units += 1;
                    }
                    for key in REASONING {
                        if let Some(t) = text(key) {
                            c.reasoning.push_str(t);
                            c.units += 1;
                        }
                    }
                    if let Some(t) = text("refusal") {
                        c.refusal.push_str(t);
                        c.units += 1;
                    }
                    for call in delta
                        .get("tool_calls")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let at = call.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
                        let slot = match c.tool_calls.iter().position(|t| t.index == at) {
                            Some(i) => i,
                            None => {
                                c.tool_calls.push(super::continuation::ToolCall {
                                    index: at,
                                    ..Default::default()
                                });
                                c.tool_calls.len() - 1
                            }
                        };
                        let t = &mut c.tool_calls[slot];
                        if let Some(id) = call.get("id").and_then(Value::as_str) {
                            t.id.push_str(id);
                        }
                        if let Some(f) = call.get("function") {
                            if let Some(name) = f.get("name").and_then(Value::as_str) {
                                t.name.push_str(name);
                            }
                            if let Some(args) = f.get("arguments").and_then(Value::as_str) {
                                t.arguments.push_str(args);
                                c.units += u64::from(!args.is_empty());
                            }
                        }
                    }
                }
                if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                    c.finish_reason = Some(reason.to_owned());
                }
            }
        }
        out
    }

    fn continuation(&self, original: &Value, style: Continuation, partial: &Partial) -> Plan {
        let n = original
            .get("n")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1);
        // Validation refuses more; a record from before it did is not
        // asked again choice by choice.
        if n > super::request::MAX_CHOICES {
            return Plan::Impossible(format!(
                "the request asked for {n} choices, more than the {} a continuation asks for",
                super::request::MAX_CHOICES
            ));
        }
        let n = n as u32;
        let unfinished: Vec<u32> = (0..n)
            .filter(|i| {
                partial
                    .choices
                    .iter()
                    .find(|c| c.index == *i)
                    .is_none_or(|c| c.finish_reason.is_none())
            })
            .collect();
        if unfinished.is_empty() {
            return Plan::AlreadyComplete;
        }
        if style == Continuation::None {
            return Plan::Unsupported;
        }
        let empty = super::continuation::Choice::default();
        let mut legs = Vec::new();
        for index in unfinished {
            let c = partial
                .choices
                .iter()
                .find(|c| c.index == index)
                .unwrap_or(&empty);
            if !c.tool_calls.is_empty() {
                return Plan::Impossible(
                    "the answer was cut inside a tool call, whose arguments no provider can continue".into(),
                );
            }
            if !c.refusal.is_empty() {
                return Plan::Impossible("the answer was cut inside a refusal".into());
            }
            let Some(mut body) = base_request(original) else {
                return Plan::Impossible("the original request is not a JSON object".into());
            };
            let used = if n > 1 { c.units } else { partial.tokens() };
            if n > 1 {
                body.insert("n".into(), json!(1));
            }
            if lower_budget(&mut body, used).is_none() {
                // Spent: the provider would have ended this choice at its limit.
                continue;
            }
            let mut splice = ChunkSplice {
                chunk_id: partial.chunk_id.clone(),
                index: (n > 1).then_some(index),
                drop_role: c.started,
                reasoning: Reasoning::Drop,
                overlap: None,
                keep_usage: false,
                used: partial.tokens(),
            };
            if c.content.is_empty() {
                // No answer text yet: ask again; a regenerated reasoning is
                // relayed only past what the client was shown.
                splice.reasoning = if c.reasoning.is_empty() {
                    Reasoning::Pass
                } else {
                    Reasoning::Skip(SkipShown::new(&c.reasoning))
                };
            } else {
                let added = match style {
                    Continuation::ContinueFinalMessage => {
                        body.insert("continue_final_message".into(), Value::Bool(true));
                        body.insert("add_generation_prompt".into(), Value::Bool(false));
                        push_messages(&mut body, [prefill_message(style, &c.content)])
                    }
                    Continuation::Prefix | Continuation::AssistantPrefix => {
                        push_messages(&mut body, [prefill_message(style, &c.content)])
                    }
                    Continuation::Instruct => {
                        splice.overlap = Some(Overlap::new(&c.content));
                        push_messages(
                            &mut body,
                            [
                                prefill_message(Continuation::AssistantPrefix, &c.content),
                                json!({"role": "user", "content": INSTRUCT_PROMPT}),
                            ],
                        )
                    }
                    Continuation::None => false,
                };
                if !added {
                    return Plan::Impossible("the original request has no messages".into());
                }
            }
            legs.push((body, splice));
        }
        // Only the last request's usage chunk reaches the client.
        match legs.last_mut() {
            None => return Plan::AlreadyComplete,
            Some((_, splice)) => splice.keep_usage = true,
        }
        Plan::Continue(
            legs.into_iter()
                .map(|(body, splice)| Leg {
                    body: Value::Object(body),
                    splice: Box::new(splice),
                })
                .collect(),
        )
    }

    fn closing(&self, partial: &Partial) -> Vec<Out> {
        // A choice the budget ended before the provider said so.
        partial
            .choices
            .iter()
            .filter(|c| c.finish_reason.is_none())
            .map(|c| {
                let chunk = json!({"id": partial.chunk_id, "object": "chat.completion.chunk", "choices": [{"index": c.index, "delta": {}, "finish_reason": "length"}]});
                (None, Bytes::from(chunk.to_string()))
            })
            .collect()
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

    fn error_message(&self, body: &Value) -> Option<String> {
        body.pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// Built once: a searcher costs more to build than to run on a chunk.
static TOOL_CALLS: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"tool_calls\""));

/// Holds each choice's chunks from its first tool-call fragment until it
/// finishes: a tool call reaches the client whole or not at all.
#[derive(Default)]
struct ToolCallHold(Held);

impl Hold for ToolCallHold {
    fn offer(&mut self, event: SseEvent, out: &mut Vec<SseEvent>) {
        // Cheap first: a text chunk with nothing held passes unparsed.
        if self.0.off || (self.0.is_empty() && TOOL_CALLS.find(&event.data).is_none()) {
            out.push(event);
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&event.data) else {
            out.push(event);
            return;
        };
        let Some(choice) = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            out.push(event);
            return;
        };
        let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
        let calls = choice
            .pointer("/delta/tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty());
        let finished = choice.get("finish_reason").is_some_and(|r| !r.is_null());
        if !calls && !self.0.holds(index) {
            out.push(event);
            return;
        }
        self.0.push(index, event);
        if finished {
            self.0.release(index, out);
        }
    }

    fn held_bytes(&self) -> usize {
        self.0.bytes()
    }

    fn release_all(&mut self, out: &mut Vec<SseEvent>) {
        self.0.release_all(out);
    }
}

/// What a continuation does with the reasoning it streams.
enum Reasoning {
    /// The client's reasoning is complete: none of it again.
    Drop,
    /// Relay it as it comes (the client was shown none).
    Pass,
    /// Relay only past what the client was shown.
    Skip(SkipShown),
}

/// Makes a continuation's chunks read as the rest of the original's: its
/// chunk id and choice index, no second role delta, reasoning not
/// repeated, a re-ask's overlap trimmed.
struct ChunkSplice {
    chunk_id: Option<String>,
    /// The client's choice index for this request's only choice (`n > 1`).
    index: Option<u32>,
    drop_role: bool,
    reasoning: Reasoning,
    overlap: Option<Overlap>,
    /// Relay the usage chunk (the last request only).
    keep_usage: bool,
    /// Tokens generated before the cut: the usage chunk counts them too.
    used: u64,
}

impl Splice for ChunkSplice {
    fn event(&mut self, event: SseEvent, out: &mut Vec<Out>) {
        let Ok(Value::Object(mut chunk)) = serde_json::from_slice::<Value>(&event.data) else {
            out.push((None, event.data));
            return;
        };
        if let (Some(id), true) = (&self.chunk_id, chunk.contains_key("id")) {
            chunk.insert("id".into(), Value::String(id.clone()));
        }
        let Some(Value::Array(choices)) = chunk.get_mut("choices") else {
            out.push((None, event.data));
            return;
        };
        if choices.is_empty() {
            // The usage chunk: the whole answer's output, as an uncut one
            // reports it.
            if self.keep_usage {
                if let Some(usage) = chunk.get_mut("usage").and_then(Value::as_object_mut) {
                    for key in ["completion_tokens", "total_tokens"] {
                        if let Some(n) = usage.get(key).and_then(Value::as_u64) {
                            usage.insert(key.into(), json!(n.saturating_add(self.used)));
                        }
                    }
                }
                out.push((None, Bytes::from(Value::Object(chunk).to_string())));
            }
            return;
        }
        choices.retain_mut(|choice| self.choice(choice));
        if choices.is_empty() {
            return;
        }
        out.push((None, Bytes::from(Value::Object(chunk).to_string())));
    }
}

impl ChunkSplice {
    /// Rewrite one choice of a chunk; `false` when nothing of it is left.
    fn choice(&mut self, choice: &mut Value) -> bool {
        if let Some(index) = self.index
            && let Some(choice) = choice.as_object_mut()
        {
            choice.insert("index".into(), json!(index));
        }
        let finished = choice.get("finish_reason").is_some_and(|r| !r.is_null());
        let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) else {
            return finished;
        };
        if self.drop_role && delta.remove("role").is_some() {
            if delta.get("refusal").is_some_and(Value::is_null) {
                delta.remove("refusal");
            }
            if delta.get("content").and_then(Value::as_str) == Some("") {
                delta.remove("content");
            }
        }
        for key in REASONING {
            let Some(text) = delta.get(key).and_then(Value::as_str).map(str::to_owned) else {
                continue;
            };
            let keep = match &mut self.reasoning {
                Reasoning::Drop => String::new(),
                Reasoning::Pass => text,
                Reasoning::Skip(skip) => skip.push(&text),
            };
            set_or_remove(delta, key, keep);
        }
        if let Some(overlap) = &mut self.overlap {
            let text = delta
                .get("content")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let relay = match &text {
                Some(text) => overlap.push(text),
                None if finished || delta.contains_key("tool_calls") => overlap.flush(),
                None => None,
            };
            if text.is_some() || relay.is_some() {
                set_or_remove(delta, "content", relay.unwrap_or_default());
            }
        }
        finished || delta.values().any(|v| !v.is_null())
    }
}

/// Set a text field, or remove it when there is no text.
fn set_or_remove(delta: &mut Map<String, Value>, key: &str, text: String) {
    if text.is_empty() {
        delta.remove(key);
    } else {
        delta.insert(key.into(), Value::String(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, choice: Value) -> Event {
        Event {
            seq,
            name: None,
            data: Bytes::from(
                json!({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]})
                    .to_string(),
            ),
        }
    }

    fn text(seq: u64, index: u32, t: &str) -> Event {
        chunk(
            seq,
            json!({"index": index, "delta": {"content": t}, "finish_reason": null}),
        )
    }

    fn sse(data: Value) -> SseEvent {
        SseEvent {
            name: None,
            data: Bytes::from(data.to_string()),
        }
    }

    fn role(seq: u64, index: u32) -> Event {
        chunk(
            seq,
            json!({"index": index, "delta": {"role": "assistant", "content": "", "refusal": null}, "finish_reason": null}),
        )
    }

    #[test]
    fn reads_back_every_choice_as_the_sdk_accumulates_it() {
        let p = OpenAiChat.partial(&[
            role(1, 0),
            chunk(2, json!({"index": 0, "delta": {"reasoning_content": "think"}})),
            text(3, 0, "a"),
            role(4, 1),
            text(5, 1, "x"),
            text(6, 0, " b"),
            chunk(7, json!({"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}})),
            chunk(8, json!({"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}})),
            chunk(9, json!({"index": 1, "delta": {}, "finish_reason": "tool_calls"})),
        ]);
        assert_eq!(p.chunk_id.as_deref(), Some("c1"));
        assert_eq!(p.last_seq, 9);
        let c0 = &p.choices[0];
        assert_eq!(
            (c0.content.as_str(), c0.reasoning.as_str()),
            ("a b", "think")
        );
        assert!(c0.started && c0.finish_reason.is_none());
        assert_eq!(c0.units, 3);
        let c1 = &p.choices[1];
        assert_eq!(c1.content, "x");
        assert_eq!(c1.tool_calls[0].id, "call_1");
        assert_eq!(c1.tool_calls[0].name, "f");
        assert_eq!(c1.tool_calls[0].arguments, "{\"q\":");
        assert_eq!(c1.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(p.text(), "a bx");
        // The provider's own count wins.
        let usage = Event {
            seq: 10,
            name: None,
            data: Bytes::from(
                json!({"id": "c1", "choices": [], "usage": {"completion_tokens": 42}}).to_string(),
            ),
        };
        assert_eq!(OpenAiChat.partial(&[text(1, 0, "a"), usage]).tokens(), 42);
    }

    #[test]
    fn a_tool_call_is_held_until_its_choice_finishes() {
        let mut hold = OpenAiChat.hold();
        let mut out = Vec::new();
        hold.offer(
            sse(json!({"choices": [{"index": 0, "delta": {"content": "a"}}]})),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        hold.offer(sse(json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}]}}]})), &mut out);
        hold.offer(sse(json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]})), &mut out);
        // Another choice's text goes on meanwhile.
        hold.offer(
            sse(json!({"choices": [{"index": 1, "delta": {"content": "x"}}]})),
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert!(hold.held_bytes() > 0);
        hold.offer(
            sse(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})),
            &mut out,
        );
        assert_eq!(out.len(), 5);
        assert_eq!(hold.held_bytes(), 0);
    }

    fn original(extra: Value) -> Value {
        let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 10, "stream": true});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn legs(plan: Plan) -> Vec<Leg> {
        match plan {
            Plan::Continue(legs) => legs,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn builds_each_style() {
        let p = OpenAiChat.partial(&[role(1, 0), text(2, 0, "a"), text(3, 0, " b")]);
        let plan = |style| OpenAiChat.continuation(&original(json!({})), style, &p);
        let v = &legs(plan(Continuation::ContinueFinalMessage))[0].body;
        assert_eq!(v["max_tokens"], 8);
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["add_generation_prompt"], false);
        assert_eq!(
            v["messages"][1],
            json!({"role": "assistant", "content": "a b"})
        );
        let v = &legs(plan(Continuation::Prefix))[0].body;
        assert_eq!(v["messages"][1]["prefix"], true);
        let v = &legs(plan(Continuation::AssistantPrefix))[0].body;
        assert_eq!(
            v["messages"][1],
            json!({"role": "assistant", "content": "a b"})
        );
        let v = &legs(plan(Continuation::Instruct))[0].body;
        assert_eq!(
            v["messages"][1],
            json!({"role": "assistant", "content": "a b"})
        );
        assert_eq!(v["messages"][2]["role"], "user");
        assert_eq!(v["messages"][2]["content"], INSTRUCT_PROMPT);
        assert!(matches!(plan(Continuation::None), Plan::Unsupported));
        let spent = Partial {
            usage_output: Some(10),
            ..p.clone()
        };
        assert!(matches!(
            OpenAiChat.continuation(&original(json!({})), Continuation::Prefix, &spent),
            Plan::AlreadyComplete
        ));
    }

    #[test]
    fn a_splice_continues_the_original_message() {
        let p = OpenAiChat.partial(&[role(1, 0), text(2, 0, "the tide")]);
        let mut leg =
            legs(OpenAiChat.continuation(&original(json!({})), Continuation::Instruct, &p))
                .remove(0);
        let mut out = Vec::new();
        for data in [
            json!({"id": "new", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "finish_reason": null}]}),
            json!({"id": "new", "choices": [{"index": 0, "delta": {"content": " tide"}, "finish_reason": null}]}),
            json!({"id": "new", "choices": [{"index": 0, "delta": {"content": " gate"}, "finish_reason": null}]}),
            json!({"id": "new", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ] {
            leg.splice.event(sse(data), &mut out);
        }
        let out: Vec<Value> = out
            .iter()
            .map(|(_, d)| serde_json::from_slice(d).unwrap())
            .collect();
        // No second role, the original id, the repeated word trimmed.
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0]["id"], "c1");
        assert_eq!(out[0]["choices"][0]["delta"], json!({"content": " gate"}));
        assert_eq!(out[1]["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn a_cut_in_reasoning_regenerates_it_and_relays_only_what_is_new() {
        let p = OpenAiChat.partial(&[
            role(1, 0),
            chunk(
                2,
                json!({"index": 0, "delta": {"reasoning_content": "step one"}}),
            ),
        ]);
        let mut leg =
            legs(OpenAiChat.continuation(&original(json!({})), Continuation::Prefix, &p)).remove(0);
        // Asked again, as the original.
        assert_eq!(leg.body["messages"].as_array().unwrap().len(), 1);
        let mut out = Vec::new();
        for r in ["step", " one", " two"] {
            leg.splice.event(
                sse(json!({"choices": [{"index": 0, "delta": {"reasoning_content": r}}]})),
                &mut out,
            );
        }
        assert_eq!(out.len(), 1);
        let v: Value = serde_json::from_slice(&out[0].1).unwrap();
        assert_eq!(v["choices"][0]["delta"]["reasoning_content"], " two");
    }

    #[test]
    fn n_choices_continue_one_request_each() {
        let p = OpenAiChat.partial(&[
            role(1, 0),
            text(2, 0, "a"),
            role(3, 1),
            text(4, 1, "x"),
            chunk(5, json!({"index": 1, "delta": {}, "finish_reason": "stop"})),
            role(6, 2),
        ]);
        let legs =
            legs(OpenAiChat.continuation(&original(json!({"n": 3})), Continuation::Prefix, &p));
        // Choice 0 (with its text) and choice 2 (nothing yet); 1 finished.
        assert_eq!(legs.len(), 2);
        assert_eq!(legs[0].body["n"], 1);
        assert_eq!(legs[0].body["messages"][1]["content"], "a");
        assert_eq!(legs[1].body["messages"].as_array().unwrap().len(), 1);
        let mut leg = legs.into_iter().nth(1).unwrap();
        let mut out = Vec::new();
        leg.splice.event(
            sse(json!({"choices": [{"index": 0, "delta": {"content": "y"}}]})),
            &mut out,
        );
        let v: Value = serde_json::from_slice(&out[0].1).unwrap();
        assert_eq!(v["choices"][0]["index"], 2);
    }

    #[test]
    fn more_choices_than_validation_allows_are_not_asked_again_one_by_one() {
        // The input the continuation fuzz target found: n = 1.7e9 built a
        // leg per choice until the process ran out of memory.
        let p = OpenAiChat.partial(&[role(1, 0), text(2, 0, "a")]);
        for n in [129u64, 1_700_000_000, u64::MAX] {
            let plan =
                OpenAiChat.continuation(&original(json!({"n": n})), Continuation::Prefix, &p);
            assert!(matches!(plan, Plan::Impossible(_)), "n={n}: {plan:?}");
        }
        let plan = OpenAiChat.continuation(&original(json!({"n": 128})), Continuation::Prefix, &p);
        assert!(matches!(plan, Plan::Continue(ref legs) if legs.len() == 128));
    }

    #[test]
    fn a_cut_inside_a_tool_call_is_not_continued() {
        let p = OpenAiChat.partial(&[
            role(1, 0),
            chunk(2, json!({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{"}}]}})),
        ]);
        assert!(matches!(
            OpenAiChat.continuation(&original(json!({})), Continuation::Prefix, &p),
            Plan::Impossible(_)
        ));
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
