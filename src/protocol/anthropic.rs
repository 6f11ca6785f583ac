//! Anthropic Messages: `POST {base_url}/messages`.
//!
//! Stream: named events (`message_start`, `content_block_start`,
//! `content_block_delta`, `content_block_stop`, `message_delta`,
//! `message_stop`, `ping`, `error`); `message_stop` is the answer's last
//! event. Requests need `max_tokens` and an `anthropic-version` header; the
//! key goes in `x-api-key`. Errors: `{"type": "error", "error": {"type",
//! "message"}}`, in a body and as `event: error` in a stream.

use std::collections::HashMap;
use std::sync::LazyLock;

use axum::http::{HeaderName, HeaderValue};
use bytes::{BufMut, Bytes, BytesMut};
use memchr::memmem;
use serde_json::{Value, json};

use super::continuation::{
    Block, Hold, INSTRUCT_PROMPT, Leg, Out, Overlap, Partial, Plan, Splice, ToolCall, base_request,
    lower_budget, push_messages,
};
use super::request::{self, RequestError, Summary};
use super::sse::{SseEvent, write_data};
use super::{Continuation, ProviderError, Terminal, Wire};
use crate::stream::Event;

pub struct AnthropicMessages;

/// The API version sent when the client names none.
static REQUIRED_HEADERS: [(HeaderName, HeaderValue); 1] = [(
    HeaderName::from_static("anthropic-version"),
    HeaderValue::from_static("2023-06-01"),
)];

/// Block kinds a prefill can carry and a continuation can follow.
fn continuable(kind: &str) -> bool {
    matches!(kind, "text" | "thinking" | "redacted_thinking")
}

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

    fn provider_error(&self, event: &SseEvent) -> Option<ProviderError> {
        if !event.name_is("error") {
            return None;
        }
        let v: Value = serde_json::from_slice(&event.data).unwrap_or(Value::Null);
        let kind = v
            .pointer("/error/type")
            .and_then(Value::as_str)
            .unwrap_or("");
        Some(ProviderError {
            message: v
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("the provider sent an error mid-stream")
                .to_owned(),
            resumable: matches!(
                kind,
                "overloaded_error" | "api_error" | "rate_limit_error" | ""
            ),
        })
    }

    fn hold(&self) -> Box<dyn Hold> {
        Box::<ToolUseHold>::default()
    }

    fn partial(&self, events: &[Event]) -> Partial {
        let mut out = Partial::default();
        let mut started = false;
        let mut units = 0;
        let mut stop_reason = None;
        for event in events {
            out.last_seq = out.last_seq.max(event.seq);
            let Ok(v) = serde_json::from_slice::<Value>(&event.data) else {
                continue;
            };
            let index = v.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
            match v.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    started = true;
                    out.chunk_id = v
                        .pointer("/message/id")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
                Some("content_block_start") => {
                    let start = v.get("content_block").cloned().unwrap_or(Value::Null);
                    let field = |k: &str| {
                        start
                            .get(k)
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned()
                    };
                    out.blocks.push(Block {
                        index,
                        kind: field("type"),
                        text: match field("type").as_str() {
                            "thinking" => field("thinking"),
                            "text" => field("text"),
                            _ => String::new(),
                        },
                        signature: Some(field("signature")).filter(|s| !s.is_empty()),
                        start,
                        stopped: false,
                        parts: 0,
                    });
                }
                Some("content_block_delta") => {
                    let Some(b) = out.blocks.iter_mut().rev().find(|b| b.index == index) else {
                        continue;
                    };
                    let delta = v.get("delta");
                    let text = |k: &str| delta.and_then(|d| d.get(k)).and_then(Value::as_str);
                    match delta.and_then(|d| d.get("type")).and_then(Value::as_str) {
                        Some("text_delta") => b.text.push_str(text("text").unwrap_or("")),
                        Some("thinking_delta") => b.text.push_str(text("thinking").unwrap_or("")),
                        Some("input_json_delta") => {
                            b.text.push_str(text("partial_json").unwrap_or(""))
                        }
                        Some("signature_delta") => {
                            b.signature = text("signature").map(str::to_owned);
                            continue;
                        }
                        _ => continue,
                    }
                    units += 1;
                }
                Some("content_block_stop") => {
                    if let Some(b) = out.blocks.iter_mut().rev().find(|b| b.index == index) {
                        b.stopped = true;
                    }
                }
                Some("message_stop") => out.ended = true,
                Some("message_delta") => {
                    stop_reason = v
                        .pointer("/delta/stop_reason")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    if let Some(tokens) = v.pointer("/usage/output_tokens").and_then(Value::as_u64)
                    {
                        out.usage_output = Some(tokens);
                    }
                }
                _ => {}
            }
        }
        // The message as one choice, for `/state` and the budget.
        let choice = out.choice(0);
        choice.started = started;
        choice.units = units;
        choice.finish_reason = stop_reason;
        let blocks = out.blocks.clone();
        let choice = out.choice(0);
        for b in &blocks {
            match b.kind.as_str() {
                "text" => choice.content.push_str(&b.text),
                "thinking" => choice.reasoning.push_str(&b.text),
                kind if kind.ends_with("tool_use") => choice.tool_calls.push(ToolCall {
                    index: b.index,
                    id: b
                        .start
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    name: b
                        .start
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    arguments: b.text.clone(),
                }),
                _ => {}
            }
        }
        if !started && blocks.is_empty() && choice.finish_reason.is_none() {
            out.choices.clear();
        }
        out
    }

    fn continuation(&self, original: &Value, style: Continuation, partial: &Partial) -> Plan {
        if partial.finish_reason().is_some() {
            return Plan::AlreadyComplete;
        }
        if style == Continuation::None {
            return Plan::Unsupported;
        }
        if let Some(b) = partial.blocks.iter().find(|b| !continuable(&b.kind)) {
            return Plan::Impossible(if b.kind.ends_with("tool_use") {
                "the answer was cut inside a tool call, whose input no provider can continue".into()
            } else {
                format!(
                    "the answer was cut after a `{}` block, which cannot be continued",
                    b.kind
                )
            });
        }
        let last = partial.blocks.last();
        if let Some(b) = last
            && b.kind == "thinking"
            && b.signature.is_none()
        {
            return Plan::Impossible(
                "the answer was cut inside a thinking block, before its signature: a thinking block cannot be continued without it".into(),
            );
        }
        let Some(mut body) = base_request(original) else {
            return Plan::Impossible("the original request is not a JSON object".into());
        };
        if lower_budget(&mut body, partial.tokens()).is_none() {
            return Plan::AlreadyComplete;
        }
        // With extended thinking, max_tokens must stay above the thinking budget.
        if let (Some(budget), Some(max)) = (
            body.get("thinking")
                .and_then(|t| t.get("budget_tokens"))
                .and_then(Value::as_u64),
            body.get("max_tokens").and_then(Value::as_u64),
        ) && max <= budget
        {
            body.insert("max_tokens".into(), json!(budget + 1));
        }
        let has_thinking = partial.blocks.iter().any(|b| b.kind != "text");
        let mut splice = BlockSplice {
            open: last
                .filter(|b| !b.stopped)
                .map(|b| (b.index, b.kind == "text")),
            next: partial
                .blocks
                .iter()
                // A provider's index is any number: no overflow.
                .map(|b| b.index.saturating_add(1))
                .max()
                .unwrap_or(0),
            drop_thinking: has_thinking,
            pending: None,
            started: partial.choices.first().is_some_and(|c| c.started),
            used: partial.tokens(),
            map: HashMap::new(),
            overlap: None,
            overlap_block: None,
        };
        let text: String = partial
            .blocks
            .iter()
            .filter(|b| b.kind == "text")
            .map(|b| b.text.as_str())
            .collect();
        match style {
            Continuation::Instruct if !text.is_empty() => {
                splice.overlap = Some(Overlap::new(&text));
                push_messages(
                    &mut body,
                    [
                        json!({"role": "assistant", "content": [{"type": "text", "text": text}]}),
                        json!({"role": "user", "content": INSTRUCT_PROMPT}),
                    ],
                );
            }
            Continuation::Instruct => {}
            _ => {
                let mut content: Vec<Value> = partial
                    .blocks
                    .iter()
                    .filter_map(|b| match b.kind.as_str() {
                        "thinking" => Some(json!({"type": "thinking", "thinking": b.text, "signature": b.signature})),
                        "redacted_thinking" => Some(json!({"type": "redacted_thinking", "data": b.start.get("data")})),
                        _ if b.text.is_empty() => None,
                        _ => Some(json!({"type": "text", "text": b.text})),
                    })
                    .collect();
                // The provider refuses a prefill that ends in whitespace; what
                // is cut off must not come back twice.
                if let Some(last) = content.last_mut()
                    && let Some(text) = last.get("text").and_then(Value::as_str)
                {
                    let kept = text.trim_end().to_owned();
                    splice.overlap = Some(Overlap::whitespace(&text[kept.len()..]));
                    if kept.is_empty() {
                        content.pop();
                    } else {
                        last["text"] = Value::String(kept);
                    }
                }
                if !content.is_empty() {
                    push_messages(
                        &mut body,
                        [json!({"role": "assistant", "content": content})],
                    );
                }
            }
        }
        Plan::Continue(vec![Leg {
            body: Value::Object(body),
            splice: Box::new(splice),
        }])
    }

    fn closing(&self, partial: &Partial) -> Vec<Out> {
        let mut out = Vec::new();
        if partial.ended {
            return out;
        }
        if let Some(b) = partial.blocks.last()
            && !b.stopped
        {
            out.push(stop(b.index));
        }
        if partial.finish_reason().is_none() {
            let delta = json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": null}, "usage": {"output_tokens": partial.tokens()}});
            out.push((Some("message_delta".into()), Bytes::from(delta.to_string())));
        }
        let end = json!({"type": "message_stop"});
        out.push((Some("message_stop".into()), Bytes::from(end.to_string())));
        out
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

    fn error_message(&self, body: &Value) -> Option<String> {
        body.pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// Built once: a searcher costs more to build than to run on an event.
static TOOL_USE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"tool_use\""));

/// Holds everything from the first tool-use block's start until the
/// message's end (`message_delta`): tool input reaches the client whole.
#[derive(Default)]
struct ToolUseHold {
    held: Vec<SseEvent>,
    bytes: usize,
    off: bool,
}

impl Hold for ToolUseHold {
    fn offer(&mut self, event: SseEvent, out: &mut Vec<SseEvent>) {
        if self.off {
            out.push(event);
            return;
        }
        if self.held.is_empty() {
            let tool = event.name_is("content_block_start")
                && TOOL_USE.find(&event.data).is_some()
                && serde_json::from_slice::<Value>(&event.data).is_ok_and(|v| {
                    v.pointer("/content_block/type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.ends_with("tool_use"))
                });
            if !tool {
                out.push(event);
                return;
            }
        }
        let end = event.name_is("message_delta") || event.name_is("message_stop");
        self.bytes += event.data.len();
        self.held.push(event);
        if end {
            self.bytes = 0;
            out.append(&mut self.held);
        }
    }

    fn held_bytes(&self) -> usize {
        self.bytes
    }

    fn release_all(&mut self, out: &mut Vec<SseEvent>) {
        self.off = true;
        self.bytes = 0;
        out.append(&mut self.held);
    }
}

/// Makes a continuation's events read as the rest of the original
/// message: no second `message_start`, block indices after the client's,
/// the first text block continuing the client's open one, thinking the
/// client already holds not repeated, a re-ask's overlap trimmed.
struct BlockSplice {
    /// The client's block still open (index, is text): continued by the
    /// first new text block, else closed before the first new block.
    open: Option<(u32, bool)>,
    /// The client's index for the next new block.
    next: u32,
    /// Drop thinking blocks (the client holds its thinking).
    drop_thinking: bool,
    /// Continuation index → client index (`None`: dropped).
    map: HashMap<u32, Option<u32>>,
    overlap: Option<Overlap>,
    /// The continuation block whose text the overlap applies to.
    overlap_block: Option<u32>,
    /// That block's start, when it opens a new block: held until it has
    /// text, so a block the trim leaves empty never reaches the client.
    pending: Option<Value>,
    /// The client holds the message's start (`message_start` not sent again).
    started: bool,
    /// Tokens generated before the cut: the message's usage counts them too.
    used: u64,
}

/// `v` numbered `index`; anything but an object (a provider's garbage)
/// goes on as it came.
fn with_index(mut v: Value, index: u32) -> Bytes {
    if let Some(object) = v.as_object_mut() {
        object.insert("index".into(), json!(index));
    }
    Bytes::from(v.to_string())
}

fn stop(index: u32) -> Out {
    (
        Some("content_block_stop".into()),
        Bytes::from(json!({"type": "content_block_stop", "index": index}).to_string()),
    )
}

impl BlockSplice {
    /// A new client block for continuation block `j`.
    fn open_new(&mut self, j: u32) -> u32 {
        let c = self.next;
        self.next = self.next.saturating_add(1);
        self.map.insert(j, Some(c));
        c
    }

    /// Close the client's open block when no continuation block continues it.
    fn close_open(&mut self, out: &mut Vec<Out>) {
        if let Some((k, _)) = self.open.take() {
            out.push(stop(k));
        }
    }
}

impl Splice for BlockSplice {
    fn event(&mut self, event: SseEvent, out: &mut Vec<Out>) {
        let name: Option<Box<str>> = event
            .name
            .as_deref()
            .map(|n| String::from_utf8_lossy(n).into());
        // Read as the SDK's accumulation reads it (and as `partial` does):
        // by the data's `type`, else by the event's name. An unnamed block
        // event is still numbered the client's way.
        let v = serde_json::from_slice::<Value>(&event.data)
            .ok()
            .filter(Value::is_object);
        let kind: Box<str> = v
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str)
            .or(name.as_deref())
            .unwrap_or("")
            .into();
        let kind = &*kind;
        if self.started && (kind == "message_start" || event.name_is("message_start")) {
            // The client holds the message's start: never a second one.
            return;
        }
        match kind {
            "content_block_start" | "content_block_delta" | "content_block_stop" => {
                // Not a JSON object (not a block event a client can read):
                // relayed as it came, and it takes no block index.
                let Some(mut v) = v else {
                    out.push((name, event.data));
                    return;
                };
                let j = v.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
                if kind == "content_block_start" {
                    let block = v
                        .pointer("/content_block/type")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if self.drop_thinking && matches!(block, "thinking" | "redacted_thinking") {
                        self.map.insert(j, None);
                        return;
                    }
                    if block == "text" && self.overlap_block.is_none() {
                        self.overlap_block = Some(j);
                    }
                    if let Some((k, true)) = self.open
                        && block == "text"
                    {
                        // The client's open text block goes on.
                        self.open = None;
                        self.map.insert(j, Some(k));
                        return;
                    }
                    self.close_open(out);
                    if self.overlap_block == Some(j) && self.overlap.is_some() {
                        self.map.insert(j, None);
                        self.pending = Some(v);
                        return;
                    }
                    let c = self.open_new(j);
                    out.push((name, with_index(v, c)));
                    return;
                }
                let mapped = self.map.get(&j).copied().unwrap_or(Some(j));
                if self.overlap_block == Some(j) {
                    let relay = if kind == "content_block_stop" {
                        self.overlap.as_mut().and_then(Overlap::flush)
                    } else {
                        let text = v.pointer("/delta/text").and_then(Value::as_str);
                        match (text, self.overlap.as_mut()) {
                            (Some(text), Some(overlap)) => match overlap.push(text) {
                                Some(text) if !text.is_empty() => Some(text),
                                _ => return,
                            },
                            _ => None,
                        }
                    };
                    let c = match (mapped, self.pending.take()) {
                        (Some(c), _) => Some(c),
                        // The held start goes out with the block's first text.
                        (None, Some(start)) if relay.as_deref().is_some_and(|t| !t.is_empty()) => {
                            let c = self.open_new(j);
                            out.push((Some("content_block_start".into()), with_index(start, c)));
                            Some(c)
                        }
                        (None, Some(start)) => {
                            // Still nothing: keep holding, or drop an empty block.
                            if kind != "content_block_stop" {
                                self.pending = Some(start);
                            }
                            return;
                        }
                        (None, None) => return,
                    };
                    let Some(c) = c else { return };
                    if let Some(text) = relay {
                        if kind == "content_block_stop" {
                            if !text.is_empty() {
                                let delta = json!({"type": "content_block_delta", "index": c, "delta": {"type": "text_delta", "text": text}});
                                out.push((
                                    Some("content_block_delta".into()),
                                    Bytes::from(delta.to_string()),
                                ));
                            }
                        } else {
                            v["delta"]["text"] = Value::String(text);
                        }
                    }
                    out.push((name, with_index(v, c)));
                    return;
                }
                let Some(c) = mapped else {
                    return;
                };
                out.push((name, with_index(v, c)));
            }
            "message_delta" => {
                self.close_open(out);
                // The whole message's output, as an uncut answer reports it.
                let data = match v {
                    Some(mut v) => {
                        match v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                            Some(n) => {
                                v["usage"]["output_tokens"] = json!(n.saturating_add(self.used));
                                Bytes::from(v.to_string())
                            }
                            None => event.data,
                        }
                    }
                    None => event.data,
                };
                out.push((name, data));
            }
            _ => out.push((name, event.data)),
        }
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

    fn start(seq: u64, index: u32, block: Value) -> Event {
        event(
            seq,
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        )
    }

    fn delta(seq: u64, index: u32, delta: Value) -> Event {
        event(
            seq,
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        )
    }

    fn stop(seq: u64, index: u32) -> Event {
        event(
            seq,
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        )
    }

    /// message_start, a signed thinking block, and `text` in an open text block.
    fn thought_then(text: &str) -> Vec<Event> {
        vec![
            event(
                1,
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1", "content": []}}),
            ),
            start(
                2,
                0,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
            ),
            delta(3, 0, json!({"type": "thinking_delta", "thinking": "hmm"})),
            delta(4, 0, json!({"type": "signature_delta", "signature": "sig"})),
            stop(5, 0),
            start(6, 1, json!({"type": "text", "text": ""})),
            delta(7, 1, json!({"type": "text_delta", "text": text})),
        ]
    }

    fn sse(name: &str, data: Value) -> SseEvent {
        SseEvent {
            name: Some(Bytes::from(name.to_owned())),
            data: Bytes::from(data.to_string()),
        }
    }

    fn original() -> Value {
        json!({"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "q"}], "stream": true})
    }

    #[test]
    fn a_block_index_at_the_limit_does_not_overflow() {
        // Found by fuzz/fuzz_targets/continuation.rs: `index + 1` overflowed
        // (a panic with overflow checks, a wrap to block 0 without).
        let p = AnthropicMessages.partial(&[
            event(
                1,
                "message_start",
                json!({"type": "message_start", "message": {"id": "m"}}),
            ),
            start(2, u32::MAX, json!({"type": "text", "text": "a"})),
            stop(3, u32::MAX),
        ]);
        let Plan::Continue(mut legs) =
            AnthropicMessages.continuation(&original(), Continuation::AssistantPrefix, &p)
        else {
            panic!()
        };
        let mut out = Vec::new();
        for i in 0..2 {
            legs[0].splice.event(
                sse(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
                ),
                &mut out,
            );
        }
        let v: Value = serde_json::from_slice(&out[0].1).unwrap();
        assert_eq!(v["index"], u32::MAX);
    }

    #[test]
    fn events_that_are_not_objects_pass_through_the_splice() {
        // Found by the continuation fuzz target in CI: a `content_block_*`
        // event whose data is a number panicked numbering it.
        let p = AnthropicMessages.partial(&[
            event(
                1,
                "message_start",
                json!({"type": "message_start", "message": {"id": "m"}}),
            ),
            start(2, 0, json!({"type": "text", "text": "a"})),
        ]);
        let Plan::Continue(mut legs) =
            AnthropicMessages.continuation(&original(), Continuation::AssistantPrefix, &p)
        else {
            panic!()
        };
        let mut out = Vec::new();
        for name in [
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
        ] {
            legs[0].splice.event(sse(name, json!(999)), &mut out);
            legs[0].splice.event(sse(name, json!([1, 2])), &mut out);
        }
        for (_, data) in &out {
            assert!(serde_json::from_slice::<Value>(data).is_ok());
        }
        // They take no block index (found by the fuzz target in CI: the
        // next real block was numbered 3 where the client expects 1).
        legs[0].splice.event(
            sse(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
            ),
            &mut out,
        );
        let last: Value = serde_json::from_slice(&out.last().unwrap().1).unwrap();
        assert_eq!(last["index"], 1, "{last}");
    }

    #[test]
    fn a_block_event_without_a_name_is_numbered_the_clients_way() {
        // Found by the continuation fuzz target in CI: an unnamed event
        // whose data is a delta for continued block 0 was relayed with
        // index 0, so it appended to the client's closed block 0.
        let p = AnthropicMessages.partial(&[
            event(
                1,
                "message_start",
                json!({"type": "message_start", "message": {"id": "m"}}),
            ),
            start(2, 0, json!({"type": "text", "text": "a"})),
        ]);
        let Plan::Continue(mut legs) =
            AnthropicMessages.continuation(&original(), Continuation::AssistantPrefix, &p)
        else {
            panic!()
        };
        let mut out = Vec::new();
        legs[0].splice.event(
            sse(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "u", "name": "g", "input": {}}}),
            ),
            &mut out,
        );
        legs[0].splice.event(
            SseEvent {
                name: None,
                data: Bytes::from(
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{}"}})
                        .to_string(),
                ),
            },
            &mut out,
        );
        let indices: Vec<Value> = out
            .iter()
            .map(|(_, d)| serde_json::from_slice::<Value>(d).unwrap()["index"].clone())
            .collect();
        // The client's open block 0 closed, the tool call opened as 1.
        assert_eq!(indices, [json!(0), json!(1), json!(1)], "{out:?}");
        assert_eq!(out[2].0, None, "the event keeps its (lack of a) name");
    }

    #[test]
    fn reads_back_the_blocks_as_the_sdk_accumulates_them() {
        let p = AnthropicMessages.partial(&thought_then("a b"));
        assert_eq!(p.chunk_id.as_deref(), Some("msg_1"));
        assert_eq!(p.blocks.len(), 2);
        assert_eq!(p.blocks[0].kind, "thinking");
        assert_eq!(p.blocks[0].signature.as_deref(), Some("sig"));
        assert!(p.blocks[0].stopped && !p.blocks[1].stopped);
        assert_eq!(p.choices[0].content, "a b");
        assert_eq!(p.choices[0].reasoning, "hmm");
        assert_eq!(p.tokens(), 2);
        assert_eq!(p.last_seq, 7);
        assert_eq!(p.finish_reason(), None);
    }

    #[test]
    fn prefill_carries_the_signed_thinking_and_continues_the_open_text() {
        let p = AnthropicMessages.partial(&thought_then("a b "));
        let Plan::Continue(mut legs) =
            AnthropicMessages.continuation(&original(), Continuation::AssistantPrefix, &p)
        else {
            panic!()
        };
        let leg = &mut legs[0];
        let last = &leg.body["messages"][1];
        assert_eq!(last["role"], "assistant");
        assert_eq!(
            last["content"][0],
            json!({"type": "thinking", "thinking": "hmm", "signature": "sig"})
        );
        // Trailing whitespace is refused by the provider: cut, and not doubled.
        assert_eq!(last["content"][1], json!({"type": "text", "text": "a b"}));
        assert_eq!(leg.body["max_tokens"], 98);
        let mut out = Vec::new();
        for (name, data) in [
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_2"}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " c"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ] {
            leg.splice.event(sse(name, data), &mut out);
        }
        let names: Vec<&str> = out
            .iter()
            .map(|(n, _)| n.as_deref().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            [
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        // The message's usage counts what was generated before the cut too.
        let usage: Value = serde_json::from_slice(&out[4].1).unwrap();
        assert_eq!(usage["usage"]["output_tokens"], 3 + 2);
        let v: Vec<Value> = out
            .iter()
            .map(|(_, d)| serde_json::from_slice(d).unwrap())
            .collect();
        // The whitespace cut from the prefill comes back once.
        assert_eq!(v[0]["delta"]["text"], "c");
        assert_eq!(
            (v[0]["index"].as_u64(), v[1]["index"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(
            (v[2]["index"].as_u64(), v[3]["index"].as_u64()),
            (Some(2), Some(2))
        );
    }

    #[test]
    fn a_re_ask_drops_the_new_thinking_and_trims_the_overlap() {
        let p = AnthropicMessages.partial(&thought_then("the tide"));
        let Plan::Continue(mut legs) =
            AnthropicMessages.continuation(&original(), Continuation::Instruct, &p)
        else {
            panic!()
        };
        let leg = &mut legs[0];
        assert_eq!(leg.body["messages"][2]["content"], INSTRUCT_PROMPT);
        let mut out = Vec::new();
        for (name, data) in [
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "again"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "tide gate"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
        ] {
            leg.splice.event(sse(name, data), &mut out);
        }
        let v: Vec<Value> = out
            .iter()
            .map(|(_, d)| serde_json::from_slice(d).unwrap())
            .collect();
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0]["delta"]["text"], " gate");
        assert_eq!(v[0]["index"], 1);
        assert_eq!(v[1]["type"], "content_block_stop");
    }

    #[test]
    fn cuts_that_cannot_be_continued_say_why() {
        // Inside a thinking block, before its signature.
        let mut events = thought_then("x");
        events.truncate(3);
        let p = AnthropicMessages.partial(&events);
        let Plan::Impossible(why) =
            AnthropicMessages.continuation(&original(), Continuation::AssistantPrefix, &p)
        else {
            panic!()
        };
        assert!(why.contains("signature"), "{why}");
        // A tool_use block the client holds (released from a full hold).
        let mut events = thought_then("x");
        events.push(start(
            8,
            2,
            json!({"type": "tool_use", "id": "t", "name": "f", "input": {}}),
        ));
        let p = AnthropicMessages.partial(&events);
        assert!(matches!(
            AnthropicMessages.continuation(&original(), Continuation::Instruct, &p),
            Plan::Impossible(_)
        ));
        // Nothing at all: ask again.
        let p = AnthropicMessages.partial(&events[..1]);
        let Plan::Continue(legs) =
            AnthropicMessages.continuation(&original(), Continuation::AssistantPrefix, &p)
        else {
            panic!()
        };
        assert_eq!(legs[0].body["messages"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn tool_use_is_held_until_the_message_ends() {
        let mut hold = AnthropicMessages.hold();
        let mut out = Vec::new();
        hold.offer(sse("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})), &mut out);
        hold.offer(sse("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}})), &mut out);
        hold.offer(sse("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}})), &mut out);
        hold.offer(
            sse(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        hold.offer(
            sse(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}}),
            ),
            &mut out,
        );
        assert_eq!(out.len(), 5);
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
