//! What every protocol shares when an interrupted answer is continued: the
//! partial answer read back from the store as the provider's SDK would
//! accumulate it, the plan for a resume, the splice that makes a
//! continuation's events read as the rest of the original answer, and the
//! hold that keeps a tool call from the client until it is whole.
//!
//! The rule every piece serves: **the client is never shown past a point
//! the gateway can continue from.** Text can be continued (prefill, or a
//! re-ask with the partial as context), so text streams at once; a tool
//! call's arguments cannot be continued by any provider, so a tool call is
//! held back until its choice finishes and then released whole. Where a
//! cut still falls somewhere no provider can continue from (a thinking
//! block before its signature, say), the plan says so with a reason and
//! the stream ends honestly instead of splicing a corrupted message.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::Continuation;
use super::sse::SseEvent;

/// One choice of the answer so far (Anthropic: the one message).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Choice {
    pub index: u32,
    /// The role delta was sent (the client holds the message's start).
    pub started: bool,
    pub content: String,
    /// `reasoning_content` (DeepSeek, vLLM reasoning parsers); Anthropic
    /// thinking text.
    pub reasoning: String,
    pub refusal: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<String>,
    /// Content, reasoning, refusal and argument deltas: roughly the tokens
    /// generated for this choice.
    pub units: u64,
}

/// A tool call as the SDK accumulates it: id and name from its first
/// fragment, arguments joined from every fragment.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct ToolCall {
    pub index: u32,
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// An Anthropic content block as the SDK accumulates it.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub index: u32,
    /// `content_block.type`: `text`, `thinking`, `redacted_thinking`,
    /// `tool_use`, `server_tool_use`, …
    pub kind: String,
    /// The `content_block` of its start event.
    pub start: Value,
    /// Text, thinking text, or a tool's input JSON as streamed.
    pub text: String,
    pub signature: Option<String>,
    pub stopped: bool,
    /// Content parts opened (OpenAI Responses: a message's
    /// `content_part.added`, a reasoning item's `summary_part.added`).
    pub parts: u32,
}

/// What was already said, read back from the stored events.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Partial {
    /// By index, in index order.
    pub choices: Vec<Choice>,
    /// Anthropic content blocks, by index.
    pub blocks: Vec<Block>,
    /// The original chunk id (OpenAI `id`, Anthropic message id), reused on
    /// continued chunks.
    pub chunk_id: Option<String>,
    /// Output tokens as the provider counted them, when it said.
    pub usage_output: Option<u64>,
    pub last_seq: u64,
    /// The answer's own last event was stored (Anthropic `message_stop`).
    pub ended: bool,
    /// The response object of the last lifecycle event stored (OpenAI
    /// Responses `response.created`, `response.in_progress`, …).
    pub response: Option<Value>,
}

impl Partial {
    /// The choice with `index`, created when first seen.
    pub fn choice(&mut self, index: u32) -> &mut Choice {
        let at = match self.choices.binary_search_by_key(&index, |c| c.index) {
            Ok(at) => at,
            Err(at) => {
                self.choices.insert(
                    at,
                    Choice {
                        index,
                        ..Choice::default()
                    },
                );
                at
            }
        };
        &mut self.choices[at]
    }

    /// Tokens generated so far: the provider's count when it gave one,
    /// else the deltas counted.
    pub fn tokens(&self) -> u64 {
        self.usage_output
            .unwrap_or_else(|| self.choices.iter().map(|c| c.units).sum())
    }

    /// All the text of every choice, in choice order (the old `/state`
    /// `text`).
    pub fn text(&self) -> String {
        self.choices.iter().map(|c| c.content.as_str()).collect()
    }

    /// The first choice's finish reason.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices.first()?.finish_reason.as_deref()
    }
}

/// What a resume of an interrupted stream should do.
pub enum Plan {
    /// Send these requests one after the other and relay what comes back
    /// through each one's splice (several only for `n > 1`: one per
    /// unfinished choice).
    Continue(Vec<Leg>),
    /// Nothing is left to generate (the answer finished, or the token
    /// budget is spent).
    AlreadyComplete,
    /// The upstream's style is `none`: no re-ask.
    Unsupported,
    /// The cut fell where no continuation can give the client a valid
    /// message; the reason is for the client.
    Impossible(String),
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Continue(legs) => f
                .debug_list()
                .entries(legs.iter().map(|l| &l.body))
                .finish(),
            Plan::AlreadyComplete => f.write_str("AlreadyComplete"),
            Plan::Unsupported => f.write_str("Unsupported"),
            Plan::Impossible(why) => write!(f, "Impossible({why})"),
        }
    }
}

/// One continuation request and how its events are spliced in.
pub struct Leg {
    pub body: Value,
    pub splice: Box<dyn Splice>,
}

/// One event for the client: its SSE name and data.
pub type Out = (Option<Box<str>>, Bytes);

/// Rewrites a continuation's events into the original answer's terms:
/// its identity and indices, without what the client already holds (the
/// message start, the role, a thinking block it has), trimming the text a
/// re-asked model repeats at the splice.
pub trait Splice: Send + Sync {
    /// The events to relay for `event` (often one, sometimes none or two).
    fn event(&mut self, event: SseEvent, out: &mut Vec<Out>);
}

/// The gateway's own words when the style is `instruct`.
pub const INSTRUCT_PROMPT: &str = "Your previous reply was cut off. Continue it exactly where it \
stopped, mid-word or mid-sentence if need be: do not repeat anything already written, do not \
start over, and add no preamble.";

/// Holds back what must not reach the client before it is whole.
pub trait Hold: Send + Sync {
    /// Take `event`; put what may go to the client now, in order, in `out`.
    fn offer(&mut self, event: SseEvent, out: &mut Vec<SseEvent>);
    /// Bytes held now.
    fn held_bytes(&self) -> usize;
    /// Give up holding (too much held): release everything, hold no more.
    fn release_all(&mut self, out: &mut Vec<SseEvent>);
}

/// What a [`Hold`] keeps back, by the index of the choice or output item
/// it belongs to: each index's events in order, their bytes, and whether
/// holding was given up.
#[derive(Default)]
pub struct Held {
    held: std::collections::BTreeMap<u32, Vec<SseEvent>>,
    bytes: usize,
    /// Too much was held once: everything passes from then on.
    pub off: bool,
}

impl Held {
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether events of `index` are held.
    pub fn holds(&self, index: u32) -> bool {
        self.held.contains_key(&index)
    }

    /// Hold `event` of `index`.
    pub fn push(&mut self, index: u32, event: SseEvent) {
        self.bytes += event.data.len();
        self.held.entry(index).or_default().push(event);
    }

    /// Let the events of `index` go, in order.
    pub fn release(&mut self, index: u32, out: &mut Vec<SseEvent>) {
        if let Some(events) = self.held.remove(&index) {
            self.bytes -= events.iter().map(|e| e.data.len()).sum::<usize>();
            out.extend(events);
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Give up holding: everything held goes, and nothing is held again.
    pub fn release_all(&mut self, out: &mut Vec<SseEvent>) {
        self.off = true;
        self.bytes = 0;
        for (_, events) in std::mem::take(&mut self.held) {
            out.extend(events);
        }
    }
}

/// Lower the token budget of a continuation by what was generated.
/// `None`: the budget is spent.
pub fn lower_budget(body: &mut Map<String, Value>, used: u64) -> Option<()> {
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(max) = body.get(key).and_then(Value::as_u64) {
            let left = max.saturating_sub(used);
            if left == 0 {
                return None;
            }
            body.insert(key.into(), json!(left));
        }
    }
    Some(())
}

/// Appends `messages` to the request's conversation; `false` when it has
/// none.
pub fn push_messages(
    body: &mut Map<String, Value>,
    messages: impl IntoIterator<Item = Value>,
) -> bool {
    match body.get_mut("messages").and_then(Value::as_array_mut) {
        Some(list) => {
            list.extend(messages);
            true
        }
        None => false,
    }
}

/// The request the original was, as a continuation's starting point:
/// streaming.
pub fn base_request(original: &Value) -> Option<Map<String, Value>> {
    let mut body = original.as_object()?.clone();
    body.insert("stream".into(), Value::Bool(true));
    Some(body)
}

/// The styles a protocol can continue text with; the rest fall to the next
/// style.
pub fn prefill_message(style: Continuation, text: &str) -> Value {
    let mut message = json!({"role": "assistant", "content": text});
    if style == Continuation::Prefix {
        message["prefix"] = Value::Bool(true);
    }
    message
}

/// The shortest overlap trimmed at a re-ask's splice: shorter matches are
/// too likely to be chance.
const MIN_OVERLAP: usize = 3;
/// How much of the shown text's end an overlap is looked for in.
const OVERLAP_WINDOW: usize = 512;

/// Trims, at a re-ask's splice, the start of the new text that repeats the
/// end of the text already shown.
#[derive(Debug)]
pub struct Overlap {
    /// The end of what the client was shown.
    tail: String,
    /// New text held while it could still be an overlap.
    pending: String,
    done: bool,
    /// Shortest overlap trimmed.
    min: usize,
}

impl Overlap {
    pub fn new(shown: &str) -> Overlap {
        let mut start = shown.len().saturating_sub(OVERLAP_WINDOW);
        while !shown.is_char_boundary(start) {
            start += 1;
        }
        Overlap {
            tail: shown[start..].to_owned(),
            pending: String::new(),
            done: shown.is_empty(),
            min: MIN_OVERLAP,
        }
    }

    /// Whitespace removed from a prefill's end must not come back twice: an
    /// exact overlap of that whitespace is trimmed.
    pub fn whitespace(stripped: &str) -> Overlap {
        Overlap {
            tail: stripped.to_owned(),
            pending: String::new(),
            done: stripped.is_empty(),
            min: stripped.len(),
        }
    }

    /// Take new text; `Some` with the text to relay once the overlap is
    /// decided (possibly empty), `None` while it is held.
    pub fn push(&mut self, text: &str) -> Option<String> {
        if self.done {
            return Some(text.to_owned());
        }
        self.pending.push_str(text);
        // Held while the new text could still grow into a longer overlap.
        if self.pending.len() < self.tail.len() && self.tail.contains(self.pending.as_str()) {
            return None;
        }
        Some(self.decide())
    }

    /// Decide now (the new text stopped): what of the held text to relay.
    pub fn flush(&mut self) -> Option<String> {
        if self.done || self.pending.is_empty() {
            self.done = true;
            return None;
        }
        Some(self.decide())
    }

    fn decide(&mut self) -> String {
        self.done = true;
        let pending = std::mem::take(&mut self.pending);
        // The longest overlap of at least `min` bytes, or a shorter one that
        // is a whole word repeated ("… by" + "by the …").
        let whole_word = |k: usize| {
            let before = self.tail[..self.tail.len() - k].chars().next_back();
            let after = pending[k..].chars().next();
            before.is_none_or(char::is_whitespace)
                && after.is_none_or(|c| c.is_whitespace() || c.is_ascii_punctuation())
                && !pending[..k].trim().is_empty()
        };
        let longest = (1..=self.tail.len().min(pending.len()))
            .rev()
            .filter(|&k| pending.is_char_boundary(k))
            .filter(|&k| self.tail.is_char_boundary(self.tail.len() - k))
            .find(|&k| self.tail.ends_with(&pending[..k]) && (k >= self.min || whole_word(k)));
        match longest {
            Some(k) => pending[k..].to_owned(),
            None => pending,
        }
    }
}

/// Whether a regenerated reasoning (or thinking) text is relayed: only what
/// comes after the part the client was shown, and only when the new one
/// starts with it (a deterministic provider); otherwise none of it, so the
/// client's reasoning is never repeated or contradicted.
#[derive(Debug)]
pub struct SkipShown {
    shown: String,
    seen: String,
    /// `Some(true)`: the new reasoning matched what was shown and is past
    /// it; `Some(false)`: it diverged and is dropped.
    state: Option<bool>,
}

impl SkipShown {
    pub fn new(shown: &str) -> SkipShown {
        SkipShown {
            shown: shown.to_owned(),
            seen: String::new(),
            state: if shown.is_empty() { Some(true) } else { None },
        }
    }

    /// New reasoning text; what of it to relay.
    pub fn push(&mut self, text: &str) -> String {
        match self.state {
            Some(true) => text.to_owned(),
            Some(false) => String::new(),
            None => {
                self.seen.push_str(text);
                if self.seen.len() < self.shown.len() {
                    if !self.shown.starts_with(self.seen.as_str()) {
                        self.state = Some(false);
                    }
                    return String::new();
                }
                if self.seen.starts_with(self.shown.as_str()) {
                    self.state = Some(true);
                    self.seen[self.shown.len()..].to_owned()
                } else {
                    self.state = Some(false);
                    String::new()
                }
            }
        }
    }

    /// Whether the reasoning diverged from what was shown.
    pub fn diverged(&self) -> bool {
        self.state == Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_trimmed_once_decided() {
        let mut o = Overlap::new("the tide gate");
        assert_eq!(o.push(" gate"), None);
        assert_eq!(o.push(" holds").as_deref(), Some(" holds"));
        assert_eq!(o.push(" more").as_deref(), Some(" more"));
        let mut o = Overlap::new("the tide gate");
        assert_eq!(o.push("gate holds").as_deref(), Some(" holds"));
        // No overlap: all of it.
        let mut o = Overlap::new("the tide gate");
        assert_eq!(o.push(" river").as_deref(), Some(" river"));
        // A short chance match is kept; a short whole word repeated is not.
        let mut o = Overlap::new("abc de");
        assert_eq!(o.push("e f").as_deref(), Some("e f"));
        let mut o = Overlap::new("and by");
        assert_eq!(o.push("by the").as_deref(), Some(" the"));
        let mut o = Overlap::new("and by");
        assert_eq!(o.push("byte").as_deref(), Some("byte"));
        // Held text comes out when the stream moves on.
        let mut o = Overlap::new("the tide gate");
        assert_eq!(o.push(" ga"), None);
        assert_eq!(o.flush().as_deref(), Some(" ga"));
        let mut o = Overlap::new("the tide gate");
        assert_eq!(o.push(" gate"), None);
        assert_eq!(o.flush().as_deref(), Some(""));
        // Multi-byte text is cut on char boundaries only.
        let mut o = Overlap::new("naïve café");
        assert_eq!(o.push("café ok").as_deref(), Some(" ok"));
        let mut w = Overlap::whitespace(" ");
        assert_eq!(w.push(" next").as_deref(), Some("next"));
    }

    #[test]
    fn regenerated_reasoning_skips_what_was_shown() {
        let mut s = SkipShown::new("think a");
        assert_eq!(s.push("think"), "");
        assert_eq!(s.push(" a b"), " b");
        assert_eq!(s.push(" c"), " c");
        let mut s = SkipShown::new("think a");
        assert_eq!(s.push("other"), "");
        assert!(s.diverged());
        assert_eq!(s.push(" text"), "");
    }

    #[test]
    fn budgets_are_lowered_or_spent() {
        let mut body = json!({"max_tokens": 10, "max_completion_tokens": 4})
            .as_object()
            .cloned()
            .unwrap();
        assert_eq!(lower_budget(&mut body, 3), Some(()));
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["max_completion_tokens"], 1);
        assert_eq!(lower_budget(&mut body, 1), None);
    }
}
