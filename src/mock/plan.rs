//! From a request to the answer the mock gives it: which shape, which
//! choices, which units, and whether the request is one a strict provider
//! would refuse (a continuation style it does not support, a prefix that is
//! not the start of its answer, prefill on a model that has none, a thinking
//! prefill without a valid signature, …).
//!
//! A *unit* is one generated piece (a word of reasoning or text, a tool
//! call's opening, a fragment of its arguments): one chunk on the wire, one
//! token for `max_tokens` and usage.

use std::time::Duration;

use serde_json::Value;

use super::Dialect;

/// The most `max_tokens` (or `words`) the mock accepts; more is a 400, as a
/// provider refuses a limit above the model's.
pub const MAX_TOKENS_LIMIT: u64 = 1_000_000;
/// The most choices (`n`) the mock generates.
pub const MAX_CHOICES: usize = 8;

/// The continuation styles a provider may support (`mock.styles`).
pub const STYLES: [&str; 3] = ["continue_final_message", "prefix", "assistant_prefix"];

/// Models that refuse assistant prefill, as Claude 4.6 and later do.
const NO_PREFILL: [&str; 6] = [
    "claude-opus-4-6*",
    "claude-sonnet-4-6*",
    "claude-haiku-4-6*",
    "claude-*-4-7*",
    "claude-opus-5*",
    "claude-sonnet-5*",
];

const PREFILL_REFUSED: &str = "This model does not support assistant message prefill. The conversation must end with a user message.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Text,
    Tools,
    ParallelTools,
    /// OpenAI dialect: `reasoning_content` words, then `content` (DeepSeek).
    Reasoning,
    /// Anthropic: a thinking block (words, then a signature).
    Thinking,
    /// Anthropic: a redacted_thinking block (opaque data).
    RedactedThinking,
}

impl Shape {
    fn parse(name: &str, dialect: Dialect) -> Option<Shape> {
        let shape = match name {
            "text" => Shape::Text,
            "tools" => Shape::Tools,
            "parallel_tools" => Shape::ParallelTools,
            "reasoning" if dialect == Dialect::OpenAi => Shape::Reasoning,
            "thinking" if dialect == Dialect::Anthropic => Shape::Thinking,
            "redacted_thinking" if dialect == Dialect::Anthropic => Shape::RedactedThinking,
            _ => return None,
        };
        Some(shape)
    }

    fn tool_calls(self) -> usize {
        match self {
            Shape::Tools => 1,
            Shape::ParallelTools => 2,
            _ => 0,
        }
    }

    fn thinks(self) -> bool {
        matches!(self, Shape::Thinking | Shape::RedactedThinking)
    }
}

/// One generated piece.
#[derive(Clone, Debug, PartialEq)]
pub enum Unit {
    /// A word of reasoning (OpenAI `reasoning_content`) or thinking (Anthropic).
    Reasoning(String),
    /// Anthropic: a redacted_thinking block, whole.
    Redacted(String),
    /// A word of the answer's text.
    Text(String),
    /// The opening of tool call `call` (its id and name).
    ToolStart {
        call: usize,
        id: String,
        name: String,
    },
    /// A fragment of tool call `call`'s arguments (JSON text).
    ToolArgs { call: usize, fragment: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    ToolCalls,
}

impl Finish {
    pub fn openai(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
        }
    }

    pub fn anthropic(self) -> &'static str {
        match self {
            Finish::Stop => "end_turn",
            Finish::Length => "max_tokens",
            Finish::ToolCalls => "tool_use",
        }
    }
}

/// What one choice of this response says.
#[derive(Clone, Debug)]
pub struct ChoiceOut {
    pub units: Vec<Unit>,
    pub finish: Finish,
}

/// The knobs that shape delivery rather than content.
#[derive(Clone, Debug, Default)]
pub struct Delivery {
    pub interval: Duration,
    /// Legacy: cut / stall once the answer holds that many units (the
    /// prefix's included, so a continuation past that point succeeds).
    pub fail_after: Option<usize>,
    pub stall_after: Option<usize>,
    /// Cut the connection after this many SSE events.
    pub cut_after_events: Option<usize>,
    /// Send the provider's mid-stream error after this many SSE events.
    pub error_after_events: Option<usize>,
    /// The cut / error happens only on the first request with this id.
    pub fail_id: Option<String>,
    /// Anthropic: a `ping` after every this many units (0: only the first).
    pub ping_every: usize,
    /// A provider broken at the byte level (`mock.hostile`).
    pub hostile: Option<Hostile>,
    /// `endless_stream` only: end after this many repeats (then the rest of
    /// the answer), instead of never.
    pub hostile_events: Option<u64>,
}

/// `mock.hostile`: what a broken or hostile provider sends instead of its
/// answer, whatever `stream` asks for. Each is written from a fixed block
/// or a generator, never a growing buffer, and stops when the peer leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostile {
    /// An event stream whose first line never ends (`data: xxx…`).
    EndlessLine,
    /// The answer's opening, then its first unit's event again and again,
    /// as fast as the peer reads (`hostile_events`: that many, then the
    /// rest of the answer).
    EndlessStream,
    /// The answer's opening and first unit, then only `: keepalive`
    /// comments, one per interval.
    CommentsOnly,
    /// The answer's opening and first unit, then `data: ` and one byte per
    /// interval of a line that never ends.
    Drip,
    /// `text/html` (a proxy's or a captive portal's page).
    Html,
    /// A `302` to a login page.
    Redirect,
    /// An error status (`status`, default 500) with a body that never ends.
    EndlessErrorBody,
    /// `application/json` whose body never ends.
    EndlessJson,
}

impl Hostile {
    pub const NAMES: [&str; 8] = [
        "endless_line",
        "endless_stream",
        "comments_only",
        "drip",
        "html",
        "redirect",
        "endless_error_body",
        "endless_json",
    ];

    fn parse(name: &str) -> Option<Hostile> {
        let hostile = match name {
            "endless_line" => Hostile::EndlessLine,
            "endless_stream" => Hostile::EndlessStream,
            "comments_only" => Hostile::CommentsOnly,
            "drip" => Hostile::Drip,
            "html" => Hostile::Html,
            "redirect" => Hostile::Redirect,
            "endless_error_body" => Hostile::EndlessErrorBody,
            "endless_json" => Hostile::EndlessJson,
            _ => return None,
        };
        Some(hostile)
    }
}

/// The whole answer to one request.
#[derive(Clone, Debug)]
pub struct Plan {
    pub choices: Vec<ChoiceOut>,
    /// Units the request's prefix already covers (for `fail_after`).
    pub covered: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub model: String,
    /// Hex, from the conversation: the same for a continuation.
    pub id: String,
    pub prompt_tokens: usize,
    pub delivery: Delivery,
}

impl Plan {
    pub fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.units.len()).sum()
    }
}

/// Why a request is refused (a 400 in the dialect's shape).
#[derive(Debug)]
pub struct Refusal {
    pub message: String,
    pub param: Option<String>,
}

fn refuse<T>(message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        message: message.into(),
        param: None,
    })
}

pub fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter(|p| {
                    p.get("type")
                        .and_then(Value::as_str)
                        .is_none_or(|t| t == "text")
                })
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

pub fn fnv(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The signature of a thinking block: a function of its text only, so the
/// mock can check one sent back in a prefill.
pub fn signature(thinking: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"tidegate-mock thinking signature\0");
    hasher.update(thinking.as_bytes());
    let digest = hasher.finalize();
    let mut bytes = b"mock".to_vec();
    bytes.extend_from_slice(&digest);
    bytes.extend_from_slice(&digest[..12]);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A redacted_thinking block's data: opaque, but checkable by the mock.
pub fn redacted_data(seed: u64) -> String {
    let payload = format!("{:016x}", mix(seed ^ 0x7265_6461_6374));
    format!("{payload}{}", &signature(&payload)[..24])
}

fn redacted_valid(data: &str) -> bool {
    data.len() == 40
        && data.is_char_boundary(16)
        && signature(&data[..16]).get(..24) == data.get(16..)
}

const FALLBACK: &[&str] = &[
    "the", "tide", "gate", "holds", "every", "stream", "until", "it", "ends",
];

/// Stream salts: each kind of words comes from its own sequence.
const REASONING_SALT: u64 = 0x5245_4153_4f4e_0000;
const INSTRUCT_SALT: u64 = 0x494e_5354_5255_0000;
const TOOL_SALT: u64 = 0x544f_4f4c_0000_0000;
const CHOICE_SALT: u64 = 1 << 40;

/// The words a conversation's answers are drawn from, and its seed.
struct Source {
    vocab: Vec<String>,
    seed: u64,
    prompt_tokens: usize,
}

impl Source {
    fn new(messages: &[Value], system: Option<&Value>) -> Source {
        let mut joined = String::new();
        for m in messages {
            if let Some(t) = m.get("content").and_then(text_of) {
                joined.push_str(&t);
                joined.push('\n');
            }
        }
        if let Some(system) = system.and_then(text_of) {
            joined.push_str(&system);
        }
        let vocab: Vec<String> = joined
            .split_whitespace()
            .map(|w| {
                w.trim_matches(|c: char| !c.is_alphanumeric())
                    .to_lowercase()
            })
            .filter(|w| !w.is_empty() && w.chars().all(char::is_alphanumeric))
            .collect();
        let prompt_tokens = vocab.len().max(1);
        let vocab = if vocab.is_empty() {
            FALLBACK.iter().map(|w| w.to_string()).collect()
        } else {
            vocab
        };
        Source {
            vocab,
            seed: fnv(&joined),
            prompt_tokens,
        }
    }

    fn word(&self, salt: u64, i: usize) -> &str {
        let pick = mix(self.seed.wrapping_add(salt).wrapping_add(i as u64));
        &self.vocab[(pick % self.vocab.len() as u64) as usize]
    }

    /// The `i`th piece of a word sequence: words joined by single spaces.
    fn piece(&self, salt: u64, i: usize) -> String {
        if i == 0 {
            self.word(salt, 0).to_owned()
        } else {
            format!(" {}", self.word(salt, i))
        }
    }

    fn tool(
        &self,
        dialect: Dialect,
        choice: usize,
        call: usize,
        words: usize,
    ) -> (String, Vec<String>) {
        let salt = TOOL_SALT
            .wrapping_add(CHOICE_SALT.wrapping_mul(choice as u64))
            .wrapping_add((call as u64) << 20);
        let id = match dialect {
            Dialect::OpenAi => format!("call_{:016x}{:08x}", mix(self.seed ^ salt), call),
            Dialect::Anthropic => format!("toolu_{:016x}{:08x}", mix(self.seed ^ salt), call),
        };
        let mut fragments = vec!["{\"query\": \"".to_owned()];
        fragments.extend((0..words).map(|i| self.piece(salt, i)));
        fragments.push("\"}".to_owned());
        (id, fragments)
    }
}

/// What the request's body says beyond the conversation.
struct Request<'a> {
    dialect: Dialect,
    body: &'a Value,
    knobs: &'a Value,
    shape: Shape,
    n: usize,
    max_tokens: Option<usize>,
    thinking: bool,
    has_tools: bool,
    styles: Vec<String>,
}

impl Request<'_> {
    fn knob(&self, name: &str) -> Option<u64> {
        self.knobs.get(name).and_then(Value::as_u64)
    }

    fn supports(&self, style: &str) -> bool {
        self.styles.iter().any(|s| s == style)
    }

    /// Tool calls per choice: the tools shapes', or one after thinking
    /// when the request declares tools.
    fn tool_calls(&self) -> usize {
        match self.shape.tool_calls() {
            0 if self.shape.thinks() && self.has_tools => 1,
            n => n,
        }
    }

    fn reasoning_words(&self) -> usize {
        match self.shape {
            Shape::Reasoning | Shape::Thinking => {
                self.knob("reasoning_words").unwrap_or(6) as usize
            }
            _ => 0,
        }
    }

    fn tool_words(&self) -> usize {
        self.knob("tool_words").unwrap_or(3) as usize
    }

    /// Units the answer has besides its text words.
    fn fixed_units(&self, reasoning_counted: bool) -> usize {
        let reasoning = if reasoning_counted {
            self.reasoning_words() + usize::from(self.shape == Shape::RedactedThinking)
        } else {
            0
        };
        reasoning + self.tool_calls() * (self.tool_words() + 3)
    }

    /// The text words of choice `k` when the prefix covers `covered` units.
    fn text_words(&self, k: usize, covered: usize, reasoning_counted: bool) -> usize {
        let base = match (self.knob("words"), self.shape) {
            (Some(w), _) => w as usize,
            (None, Shape::Tools | Shape::ParallelTools) => {
                self.knob("content_words").map_or(3, |w| w as usize)
            }
            (None, _) => match self.max_tokens {
                Some(max) => (max + covered).saturating_sub(self.fixed_units(reasoning_counted)),
                None => 64,
            },
        };
        let base = match (self.shape, self.knob("content_words")) {
            (Shape::Tools | Shape::ParallelTools, Some(c)) => c as usize,
            _ => base,
        };
        if k == 0 || base == 0 {
            base
        } else {
            base.saturating_sub(2 * k).max(1)
        }
    }
}

/// Where this request's answer starts in the full answer.
#[derive(Debug)]
enum Start {
    Fresh,
    /// Continue the text after this prefix; `reasoning`: a reasoning prefix
    /// (OpenAI `reasoning_content`, when the text prefix is empty);
    /// `skip_reasoning`: the thinking / reasoning is already done.
    Prefix {
        text: String,
        reasoning: Option<String>,
        skip_reasoning: bool,
    },
    /// Re-asked with the partial `text` as context: repeat its last word,
    /// think again.
    Instruct {
        text: String,
    },
}

fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn limit(body: &Value, name: &str) -> Result<Option<usize>, Refusal> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_TOKENS_LIMIT => Ok(Some(n as usize)),
            Some(n) => Err(Refusal {
                message: format!(
                    "{name}: {n} is too large: this model supports at most {MAX_TOKENS_LIMIT} tokens"
                ),
                param: Some(name.to_owned()),
            }),
            None => Err(Refusal {
                message: format!("{name}: expected a non-negative integer"),
                param: Some(name.to_owned()),
            }),
        },
    }
}

/// The answer to `body`, or why a strict provider refuses it.
pub fn plan(body: &Value, dialect: Dialect) -> Result<Plan, Refusal> {
    let messages = match body.get("messages").and_then(Value::as_array) {
        Some(m) if !m.is_empty() => m,
        Some(_) => return refuse("messages: at least one message is required"),
        None => return refuse("messages: Field required"),
    };
    let knobs = body.get("mock").unwrap_or(&Value::Null);
    let shape_name = knobs.get("shape").and_then(Value::as_str).unwrap_or("text");
    let Some(shape) = Shape::parse(shape_name, dialect) else {
        return refuse(format!(
            "mock.shape: unknown shape `{shape_name}` for this API"
        ));
    };
    let max_tokens = match limit(body, "max_tokens")? {
        Some(m) => Some(m),
        None => limit(body, "max_completion_tokens")?,
    };
    if dialect == Dialect::Anthropic && max_tokens.is_none() {
        return refuse("max_tokens: Field required");
    }
    if knobs
        .get("words")
        .and_then(Value::as_u64)
        .is_some_and(|w| w > MAX_TOKENS_LIMIT)
    {
        return refuse(format!("mock.words: at most {MAX_TOKENS_LIMIT}"));
    }
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n) if dialect == Dialect::OpenAi && (1..=MAX_CHOICES as u64).contains(&n) => {
                n as usize
            }
            _ => {
                return Err(Refusal {
                    message: format!("n: must be an integer from 1 to {MAX_CHOICES}"),
                    param: Some("n".into()),
                });
            }
        },
    };
    let has_tools = body
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    if shape.tool_calls() > 0 && !has_tools {
        return refuse("mock.shape asks for tool calls, but the request declares no `tools`");
    }
    let thinking = body.pointer("/thinking/type").and_then(Value::as_str) == Some("enabled");
    if dialect == Dialect::Anthropic && thinking {
        let budget = body
            .pointer("/thinking/budget_tokens")
            .and_then(Value::as_u64);
        match budget {
            Some(b) if b < 1024 => {
                return refuse(
                    "thinking.budget_tokens: Input should be greater than or equal to 1024",
                );
            }
            Some(b) if max_tokens.is_some_and(|m| b as usize >= m) => {
                return refuse("`max_tokens` must be greater than `thinking.budget_tokens`");
            }
            Some(_) => {}
            None => return refuse("thinking.enabled.budget_tokens: Field required"),
        }
    }
    if shape.thinks() && !thinking {
        return refuse(
            "mock.shape `thinking` needs `thinking: {\"type\": \"enabled\", \"budget_tokens\": N}`",
        );
    }
    let styles = match knobs.get("styles").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        None => STYLES.iter().map(|s| s.to_string()).collect(),
    };
    let request = Request {
        dialect,
        body,
        knobs,
        shape,
        n,
        max_tokens,
        thinking,
        has_tools,
        styles,
    };
    let (source_messages, start) = match dialect {
        Dialect::OpenAi => openai_start(&request, messages)?,
        Dialect::Anthropic => anthropic_start(&request, messages)?,
    };
    let mut source = Source::new(source_messages, body.get("system"));
    let (choices, covered) = match answer(&request, &source, start)? {
        Some(answered) => answered,
        None => {
            source = Source::new(messages, body.get("system"));
            answer(&request, &source, Start::Fresh)?.ok_or_else(|| Refusal {
                message: "no answer".into(),
                param: None,
            })?
        }
    };
    let delivery = Delivery {
        interval: Duration::from_millis(request.knob("token_interval_ms").unwrap_or(0)),
        fail_after: request.knob("fail_after").map(|v| v as usize),
        stall_after: request.knob("stall_after").map(|v| v as usize),
        cut_after_events: request.knob("cut_after_events").map(|v| v as usize),
        error_after_events: request.knob("error_after_events").map(|v| v as usize),
        fail_id: knobs
            .get("fail_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        ping_every: request.knob("ping_every").map_or(5, |v| v as usize),
        hostile: match knobs.get("hostile") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_str().and_then(Hostile::parse) {
                Some(h) => Some(h),
                None => {
                    return refuse(format!(
                        "mock.hostile: {v} is none of {}",
                        Hostile::NAMES.join(", ")
                    ));
                }
            },
        },
        hostile_events: request.knob("hostile_events"),
    };
    Ok(Plan {
        choices,
        covered,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true),
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("mock")
            .to_owned(),
        id: format!("{:016x}", source.seed),
        prompt_tokens: source.prompt_tokens,
        delivery,
    })
}

fn role(m: &Value) -> Option<&str> {
    m.get("role").and_then(Value::as_str)
}

/// The partial of an `[assistant A, user U]` ending, when A is text.
fn instruct_text(messages: &[Value]) -> Option<(usize, String)> {
    let len = messages.len();
    if len < 2
        || role(&messages[len - 1]) != Some("user")
        || role(&messages[len - 2]) != Some("assistant")
    {
        return None;
    }
    let a = &messages[len - 2];
    if a.get("tool_calls")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty())
    {
        return None;
    }
    let text = a.get("content").and_then(text_of)?;
    (!text.is_empty()).then_some((len - 2, text))
}

fn openai_start<'m>(r: &Request, messages: &'m [Value]) -> Result<(&'m [Value], Start), Refusal> {
    let body = r.body;
    let continue_final = body.get("continue_final_message").and_then(Value::as_bool) == Some(true);
    if body.get("continue_final_message").is_some() && !r.supports("continue_final_message") {
        return Err(Refusal {
            message: "Unrecognized request argument supplied: continue_final_message".into(),
            param: None,
        });
    }
    if body.get("add_generation_prompt").is_some() && !r.supports("continue_final_message") {
        return Err(Refusal {
            message: "Unrecognized request argument supplied: add_generation_prompt".into(),
            param: None,
        });
    }
    let last_index = messages.len() - 1;
    let last = &messages[last_index];
    if role(last) == Some("assistant") {
        if last
            .get("tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty())
        {
            return Err(Refusal {
                message: format!(
                    "messages.{last_index}: an assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'"
                ),
                param: Some(format!("messages.[{last_index}].role")),
            });
        }
        let text = match last.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(c) => match text_of(c) {
                Some(t) => t,
                None => return refuse(format!("messages.{last_index}.content: invalid content")),
            },
        };
        let prefix_flag = last.get("prefix").is_some();
        if prefix_flag && !r.supports("prefix") {
            return Err(Refusal {
                message: format!(
                    "Additional properties are not allowed ('prefix' was unexpected) - 'messages.{last_index}'"
                ),
                param: Some(format!("messages.{last_index}")),
            });
        }
        let reasoning = last
            .get("reasoning_content")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let source = &messages[..last_index];
        if continue_final {
            let generation_prompt = body
                .get("add_generation_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            if generation_prompt {
                return refuse(
                    "continue_final_message and add_generation_prompt cannot both be true",
                );
            }
            let skip_reasoning = !text.is_empty();
            return Ok((
                source,
                Start::Prefix {
                    text,
                    reasoning: None,
                    skip_reasoning,
                },
            ));
        }
        if last.get("prefix").and_then(Value::as_bool) == Some(true) {
            let skip_reasoning = !text.is_empty();
            return Ok((
                source,
                Start::Prefix {
                    text,
                    reasoning: reasoning.filter(|_| !skip_reasoning),
                    skip_reasoning,
                },
            ));
        }
        if r.supports("assistant_prefix") {
            let skip_reasoning = !text.is_empty();
            return Ok((
                source,
                Start::Prefix {
                    text,
                    reasoning: None,
                    skip_reasoning,
                },
            ));
        }
        // OpenAI itself: a trailing assistant turn is just more conversation.
        return Ok((messages, Start::Fresh));
    }
    if continue_final {
        return refuse(
            "continue_final_message is set but the last message is not an assistant message",
        );
    }
    if let Some((at, text)) = instruct_text(messages) {
        return Ok((&messages[..at], Start::Instruct { text }));
    }
    Ok((messages, Start::Fresh))
}

/// What Anthropic checks in every message: no empty content but the final
/// assistant turn's, no empty text block, and every thinking block signed.
fn anthropic_messages_valid(messages: &[Value]) -> Result<(), Refusal> {
    let last = messages.len() - 1;
    for (i, m) in messages.iter().enumerate() {
        match m.get("content") {
            Some(Value::String(s))
                if s.is_empty() && !(i == last && role(m) == Some("assistant")) =>
            {
                return refuse(format!(
                    "messages.{i}: all messages must have non-empty content except for the optional final assistant message"
                ));
            }
            Some(Value::Array(blocks)) => {
                for (j, b) in blocks.iter().enumerate() {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text")
                            if b.get("text")
                                .and_then(Value::as_str)
                                .is_none_or(str::is_empty) =>
                        {
                            return refuse(format!(
                                "messages.{i}.content.{j}.text: text content blocks must be non-empty"
                            ));
                        }
                        Some("thinking") if role(m) == Some("assistant") => {
                            let thinking = b.get("thinking").and_then(Value::as_str).unwrap_or("");
                            let sig = b.get("signature").and_then(Value::as_str).unwrap_or("");
                            if sig.is_empty() {
                                return refuse(format!(
                                    "messages.{i}.content.{j}.thinking.signature: Field required"
                                ));
                            }
                            if sig != signature(thinking) {
                                return refuse(format!(
                                    "messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                                ));
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn anthropic_start<'m>(
    r: &Request,
    messages: &'m [Value],
) -> Result<(&'m [Value], Start), Refusal> {
    anthropic_messages_valid(messages)?;
    let last_index = messages.len() - 1;
    let last = &messages[last_index];
    if role(last) != Some("assistant") {
        if let Some((at, text)) = instruct_text(messages) {
            return Ok((&messages[..at], Start::Instruct { text }));
        }
        return Ok((messages, Start::Fresh));
    }
    let model = r.body.get("model").and_then(Value::as_str).unwrap_or("");
    let extra: Vec<&str> = r
        .knobs
        .get("no_prefill")
        .and_then(Value::as_array)
        .map(|l| l.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !r.supports("assistant_prefix")
        || NO_PREFILL
            .iter()
            .chain(extra.iter())
            .any(|g| glob(g, model))
    {
        return refuse(PREFILL_REFUSED);
    }
    let content = last.get("content").unwrap_or(&Value::Null);
    let blocks: Vec<Value> = match content {
        Value::String(s) => vec![serde_json::json!({"type": "text", "text": s})],
        Value::Array(b) => b.clone(),
        _ => {
            return refuse(format!(
                "messages.{last_index}.content: Input should be a valid list"
            ));
        }
    };
    if blocks
        .iter()
        .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
    {
        return refuse(
            "messages: `tool_use` ids were found without `tool_result` blocks immediately after",
        );
    }
    let mut skip_reasoning = false;
    if r.thinking {
        let first = blocks.first();
        let kind = first.and_then(|b| b.get("type")).and_then(Value::as_str);
        match kind {
            Some("thinking") => {
                let b = first.unwrap_or(&Value::Null);
                let thinking = b.get("thinking").and_then(Value::as_str).unwrap_or("");
                let sig = b.get("signature").and_then(Value::as_str).unwrap_or("");
                if sig.is_empty() {
                    return refuse(format!(
                        "messages.{last_index}.content.0.thinking.signature: Field required"
                    ));
                }
                if sig != signature(thinking) {
                    return refuse(format!(
                        "messages.{last_index}.content.0: Invalid `signature` in `thinking` block"
                    ));
                }
            }
            Some("redacted_thinking") => {
                let data = first
                    .and_then(|b| b.get("data"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if !redacted_valid(data) {
                    return refuse(format!(
                        "messages.{last_index}.content.0: Invalid `data` in `redacted_thinking` block"
                    ));
                }
            }
            _ => {
                return refuse(format!(
                    "messages.{last_index}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{}`. When `thinking` is enabled, a final `assistant` message must start with a thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks). We recommend you include thinking blocks from previous turns. To avoid this requirement, disable `thinking`.",
                    kind.unwrap_or("text")
                ));
            }
        }
        skip_reasoning = true;
    }
    let text: String = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    if text.ends_with(char::is_whitespace) {
        return refuse("messages: final assistant content cannot end with trailing whitespace");
    }
    let skip_reasoning = skip_reasoning || !text.is_empty();
    Ok((
        &messages[..last_index],
        Start::Prefix {
            text,
            reasoning: None,
            skip_reasoning,
        },
    ))
}

/// How far `prefix` goes into the pieces of a word sequence: the number of
/// whole pieces it covers and the tail of the piece it ends inside, or
/// `None` when it is not a start of the sequence (of at most `words` words).
fn split(source: &Source, salt: u64, words: usize, prefix: &str) -> Option<(usize, String)> {
    let mut built = 0;
    let mut i = 0;
    while built < prefix.len() {
        if i >= words {
            return None;
        }
        let piece = source.piece(salt, i);
        let rest = &prefix[built..];
        if rest.len() >= piece.len() {
            if !rest.starts_with(piece.as_str()) {
                return None;
            }
            built += piece.len();
            i += 1;
        } else {
            if !piece.starts_with(rest) {
                return None;
            }
            return Some((i, piece[rest.len()..].to_owned()));
        }
    }
    Some((i, String::new()))
}

fn answer(
    r: &Request,
    source: &Source,
    start: Start,
) -> Result<Option<(Vec<ChoiceOut>, usize)>, Refusal> {
    let reasoning_salt = |k: usize| REASONING_SALT.wrapping_add(CHOICE_SALT.wrapping_mul(k as u64));
    let text_salt = |k: usize| CHOICE_SALT.wrapping_mul(k as u64);
    let tools = |k: usize, units: &mut Vec<Unit>| {
        for call in 0..r.tool_calls() {
            let (id, fragments) = source.tool(r.dialect, k, call, r.tool_words());
            units.push(Unit::ToolStart {
                call,
                id,
                name: "lookup".into(),
            });
            units.extend(
                fragments
                    .into_iter()
                    .map(|fragment| Unit::ToolArgs { call, fragment }),
            );
        }
    };
    let reasoning = |salt: u64, from: usize, head: String, units: &mut Vec<Unit>| match r.shape {
        Shape::RedactedThinking => units.push(Unit::Redacted(redacted_data(source.seed ^ salt))),
        Shape::Reasoning | Shape::Thinking => {
            if !head.is_empty() {
                units.push(Unit::Reasoning(head));
            }
            units.extend(
                (from..r.reasoning_words()).map(|i| Unit::Reasoning(source.piece(salt, i))),
            );
        }
        _ => {}
    };
    let mut choices = Vec::new();
    let mut covered = 0;
    match start {
        Start::Fresh => {
            for k in 0..r.n {
                let mut units = Vec::new();
                reasoning(reasoning_salt(k), 0, String::new(), &mut units);
                let words = r.text_words(k, 0, true);
                units.extend((0..words).map(|i| Unit::Text(source.piece(text_salt(k), i))));
                tools(k, &mut units);
                choices.push(units);
            }
        }
        Start::Prefix {
            text,
            reasoning: reasoning_prefix,
            skip_reasoning,
        } => {
            // Which choice of the original answer this prefix starts.
            let found = (0..MAX_CHOICES).find_map(|k| {
                let max_words = r
                    .text_words(k, usize::MAX / 4, !skip_reasoning)
                    .min(MAX_TOKENS_LIMIT as usize);
                split(source, text_salt(k), max_words, &text).map(|s| (k, s))
            });
            let Some((k, (whole, tail))) = found else {
                return refuse("the assistant prefix is not the start of this answer");
            };
            let mut units = Vec::new();
            let mut reasoning_covered = 0;
            if !skip_reasoning {
                match &reasoning_prefix {
                    Some(p) => {
                        let Some((w, t)) = split(source, reasoning_salt(k), r.reasoning_words(), p)
                        else {
                            return refuse(
                                "the reasoning_content prefix is not the start of this answer's reasoning",
                            );
                        };
                        reasoning_covered = w;
                        reasoning(
                            reasoning_salt(k),
                            w + usize::from(!t.is_empty()),
                            t,
                            &mut units,
                        );
                    }
                    None => reasoning(reasoning_salt(k), 0, String::new(), &mut units),
                }
            } else {
                reasoning_covered = r.reasoning_words();
            }
            covered = whole + reasoning_covered;
            let words = r.text_words(k, covered, true);
            if whole > words || (whole == words && !tail.is_empty()) {
                return refuse("the assistant prefix is not the start of this answer");
            }
            let from = whole + usize::from(!tail.is_empty());
            if !tail.is_empty() {
                units.push(Unit::Text(tail));
            }
            units.extend((from..words).map(|i| Unit::Text(source.piece(text_salt(k), i))));
            tools(k, &mut units);
            choices.push(units);
        }
        Start::Instruct { text } => {
            let found = (0..MAX_CHOICES).find_map(|k| {
                let max_words = r
                    .text_words(k, usize::MAX / 4, true)
                    .min(MAX_TOKENS_LIMIT as usize);
                split(source, text_salt(k), max_words, &text).map(|s| (k, s))
            });
            match found {
                Some((k, (whole, tail))) => {
                    // The word the partial ends in (or after), said again.
                    let last = if tail.is_empty() {
                        whole.saturating_sub(1)
                    } else {
                        whole
                    };
                    covered = last;
                    // The whole answer's length: as for a prefix, the
                    // budget left (lowered by what was said, plus the word
                    // said again) plus what the partial covers.
                    let words = r.text_words(k, last + r.reasoning_words(), true);
                    if whole > words {
                        // Longer than this answer: not a partial of ours.
                        return Ok(None);
                    }
                    let mut units = Vec::new();
                    reasoning(
                        INSTRUCT_SALT ^ reasoning_salt(k),
                        0,
                        String::new(),
                        &mut units,
                    );
                    if last < words {
                        units.push(Unit::Text(source.word(text_salt(k), last).to_owned()));
                    }
                    units.extend(
                        (last + 1..words).map(|i| Unit::Text(source.piece(text_salt(k), i))),
                    );
                    tools(k, &mut units);
                    choices.push(units);
                }
                // Not a partial of ours: an ordinary answer to it all.
                None => return Ok(None),
            }
        }
    }
    let max = r.max_tokens;
    let out = choices
        .into_iter()
        .map(|mut units| {
            let has_tools = units.iter().any(|u| matches!(u, Unit::ToolStart { .. }));
            let finish = match max {
                Some(m) if units.len() > m => {
                    units.truncate(m);
                    Finish::Length
                }
                _ if has_tools => Finish::ToolCalls,
                _ => Finish::Stop,
            };
            ChoiceOut { units, finish }
        })
        .collect();
    Ok(Some((out, covered)))
}
