//! OpenAI Responses: `POST {base_url}/responses`, spoken by OpenAI (where
//! its SDKs, the Agents SDK and `@ai-sdk/openai` send traffic now), vLLM and
//! Ollama.
//!
//! Stream: named events (`event: response.output_text.delta`), each a JSON
//! object whose `type` is the name and whose `sequence_number` counts from
//! 0. `response.created` and `response.in_progress` carry the response
//! object; output items open with `response.output_item.added` and close
//! with `response.output_item.done`; `response.completed` (or
//! `response.incomplete`) is the answer's own last event, and there is no
//! `[DONE]`. Errors: `{"error": {"message", "type", "param", "code"}}` in a
//! body; in the stream, an `error` event or `response.failed`.
//!
//! The gateway numbers the events itself (`sequence_number` is its event id
//! less one) and names every lifecycle event's response by the stream's id,
//! so a client resumes with the SDK's own `starting_after`, on any replica
//! and after a restart, whatever the upstream numbered or named.

use std::collections::{BTreeMap, HashMap};

use axum::http::{HeaderName, header};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value, json};

use super::continuation::{
    Block, Held, Hold, INSTRUCT_PROMPT, Leg, Out, Overlap, Partial, Plan, SkipShown, Splice,
    base_request,
};
use super::request::{self, RequestError, Summary};
use super::sse::{SseEvent, write_data};
use super::{Continuation, ProviderError, Stamp, Terminal, Wire};
use crate::stream::{Event, Status, StreamRecord};

pub struct OpenAiResponses;

/// The events that carry the whole response object.
const LIFECYCLE: [&str; 6] = [
    "response.created",
    "response.queued",
    "response.in_progress",
    "response.completed",
    "response.failed",
    "response.incomplete",
];

/// The smallest `max_output_tokens` OpenAI takes: a continuation with
/// fewer left ends the answer as the budget would have.
const MIN_OUTPUT_TOKENS: u64 = 16;

/// An event's type: its SSE name, else its data's `type`.
fn kind(name: Option<&[u8]>, data: &[u8]) -> Option<String> {
    if let Some(name) = name {
        return std::str::from_utf8(name).ok().map(str::to_owned);
    }
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: String,
    }
    serde_json::from_slice::<Typed>(data).ok().map(|t| t.kind)
}

fn sse_kind(event: &SseEvent) -> Option<String> {
    kind(event.name.as_deref(), &event.data)
}

impl Wire for OpenAiResponses {
    fn name(&self) -> &'static str {
        "openai_responses"
    }

    fn path(&self) -> &'static str {
        "/responses"
    }

    fn validate<'a>(&self, body: &'a [u8]) -> Result<Summary<'a>, RequestError> {
        request::responses(body)
    }

    fn credential(&self, key: &str) -> (HeaderName, String) {
        (header::AUTHORIZATION, format!("Bearer {key}"))
    }

    fn terminal(&self, event: &SseEvent) -> Option<Terminal> {
        // Per event: the name is compared, the data parsed only when the
        // provider names none.
        let last = match event.name.as_deref() {
            Some(name) => name == b"response.completed" || name == b"response.incomplete",
            None => matches!(
                sse_kind(event).as_deref(),
                Some("response.completed" | "response.incomplete")
            ),
        };
        last.then_some(Terminal::Last)
    }

    fn provider_error(&self, event: &SseEvent) -> Option<ProviderError> {
        let kind = match event.name.as_deref() {
            Some(b"error") | Some(b"response.failed") => sse_kind(event)?,
            Some(_) => return None,
            None => sse_kind(event)?,
        };
        let v: Value = serde_json::from_slice(&event.data).ok()?;
        let error = match kind.as_str() {
            "error" => v.get("error").filter(|e| e.is_object()).unwrap_or(&v),
            "response.failed" => v.pointer("/response/error").unwrap_or(&Value::Null),
            _ => return None,
        };
        let code = error
            .get("code")
            .or_else(|| error.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        Some(ProviderError {
            message: error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the provider sent an error mid-stream")
                .to_owned(),
            // A request the provider found wrong fails again when re-asked.
            resumable: !matches!(
                code,
                "invalid_request_error" | "invalid_prompt" | "invalid_request"
            ),
        })
    }

    fn hold(&self) -> Box<dyn Hold> {
        Box::<FunctionCallHold>::default()
    }

    fn partial(&self, events: &[Event]) -> Partial {
        let mut out = Partial::default();
        for event in events {
            out.last_seq = out.last_seq.max(event.seq);
            let Some(kind) = kind(event.name.as_deref().map(str::as_bytes), &event.data) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(&event.data) else {
                continue;
            };
            read_event(&mut out, &kind, v);
        }
        out
    }

    fn continuation(&self, original: &Value, style: Continuation, partial: &Partial) -> Plan {
        if partial.ended {
            return Plan::AlreadyComplete;
        }
        if style == Continuation::None {
            return Plan::Unsupported;
        }
        if !partial.choices.first().is_none_or(|c| c.refusal.is_empty()) {
            return Plan::Impossible("the answer was cut inside a refusal".into());
        }
        let open: Vec<&Block> = partial.blocks.iter().filter(|b| !b.stopped).collect();
        if let Some(b) = open
            .iter()
            .find(|b| b.kind != "message" && b.kind != "reasoning")
        {
            return Plan::Impossible(format!(
                "the answer was cut inside a `{}` output item, which no provider can continue",
                b.kind
            ));
        }
        if open.len() > 1 {
            return Plan::Impossible("the answer was cut inside several output items".into());
        }
        let open = open.first().copied();
        let said_enough = partial
            .blocks
            .iter()
            .any(|b| b.stopped && (b.kind == "message" || b.kind == "function_call"));
        if open.is_none() && said_enough {
            // Every item it said is whole: only the end is missing.
            return Plan::AlreadyComplete;
        }
        let Some(mut body) = base_request(original) else {
            return Plan::Impossible("the original request is not a JSON object".into());
        };
        // tidegate generates a background response itself: the provider
        // streams it like any other.
        body.remove("background");
        let used = partial.tokens();
        // An open message is continued by instruction: the model says the
        // word it was cut in (or after) again, and that costs a token the
        // splice drops.
        let says_again = open.is_some_and(|o| o.kind == "message" && !o.text.is_empty());
        if let Some(max) = body.get("max_output_tokens").and_then(Value::as_u64) {
            let left = (max + u64::from(says_again)).saturating_sub(used);
            if left < MIN_OUTPUT_TOKENS {
                return Plan::AlreadyComplete;
            }
            body.insert("max_output_tokens".into(), json!(left));
        }
        let mut splice = ItemSplice::new(partial);
        if let Some(open) = open
            && open.kind == "message"
            && !open.text.is_empty()
        {
            let Some(input) = input_items(&body) else {
                return Plan::Impossible("the original request has no input".into());
            };
            let mut input = input;
            input.push(json!({"role": "assistant", "content": open.text}));
            input.push(json!({"role": "user", "content": INSTRUCT_PROMPT}));
            body.insert("input".into(), Value::Array(input));
            splice.overlap = Some(Overlap::new(&open.text));
        }
        Plan::Continue(vec![Leg {
            body: Value::Object(body),
            splice: Box::new(splice),
        }])
    }

    fn closing(&self, partial: &Partial) -> Vec<Out> {
        let mut out = Vec::new();
        let mut items = Vec::new();
        let mut cut = false;
        for b in &partial.blocks {
            if b.stopped {
                items.push(b.start.clone());
                continue;
            }
            cut = true;
            let item = close_item(b, &b.text, "incomplete");
            for (name, data) in done_events(b, &b.text, &item) {
                out.push((Some(name.into()), Bytes::from(data.to_string())));
            }
            items.push(item);
        }
        // Nothing whole said (a reasoning alone): the budget ended it.
        let cut = cut
            || !partial
                .blocks
                .iter()
                .any(|b| b.kind == "message" || b.kind == "function_call");
        let mut response = partial.response.clone().unwrap_or_else(|| json!({}));
        let (name, status) = if cut && partial.blocks.iter().all(|b| b.kind != "function_call") {
            response["incomplete_details"] = json!({"reason": "max_output_tokens"});
            ("response.incomplete", "incomplete")
        } else {
            ("response.completed", "completed")
        };
        response["status"] = json!(status);
        response["output"] = Value::Array(items);
        out.push((
            Some(name.into()),
            Bytes::from(json!({"type": name, "response": response}).to_string()),
        ));
        out
    }

    fn write_done(&self, _out: &mut BytesMut) {
        // `response.completed` is the answer's own end: no sentinel.
    }

    fn write_abort(&self, out: &mut BytesMut, error: Value) {
        // The SDKs raise an `APIError` for an event whose data has an
        // `error` object (its body is tidegate's abort object); a raw reader
        // sees an OpenAI `error` event. Its number is the next event's: the
        // abort is not one of the response's events.
        let next = error
            .get("last_event_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let data = json!({
            "type": "error",
            "code": error.get("code"),
            "message": error.get("message"),
            "param": null,
            "sequence_number": next,
            "error": error,
        });
        out.put_slice(b"event: error\n");
        write_data(out, data.to_string().as_bytes());
    }

    fn error_body(&self, kind: &str, code: &str, message: &str) -> Value {
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    }

    fn is_error_body(&self, body: &Value) -> bool {
        body.get("error").is_some_and(Value::is_object)
    }

    fn error_message(&self, body: &Value) -> Option<String> {
        body.pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    fn stamps(&self) -> bool {
        true
    }

    fn stamp(&self, to: &Stamp<'_>, seq: u64, name: Option<&str>, data: Bytes) -> Bytes {
        let number = seq.saturating_sub(1);
        let lifecycle = name.is_some_and(|n| LIFECYCLE.contains(&n));
        if !lifecycle && numbered(&data) == Some(number) {
            return data;
        }
        let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(&data) else {
            return data;
        };
        v.insert("sequence_number".into(), json!(number));
        if let Some(response) = v.get_mut("response").and_then(Value::as_object_mut) {
            response.insert("id".into(), json!(to.id));
            response.insert("background".into(), json!(to.background));
        }
        Bytes::from(Value::Object(v).to_string())
    }
}

/// Whether a Responses request asks for a background response.
pub fn asks_background(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Asked {
        background: Option<bool>,
    }
    serde_json::from_slice::<Asked>(body).is_ok_and(|a| a.background == Some(true))
}

/// The body a background request's provider is sent: an ordinary stream
/// (tidegate generates the background response itself).
pub fn foreground(body: &[u8]) -> Result<Bytes, RequestError> {
    let mut v: Map<String, Value> =
        serde_json::from_slice(body).map_err(RequestError::Malformed)?;
    v.remove("background");
    v.insert("stream".into(), Value::Bool(true));
    Ok(Bytes::from(Value::Object(v).to_string()))
}

/// The body an upstream with `provider_background` is sent: a background
/// response the provider keeps (`background`, `store`), streamed. `None`
/// when the client asked not to be stored (`store: false`): that request
/// goes as it is, and is continued, not re-attached, after a cut.
pub fn provider_background(body: &[u8]) -> Option<Bytes> {
    let mut v: Map<String, Value> = serde_json::from_slice(body).ok()?;
    if v.get("store") == Some(&Value::Bool(false)) {
        return None;
    }
    v.insert("background".into(), Value::Bool(true));
    v.insert("store".into(), Value::Bool(true));
    v.insert("stream".into(), Value::Bool(true));
    Some(Bytes::from(Value::Object(v).to_string()))
}

/// A provider's event as its own stream numbers it: its `sequence_number`,
/// and for the events that carry the response object, the response's id.
pub fn provider_numbering(name: Option<&str>, data: &[u8]) -> Option<(u64, Option<String>)> {
    let lifecycle = match name {
        Some(name) => LIFECYCLE.contains(&name),
        None => kind(None, data).is_some_and(|k| LIFECYCLE.contains(&k.as_str())),
    };
    if !lifecycle {
        return numbered(data).map(|n| (n, None));
    }
    #[derive(serde::Deserialize)]
    struct Identified {
        id: String,
    }
    #[derive(serde::Deserialize)]
    struct Lifecycle {
        sequence_number: u64,
        response: Option<Identified>,
    }
    let v: Lifecycle = serde_json::from_slice(data).ok()?;
    Some((v.sequence_number, v.response.map(|r| r.id)))
}

/// A response object for stream `id` from its request alone (before its
/// provider said anything), in `status`.
pub fn skeleton(id: &str, request: &Value, status: &str) -> Value {
    let field = |k: &str, default: Value| request.get(k).cloned().unwrap_or(default);
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": field("background", json!(false)),
        "model": field("model", Value::Null),
        "output": [],
        "usage": null,
        "error": null,
        "incomplete_details": null,
        "instructions": field("instructions", Value::Null),
        "max_output_tokens": field("max_output_tokens", Value::Null),
        "metadata": field("metadata", json!({})),
        "parallel_tool_calls": field("parallel_tool_calls", json!(true)),
        "temperature": field("temperature", Value::Null),
        "top_p": field("top_p", Value::Null),
        "tool_choice": field("tool_choice", json!("auto")),
        "tools": field("tools", json!([])),
        "text": field("text", json!({"format": {"type": "text"}})),
        "store": field("store", json!(true)),
    })
}

/// The response object `GET /v1/responses/{id}` answers: the last one its
/// provider sent, with the output items as they stand (open ones
/// `in_progress`) and the status of the stream.
pub fn view(record: &StreamRecord, status: Status, events: &[Event]) -> Value {
    let request: Value = serde_json::from_str(&record.request).unwrap_or_default();
    let partial = OpenAiResponses.partial(events);
    let background = request.get("background").and_then(Value::as_bool) == Some(true);
    let mut response = partial
        .response
        .clone()
        .unwrap_or_else(|| skeleton(&record.id, &request, "queued"));
    response["id"] = json!(record.id);
    response["background"] = json!(background);
    let said = match status {
        Status::Running if partial.response.is_none() => "queued",
        Status::Running => "in_progress",
        // A background response is continued with no client: still in
        // progress. A foreground one waits for its client's resume.
        Status::Interrupted if background => "in_progress",
        Status::Interrupted => "incomplete",
        Status::Completed => partial
            .response
            .as_ref()
            .and_then(|r| r.get("status"))
            .and_then(Value::as_str)
            .filter(|s| *s == "incomplete")
            .unwrap_or("completed"),
        Status::Cancelled => "cancelled",
        Status::Failed => "failed",
    };
    response["status"] = json!(said);
    if status == Status::Interrupted && !background {
        response["incomplete_details"] = json!({"reason": "interrupted"});
    }
    if status == Status::Failed {
        let reason = record.reason.as_deref().unwrap_or("failed");
        let (code, message) = reason.split_once(": ").unwrap_or((reason, reason));
        response["error"] = json!({"code": code, "message": message});
    }
    if !partial.ended || status != Status::Completed {
        let items: Vec<Value> = partial
            .blocks
            .iter()
            .map(|b| {
                if b.stopped {
                    b.start.clone()
                } else {
                    close_item(b, &b.text, "in_progress")
                }
            })
            .collect();
        response["output"] = Value::Array(items);
    }
    response
}

/// The `sequence_number` a provider's event already carries, read without
/// parsing it (most events are numbered as the gateway numbers them).
fn numbered(data: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sequence_number\":";
    let at = memchr::memmem::rfind(data, KEY)? + KEY.len();
    let digits: &[u8] = &data[at..];
    let digits = digits.trim_ascii_start();
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// The original's `input` as a list of items (a string is one user
/// message).
fn input_items(body: &Map<String, Value>) -> Option<Vec<Value>> {
    match body.get("input")? {
        Value::String(text) => Some(vec![json!({"role": "user", "content": text})]),
        Value::Array(items) => Some(items.clone()),
        _ => None,
    }
}

fn index_of(v: &Value) -> Option<u32> {
    v.get("output_index")
        .and_then(Value::as_u64)
        .map(|i| i as u32)
}

fn text_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Accumulate one stored event into `out`, as the SDK accumulates it.
fn read_event(out: &mut Partial, kind: &str, v: Value) {
    if LIFECYCLE.contains(&kind) {
        if let Some(response) = v.get("response") {
            if let Some(tokens) = response
                .pointer("/usage/output_tokens")
                .and_then(Value::as_u64)
            {
                out.usage_output = Some(tokens);
            }
            if out.chunk_id.is_none() {
                out.chunk_id = response.get("id").and_then(Value::as_str).map(Into::into);
            }
            out.response = Some(response.clone());
        }
        if matches!(kind, "response.completed" | "response.incomplete") {
            out.ended = true;
            out.choice(0).finish_reason = Some(text_of(&v["response"], "status").to_owned());
        }
        return;
    }
    let Some(index) = index_of(&v) else {
        return;
    };
    let at = out.blocks.iter().position(|b| b.index == index);
    match (kind, at) {
        ("response.output_item.added", None) => {
            let item = v.get("item").cloned().unwrap_or(Value::Null);
            out.choice(0).started = true;
            out.blocks.push(Block {
                index,
                kind: text_of(&item, "type").to_owned(),
                start: item,
                text: String::new(),
                signature: None,
                stopped: false,
                parts: 0,
            });
        }
        ("response.output_item.done", Some(at)) => {
            let b = &mut out.blocks[at];
            b.stopped = true;
            if let Some(item) = v.get("item") {
                b.start = item.clone();
            }
        }
        ("response.content_part.added" | "response.reasoning_summary_part.added", Some(at)) => {
            out.blocks[at].parts += 1;
        }
        (
            "response.output_text.delta"
            | "response.reasoning_summary_text.delta"
            | "response.reasoning_text.delta"
            | "response.function_call_arguments.delta"
            | "response.refusal.delta",
            Some(at),
        ) => {
            let delta = text_of(&v, "delta");
            if delta.is_empty() {
                return;
            }
            out.blocks[at].text.push_str(delta);
            let c = out.choice(0);
            c.units += 1;
            match kind {
                "response.output_text.delta" => c.content.push_str(delta),
                "response.refusal.delta" => c.refusal.push_str(delta),
                "response.function_call_arguments.delta" => {}
                _ => c.reasoning.push_str(delta),
            }
        }
        _ => {}
    }
}

/// An open item closed with `text` and `status`, as its
/// `response.output_item.done` carries it.
fn close_item(b: &Block, text: &str, status: &str) -> Value {
    let mut item = b.start.clone();
    if let Some(o) = item.as_object_mut() {
        match b.kind.as_str() {
            "message" => {
                o.insert("status".into(), json!(status));
                o.insert(
                    "content".into(),
                    json!([{"type": "output_text", "text": text, "annotations": []}]),
                );
            }
            "reasoning" => {
                o.insert(
                    "summary".into(),
                    json!([{"type": "summary_text", "text": text}]),
                );
            }
            _ => {}
        }
    }
    item
}

/// The `…done` events that close an open item the provider never closed.
fn done_events(b: &Block, text: &str, item: &Value) -> Vec<(&'static str, Value)> {
    let id = b.start.get("id").cloned().unwrap_or(Value::Null);
    let index = b.index;
    let mut out = Vec::new();
    if b.parts > 0 {
        match b.kind.as_str() {
            "message" => {
                out.push(("response.output_text.done", json!({"type": "response.output_text.done", "item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []})));
                out.push(("response.content_part.done", json!({"type": "response.content_part.done", "item_id": id, "output_index": index, "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}})));
            }
            "reasoning" => {
                out.push(("response.reasoning_summary_text.done", json!({"type": "response.reasoning_summary_text.done", "item_id": id, "output_index": index, "summary_index": 0, "text": text})));
                out.push(("response.reasoning_summary_part.done", json!({"type": "response.reasoning_summary_part.done", "item_id": id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": text}})));
            }
            _ => {}
        }
    }
    out.push((
        "response.output_item.done",
        json!({"type": "response.output_item.done", "output_index": index, "item": item}),
    ));
    out
}

/// Holds each function call's events from its `output_item.added` until
/// its `output_item.done`: a call reaches the client whole or not at all.
#[derive(Default)]
struct FunctionCallHold(Held);

impl Hold for FunctionCallHold {
    fn offer(&mut self, event: SseEvent, out: &mut Vec<SseEvent>) {
        let opens_call = event.name_is("response.output_item.added")
            && memchr::memmem::find(&event.data, b"\"function_call\"").is_some();
        if self.0.off || (self.0.is_empty() && !opens_call) {
            out.push(event);
            return;
        }
        let Some(index) = serde_json::from_slice::<Value>(&event.data)
            .ok()
            .as_ref()
            .and_then(index_of)
        else {
            out.push(event);
            return;
        };
        if !opens_call && !self.0.holds(index) {
            out.push(event);
            return;
        }
        let done = event.name_is("response.output_item.done");
        self.0.push(index, event);
        if done {
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

/// Where a continuation's output item goes in the client's response.
#[derive(Debug, Clone)]
enum Target {
    /// It continues the item the client holds open (at this index, with
    /// this id).
    Same { index: u32, id: Value },
    /// A new item at this index of the client's output.
    New(u32),
    /// Not relayed (a regenerated reasoning the client has whole).
    Drop,
}

/// The item the client holds open, which the continuation's first item of
/// its kind continues.
struct OpenItem {
    block: Block,
    /// Text relayed for it after the cut.
    relayed: String,
    /// The continuation's first item of its kind was mapped onto it.
    taken: bool,
}

/// Makes a continuation's events read as the rest of the original
/// response: no second `response.created`, its items at the client's
/// output indices, the open item continued under its own id (the text a
/// re-ask repeats trimmed, a regenerated reasoning not repeated), and a
/// `response.completed` whose output is the whole answer.
struct ItemSplice {
    open: Option<OpenItem>,
    /// New output index → where it goes.
    map: HashMap<u32, Target>,
    next_index: u32,
    /// Whether a regenerated reasoning item is relayed: only when the
    /// client was shown no output at all.
    pass_reasoning: bool,
    overlap: Option<Overlap>,
    skip: Option<SkipShown>,
    /// The client's output as it will stand: the items it has whole, then
    /// each one closed through the splice.
    items: BTreeMap<u32, Value>,
    used: u64,
}

impl ItemSplice {
    fn new(partial: &Partial) -> ItemSplice {
        let open = partial
            .blocks
            .iter()
            .find(|b| !b.stopped)
            .map(|b| OpenItem {
                block: b.clone(),
                relayed: String::new(),
                taken: false,
            });
        let skip = open
            .as_ref()
            .filter(|o| o.block.kind == "reasoning")
            .map(|o| SkipShown::new(&o.block.text));
        ItemSplice {
            map: HashMap::new(),
            next_index: partial
                .blocks
                .iter()
                .map(|b| b.index + 1)
                .max()
                .unwrap_or(0),
            pass_reasoning: partial.blocks.is_empty(),
            overlap: None,
            skip,
            items: partial
                .blocks
                .iter()
                .filter(|b| b.stopped)
                .map(|b| (b.index, b.start.clone()))
                .collect(),
            used: partial.tokens(),
            open,
        }
    }

    /// Where the item a new `output_item.added` opens goes.
    fn place(&mut self, item: &Value) -> Target {
        let kind = text_of(item, "type");
        if let Some(open) = &mut self.open
            && !open.taken
            && open.block.kind == kind
        {
            open.taken = true;
            return Target::Same {
                index: open.block.index,
                id: open.block.start.get("id").cloned().unwrap_or(Value::Null),
            };
        }
        if kind == "reasoning" && !self.pass_reasoning {
            return Target::Drop;
        }
        let at = self.next_index;
        self.next_index += 1;
        Target::New(at)
    }

    /// The full text of the open item as the client holds it now.
    fn open_text(&self) -> String {
        self.open
            .as_ref()
            .map(|o| format!("{}{}", o.block.text, o.relayed))
            .unwrap_or_default()
    }

    fn emit(out: &mut Vec<Out>, kind: &str, v: Map<String, Value>) {
        out.push((Some(kind.into()), Bytes::from(Value::Object(v).to_string())));
    }

    /// A text delta for the open item: trimmed at a re-ask's splice,
    /// regenerated reasoning past what was shown; what is left to relay.
    fn open_delta(&mut self, kind: &str, delta: &str) -> String {
        let keep = if kind == "response.output_text.delta" {
            match &mut self.overlap {
                Some(o) => o.push(delta).unwrap_or_default(),
                None => delta.to_owned(),
            }
        } else {
            match &mut self.skip {
                Some(s) => s.push(delta),
                None => delta.to_owned(),
            }
        };
        if let Some(open) = &mut self.open {
            open.relayed.push_str(&keep);
        }
        keep
    }
}

impl Splice for ItemSplice {
    fn event(&mut self, event: SseEvent, out: &mut Vec<Out>) {
        let Some(kind) = sse_kind(&event) else {
            return;
        };
        let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(&event.data) else {
            return;
        };
        match kind.as_str() {
            // The client has the response's start.
            "response.created" | "response.queued" | "response.in_progress" => return,
            "response.completed" | "response.incomplete" => {
                if let Some(response) = v.get_mut("response").and_then(Value::as_object_mut) {
                    response.insert(
                        "output".into(),
                        Value::Array(self.items.values().cloned().collect()),
                    );
                    if let Some(usage) = response.get_mut("usage").and_then(Value::as_object_mut) {
                        for key in ["output_tokens", "total_tokens"] {
                            if let Some(n) = usage.get(key).and_then(Value::as_u64) {
                                usage.insert(key.into(), json!(n.saturating_add(self.used)));
                            }
                        }
                    }
                }
                Self::emit(out, &kind, v);
                return;
            }
            _ => {}
        }
        let Some(new_index) = v
            .get("output_index")
            .and_then(Value::as_u64)
            .map(|i| i as u32)
        else {
            Self::emit(out, &kind, v);
            return;
        };
        if kind == "response.output_item.added" {
            let target = self.place(v.get("item").unwrap_or(&Value::Null));
            self.map.insert(new_index, target.clone());
            match target {
                Target::New(at) => {
                    v.insert("output_index".into(), json!(at));
                    Self::emit(out, &kind, v);
                }
                Target::Same { .. } | Target::Drop => {}
            }
            return;
        }
        let target = self.map.get(&new_index).cloned().unwrap_or(Target::Drop);
        let (index, id) = match target {
            Target::Drop => return,
            Target::New(at) => {
                v.insert("output_index".into(), json!(at));
                if kind == "response.output_item.done"
                    && let Some(item) = v.get("item")
                {
                    self.items.insert(at, item.clone());
                }
                Self::emit(out, &kind, v);
                return;
            }
            Target::Same { index, id } => (index, id),
        };
        v.insert("output_index".into(), json!(index));
        if v.contains_key("item_id") {
            v.insert("item_id".into(), id.clone());
        }
        let parts = self.open.as_ref().map_or(0, |o| o.block.parts);
        match kind.as_str() {
            "response.content_part.added" | "response.reasoning_summary_part.added"
                if parts > 0 => {}
            "response.output_text.delta"
            | "response.reasoning_summary_text.delta"
            | "response.reasoning_text.delta" => {
                let delta = v.get("delta").and_then(Value::as_str).unwrap_or("");
                let keep = self.open_delta(&kind, delta);
                if !keep.is_empty() {
                    v.insert("delta".into(), json!(keep));
                    Self::emit(out, &kind, v);
                }
            }
            "response.output_text.done" | "response.reasoning_summary_text.done" => {
                // What a re-ask's overlap still holds comes out first.
                if kind == "response.output_text.done"
                    && let Some(held) = self.overlap.as_mut().and_then(Overlap::flush)
                    && !held.is_empty()
                {
                    if let Some(open) = &mut self.open {
                        open.relayed.push_str(&held);
                    }
                    let mut delta = Map::new();
                    delta.insert("type".into(), json!("response.output_text.delta"));
                    delta.insert("item_id".into(), id.clone());
                    delta.insert("output_index".into(), json!(index));
                    delta.insert("content_index".into(), json!(0));
                    delta.insert("delta".into(), json!(held));
                    delta.insert("logprobs".into(), json!([]));
                    Self::emit(out, "response.output_text.delta", delta);
                }
                v.insert("text".into(), json!(self.open_text()));
                Self::emit(out, &kind, v);
            }
            "response.content_part.done" | "response.reasoning_summary_part.done" => {
                if let Some(part) = v.get_mut("part").and_then(Value::as_object_mut) {
                    part.insert("text".into(), json!(self.open_text()));
                }
                Self::emit(out, &kind, v);
            }
            "response.output_item.done" => {
                let text = self.open_text();
                let item = match &self.open {
                    Some(open) => {
                        let status = v
                            .get("item")
                            .and_then(|i| i.get("status"))
                            .and_then(Value::as_str)
                            .unwrap_or("completed")
                            .to_owned();
                        close_item(&open.block, &text, &status)
                    }
                    None => v.get("item").cloned().unwrap_or(Value::Null),
                };
                self.items.insert(index, item.clone());
                v.insert("item".into(), item);
                Self::emit(out, &kind, v);
            }
            _ => Self::emit(out, &kind, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, data: Value) -> Event {
        let name = data["type"].as_str().unwrap().to_owned();
        Event {
            seq,
            name: Some(name.into()),
            data: Bytes::from(data.to_string()),
        }
    }

    fn sse(data: Value) -> SseEvent {
        let name = data["type"].as_str().unwrap().to_owned();
        SseEvent {
            name: Some(Bytes::from(name)),
            data: Bytes::from(data.to_string()),
        }
    }

    fn response(status: &str) -> Value {
        json!({"id": "resp_up", "object": "response", "status": status, "model": "m", "output": []})
    }

    /// The events of a text answer cut after `words` deltas.
    fn cut_text(words: &[&str]) -> Vec<Event> {
        let mut events = vec![
            json!({"type": "response.created", "response": response("in_progress")}),
            json!({"type": "response.in_progress", "response": response("in_progress")}),
            json!({"type": "response.output_item.added", "output_index": 0, "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
            json!({"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
        ];
        for w in words {
            events.push(json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": w, "logprobs": []}));
        }
        events
            .into_iter()
            .enumerate()
            .map(|(i, v)| ev(i as u64 + 1, v))
            .collect()
    }

    fn original() -> Value {
        json!({"model": "m", "input": "q", "stream": true, "max_output_tokens": 100})
    }

    /// A stream the client did not ask to run in the background.
    const TG: Stamp<'static> = Stamp {
        id: "resp_tg",
        background: false,
    };

    #[test]
    fn the_gateway_numbers_events_and_names_the_response() {
        let w = OpenAiResponses;
        let data = Bytes::from_static(
            br#"{"type":"response.output_text.delta","delta":"a","sequence_number":4}"#,
        );
        // Numbered as the gateway numbers it: untouched.
        assert_eq!(
            w.stamp(&TG, 5, Some("response.output_text.delta"), data.clone()),
            data
        );
        let v: Value =
            serde_json::from_slice(&w.stamp(&TG, 9, Some("response.output_text.delta"), data))
                .unwrap();
        assert_eq!(v["sequence_number"], 8);
        let created = Bytes::from(json!({"type": "response.created", "sequence_number": 0, "response": response("in_progress")}).to_string());
        let v: Value =
            serde_json::from_slice(&w.stamp(&TG, 1, Some("response.created"), created)).unwrap();
        assert_eq!(
            (v["response"]["id"].as_str(), v["sequence_number"].as_u64()),
            (Some("resp_tg"), Some(0))
        );
        // The provider's background response (`provider_background`) is
        // not the client's: it sees the mode it asked for, either way.
        let queued = Bytes::from(json!({"type": "response.queued", "sequence_number": 0, "response": {"id": "resp_p", "status": "queued", "background": true}}).to_string());
        let v: Value =
            serde_json::from_slice(&w.stamp(&TG, 1, Some("response.queued"), queued.clone()))
                .unwrap();
        assert_eq!(v["response"]["background"], false);
        let asked = Stamp {
            background: true,
            ..TG
        };
        let v: Value =
            serde_json::from_slice(&w.stamp(&asked, 1, Some("response.queued"), queued)).unwrap();
        assert_eq!(v["response"]["background"], true);
        assert!(asks_background(
            br#"{"model":"m","input":"q","background":true}"#
        ));
        assert!(!asks_background(
            br#"{"model":"m","input":"q","background":false}"#
        ));
        assert!(!asks_background(br#"{"model":"m","input":"q"}"#));
    }

    #[test]
    fn knows_its_end_and_its_errors() {
        let w = OpenAiResponses;
        assert_eq!(
            w.terminal(&sse(
                json!({"type": "response.completed", "response": response("completed")})
            )),
            Some(Terminal::Last)
        );
        assert_eq!(
            w.terminal(&sse(
                json!({"type": "response.output_text.delta", "delta": "x"})
            )),
            None
        );
        let e = w
            .provider_error(&sse(
                json!({"type": "error", "code": "server_error", "message": "boom", "param": null}),
            ))
            .unwrap();
        assert_eq!((e.message.as_str(), e.resumable), ("boom", true));
        let failed = json!({"type": "response.failed", "response": {"id": "r", "status": "failed", "error": {"code": "invalid_prompt", "message": "no"}}});
        let e = w.provider_error(&sse(failed)).unwrap();
        assert!(!e.resumable);
        assert!(
            w.provider_error(&sse(
                json!({"type": "response.output_text.delta", "delta": "x"})
            ))
            .is_none()
        );
    }

    #[test]
    fn reads_back_the_output_items() {
        let p = OpenAiResponses.partial(&cut_text(&["the", " tide"]));
        assert_eq!(p.text(), "the tide");
        assert_eq!(p.blocks.len(), 1);
        assert_eq!(
            (
                p.blocks[0].kind.as_str(),
                p.blocks[0].parts,
                p.blocks[0].stopped
            ),
            ("message", 1, false)
        );
        assert_eq!(p.last_seq, 6);
        assert!(!p.ended);
        assert_eq!(p.response.as_ref().unwrap()["id"], "resp_up");
    }

    #[test]
    fn a_cut_message_is_continued_by_a_re_ask_and_spliced_into_the_same_item() {
        let p = OpenAiResponses.partial(&cut_text(&["the", " tide", " gate"]));
        let Plan::Continue(mut legs) =
            OpenAiResponses.continuation(&original(), Continuation::Instruct, &p)
        else {
            panic!()
        };
        let leg = legs.remove(0);
        let input = leg.body["input"].as_array().unwrap();
        assert_eq!(input.len(), 3);
        assert_eq!(
            input[1],
            json!({"role": "assistant", "content": "the tide gate"})
        );
        assert_eq!(input[2]["content"], INSTRUCT_PROMPT);
        assert_eq!(
            leg.body["max_output_tokens"], 98,
            "3 said, and the word said again"
        );
        let mut splice = leg.splice;
        let mut out = Vec::new();
        let id = "msg_2";
        for v in [
            json!({"type": "response.created", "response": response("in_progress")}),
            json!({"type": "response.in_progress", "response": response("in_progress")}),
            json!({"type": "response.output_item.added", "output_index": 0, "item": {"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
            json!({"type": "response.content_part.added", "item_id": id, "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
            json!({"type": "response.output_text.delta", "item_id": id, "output_index": 0, "content_index": 0, "delta": "gate", "logprobs": []}),
            json!({"type": "response.output_text.delta", "item_id": id, "output_index": 0, "content_index": 0, "delta": " holds", "logprobs": []}),
            json!({"type": "response.output_text.done", "item_id": id, "output_index": 0, "content_index": 0, "text": "gate holds", "logprobs": []}),
            json!({"type": "response.content_part.done", "item_id": id, "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "gate holds", "annotations": []}}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": {"id": id, "type": "message", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": "gate holds", "annotations": []}]}}),
            json!({"type": "response.completed", "response": {"id": "resp_2", "status": "completed", "output": [], "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}}}),
        ] {
            splice.event(sse(v), &mut out);
        }
        let out: Vec<(String, Value)> = out
            .iter()
            .map(|(n, d)| {
                (
                    n.as_deref().unwrap().to_owned(),
                    serde_json::from_slice(d).unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert_eq!(out[0].1["delta"], " holds");
        assert_eq!(out[0].1["item_id"], "msg_1");
        assert_eq!(out[1].1["text"], "the tide gate holds");
        assert_eq!(out[3].1["item"]["id"], "msg_1");
        assert_eq!(
            out[3].1["item"]["content"][0]["text"],
            "the tide gate holds"
        );
        let done = &out[4].1["response"];
        assert_eq!(
            done["output"][0]["content"][0]["text"],
            "the tide gate holds"
        );
        assert_eq!(done["usage"]["output_tokens"], 5);
    }

    #[test]
    fn ends_what_needs_only_its_end_and_refuses_a_cut_call() {
        let mut events = cut_text(&["a"]);
        let done_item = json!({"type": "response.output_item.done", "output_index": 0, "item": {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": "a", "annotations": []}]}});
        events.push(ev(6, done_item));
        let p = OpenAiResponses.partial(&events);
        assert!(matches!(
            OpenAiResponses.continuation(&original(), Continuation::Instruct, &p),
            Plan::AlreadyComplete
        ));
        let closing = OpenAiResponses.closing(&p);
        assert_eq!(closing.len(), 1);
        let v: Value = serde_json::from_slice(&closing[0].1).unwrap();
        assert_eq!(v["type"], "response.completed");
        assert_eq!(v["response"]["output"][0]["id"], "msg_1");
        let mut events = cut_text(&[]);
        events.push(ev(5, json!({"type": "response.output_item.added", "output_index": 1, "item": {"id": "fc_1", "type": "function_call", "status": "in_progress", "call_id": "c", "name": "f", "arguments": ""}})));
        let p = OpenAiResponses.partial(&events);
        assert!(matches!(
            OpenAiResponses.continuation(&original(), Continuation::Instruct, &p),
            Plan::Impossible(_)
        ));
        // A spent budget ends the open message as the budget would have
        // (16 − 2 said + 1 said again is under OpenAI's least, 16).
        let p = OpenAiResponses.partial(&cut_text(&["a", " b"]));
        let spent = json!({"model": "m", "input": "q", "max_output_tokens": 16});
        assert!(matches!(
            OpenAiResponses.continuation(&spent, Continuation::Instruct, &p),
            Plan::AlreadyComplete
        ));
        let closing = OpenAiResponses.closing(&p);
        let names: Vec<&str> = closing.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.incomplete"
            ]
        );
    }

    #[test]
    fn a_function_call_is_held_until_done() {
        let mut hold = OpenAiResponses.hold();
        let mut out = Vec::new();
        hold.offer(sse(json!({"type": "response.output_item.added", "output_index": 0, "item": {"id": "fc", "type": "function_call", "arguments": ""}})), &mut out);
        hold.offer(sse(json!({"type": "response.function_call_arguments.delta", "output_index": 0, "item_id": "fc", "delta": "{"})), &mut out);
        assert!(out.is_empty());
        assert!(hold.held_bytes() > 0);
        hold.offer(sse(json!({"type": "response.output_item.done", "output_index": 0, "item": {"id": "fc", "type": "function_call", "arguments": "{}"}})), &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(hold.held_bytes(), 0);
    }

    #[test]
    fn the_abort_is_an_error_event_the_sdks_raise() {
        let mut out = BytesMut::new();
        OpenAiResponses.write_abort(&mut out, json!({"type": "server_restarting", "code": "server_restarting", "message": "m", "resume": true, "last_event_id": "7"}));
        let text = std::str::from_utf8(&out).unwrap();
        let data = text.strip_prefix("event: error\ndata: ").unwrap().trim();
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "server_restarting");
        assert_eq!(v["sequence_number"], 7);
        assert_eq!(v["error"]["resume"], true);
    }
}
