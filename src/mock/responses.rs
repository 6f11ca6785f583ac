//! The OpenAI Responses API on the wire: a `POST /v1/responses` body
//! checked as strictly as OpenAI checks it and turned into the chat
//! conversation the answer is drawn from ([`check`]), and a plan rendered
//! as Responses stream events and Response objects ([`Stream`]).
//!
//! The conversion is what keeps the dialects in step: the same
//! conversation (input string or items, `instructions` as a leading system
//! message) makes the same chat messages, so the same plan and the same
//! words as `/v1/chat/completions`. The Responses API has no prefill, so a
//! trailing assistant message is history; `[assistant partial, user]` is
//! the chat API's instruct re-ask.

use std::collections::{HashSet, VecDeque};

use serde_json::{Map, Value, json};

use super::plan::{Finish, MAX_TOKENS_LIMIT, Plan, Unit};
use super::render::{Out, js};

/// The top-level parameters the real API accepts, and the mock's `mock`.
const PARAMETERS: [&str; 26] = [
    "model",
    "input",
    "instructions",
    "stream",
    "stream_options",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning",
    "text",
    "store",
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "background",
    "include",
    "truncation",
    "service_tier",
    "previous_response_id",
    "max_tool_calls",
    "top_logprobs",
    "mock",
];

/// The real API's floor for `max_output_tokens`.
pub const MIN_OUTPUT_TOKENS: u64 = 16;

const ROLES: [&str; 4] = ["user", "assistant", "system", "developer"];
const ITEM_TYPES: [&str; 4] = [
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
];
const EFFORTS: [&str; 7] = ["none", "minimal", "low", "medium", "high", "xhigh", "max"];
const SUMMARIES: [&str; 3] = ["auto", "concise", "detailed"];

/// A request OpenAI would refuse: a 400 with its `param` and `code`.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl Invalid {
    fn new(message: String, param: &str, code: &'static str) -> Invalid {
        Invalid {
            message,
            param: Some(param.to_owned()),
            code: Some(code),
        }
    }

    fn unknown(param: &str) -> Invalid {
        Invalid::new(
            format!("Unknown parameter: '{param}'."),
            param,
            "unknown_parameter",
        )
    }

    fn missing(param: &str) -> Invalid {
        Invalid::new(
            format!("Missing required parameter: '{param}'."),
            param,
            "missing_required_parameter",
        )
    }

    fn wrong_type(param: &str, expected: &str, got: &Value) -> Invalid {
        Invalid::new(
            format!(
                "Invalid type for '{param}': expected {expected}, but got {} instead.",
                kind(got)
            ),
            param,
            "invalid_type",
        )
    }

    fn value(param: &str, got: &str, supported: &[&str]) -> Invalid {
        Invalid::new(
            format!(
                "Invalid value: '{got}'. Supported values are: {}.",
                listed(supported)
            ),
            param,
            "invalid_value",
        )
    }

    fn empty_string(param: &str) -> Invalid {
        Invalid::new(
            format!(
                "Invalid '{param}': empty string. Expected a string with minimum length 1, but got an empty string instead."
            ),
            param,
            "empty_string",
        )
    }

    fn empty_array(param: &str) -> Invalid {
        Invalid::new(
            format!(
                "Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead."
            ),
            param,
            "empty_array",
        )
    }

    fn below(param: &str, min: impl std::fmt::Display, got: &Value, integer: bool) -> Invalid {
        let (what, code) = if integer {
            ("integer", "integer_below_min_value")
        } else {
            ("decimal", "decimal_below_min_value")
        };
        Invalid::new(
            format!(
                "Invalid '{param}': {what} below minimum value. Expected a value >= {min}, but got {got} instead."
            ),
            param,
            code,
        )
    }

    fn above(param: &str, max: impl std::fmt::Display, got: &Value, integer: bool) -> Invalid {
        let (what, code) = if integer {
            ("integer", "integer_above_max_value")
        } else {
            ("decimal", "decimal_above_max_value")
        };
        Invalid::new(
            format!(
                "Invalid '{param}': {what} above maximum value. Expected a value <= {max}, but got {got} instead."
            ),
            param,
            code,
        )
    }

    /// A refusal with no code, about the input as a whole.
    fn input(message: String) -> Invalid {
        Invalid {
            message,
            param: Some("input".into()),
            code: None,
        }
    }
}

/// How OpenAI names a JSON value's type in its messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a decimal",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `'a'`, `'a' and 'b'`, `'a', 'b', and 'c'`.
fn listed(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [init @ .., last] => format!("{}, and {last}", init.join(", ")),
    }
}

/// Every key of `object` is one of `allowed`.
fn known_keys(at: &str, object: &Map<String, Value>, allowed: &[&str]) -> Result<(), Invalid> {
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(Invalid::unknown(&format!("{at}.{k}"))),
        None => Ok(()),
    }
}

/// A field that is a string when present.
fn string_or_null<'a>(at: &str, value: Option<&'a Value>) -> Result<Option<&'a str>, Invalid> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(Invalid::wrong_type(at, "a string", v)),
    }
}

/// A string field that must be there.
fn required_string<'a>(at: &str, value: Option<&'a Value>) -> Result<&'a str, Invalid> {
    string_or_null(at, value)?.ok_or_else(|| Invalid::missing(at))
}

fn bool_or_null(at: &str, value: Option<&Value>) -> Result<Option<bool>, Invalid> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(Invalid::wrong_type(at, "a boolean", v)),
    }
}

/// An integer in `min..=max`, when present.
fn integer_or_null(
    at: &str,
    value: Option<&Value>,
    min: u64,
    max: u64,
) -> Result<Option<u64>, Invalid> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) if n.is_i64() || n.is_u64() => match n.as_u64() {
            Some(x) if x < min => Err(Invalid::below(at, min, v, true)),
            None => Err(Invalid::below(at, min, v, true)),
            Some(x) if x > max => Err(Invalid::above(at, max, v, true)),
            Some(x) => Ok(Some(x)),
        },
        Some(v) => Err(Invalid::wrong_type(at, "an integer", v)),
    }
}

/// A number in `min..=max`, when present.
fn number_or_null(at: &str, value: Option<&Value>, min: f64, max: f64) -> Result<(), Invalid> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(v @ Value::Number(n)) => match n.as_f64() {
            Some(x) if x < min => Err(Invalid::below(at, min, v, false)),
            Some(x) if x > max => Err(Invalid::above(at, max, v, false)),
            _ => Ok(()),
        },
        Some(v) => Err(Invalid::wrong_type(at, "a number", v)),
    }
}

fn object_or_null<'a>(
    at: &str,
    value: Option<&'a Value>,
) -> Result<Option<&'a Map<String, Value>>, Invalid> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(v) => Err(Invalid::wrong_type(at, "an object", v)),
    }
}

/// One input item, as far as the answer cares.
enum Item {
    Message {
        role: String,
        text: String,
    },
    Call {
        call_id: String,
        name: String,
        arguments: String,
    },
    CallOutput {
        call_id: String,
        output: String,
    },
    /// Reasoning from an earlier turn: checked, not part of the words.
    Reasoning,
}

/// The text of a message's `content` (a string or parts), its parts
/// checked against what `role` may send.
fn content_text(at: &str, role: &str, content: Option<&Value>) -> Result<String, Invalid> {
    let at = format!("{at}.content");
    match content {
        None | Some(Value::Null) => Err(Invalid::missing(&at)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let supported: &[&str] = if role == "assistant" {
                &["output_text", "refusal"]
            } else {
                &["input_text"]
            };
            parts_text(&at, supported, parts)
        }
        Some(v) => Err(Invalid::wrong_type(&at, "a string or an array", v)),
    }
}

/// The text of content parts at `at`, each of a `supported` type.
fn parts_text(at: &str, supported: &[&str], parts: &[Value]) -> Result<String, Invalid> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{at}[{j}]");
        let Some(part) = part.as_object() else {
            return Err(Invalid::wrong_type(&at, "an object", part));
        };
        let kind = required_string(&format!("{at}.type"), part.get("type"))?;
        if !supported.contains(&kind) {
            return Err(Invalid::value(&at, kind, supported));
        }
        match kind {
            "input_text" => {
                known_keys(&at, part, &["type", "text"])?;
                text.push_str(required_string(&format!("{at}.text"), part.get("text"))?);
            }
            "output_text" => {
                known_keys(&at, part, &["type", "text", "annotations", "logprobs"])?;
                text.push_str(required_string(&format!("{at}.text"), part.get("text"))?);
            }
            _ => {
                known_keys(&at, part, &["type", "refusal"])?;
                required_string(&format!("{at}.refusal"), part.get("refusal"))?;
            }
        }
    }
    Ok(text)
}

fn item(i: usize, value: &Value) -> Result<Item, Invalid> {
    let at = format!("input[{i}]");
    let Some(object) = value.as_object() else {
        return Err(Invalid::wrong_type(&at, "an object", value));
    };
    let field = |name: &str| format!("{at}.{name}");
    let kind = string_or_null(&field("type"), object.get("type"))?.unwrap_or("message");
    match kind {
        "message" => {
            known_keys(
                &at,
                object,
                &["type", "role", "content", "id", "status", "phase"],
            )?;
            let role = required_string(&field("role"), object.get("role"))?;
            if !ROLES.contains(&role) {
                return Err(Invalid::value(&field("role"), role, &ROLES));
            }
            let text = content_text(&at, role, object.get("content"))?;
            Ok(Item::Message {
                role: role.to_owned(),
                text,
            })
        }
        "function_call" => {
            known_keys(
                &at,
                object,
                &[
                    "type",
                    "call_id",
                    "name",
                    "arguments",
                    "id",
                    "status",
                    "namespace",
                    "caller",
                ],
            )?;
            Ok(Item::Call {
                call_id: required_string(&field("call_id"), object.get("call_id"))?.to_owned(),
                name: required_string(&field("name"), object.get("name"))?.to_owned(),
                arguments: required_string(&field("arguments"), object.get("arguments"))?
                    .to_owned(),
            })
        }
        "function_call_output" => {
            known_keys(
                &at,
                object,
                &[
                    "type",
                    "call_id",
                    "output",
                    "id",
                    "status",
                    "name",
                    "namespace",
                    "caller",
                ],
            )?;
            let call_id = required_string(&field("call_id"), object.get("call_id"))?.to_owned();
            let output = match object.get("output") {
                None | Some(Value::Null) => return Err(Invalid::missing(&field("output"))),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts_text(&field("output"), &["input_text"], parts)?,
                Some(v) => {
                    return Err(Invalid::wrong_type(
                        &field("output"),
                        "a string or an array",
                        v,
                    ));
                }
            };
            Ok(Item::CallOutput { call_id, output })
        }
        "reasoning" => {
            known_keys(
                &at,
                object,
                &[
                    "type",
                    "id",
                    "summary",
                    "content",
                    "encrypted_content",
                    "status",
                ],
            )?;
            required_string(&field("id"), object.get("id"))?;
            let summary = match object.get("summary") {
                None | Some(Value::Null) => return Err(Invalid::missing(&field("summary"))),
                Some(Value::Array(s)) => s,
                Some(v) => return Err(Invalid::wrong_type(&field("summary"), "an array", v)),
            };
            for (j, part) in summary.iter().enumerate() {
                let at = format!("{at}.summary[{j}]");
                let Some(part) = part.as_object() else {
                    return Err(Invalid::wrong_type(&at, "an object", part));
                };
                known_keys(&at, part, &["type", "text"])?;
                let kind = required_string(&format!("{at}.type"), part.get("type"))?;
                if kind != "summary_text" {
                    return Err(Invalid::value(
                        &format!("{at}.type"),
                        kind,
                        &["summary_text"],
                    ));
                }
                required_string(&format!("{at}.text"), part.get("text"))?;
            }
            Ok(Item::Reasoning)
        }
        other => Err(Invalid::value(&field("type"), other, &ITEM_TYPES)),
    }
}

/// A checked `POST /v1/responses`: the chat body its answer is planned
/// from, and what its Response object says about the request.
#[derive(Debug, Clone)]
pub struct Request {
    /// A `/v1/chat/completions` body with the same conversation, budget,
    /// tools and knobs, for [`super::plan::plan`].
    pub chat: Value,
    /// The request's settings as the Response object echoes them.
    pub echo: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    pub background: bool,
    /// Whether the response can be retrieved later (`store`, default true).
    pub store: bool,
}

/// Check `body` as OpenAI does, and turn it into a [`Request`].
pub fn check(body: &Value) -> Result<Request, Invalid> {
    let Some(fields) = body.as_object() else {
        return Err(Invalid {
            message: format!(
                "Invalid type for the request body: expected an object, but got {} instead.",
                kind(body)
            ),
            param: None,
            code: Some("invalid_type"),
        });
    };
    if let Some(key) = fields.keys().find(|k| !PARAMETERS.contains(&k.as_str())) {
        return Err(Invalid::unknown(key));
    }
    let model = required_string("model", fields.get("model"))?;
    if model.is_empty() {
        return Err(Invalid::empty_string("model"));
    }
    let items: Vec<Item> = match fields.get("input") {
        None | Some(Value::Null) => return Err(Invalid::missing("input")),
        Some(Value::String(s)) if s.is_empty() => return Err(Invalid::empty_string("input")),
        Some(Value::String(s)) => vec![Item::Message {
            role: "user".into(),
            text: s.clone(),
        }],
        Some(Value::Array(a)) if a.is_empty() => return Err(Invalid::empty_array("input")),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| item(i, v))
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(Invalid::wrong_type("input", "a string or an array", v)),
    };
    let instructions = string_or_null("instructions", fields.get("instructions"))?;
    let stream = bool_or_null("stream", fields.get("stream"))?.unwrap_or(false);
    let background = bool_or_null("background", fields.get("background"))?.unwrap_or(false);
    let store = bool_or_null("store", fields.get("store"))?.unwrap_or(true);
    let parallel = bool_or_null("parallel_tool_calls", fields.get("parallel_tool_calls"))?;
    if let Some(options) = object_or_null("stream_options", fields.get("stream_options"))? {
        known_keys("stream_options", options, &["include_obfuscation"])?;
        bool_or_null(
            "stream_options.include_obfuscation",
            options.get("include_obfuscation"),
        )?;
    }
    let max_output_tokens = integer_or_null(
        "max_output_tokens",
        fields.get("max_output_tokens"),
        MIN_OUTPUT_TOKENS,
        MAX_TOKENS_LIMIT,
    )?;
    number_or_null("temperature", fields.get("temperature"), 0.0, 2.0)?;
    number_or_null("top_p", fields.get("top_p"), 0.0, 1.0)?;
    let max_tool_calls =
        integer_or_null("max_tool_calls", fields.get("max_tool_calls"), 1, u64::MAX)?;
    let top_logprobs = integer_or_null("top_logprobs", fields.get("top_logprobs"), 0, 20)?;
    let tools = tools(fields.get("tools"))?;
    tool_choice(fields.get("tool_choice"))?;
    let reasoning = reasoning(fields.get("reasoning"))?;
    if let Some(text) = object_or_null("text", fields.get("text"))? {
        known_keys("text", text, &["format", "verbosity"])?;
        if let Some(format) = object_or_null("text.format", text.get("format"))? {
            let kind = required_string("text.format.type", format.get("type"))?;
            const FORMATS: [&str; 3] = ["text", "json_object", "json_schema"];
            if !FORMATS.contains(&kind) {
                return Err(Invalid::value("text.format.type", kind, &FORMATS));
            }
        }
    }
    if let Some(metadata) = object_or_null("metadata", fields.get("metadata"))? {
        if metadata.len() > 16 {
            return Err(Invalid::new(
                format!(
                    "Invalid 'metadata': too many properties. Expected an object with at most 16 properties, but got an object with {} properties instead.",
                    metadata.len()
                ),
                "metadata",
                "object_above_max_properties",
            ));
        }
        for (key, value) in metadata {
            string_or_null(&format!("metadata.{key}"), Some(value))?.ok_or_else(|| {
                Invalid::wrong_type(&format!("metadata.{key}"), "a string", value)
            })?;
        }
    }
    for name in ["user", "safety_identifier", "prompt_cache_key"] {
        string_or_null(name, fields.get(name))?;
    }
    match fields.get("include") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (j, v) in list.iter().enumerate() {
                if !v.is_string() {
                    return Err(Invalid::wrong_type(&format!("include[{j}]"), "a string", v));
                }
            }
        }
        Some(v) => return Err(Invalid::wrong_type("include", "an array", v)),
    }
    if let Some(t) = string_or_null("truncation", fields.get("truncation"))?
        && !["auto", "disabled"].contains(&t)
    {
        return Err(Invalid::value("truncation", t, &["auto", "disabled"]));
    }
    const TIERS: [&str; 5] = ["auto", "default", "flex", "scale", "priority"];
    if let Some(t) = string_or_null("service_tier", fields.get("service_tier"))?
        && !TIERS.contains(&t)
    {
        return Err(Invalid::value("service_tier", t, &TIERS));
    }
    // The mock keeps no conversations: no earlier response can be found.
    if let Some(id) = string_or_null("previous_response_id", fields.get("previous_response_id"))? {
        return Err(Invalid::new(
            format!("Previous response with id '{id}' not found."),
            "previous_response_id",
            "previous_response_not_found",
        ));
    }
    if background && !store {
        return Err(Invalid::new(
            "Background mode requires `store` to be true: a background response must be stored to be retrieved.".into(),
            "store",
            "invalid_value",
        ));
    }
    let knobs = match fields.get("mock") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(v) => return Err(Invalid::wrong_type("mock", "an object", v)),
    };

    let messages = messages(instructions, &items)?;
    let mut knobs = knobs;
    // No prefill here: a trailing assistant message is only history.
    knobs.insert("styles".into(), json!([]));
    if reasoning.summary.is_some() && !knobs.contains_key("shape") {
        knobs.insert("shape".into(), json!("reasoning"));
    }
    let mut chat = json!({
        "model": model,
        "messages": messages,
        "stream": stream,
        "mock": knobs,
    });
    if let Some(m) = max_output_tokens {
        chat["max_tokens"] = json!(m);
    }
    if !tools.is_empty() {
        chat["tools"] = tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t["name"], "parameters": t["parameters"]}}))
            .collect();
    }

    let given = |name: &str| fields.get(name).filter(|v| !v.is_null()).cloned();
    let mut echo = Map::new();
    echo.insert("background".into(), json!(background));
    echo.insert("instructions".into(), json!(instructions));
    echo.insert("max_output_tokens".into(), json!(max_output_tokens));
    echo.insert("max_tool_calls".into(), json!(max_tool_calls));
    echo.insert(
        "metadata".into(),
        given("metadata").unwrap_or_else(|| json!({})),
    );
    echo.insert(
        "parallel_tool_calls".into(),
        json!(parallel.unwrap_or(true)),
    );
    echo.insert("previous_response_id".into(), Value::Null);
    echo.insert(
        "prompt_cache_key".into(),
        given("prompt_cache_key").unwrap_or(Value::Null),
    );
    echo.insert(
        "reasoning".into(),
        json!({"effort": reasoning.effort, "summary": reasoning.summary}),
    );
    echo.insert(
        "safety_identifier".into(),
        given("safety_identifier").unwrap_or(Value::Null),
    );
    echo.insert(
        "service_tier".into(),
        given("service_tier").unwrap_or_else(|| json!("default")),
    );
    echo.insert("store".into(), json!(store));
    echo.insert(
        "temperature".into(),
        given("temperature").unwrap_or_else(|| json!(1.0)),
    );
    echo.insert(
        "text".into(),
        given("text").unwrap_or_else(|| json!({"format": {"type": "text"}})),
    );
    echo.insert(
        "tool_choice".into(),
        given("tool_choice").unwrap_or_else(|| json!("auto")),
    );
    echo.insert("tools".into(), Value::Array(tools));
    echo.insert("top_logprobs".into(), json!(top_logprobs.unwrap_or(0)));
    echo.insert("top_p".into(), given("top_p").unwrap_or_else(|| json!(1.0)));
    echo.insert(
        "truncation".into(),
        given("truncation").unwrap_or_else(|| json!("disabled")),
    );
    echo.insert("user".into(), given("user").unwrap_or(Value::Null));
    Ok(Request {
        chat,
        echo,
        model: model.to_owned(),
        stream,
        background,
        store,
    })
}

/// The chat messages of `items`: `instructions` first as a system
/// message, consecutive function calls as one assistant turn's
/// `tool_calls`, outputs as tool messages; every output answers an
/// earlier call and every call has its output, as OpenAI demands.
fn messages(instructions: Option<&str>, items: &[Item]) -> Result<Vec<Value>, Invalid> {
    let mut messages = Vec::new();
    if let Some(text) = instructions.filter(|t| !t.is_empty()) {
        messages.push(json!({"role": "system", "content": text}));
    }
    let mut calls: Vec<&str> = Vec::new();
    let mut answered: HashSet<&str> = HashSet::new();
    let mut calls_open = false;
    for item in items {
        match item {
            Item::Message { role, text } => {
                messages.push(json!({"role": role, "content": text}));
                calls_open = false;
            }
            Item::Call {
                call_id,
                name,
                arguments,
            } => {
                let call = json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                match messages.last_mut() {
                    Some(last) if calls_open => {
                        if let Some(list) = last["tool_calls"].as_array_mut() {
                            list.push(call);
                        }
                    }
                    _ => messages
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
                calls.push(call_id);
                calls_open = true;
            }
            Item::CallOutput { call_id, output } => {
                if !calls.contains(&call_id.as_str()) {
                    return Err(Invalid::input(format!(
                        "No tool call found for function call output with call_id {call_id}."
                    )));
                }
                answered.insert(call_id);
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
                calls_open = false;
            }
            Item::Reasoning => calls_open = false,
        }
    }
    if let Some(unanswered) = calls.iter().find(|c| !answered.contains(*c)) {
        return Err(Invalid::input(format!(
            "No tool output found for function call {unanswered}."
        )));
    }
    Ok(messages)
}

/// The function tools, flat as the Responses API has them (the chat
/// API's nested `{"type": "function", "function": {…}}` is refused), as
/// the Response object echoes them.
fn tools(value: Option<&Value>) -> Result<Vec<Value>, Invalid> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(v) => return Err(Invalid::wrong_type("tools", "an array", v)),
    };
    let mut out = Vec::new();
    for (j, tool) in list.iter().enumerate() {
        let at = format!("tools[{j}]");
        let Some(tool) = tool.as_object() else {
            return Err(Invalid::wrong_type(&at, "an object", tool));
        };
        let kind = required_string(&format!("{at}.type"), tool.get("type"))?;
        if kind != "function" {
            return Err(Invalid::new(
                format!(
                    "The mock provider has no built-in tools: '{kind}' is not supported here, only 'function'."
                ),
                &format!("{at}.type"),
                "invalid_value",
            ));
        }
        let name = required_string(&format!("{at}.name"), tool.get("name"))?;
        known_keys(
            &at,
            tool,
            &[
                "type",
                "name",
                "parameters",
                "strict",
                "description",
                "allowed_callers",
                "defer_loading",
                "output_schema",
            ],
        )?;
        let parameters = object_or_null(&format!("{at}.parameters"), tool.get("parameters"))?;
        let strict = bool_or_null(&format!("{at}.strict"), tool.get("strict"))?;
        let description = string_or_null(&format!("{at}.description"), tool.get("description"))?;
        out.push(json!({
            "type": "function",
            "name": name,
            "description": description,
            "parameters": parameters,
            "strict": strict.unwrap_or(true),
        }));
    }
    Ok(out)
}

fn tool_choice(value: Option<&Value>) -> Result<(), Invalid> {
    const MODES: [&str; 3] = ["none", "auto", "required"];
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(mode)) if MODES.contains(&mode.as_str()) => Ok(()),
        Some(Value::String(mode)) => Err(Invalid::value("tool_choice", mode, &MODES)),
        Some(Value::Object(choice)) => {
            let kind = required_string("tool_choice.type", choice.get("type"))?;
            if kind != "function" {
                return Err(Invalid::value("tool_choice.type", kind, &["function"]));
            }
            known_keys("tool_choice", choice, &["type", "name"])?;
            required_string("tool_choice.name", choice.get("name"))?;
            Ok(())
        }
        Some(v) => Err(Invalid::wrong_type(
            "tool_choice",
            "a string or an object",
            v,
        )),
    }
}

struct Reasoning {
    effort: Option<String>,
    summary: Option<String>,
}

fn reasoning(value: Option<&Value>) -> Result<Reasoning, Invalid> {
    let Some(r) = object_or_null("reasoning", value)? else {
        return Ok(Reasoning {
            effort: None,
            summary: None,
        });
    };
    known_keys("reasoning", r, &["effort", "summary", "generate_summary"])?;
    let effort = string_or_null("reasoning.effort", r.get("effort"))?;
    if let Some(e) = effort
        && !EFFORTS.contains(&e)
    {
        return Err(Invalid::value("reasoning.effort", e, &EFFORTS));
    }
    let mut summary = None;
    for name in ["summary", "generate_summary"] {
        let at = format!("reasoning.{name}");
        if let Some(s) = string_or_null(&at, r.get(name))? {
            if !SUMMARIES.contains(&s) {
                return Err(Invalid::value(&at, s, &SUMMARIES));
            }
            summary = summary.or(Some(s.to_owned()));
        }
    }
    Ok(Reasoning {
        effort: effort.map(str::to_owned),
        summary,
    })
}

// ------------------------------------------------------------ rendering

/// Who a response is, for every Response object it is rendered into.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `resp_<hex>`.
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
}

/// The Response object of `request` as it stands: `status`, `output`,
/// `usage` (null until the end).
fn response_object(
    identity: &Identity,
    request: &Request,
    status: &str,
    output: Vec<Value>,
    usage: Value,
) -> Value {
    let mut object = request.echo.clone();
    object.insert("id".into(), json!(identity.id));
    object.insert("object".into(), json!("response"));
    object.insert("created_at".into(), json!(identity.created_at));
    object.insert("status".into(), json!(status));
    object.insert("model".into(), json!(request.model));
    object.insert("output".into(), Value::Array(output));
    object.insert("usage".into(), usage);
    object.insert("error".into(), Value::Null);
    object.insert("incomplete_details".into(), Value::Null);
    object.insert(
        "completed_at".into(),
        if status == "completed" {
            json!(now())
        } else {
            Value::Null
        },
    );
    Value::Object(object)
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Reasoning,
    Message,
    Call,
}

/// The output item being streamed.
struct Open {
    kind: Kind,
    index: usize,
    id: String,
    /// Its text so far: summary, message text or arguments.
    text: String,
    /// A call's `call_id` and name.
    call: Option<(String, String)>,
}

/// A plan as Responses stream events, one at a time: `response.created`
/// (and `response.queued` in background mode), `response.in_progress`,
/// each output item's `added` / content / `done` events, then
/// `response.completed` or (the budget spent) `response.incomplete`.
/// Every event's data has its `type` and a `sequence_number` from 0.
pub struct Stream {
    identity: Identity,
    request: Request,
    units: Vec<Unit>,
    pos: usize,
    finish: Finish,
    prompt_tokens: usize,
    seq: u64,
    started: bool,
    ended: bool,
    open: Option<Open>,
    /// The items done so far, as `response.output_item.done` gave them.
    output: Vec<Value>,
    queue: VecDeque<Out>,
    /// The Response object of the last lifecycle event.
    last: Value,
}

impl Stream {
    pub fn new(plan: Plan, request: Request, identity: Identity) -> Stream {
        let (units, finish) = match plan.choices.into_iter().next() {
            Some(choice) => (choice.units, choice.finish),
            None => (Vec::new(), Finish::Stop),
        };
        let mut stream = Stream {
            identity,
            request,
            units,
            pos: 0,
            finish,
            prompt_tokens: plan.prompt_tokens,
            seq: 0,
            started: false,
            ended: false,
            open: None,
            output: Vec::new(),
            queue: VecDeque::new(),
            last: Value::Null,
        };
        stream.last = stream.snapshot(stream.first_status());
        stream
    }

    fn first_status(&self) -> &'static str {
        if self.request.background {
            "queued"
        } else {
            "in_progress"
        }
    }

    /// The Response object with `status`, no output yet, no usage.
    pub fn snapshot(&self, status: &str) -> Value {
        response_object(
            &self.identity,
            &self.request,
            status,
            Vec::new(),
            Value::Null,
        )
    }

    /// The Response object of the last lifecycle event rendered (the final
    /// one once [`Stream::next`] gave `None`).
    pub fn response(&self) -> &Value {
        &self.last
    }

    /// The provider's mid-stream error, as the `sequence_number`th event.
    pub fn error_event(sequence_number: usize) -> String {
        format!(
            r#"{{"type":"error","code":"server_error","message":"The server had an error while processing your request.","param":null,"sequence_number":{sequence_number}}}"#
        )
    }

    fn push(&mut self, kind: &'static str, fields: Value, unit: bool) {
        let mut data = Map::new();
        data.insert("type".into(), json!(kind));
        data.insert("sequence_number".into(), json!(self.seq));
        if let Value::Object(fields) = fields {
            data.extend(fields);
        }
        self.push_raw(kind, Value::Object(data).to_string(), unit);
    }

    fn push_raw(&mut self, kind: &'static str, data: String, unit: bool) {
        self.seq += 1;
        self.queue.push_back(Out {
            event: Some(kind),
            data,
            unit,
        });
    }

    fn lifecycle(&mut self, kind: &'static str, response: Value) {
        self.last = response.clone();
        self.push(kind, json!({"response": response}), false);
    }

    fn usage(&self) -> Value {
        let output = self.units.len();
        let reasoning = self
            .units
            .iter()
            .filter(|u| matches!(u, Unit::Reasoning(_)))
            .count();
        json!({
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": self.prompt_tokens + output,
        })
    }

    /// Open an item of `kind` (closing the one before).
    fn open(&mut self, kind: Kind, call: Option<(String, String)>) {
        self.close(false);
        let index = self.output.len();
        let prefix = match kind {
            Kind::Reasoning => "rs",
            Kind::Message => "msg",
            Kind::Call => "fc",
        };
        let hex = self.identity.id.trim_start_matches("resp_");
        let id = format!("{prefix}_{hex}{index:04x}");
        let item = match (kind, &call) {
            (Kind::Reasoning, _) => json!({"id": id, "type": "reasoning", "summary": []}),
            (Kind::Message, _) => json!({
                "id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": [],
            }),
            (Kind::Call, call) => {
                let (call_id, name) = call.clone().unwrap_or_default();
                json!({
                    "id": id, "type": "function_call", "status": "in_progress",
                    "call_id": call_id, "name": name, "arguments": "",
                })
            }
        };
        self.push(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
            false,
        );
        match kind {
            Kind::Reasoning => self.push(
                "response.reasoning_summary_part.added",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}),
                false,
            ),
            Kind::Message => self.push(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
                false,
            ),
            Kind::Call => {}
        }
        self.open = Some(Open {
            kind,
            index,
            id,
            text: String::new(),
            call,
        });
    }

    /// Close the open item: its content's `done` events, then
    /// `response.output_item.done`; `incomplete` when the budget cut it.
    fn close(&mut self, incomplete: bool) {
        let Some(open) = self.open.take() else {
            return;
        };
        let Open {
            kind,
            index,
            id,
            text,
            call,
        } = open;
        let status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        let item = match kind {
            Kind::Reasoning => {
                self.push(
                    "response.reasoning_summary_text.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                    false,
                );
                let mut part_done = json!({"item_id": id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": text}});
                let mut item = json!({"id": id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]});
                if incomplete {
                    part_done["status"] = json!("incomplete");
                    item["status"] = json!("incomplete");
                }
                self.push("response.reasoning_summary_part.done", part_done, false);
                item
            }
            Kind::Message => {
                self.push(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                    false,
                );
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                self.push(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                    false,
                );
                json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": [part]})
            }
            Kind::Call => {
                let (call_id, name) = call.unwrap_or_default();
                self.push(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": text, "name": name}),
                    false,
                );
                json!({
                    "id": id, "type": "function_call", "status": status,
                    "call_id": call_id, "name": name, "arguments": text,
                })
            }
        };
        self.push(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
            false,
        );
        self.output.push(item);
    }

    /// A delta to the open item of `kind` (opened first if need be).
    fn delta(&mut self, kind: Kind, piece: &str) {
        if self.open.as_ref().map(|o| o.kind) != Some(kind) {
            self.open(kind, None);
        }
        let seq = self.seq;
        let Some(open) = self.open.as_mut() else {
            return;
        };
        open.text.push_str(piece);
        let (id, index) = (js(&open.id), open.index);
        let piece = js(piece);
        // The hot path: one format, no JSON tree.
        let (name, data) = match kind {
            Kind::Reasoning => (
                "response.reasoning_summary_text.delta",
                format!(
                    r#"{{"type":"response.reasoning_summary_text.delta","sequence_number":{seq},"item_id":{id},"output_index":{index},"summary_index":0,"delta":{piece}}}"#
                ),
            ),
            Kind::Message => (
                "response.output_text.delta",
                format!(
                    r#"{{"type":"response.output_text.delta","sequence_number":{seq},"item_id":{id},"output_index":{index},"content_index":0,"delta":{piece},"logprobs":[]}}"#
                ),
            ),
            Kind::Call => (
                "response.function_call_arguments.delta",
                format!(
                    r#"{{"type":"response.function_call_arguments.delta","sequence_number":{seq},"item_id":{id},"output_index":{index},"delta":{piece}}}"#
                ),
            ),
        };
        self.push_raw(name, data, true);
    }

    fn fill(&mut self) {
        if !self.started {
            self.started = true;
            let first = self.snapshot(self.first_status());
            self.lifecycle("response.created", first.clone());
            if self.request.background {
                self.lifecycle("response.queued", first);
            }
            let running = self.snapshot("in_progress");
            self.lifecycle("response.in_progress", running);
            return;
        }
        if let Some(unit) = self.units.get(self.pos).cloned() {
            self.pos += 1;
            match unit {
                Unit::Reasoning(w) => self.delta(Kind::Reasoning, &w),
                Unit::Text(w) => self.delta(Kind::Message, &w),
                Unit::ToolStart { id, name, .. } => self.open(Kind::Call, Some((id, name))),
                Unit::ToolArgs { fragment, .. } => self.delta(Kind::Call, &fragment),
                // Anthropic only: the plan never gives one to this API.
                Unit::Redacted(_) => {}
            }
            return;
        }
        self.ended = true;
        let incomplete = self.finish == Finish::Length;
        self.close(incomplete);
        let output = self.output.clone();
        let usage = self.usage();
        if incomplete {
            let mut response =
                response_object(&self.identity, &self.request, "incomplete", output, usage);
            response["incomplete_details"] = json!({"reason": "max_output_tokens"});
            self.lifecycle("response.incomplete", response);
        } else {
            let response =
                response_object(&self.identity, &self.request, "completed", output, usage);
            self.lifecycle("response.completed", response);
        }
    }

    pub fn next(&mut self) -> Option<Out> {
        while self.queue.is_empty() && !self.ended {
            self.fill();
        }
        self.queue.pop_front()
    }

    /// The whole answer (a non-streaming request's): every event rendered,
    /// the final Response object kept.
    pub fn whole(mut self) -> Value {
        while self.next().is_some() {}
        self.last
    }
}
