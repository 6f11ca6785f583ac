//! Request validation (`Wire::validate` of both protocols, after the
//! structure check the API runs first) on arbitrary bodies: no panic, and
//! wherever the body is JSON, the same verdict and summary as a plain
//! reading of the parsed JSON tree (what the provider would see).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tidegate::protocol::Protocol;
use tidegate::protocol::request::{MAX_CHOICES, check_structure};

/// The default `limits.max_json_depth`.
const MAX_DEPTH: usize = 64;

/// What validation should say of `v`: `Some((model, stream, tools))` or
/// `None` for a refusal.
fn reference(v: &Value, max_tokens_required: bool) -> Option<(String, bool, bool)> {
    let o = v.as_object()?;
    let model = o.get("model")?.as_str().filter(|m| !m.is_empty())?;
    o.get("messages")?.as_array().filter(|m| !m.is_empty())?;
    if max_tokens_required {
        o.get("max_tokens")?.as_u64()?;
    }
    match o.get("n") {
        None | Some(Value::Null) => {}
        Some(n) => {
            n.as_u64().filter(|n| (1..=MAX_CHOICES).contains(n))?;
        }
    }
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return None,
    };
    // `tools` and the older `functions` are one field: the last one wins.
    let tools = last_tools_key(o).is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()));
    Some((model.to_owned(), stream, tools))
}

/// serde_json's map keeps one value per key, not their order of arrival
/// across keys: which of `tools` and `functions` came last is read from
/// the body's bytes by the caller when both are present.
fn last_tools_key(o: &serde_json::Map<String, Value>) -> Option<&Value> {
    match (o.get("tools"), o.get("functions")) {
        (Some(t), None) => Some(t),
        (None, Some(f)) => Some(f),
        (None, None) => None,
        (Some(_), Some(_)) => None,
    }
}

fuzz_target!(|body: &[u8]| {
    if check_structure(body, MAX_DEPTH).is_err() {
        return;
    }
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let both_tool_keys = parsed
        .as_ref()
        .and_then(Value::as_object)
        .is_some_and(|o| o.contains_key("tools") && o.contains_key("functions"));
    for protocol in Protocol::ALL {
        let got = protocol.wire().validate(body);
        let Some(v) = &parsed else {
            // Not JSON for serde_json's tree: validation may only accept
            // what its skipping reader cannot tell apart (escapes in values
            // it skips); it must not panic, which it did not.
            continue;
        };
        if protocol == Protocol::OpenAiResponses {
            // Its own fields (`input`, not `messages`): exercised for
            // panics only; the reference below is the chat APIs'.
            continue;
        }
        let want = reference(v, protocol == Protocol::Anthropic);
        match (&got, &want) {
            (Ok(s), Some((model, stream, tools))) => {
                assert_eq!(s.model.as_ref(), model.as_str(), "{protocol:?}: model");
                assert_eq!(s.stream, *stream, "{protocol:?}: stream");
                if !both_tool_keys {
                    assert_eq!(s.tools, *tools, "{protocol:?}: tools");
                }
            }
            (Err(_), None) => {}
            _ => panic!(
                "{protocol:?}: validation said {:?}, the JSON tree says {want:?}",
                got.as_ref()
                    .map(|s| (&s.model, s.stream, s.tools))
                    .map_err(|e| e.to_string())
            ),
        }
    }
});
