//! What every protocol shares when an interrupted answer is continued: the
//! partial answer read back from the store, the plan for a resume, and the
//! request edits common to all styles.
//!
//! A continuation re-asks the provider with the original request plus the
//! partial answer as a trailing assistant message the model must continue,
//! in the style the upstream understands (`continue_final_message`,
//! `prefix`, `assistant_prefix`); the relay then gives its events the
//! original's identity, so the client reads one answer.

use serde_json::{Map, Value, json};

use super::Continuation;

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

/// What a resume of an interrupted stream should do.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Send this request and relay what comes back.
    Continue(Value),
    /// Nothing is left to generate (the answer finished, or the token
    /// budget is spent).
    AlreadyComplete,
    /// This upstream cannot continue a partial answer.
    Unsupported,
}

/// The steps every style shares, around `style_edit`, the protocol's own:
/// ask again when nothing was said yet; stop when the answer is finished,
/// the budget spent or the style is `none`; take what was said off the
/// token budget; append the partial answer as the assistant's message.
pub fn plan_with(
    original: &Value,
    style: Continuation,
    partial: &Partial,
    style_edit: impl FnOnce(&mut Map<String, Value>, &mut Value),
) -> Plan {
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
    style_edit(object, &mut message);
    match object.get_mut("messages").and_then(Value::as_array_mut) {
        Some(messages) => messages.push(message),
        None => return Plan::Unsupported,
    }
    Plan::Continue(body)
}
