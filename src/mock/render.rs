//! A plan on the wire: the SSE events each dialect streams, one at a time
//! (nothing is built ahead, so a long answer costs no memory), and the
//! whole answer of a non-streaming request.

use std::collections::VecDeque;

use serde_json::{Value, json};

use super::plan::{ChoiceOut, Plan, Unit, signature};

/// One SSE event. `unit`: it carries a generated unit (paced, counted).
pub struct Out {
    pub event: Option<&'static str>,
    pub data: String,
    pub unit: bool,
}

pub fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A choice's units put together, as an SDK would accumulate them.
#[derive(Default, Debug, PartialEq)]
pub struct Accumulated {
    pub reasoning: String,
    pub redacted: Option<String>,
    pub text: String,
    /// (id, name, arguments)
    pub tools: Vec<(String, String, String)>,
}

pub fn accumulate(choice: &ChoiceOut) -> Accumulated {
    let mut a = Accumulated::default();
    for unit in &choice.units {
        match unit {
            Unit::Reasoning(w) => a.reasoning.push_str(w),
            Unit::Redacted(d) => a.redacted = Some(d.clone()),
            Unit::Text(w) => a.text.push_str(w),
            Unit::ToolStart { id, name, .. } => {
                a.tools.push((id.clone(), name.clone(), String::new()))
            }
            Unit::ToolArgs { fragment, .. } => {
                if let Some(t) = a.tools.last_mut() {
                    t.2.push_str(fragment);
                }
            }
        }
    }
    a
}

// ---------------------------------------------------------------- OpenAI

struct Cursor {
    role_sent: bool,
    pos: usize,
    finished: bool,
}

pub struct OpenAiStream {
    plan: Plan,
    head: String,
    tail: &'static str,
    cursors: Vec<Cursor>,
    queue: VecDeque<Out>,
    usage_sent: bool,
    done: bool,
}

impl OpenAiStream {
    pub fn new(plan: Plan) -> OpenAiStream {
        let head = format!(
            r#"{{"id":"chatcmpl-mock-{}","object":"chat.completion.chunk","created":1700000000,"model":{},"system_fingerprint":"fp_mock","choices":["#,
            plan.id,
            js(&plan.model)
        );
        let tail = if plan.include_usage {
            r#"],"usage":null}"#
        } else {
            "]}"
        };
        let cursors = plan
            .choices
            .iter()
            .map(|_| Cursor {
                role_sent: false,
                pos: 0,
                finished: false,
            })
            .collect();
        OpenAiStream {
            plan,
            head,
            tail,
            cursors,
            queue: VecDeque::new(),
            usage_sent: false,
            done: false,
        }
    }

    fn chunk(&self, index: usize, delta: &str, finish: Option<&str>, unit: bool) -> Out {
        let finish = finish.map_or_else(|| "null".to_owned(), |f| format!("\"{f}\""));
        Out {
            event: None,
            data: format!(
                r#"{}{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{finish}}}{}"#,
                self.head, self.tail
            ),
            unit,
        }
    }

    fn round(&mut self) {
        for i in 0..self.cursors.len() {
            let c = &self.cursors[i];
            if c.finished {
                continue;
            }
            let choice = &self.plan.choices[i];
            let out = if !c.role_sent {
                self.cursors[i].role_sent = true;
                self.chunk(
                    i,
                    r#"{"role":"assistant","content":"","refusal":null}"#,
                    None,
                    false,
                )
            } else if c.pos < choice.units.len() {
                let delta = match &choice.units[c.pos] {
                    Unit::Reasoning(w) => {
                        format!(r#"{{"content":null,"reasoning_content":{}}}"#, js(w))
                    }
                    Unit::Text(w) | Unit::Redacted(w) => format!(r#"{{"content":{}}}"#, js(w)),
                    Unit::ToolStart { call, id, name } => format!(
                        r#"{{"tool_calls":[{{"index":{call},"id":{},"type":"function","function":{{"name":{},"arguments":""}}}}]}}"#,
                        js(id),
                        js(name)
                    ),
                    Unit::ToolArgs { call, fragment } => format!(
                        r#"{{"tool_calls":[{{"index":{call},"function":{{"arguments":{}}}}}]}}"#,
                        js(fragment)
                    ),
                };
                self.cursors[i].pos += 1;
                self.chunk(i, &delta, None, true)
            } else {
                self.cursors[i].finished = true;
                self.chunk(i, "{}", Some(choice.finish.openai()), false)
            };
            self.queue.push_back(out);
        }
    }

    pub fn next(&mut self) -> Option<Out> {
        if self.queue.is_empty() {
            self.round();
        }
        if let Some(out) = self.queue.pop_front() {
            return Some(out);
        }
        if self.plan.include_usage && !self.usage_sent {
            self.usage_sent = true;
            let (p, c) = (self.plan.prompt_tokens, self.plan.completion_tokens());
            return Some(Out {
                event: None,
                data: format!(
                    r#"{}],"usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{}}}}}"#,
                    self.head,
                    p + c
                ),
                unit: false,
            });
        }
        if !self.done {
            self.done = true;
            return Some(Out {
                event: None,
                data: "[DONE]".into(),
                unit: false,
            });
        }
        None
    }
}

pub fn openai_whole(plan: &Plan) -> Value {
    let choices: Vec<Value> = plan
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let a = accumulate(c);
            let mut message = json!({
                "role": "assistant",
                "content": if a.text.is_empty() && !a.tools.is_empty() { Value::Null } else { json!(a.text) },
                "refusal": null,
            });
            if !a.reasoning.is_empty() {
                message["reasoning_content"] = json!(a.reasoning);
            }
            if !a.tools.is_empty() {
                message["tool_calls"] = a
                    .tools
                    .iter()
                    .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
                    .collect();
            }
            json!({"index": i, "message": message, "logprobs": null, "finish_reason": c.finish.openai()})
        })
        .collect();
    let (p, c) = (plan.prompt_tokens, plan.completion_tokens());
    json!({
        "id": format!("chatcmpl-mock-{}", plan.id),
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": plan.model,
        "system_fingerprint": "fp_mock",
        "choices": choices,
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    })
}

// ------------------------------------------------------------- Anthropic

#[derive(Clone, Copy, PartialEq)]
enum Block {
    Thinking,
    Text,
    Tool,
}

pub struct AnthropicStream {
    plan: Plan,
    started: bool,
    pos: usize,
    open: Option<(usize, Block)>,
    next_index: usize,
    thinking: String,
    units: usize,
    finished: bool,
    queue: VecDeque<Out>,
}

fn named(event: &'static str, data: String, unit: bool) -> Out {
    Out {
        event: Some(event),
        data,
        unit,
    }
}

impl AnthropicStream {
    pub fn new(plan: Plan) -> AnthropicStream {
        AnthropicStream {
            plan,
            started: false,
            pos: 0,
            open: None,
            next_index: 0,
            thinking: String::new(),
            units: 0,
            finished: false,
            queue: VecDeque::new(),
        }
    }

    fn ping(&mut self) {
        self.queue
            .push_back(named("ping", r#"{"type": "ping"}"#.into(), false));
    }

    fn close(&mut self) {
        if let Some((index, kind)) = self.open.take() {
            if kind == Block::Thinking {
                let sig = signature(&std::mem::take(&mut self.thinking));
                self.queue.push_back(named(
                    "content_block_delta",
                    format!(
                        r#"{{"type":"content_block_delta","index":{index},"delta":{{"type":"signature_delta","signature":{}}}}}"#,
                        js(&sig)
                    ),
                    false,
                ));
            }
            self.queue.push_back(named(
                "content_block_stop",
                format!(r#"{{"type":"content_block_stop","index":{index}}}"#),
                false,
            ));
        }
    }

    fn open(&mut self, kind: Block, block: String, unit: bool) -> usize {
        self.close();
        let index = self.next_index;
        self.next_index += 1;
        self.queue.push_back(named(
            "content_block_start",
            format!(r#"{{"type":"content_block_start","index":{index},"content_block":{block}}}"#),
            unit,
        ));
        self.open = Some((index, kind));
        index
    }

    fn delta(&mut self, kind: Block, delta: String) {
        let index = match self.open {
            Some((i, k)) if k == kind => i,
            _ => {
                let block = match kind {
                    Block::Thinking => r#"{"type":"thinking","thinking":"","signature":""}"#,
                    _ => r#"{"type":"text","text":""}"#,
                };
                self.open(kind, block.into(), false)
            }
        };
        self.queue.push_back(named(
            "content_block_delta",
            format!(r#"{{"type":"content_block_delta","index":{index},"delta":{delta}}}"#),
            true,
        ));
    }

    fn fill(&mut self) {
        if !self.started {
            self.started = true;
            self.queue.push_back(named(
                "message_start",
                format!(
                    r#"{{"type":"message_start","message":{{"id":"msg_mock_{}","type":"message","role":"assistant","model":{},"content":[],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":{},"output_tokens":1}}}}}}"#,
                    self.plan.id,
                    js(&self.plan.model),
                    self.plan.prompt_tokens
                ),
                false,
            ));
            self.ping();
            return;
        }
        let Some(choice) = self.plan.choices.first() else {
            self.finished = true;
            return;
        };
        if let Some(unit) = choice.units.get(self.pos).cloned() {
            self.pos += 1;
            match unit {
                Unit::Reasoning(w) => {
                    self.thinking.push_str(&w);
                    self.delta(
                        Block::Thinking,
                        format!(r#"{{"type":"thinking_delta","thinking":{}}}"#, js(&w)),
                    );
                }
                Unit::Redacted(data) => {
                    let block = format!(r#"{{"type":"redacted_thinking","data":{}}}"#, js(&data));
                    self.open(Block::Tool, block, true);
                    self.close();
                }
                Unit::Text(w) => self.delta(
                    Block::Text,
                    format!(r#"{{"type":"text_delta","text":{}}}"#, js(&w)),
                ),
                Unit::ToolStart { id, name, .. } => {
                    let block = format!(
                        r#"{{"type":"tool_use","id":{},"name":{},"input":{{}}}}"#,
                        js(&id),
                        js(&name)
                    );
                    self.open(Block::Tool, block, true);
                }
                Unit::ToolArgs { fragment, .. } => self.delta(
                    Block::Tool,
                    format!(
                        r#"{{"type":"input_json_delta","partial_json":{}}}"#,
                        js(&fragment)
                    ),
                ),
            }
            self.units += 1;
            let every = self.plan.delivery.ping_every;
            if every > 0 && self.units.is_multiple_of(every) {
                self.ping();
            }
            return;
        }
        if !self.finished {
            self.finished = true;
            let reason = choice.finish.anthropic();
            self.close();
            let tokens = self.plan.completion_tokens();
            self.queue.push_back(named(
                "message_delta",
                format!(
                    r#"{{"type":"message_delta","delta":{{"stop_reason":"{reason}","stop_sequence":null}},"usage":{{"output_tokens":{tokens}}}}}"#
                ),
                false,
            ));
            self.queue.push_back(named(
                "message_stop",
                r#"{"type":"message_stop"}"#.into(),
                false,
            ));
        }
    }

    pub fn next(&mut self) -> Option<Out> {
        while self.queue.is_empty() && !(self.finished && self.started) {
            self.fill();
        }
        self.queue.pop_front()
    }
}

pub fn anthropic_whole(plan: &Plan) -> Value {
    let mut content = Vec::new();
    let mut finish = "end_turn";
    if let Some(choice) = plan.choices.first() {
        finish = choice.finish.anthropic();
        let a = accumulate(choice);
        if !a.reasoning.is_empty() {
            content.push(json!({"type": "thinking", "thinking": a.reasoning, "signature": signature(&a.reasoning)}));
        }
        if let Some(data) = a.redacted {
            content.push(json!({"type": "redacted_thinking", "data": data}));
        }
        if !a.text.is_empty() {
            content.push(json!({"type": "text", "text": a.text}));
        }
        for (id, name, args) in a.tools {
            let input: Value = serde_json::from_str(&args).unwrap_or_else(|_| json!({}));
            content.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
        }
    }
    json!({
        "id": format!("msg_mock_{}", plan.id),
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": content,
        "stop_reason": finish,
        "stop_sequence": null,
        "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": plan.completion_tokens()},
    })
}
