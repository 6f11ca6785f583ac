//! The mock's rules, each checked: shapes as the SDKs accumulate them,
//! determinism, `max_tokens`, strictness about continuations, credentials,
//! once-only failures.

use std::collections::BTreeMap;

use super::plan::{self, signature};
use super::render::{AnthropicStream, OpenAiStream};
use super::*;

fn body(extra: Value) -> Value {
    let mut b = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "alpha beta gamma delta epsilon zeta eta theta iota kappa"}],
        "max_tokens": 2000,
        "stream": true,
    });
    if let (Some(b), Some(extra)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            b.insert(k.clone(), v.clone());
        }
    }
    b
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])
}

fn anthropic_tools() -> Value {
    json!([{"name": "lookup", "input_schema": {"type": "object"}}])
}

fn thinking() -> Value {
    json!({"type": "enabled", "budget_tokens": 1024})
}

fn push(req: &mut Value, message: Value) {
    if let Some(m) = req["messages"].as_array_mut() {
        m.push(message);
    }
}

fn openai(req: &Value) -> plan::Plan {
    plan::plan(req, Dialect::OpenAi).unwrap()
}

fn anthropic(req: &Value) -> plan::Plan {
    plan::plan(req, Dialect::Anthropic).unwrap()
}

fn refused(req: &Value, dialect: Dialect) -> String {
    match plan::plan(req, dialect) {
        Ok(_) => panic!("accepted: {req}"),
        Err(r) => r.message,
    }
}

/// Every event of a stream: (event name, data).
fn events(plan: plan::Plan, dialect: Dialect) -> Vec<(Option<&'static str>, String)> {
    let mut out = Vec::new();
    match dialect {
        Dialect::OpenAi => {
            let mut r = OpenAiStream::new(plan);
            while let Some(e) = r.next() {
                out.push((e.event, e.data));
            }
        }
        Dialect::Anthropic => {
            let mut r = AnthropicStream::new(plan);
            while let Some(e) = r.next() {
                out.push((e.event, e.data));
            }
        }
    }
    out
}

/// What openai-python's ChatCompletionStreamState makes of the chunks,
/// per choice, checking the chunk shape on the way.
#[derive(Default, Debug, Clone, PartialEq)]
struct Choice {
    roles: usize,
    content: String,
    reasoning: String,
    tools: BTreeMap<u64, (String, String, String)>,
    finish: Option<String>,
}

fn openai_accumulate(events: &[(Option<&'static str>, String)]) -> (Vec<Choice>, Option<Value>) {
    let mut choices: BTreeMap<u64, Choice> = BTreeMap::new();
    let mut usage = None;
    let last = events.last().map(|e| e.1.as_str());
    assert_eq!(last, Some("[DONE]"));
    for (name, data) in &events[..events.len() - 1] {
        assert!(name.is_none());
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        for key in ["id", "created", "model", "system_fingerprint"] {
            assert!(v.get(key).is_some(), "{key} in {v}");
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            assert_eq!(v["choices"], json!([]));
            usage = Some(u.clone());
        }
        for c in v["choices"].as_array().unwrap() {
            assert!(c.get("logprobs").is_some() && c.get("finish_reason").is_some());
            let entry = choices.entry(c["index"].as_u64().unwrap()).or_default();
            assert!(entry.finish.is_none(), "a chunk after the finish: {v}");
            let d = &c["delta"];
            if d.get("role").is_some() {
                assert_eq!(
                    d,
                    &json!({"role": "assistant", "content": "", "refusal": null})
                );
                entry.roles += 1;
            } else {
                assert_eq!(entry.roles, 1, "the role chunk comes first");
            }
            if let Some(t) = d["content"].as_str() {
                entry.content.push_str(t);
            }
            if let Some(t) = d["reasoning_content"].as_str() {
                assert!(entry.content.is_empty(), "reasoning after content");
                entry.reasoning.push_str(t);
            }
            for call in d["tool_calls"].as_array().into_iter().flatten() {
                let k = call["index"].as_u64().unwrap();
                let slot = entry.tools.entry(k).or_default();
                if let Some(id) = call["id"].as_str() {
                    assert!(slot.0.is_empty(), "a second id for call {k}");
                    assert_eq!(call["type"], "function");
                    slot.0 = id.to_owned();
                    slot.1 = call["function"]["name"].as_str().unwrap().to_owned();
                }
                slot.2
                    .push_str(call["function"]["arguments"].as_str().unwrap());
            }
            if let Some(f) = c["finish_reason"].as_str() {
                entry.finish = Some(f.to_owned());
            }
        }
    }
    (choices.into_values().collect(), usage)
}

/// What anthropic's accumulate_event makes of the events: the content
/// blocks, the stop reason, checking pairing and indices.
fn anthropic_accumulate(events: &[(Option<&'static str>, String)]) -> (Vec<Value>, String, usize) {
    let mut blocks: Vec<Value> = Vec::new();
    let mut open: Option<usize> = None;
    let mut stop = String::new();
    let mut pings = 0;
    let mut json_parts: BTreeMap<usize, String> = BTreeMap::new();
    assert_eq!(events[0].0, Some("message_start"));
    assert_eq!(events.last().unwrap().0, Some("message_stop"));
    for (name, data) in events {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"].as_str(), *name, "event name = type");
        match *name {
            Some("message_start") => assert_eq!(v["message"]["content"], json!([])),
            Some("ping") => pings += 1,
            Some("content_block_start") => {
                assert!(open.is_none(), "a block opened inside another");
                let i = v["index"].as_u64().unwrap() as usize;
                assert_eq!(i, blocks.len(), "indices count from 0");
                blocks.push(v["content_block"].clone());
                open = Some(i);
            }
            Some("content_block_delta") => {
                let i = v["index"].as_u64().unwrap() as usize;
                assert_eq!(open, Some(i), "a delta to an open block");
                let b = &mut blocks[i];
                let d = &v["delta"];
                let append = |b: &mut Value, key: &str, t: &str| {
                    let s = format!("{}{t}", b[key].as_str().unwrap());
                    b[key] = json!(s);
                };
                match d["type"].as_str().unwrap() {
                    "text_delta" => {
                        assert_eq!(b["type"], "text");
                        append(b, "text", d["text"].as_str().unwrap());
                    }
                    "thinking_delta" => {
                        assert_eq!(b["type"], "thinking");
                        append(b, "thinking", d["thinking"].as_str().unwrap());
                    }
                    "signature_delta" => {
                        assert_eq!(b["type"], "thinking");
                        b["signature"] = d["signature"].clone();
                    }
                    "input_json_delta" => {
                        assert_eq!(b["type"], "tool_use");
                        json_parts
                            .entry(i)
                            .or_default()
                            .push_str(d["partial_json"].as_str().unwrap());
                    }
                    other => panic!("delta {other}"),
                }
            }
            Some("content_block_stop") => {
                let i = v["index"].as_u64().unwrap() as usize;
                assert_eq!(open.take(), Some(i));
                if let Some(j) = json_parts.get(&i) {
                    blocks[i]["input"] = serde_json::from_str(j).unwrap();
                }
            }
            Some("message_delta") => stop = v["delta"]["stop_reason"].as_str().unwrap().to_owned(),
            Some("message_stop") => assert!(open.is_none()),
            other => panic!("event {other:?}"),
        }
    }
    (blocks, stop, pings)
}

fn words(text: &str) -> Vec<&str> {
    text.split(' ').collect()
}

#[test]
fn deterministic_drawn_from_the_messages_and_capped() {
    let req = body(json!({"mock": {"words": 10}}));
    let a = openai_accumulate(&events(openai(&req), Dialect::OpenAi)).0;
    let b = openai_accumulate(&events(openai(&req), Dialect::OpenAi)).0;
    assert_eq!(a, b);
    assert_eq!(words(&a[0].content).len(), 10);
    let prompt = "alpha beta gamma delta epsilon zeta eta theta iota kappa";
    assert!(words(&a[0].content).iter().all(|w| prompt.contains(w)));
    assert_eq!(a[0].finish.as_deref(), Some("stop"));
    // max_tokens caps the words a response adds.
    let capped = openai(&body(json!({"mock": {"words": 10}, "max_tokens": 4})));
    assert_eq!(capped.choices[0].units.len(), 4);
    assert_eq!(capped.choices[0].finish, plan::Finish::Length);
    // Without `words`, the answer is as long as max_tokens allows.
    let natural = openai(&body(json!({"max_tokens": 7})));
    assert_eq!(natural.choices[0].units.len(), 7);
    assert_eq!(natural.choices[0].finish, plan::Finish::Stop);
}

#[test]
fn text_stream_starts_with_a_role_chunk_and_ends_with_usage() {
    let req = body(json!({"mock": {"words": 5}, "stream_options": {"include_usage": true}}));
    let evs = events(openai(&req), Dialect::OpenAi);
    assert_eq!(
        evs.len(),
        1 + 5 + 1 + 1 + 1,
        "role, words, finish, usage, [DONE]"
    );
    for (_, data) in &evs[..evs.len() - 2] {
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(
            v["usage"].is_null() && v.get("usage").is_some(),
            "usage: null on every chunk"
        );
    }
    let (choices, usage) = openai_accumulate(&evs);
    let usage = usage.unwrap();
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + 5)
    );
    let whole = render::openai_whole(&openai(&req));
    assert_eq!(
        whole["choices"][0]["message"]["content"].as_str(),
        Some(choices[0].content.as_str())
    );
    // No usage chunk unless asked.
    let plain = events(
        openai(&body(json!({"mock": {"words": 5}}))),
        Dialect::OpenAi,
    );
    assert_eq!(plain.len(), 8);
    assert!(!plain[1].1.contains("usage"));
}

#[test]
fn tool_calls_need_tools_and_their_arguments_are_json() {
    let refusal = refused(&body(json!({"mock": {"shape": "tools"}})), Dialect::OpenAi);
    assert!(refusal.contains("tools"), "{refusal}");
    for (shape, calls) in [("tools", 1), ("parallel_tools", 2)] {
        let req = body(json!({"mock": {"shape": shape}, "tools": tools()}));
        let (choices, _) = openai_accumulate(&events(openai(&req), Dialect::OpenAi));
        let c = &choices[0];
        assert_eq!(words(&c.content).len(), 3, "content words first");
        assert_eq!(c.tools.len(), calls);
        for (k, (id, name, args)) in &c.tools {
            assert!(id.starts_with("call_"), "{id}");
            assert_eq!(name, "lookup");
            let args: Value = serde_json::from_str(args).unwrap();
            assert_eq!(words(args["query"].as_str().unwrap()).len(), 3, "call {k}");
        }
        assert_eq!(c.finish.as_deref(), Some("tool_calls"));
        let whole = render::openai_whole(&openai(&req));
        assert_eq!(
            whole["choices"][0]["message"]["tool_calls"]
                .as_array()
                .unwrap()
                .len(),
            calls
        );
        assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls");
    }
    // No content words at all: content is null in the whole answer.
    let req = body(json!({"mock": {"shape": "tools", "content_words": 0}, "tools": tools()}));
    let whole = render::openai_whole(&openai(&req));
    assert!(whole["choices"][0]["message"]["content"].is_null());
    // Several fragments per call, the calls one after the other.
    let evs = events(
        openai(&body(
            json!({"mock": {"shape": "parallel_tools"}, "tools": tools()}),
        )),
        Dialect::OpenAi,
    );
    let order: Vec<u64> = evs
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/tool_calls/0/index")
                .and_then(Value::as_u64)
        })
        .collect();
    assert!(
        order.len() >= 8 && order.windows(2).all(|w| w[0] <= w[1]),
        "{order:?}"
    );
}

#[test]
fn reasoning_comes_before_content() {
    let req = body(json!({"mock": {"shape": "reasoning", "words": 4}}));
    let (choices, _) = openai_accumulate(&events(openai(&req), Dialect::OpenAi));
    assert_eq!(words(&choices[0].reasoning).len(), 6);
    assert_eq!(words(&choices[0].content).len(), 4);
    let whole = render::openai_whole(&openai(&req));
    assert_eq!(
        whole["choices"][0]["message"]["reasoning_content"].as_str(),
        Some(choices[0].reasoning.as_str())
    );
    // max_tokens counts reasoning too.
    let capped = openai(&body(
        json!({"mock": {"shape": "reasoning", "words": 4}, "max_tokens": 8}),
    ));
    assert_eq!(capped.choices[0].units.len(), 8);
    assert_eq!(capped.choices[0].finish, plan::Finish::Length);
    assert_eq!(capped.completion_tokens(), 8);
}

#[test]
fn choices_interleave_and_the_second_finishes_first() {
    let req = body(json!({"mock": {"words": 6}, "n": 2}));
    let evs = events(openai(&req), Dialect::OpenAi);
    let (choices, _) = openai_accumulate(&evs);
    assert_eq!(choices.len(), 2);
    assert!(
        choices
            .iter()
            .all(|c| c.roles == 1 && c.finish.as_deref() == Some("stop"))
    );
    assert!(words(&choices[1].content).len() < words(&choices[0].content).len());
    assert_ne!(choices[0].content, choices[1].content);
    // Round robin: chunk 0 is choice 0, chunk 1 choice 1, …; choice 1's
    // finish comes before choice 0's.
    let index = |d: &String| {
        serde_json::from_str::<Value>(d)
            .ok()
            .and_then(|v| v.pointer("/choices/0/index").and_then(Value::as_u64))
    };
    assert_eq!(index(&evs[0].1), Some(0));
    assert_eq!(index(&evs[1].1), Some(1));
    let finish_at = |k: u64| {
        evs.iter()
            .position(|(_, d)| index(d) == Some(k) && d.contains("\"finish_reason\":\""))
            .unwrap()
    };
    assert!(finish_at(1) < finish_at(0));
    assert!(refused(&body(json!({"n": 9})), Dialect::OpenAi).contains("n"));
}

#[test]
fn limits_above_a_million_are_refused_not_a_panic() {
    for name in ["max_tokens", "max_completion_tokens"] {
        let mut req = body(json!({}));
        req.as_object_mut().unwrap().remove("max_tokens");
        req[name] = json!(u64::MAX);
        assert!(refused(&req, Dialect::OpenAi).contains("too large"));
        req[name] = json!(1_000_001);
        assert!(refused(&req, Dialect::OpenAi).contains("too large"));
    }
    assert!(
        refused(&body(json!({"max_tokens": u64::MAX})), Dialect::Anthropic).contains("too large")
    );
    assert!(
        refused(&body(json!({"mock": {"words": u64::MAX}})), Dialect::OpenAi).contains("words")
    );
    let mut req = body(json!({}));
    req.as_object_mut().unwrap().remove("max_tokens");
    assert!(refused(&req, Dialect::Anthropic).contains("max_tokens"));
}

fn text_of(plan: &plan::Plan, choice: usize) -> String {
    render::accumulate(&plan.choices[choice]).text
}

#[test]
fn openai_continuation_styles() {
    let base = body(json!({"mock": {"words": 10}}));
    let full = text_of(&openai(&base), 0);
    let cut = words(&full)[..4].join(" ");
    let rest = full[cut.len()..].to_owned();
    let with = |extra: Value, assistant: Value| {
        let mut r = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        push(&mut r, assistant);
        r
    };
    // vLLM: continue_final_message + add_generation_prompt: false.
    let cfm = with(
        json!({"continue_final_message": true, "add_generation_prompt": false}),
        json!({"role": "assistant", "content": cut}),
    );
    assert_eq!(text_of(&openai(&cfm), 0), rest);
    let mut no_agp = cfm.clone();
    no_agp
        .as_object_mut()
        .unwrap()
        .remove("add_generation_prompt");
    assert!(plan::plan(&no_agp, Dialect::OpenAi).is_err());
    // DeepSeek: prefix: true.
    let prefix = with(
        json!({}),
        json!({"role": "assistant", "content": cut, "prefix": true}),
    );
    assert_eq!(text_of(&openai(&prefix), 0), rest);
    // llama.cpp: a bare trailing assistant message.
    let bare = with(json!({}), json!({"role": "assistant", "content": cut}));
    assert_eq!(text_of(&openai(&bare), 0), rest);
    // A prefix that is not ours, or ends inside a word, …
    let foreign = with(
        json!({}),
        json!({"role": "assistant", "content": "zzz", "prefix": true}),
    );
    assert!(refused(&foreign, Dialect::OpenAi).contains("not the start"));
    let mid = with(
        json!({}),
        json!({"role": "assistant", "content": &full[..cut.len() + 2], "prefix": true}),
    );
    assert_eq!(
        format!("{}{}", &full[..cut.len() + 2], text_of(&openai(&mid), 0)),
        full
    );

    // A provider that supports only some styles.
    let only = |style: &str, mut r: Value| {
        r["mock"]["styles"] = json!([style]);
        r
    };
    let m = refused(&only("prefix", cfm.clone()), Dialect::OpenAi);
    assert_eq!(
        m,
        "Unrecognized request argument supplied: continue_final_message"
    );
    let mut agp = bare.clone();
    agp["add_generation_prompt"] = json!(false);
    let m = refused(&only("prefix", agp), Dialect::OpenAi);
    assert_eq!(
        m,
        "Unrecognized request argument supplied: add_generation_prompt"
    );
    let m = refused(
        &only("continue_final_message", prefix.clone()),
        Dialect::OpenAi,
    );
    assert!(m.contains("'prefix' was unexpected"), "{m}");
    assert_eq!(text_of(&openai(&only("prefix", prefix.clone())), 0), rest);
    // Without assistant_prefix a bare assistant turn is more conversation:
    // a fresh answer, no error.
    let fresh = openai(&only("prefix", bare.clone()));
    assert_ne!(text_of(&fresh, 0), rest);
    assert!(!text_of(&fresh, 0).is_empty());
    // A trailing assistant with tool calls is refused.
    let tools_trailing = with(
        json!({}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}),
    );
    assert!(plan::plan(&tools_trailing, Dialect::OpenAi).is_err());
}

#[test]
fn continuations_count_every_unit_and_continue_tools_and_reasoning() {
    // Tools: a prefix covering all content gets the tool calls.
    let base = body(json!({"mock": {"shape": "tools"}, "tools": tools()}));
    let full = openai(&base);
    let all = render::accumulate(&full.choices[0]);
    let mut cont = base.clone();
    push(
        &mut cont,
        json!({"role": "assistant", "content": all.text, "prefix": true}),
    );
    let c = openai(&cont);
    let rest = render::accumulate(&c.choices[0]);
    assert_eq!(rest.text, "");
    assert_eq!(rest.tools, all.tools);
    assert_eq!(c.choices[0].finish, plan::Finish::ToolCalls);

    // Reasoning: a content prefix means the reasoning is done.
    let base = body(json!({"mock": {"shape": "reasoning", "words": 5}}));
    let full = render::accumulate(&openai(&base).choices[0]);
    let mut cont = base.clone();
    let cut = words(&full.text)[..2].join(" ");
    push(
        &mut cont,
        json!({"role": "assistant", "content": cut, "prefix": true}),
    );
    let rest = render::accumulate(&openai(&cont).choices[0]);
    assert_eq!(rest.reasoning, "");
    assert_eq!(format!("{cut}{}", rest.text), full.text);
    // A reasoning_content prefix (DeepSeek) continues the reasoning.
    let mut cont = base.clone();
    let cut = words(&full.reasoning)[..3].join(" ");
    push(
        &mut cont,
        json!({"role": "assistant", "content": "", "reasoning_content": cut, "prefix": true}),
    );
    let rest = render::accumulate(&openai(&cont).choices[0]);
    assert_eq!(format!("{cut}{}", rest.reasoning), full.reasoning);
    assert_eq!(rest.text, full.text);

    // Without `words`, max_tokens lowered by what was generated gives
    // exactly the rest of the original answer.
    let base = body(json!({"mock": {"shape": "reasoning"}, "max_tokens": 20}));
    let full = render::accumulate(&openai(&base).choices[0]);
    let mut cont = base.clone();
    let cut = words(&full.text)[..3].join(" ");
    cont["max_tokens"] = json!(20 - 6 - 3);
    push(
        &mut cont,
        json!({"role": "assistant", "content": cut, "prefix": true}),
    );
    let c = openai(&cont);
    assert_eq!(format!("{cut}{}", text_of(&c, 0)), full.text);
    assert_eq!(c.choices[0].finish, plan::Finish::Stop);
}

#[test]
fn a_prefix_of_any_choice_continues_that_choice() {
    let base = body(json!({"mock": {"words": 8}, "n": 3}));
    let full = openai(&base);
    let second = text_of(&full, 1);
    let cut = words(&second)[..2].join(" ");
    let mut cont = base.clone();
    cont["n"] = json!(1);
    push(
        &mut cont,
        json!({"role": "assistant", "content": cut, "prefix": true}),
    );
    let c = openai(&cont);
    assert_eq!(c.choices.len(), 1);
    assert_eq!(format!("{cut}{}", text_of(&c, 0)), second);
}

#[test]
fn instruct_repeats_the_last_word_and_thinks_again() {
    let base = body(json!({"mock": {"shape": "tools", "content_words": 6}, "tools": tools()}));
    let full = render::accumulate(&openai(&base).choices[0]);
    let w = words(&full.text);
    let cut = w[..3].join(" ");
    let mut re = base.clone();
    push(&mut re, json!({"role": "assistant", "content": cut}));
    push(
        &mut re,
        json!({"role": "user", "content": "Continue exactly where you stopped."}),
    );
    let rest = render::accumulate(&openai(&re).choices[0]);
    assert_eq!(
        rest.text,
        w[2..].join(" "),
        "starts with a repeat of the last word"
    );
    assert_eq!(rest.tools, full.tools);
    // Not our partial: an ordinary answer.
    let mut other = base.clone();
    push(
        &mut other,
        json!({"role": "assistant", "content": "zzz yyy"}),
    );
    push(&mut other, json!({"role": "user", "content": "go on"}));
    assert!(plan::plan(&other, Dialect::OpenAi).is_ok());

    // Anthropic thinking: a new thinking block first, with a valid signature.
    let base = body(
        json!({"mock": {"shape": "thinking", "words": 6}, "thinking": thinking(), "tools": anthropic_tools()}),
    );
    let (full, _, _) = anthropic_accumulate(&events(anthropic(&base), Dialect::Anthropic));
    let text = full[1]["text"].as_str().unwrap();
    let w = words(text);
    let mut re = base.clone();
    push(
        &mut re,
        json!({"role": "assistant", "content": [full[0].clone(), {"type": "text", "text": w[..2].join(" ")}]}),
    );
    push(
        &mut re,
        json!({"role": "user", "content": "Continue exactly where you stopped."}),
    );
    let (blocks, stop, _) = anthropic_accumulate(&events(anthropic(&re), Dialect::Anthropic));
    assert_eq!(blocks[0]["type"], "thinking");
    assert_ne!(blocks[0]["thinking"], full[0]["thinking"]);
    assert_eq!(
        blocks[0]["signature"].as_str(),
        Some(signature(blocks[0]["thinking"].as_str().unwrap()).as_str())
    );
    assert_eq!(blocks[1]["text"].as_str(), Some(w[1..].join(" ").as_str()));
    assert_eq!(blocks[2]["type"], "tool_use");
    assert_eq!(blocks[2]["id"], full[2]["id"]);
    assert_eq!(stop, "tool_use");
}

#[test]
fn anthropic_thinking_text_tool_use_with_pings() {
    let req = body(
        json!({"mock": {"shape": "thinking", "words": 12}, "thinking": thinking(), "tools": anthropic_tools()}),
    );
    let evs = events(anthropic(&req), Dialect::Anthropic);
    assert_eq!(evs[1].0, Some("ping"), "a ping after message_start");
    let (blocks, stop, pings) = anthropic_accumulate(&evs);
    assert!(pings >= 3, "{pings}");
    assert_eq!(blocks.len(), 3);
    assert_eq!(blocks[0]["type"], "thinking");
    let thought = blocks[0]["thinking"].as_str().unwrap();
    assert_eq!(words(thought).len(), 6);
    assert_eq!(
        blocks[0]["signature"].as_str(),
        Some(signature(thought).as_str())
    );
    assert_eq!(words(blocks[1]["text"].as_str().unwrap()).len(), 12);
    assert_eq!(blocks[2]["type"], "tool_use");
    assert!(blocks[2]["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(blocks[2]["name"], "lookup");
    assert!(blocks[2]["input"]["query"].is_string());
    assert_eq!(stop, "tool_use");
    let whole = render::anthropic_whole(&anthropic(&req));
    assert_eq!(whole["content"], json!(blocks));
    assert_eq!(whole["stop_reason"], "tool_use");
    // No tools: end_turn, two blocks.
    let mut plain = req.clone();
    plain.as_object_mut().unwrap().remove("tools");
    let (blocks, stop, _) = anthropic_accumulate(&events(anthropic(&plain), Dialect::Anthropic));
    assert_eq!((blocks.len(), stop.as_str()), (2, "end_turn"));
    // The shape needs thinking enabled, with a sane budget.
    let mut off = req.clone();
    off.as_object_mut().unwrap().remove("thinking");
    assert!(refused(&off, Dialect::Anthropic).contains("thinking"));
    let mut small = req.clone();
    small["thinking"]["budget_tokens"] = json!(10);
    assert!(plan::plan(&small, Dialect::Anthropic).is_err());
    // Tools for Anthropic: text, then tool_use blocks.
    let req = body(json!({"mock": {"shape": "parallel_tools"}, "tools": anthropic_tools()}));
    let (blocks, stop, _) = anthropic_accumulate(&events(anthropic(&req), Dialect::Anthropic));
    let kinds: Vec<&str> = blocks.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["text", "tool_use", "tool_use"]);
    assert_ne!(blocks[1]["id"], blocks[2]["id"]);
    assert_eq!(stop, "tool_use");
    // Redacted thinking.
    let req =
        body(json!({"mock": {"shape": "redacted_thinking", "words": 3}, "thinking": thinking()}));
    let (blocks, _, _) = anthropic_accumulate(&events(anthropic(&req), Dialect::Anthropic));
    assert_eq!(blocks[0]["type"], "redacted_thinking");
    assert_eq!(blocks[1]["type"], "text");
}

#[test]
fn anthropic_prefill_rules() {
    let base = body(json!({"model": "claude-3-7-sonnet", "mock": {"words": 8}}));
    let (full, _, _) = anthropic_accumulate(&events(anthropic(&base), Dialect::Anthropic));
    let text = full[0]["text"].as_str().unwrap().to_owned();
    let cut = words(&text)[..3].join(" ");
    let mut pre = base.clone();
    push(&mut pre, json!({"role": "assistant", "content": cut}));
    let (blocks, _, _) = anthropic_accumulate(&events(anthropic(&pre), Dialect::Anthropic));
    assert_eq!(
        format!("{cut}{}", blocks[0]["text"].as_str().unwrap()),
        text
    );
    // Claude 4.6+ and named globs refuse prefill; so does a provider without it.
    let prefill = "This model does not support assistant message prefill. The conversation must end with a user message.";
    // Models before 4.6 take prefill.
    for model in ["claude-sonnet-4-5", "claude-3-5-haiku"] {
        let mut r = pre.clone();
        r["model"] = json!(model);
        assert!(plan::plan(&r, Dialect::Anthropic).is_ok(), "{model}");
    }
    for model in [
        "claude-opus-4-6",
        "claude-sonnet-4-6-20260101",
        "claude-haiku-4-7",
        "claude-opus-5",
        "claude-3-7-sonnet",
    ] {
        let mut r = pre.clone();
        r["model"] = json!(model);
        if model == "claude-3-7-sonnet" {
            assert!(plan::plan(&r, Dialect::Anthropic).is_ok(), "{model}");
            r["mock"]["no_prefill"] = json!(["claude-3-7-*"]);
        }
        assert_eq!(refused(&r, Dialect::Anthropic), prefill, "{model}");
    }
    let mut r = pre.clone();
    r["mock"]["styles"] = json!(["prefix"]);
    assert_eq!(refused(&r, Dialect::Anthropic), prefill);
    // Trailing whitespace is refused, as Anthropic does.
    let mut r = base.clone();
    push(
        &mut r,
        json!({"role": "assistant", "content": format!("{cut} ")}),
    );
    assert!(refused(&r, Dialect::Anthropic).contains("whitespace"));

    // Thinking: the prefill must start with a signed thinking block.
    let base = body(
        json!({"model": "claude-3-7-sonnet", "mock": {"shape": "thinking", "words": 8}, "thinking": thinking(), "tools": anthropic_tools()}),
    );
    let (full, _, _) = anthropic_accumulate(&events(anthropic(&base), Dialect::Anthropic));
    let text = full[1]["text"].as_str().unwrap().to_owned();
    let cut = words(&text)[..3].join(" ");
    let with = |content: Value| {
        let mut r = base.clone();
        push(&mut r, json!({"role": "assistant", "content": content}));
        r
    };
    let m = refused(&with(json!(cut)), Dialect::Anthropic);
    assert!(m.contains("thinking"), "{m}");
    let mut forged = full[0].clone();
    forged["signature"] = json!("forged");
    assert!(
        refused(
            &with(json!([forged, {"type": "text", "text": cut}])),
            Dialect::Anthropic
        )
        .contains("signature")
    );
    let mut unsigned = full[0].clone();
    unsigned["signature"] = json!("");
    assert!(
        refused(
            &with(json!([unsigned, {"type": "text", "text": cut}])),
            Dialect::Anthropic
        )
        .contains("signature")
    );
    let ok = with(json!([full[0].clone(), {"type": "text", "text": cut}]));
    let (blocks, stop, _) = anthropic_accumulate(&events(anthropic(&ok), Dialect::Anthropic));
    assert_eq!(
        blocks[0]["type"], "text",
        "no new thinking, text at index 0"
    );
    assert_eq!(
        format!("{cut}{}", blocks[0]["text"].as_str().unwrap()),
        text
    );
    assert_eq!(blocks[1], full[2], "then the same tool_use");
    assert_eq!(stop, "tool_use");
    // Thinking done, no text yet: the text from its start.
    let (blocks, _, _) = anthropic_accumulate(&events(
        anthropic(&with(json!([full[0].clone()]))),
        Dialect::Anthropic,
    ));
    assert_eq!(blocks[0]["text"].as_str(), Some(text.as_str()));
    // Anthropic's checks on every message: signed thinking in earlier turns
    // too, no empty text blocks.
    let mut earlier = base.clone();
    push(
        &mut earlier,
        json!({"role": "assistant", "content": [forged_block(&full[0]), {"type": "text", "text": cut}]}),
    );
    push(&mut earlier, json!({"role": "user", "content": "go on"}));
    assert!(refused(&earlier, Dialect::Anthropic).contains("signature"));
    assert!(
        refused(
            &with(json!([full[0].clone(), {"type": "text", "text": ""}])),
            Dialect::Anthropic
        )
        .contains("non-empty")
    );
    // A tool_use in the prefill is refused.
    assert!(
        plan::plan(
            &with(json!([full[0].clone(), {"type": "text", "text": text}, full[2].clone()])),
            Dialect::Anthropic
        )
        .is_err()
    );
}

fn forged_block(block: &Value) -> Value {
    let mut b = block.clone();
    b["signature"] = json!("forged");
    b
}

#[test]
fn fail_ids_are_used_once_and_forgotten_in_order() {
    let stats = Stats::default();
    assert!(stats.first_use("a"));
    assert!(!stats.first_use("a"));
    for i in 0..FAIL_IDS_KEPT {
        assert!(stats.first_use(&i.to_string()));
    }
    assert!(
        stats.first_use("a"),
        "forgotten after {FAIL_IDS_KEPT} newer ids"
    );
}

#[test]
fn globs() {
    assert!(plan_glob("claude-*-4-7*", "claude-opus-4-7-20260101"));
    assert!(!plan_glob("claude-*-5*", "claude-3-opus"));
}

fn plan_glob(p: &str, t: &str) -> bool {
    // The no-prefill globs, through the public rule.
    let mut r = body(json!({"model": t, "mock": {"no_prefill": [p], "words": 3}}));
    push(&mut r, json!({"role": "assistant", "content": ""}));
    plan::plan(&r, Dialect::Anthropic).is_err()
}

// ------------------------------------------------------------ over HTTP

/// `GET url`, as JSON.
async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

async fn serve_mock(
    key: Option<&str>,
) -> (
    String,
    tokio_util::sync::CancellationToken,
    tokio_util::task::TaskTracker,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let done = stop.clone();
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(serve(
        listener,
        router(key.map(str::to_owned)),
        async move { done.cancelled().await },
    ));
    (url, stop, tracker)
}

/// The SSE events of a response, and whether its body ended cleanly.
async fn read_events(response: reqwest::Response) -> (Vec<String>, bool) {
    let mut response = response;
    let mut buf = String::new();
    let clean = loop {
        match response.chunk().await {
            Ok(Some(b)) => buf.push_str(&String::from_utf8_lossy(&b)),
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    let events = buf
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    (events, clean)
}

#[tokio::test]
async fn credentials_headers_cuts_errors_and_the_request_log() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    let chat = format!("{url}/v1/chat/completions");
    let messages = format!("{url}/v1/messages");
    let req = body(json!({"mock": {"words": 6}}));

    // OpenAI: Bearer only; Anthropic: x-api-key only, and anthropic-version.
    let r = http.post(&chat).json(&req).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = http
        .post(&chat)
        .header("x-api-key", "k1")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(&messages)
        .bearer_auth("k1")
        .header("anthropic-version", "2023-06-01")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let r = http
        .post(&messages)
        .header("x-api-key", "k1")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version")
    );

    // Provider headers on streams and whole answers.
    let r = http
        .post(&chat)
        .bearer_auth("k1")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for h in [
        "x-request-id",
        "openai-processing-ms",
        "openai-version",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "set-cookie",
    ] {
        assert!(r.headers().contains_key(h), "{h}");
    }
    let (evs, clean) = read_events(r).await;
    assert!(clean && evs.last().is_some_and(|e| e == "data: [DONE]"));
    let mut whole = req.clone();
    whole["stream"] = json!(false);
    let r = http
        .post(&messages)
        .header("x-api-key", "k1")
        .header("anthropic-version", "2023-06-01")
        .json(&whole)
        .send()
        .await
        .unwrap();
    for h in [
        "request-id",
        "anthropic-ratelimit-requests-remaining",
        "set-cookie",
    ] {
        assert!(r.headers().contains_key(h), "{h}");
    }
    let mut limited = req.clone();
    limited["mock"]["status"] = json!(429);
    let r = http
        .post(&chat)
        .bearer_auth("k1")
        .json(&limited)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));

    // A cut with a fail id: the first request only.
    let mut cut = req.clone();
    cut["mock"]["cut_after_events"] = json!(3);
    cut["mock"]["fail_id"] = json!("cell-1");
    let r = http
        .post(&chat)
        .bearer_auth("k1")
        .json(&cut)
        .send()
        .await
        .unwrap();
    let (evs, clean) = read_events(r).await;
    assert!(!clean, "an aborted body");
    assert_eq!(evs.len(), 3);
    let r = http
        .post(&chat)
        .bearer_auth("k1")
        .json(&cut)
        .send()
        .await
        .unwrap();
    let (evs, clean) = read_events(r).await;
    assert!(clean && evs.len() == 9, "{evs:?}");

    // The provider's own mid-stream error, then a clean end.
    let mut err = body(json!({"mock": {"words": 6, "error_after_events": 4}}));
    let r = http
        .post(&messages)
        .header("x-api-key", "k1")
        .header("anthropic-version", "2023-06-01")
        .json(&err)
        .send()
        .await
        .unwrap();
    let (evs, clean) = read_events(r).await;
    assert!(clean);
    assert_eq!(evs.len(), 5);
    assert_eq!(
        evs[4],
        format!("event: error\ndata: {ANTHROPIC_STREAM_ERROR}")
    );
    err["mock"]["error_after_events"] = json!(2);
    let r = http
        .post(&chat)
        .bearer_auth("k1")
        .json(&err)
        .send()
        .await
        .unwrap();
    let (evs, clean) = read_events(r).await;
    assert!(
        clean && evs.len() == 3 && evs[2].contains("server_error"),
        "{evs:?}"
    );

    // What was received, never the key.
    let log: Value = get_json(&http, format!("{url}/mock/requests")).await;
    let log = log.as_array().unwrap();
    assert_eq!(log[0]["has_credential"], false);
    assert_eq!(log[0]["status"], 401);
    assert!(log.iter().all(|e| !e.to_string().contains("k1")));
    let anthropic_ok = log
        .iter()
        .find(|e| e["path"] == "/v1/messages" && e["status"] == 200)
        .unwrap();
    assert_eq!(anthropic_ok["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(anthropic_ok["has_credential"], true);
    let stats: Value = get_json(&http, format!("{url}/mock/stats")).await;
    assert_eq!(stats["requests_unauthorized"], 3);
    assert_eq!(stats["requests_rejected"], 5, "401s, the 400 and the 429");
    let r = http
        .delete(format!("{url}/mock/requests"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let log: Value = get_json(&http, format!("{url}/mock/requests")).await;
    assert_eq!(log, json!([]));
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[test]
fn hostile_knobs_are_checked() {
    for bad in [
        json!("nope"),
        json!(3),
        json!({"kind": "html"}),
        json!(["html"]),
    ] {
        let req = body(json!({"mock": {"hostile": bad}}));
        assert!(
            refused(&req, Dialect::OpenAi).contains("mock.hostile"),
            "{bad}"
        );
    }
    for (i, name) in plan::Hostile::NAMES.iter().enumerate() {
        let req = body(json!({"mock": {"hostile": name, "hostile_events": u64::MAX}}));
        let p = openai(&req);
        assert!(p.delivery.hostile.is_some(), "{name}");
        assert_eq!(p.delivery.hostile_events, Some(u64::MAX));
        // Every name parses to its own variant.
        for other in &plan::Hostile::NAMES[..i] {
            let q = openai(&body(json!({"mock": {"hostile": other}})));
            assert_ne!(q.delivery.hostile, p.delivery.hostile);
        }
    }
    // The request is still checked first: a hostile provider refuses too.
    let req = body(json!({"max_tokens": u64::MAX, "mock": {"hostile": "html"}}));
    assert!(refused(&req, Dialect::OpenAi).contains("too large"));
}

/// Read `response` until `want` shows up or `limit` bytes came; what came.
async fn read_until(response: &mut reqwest::Response, want: &str, limit: usize) -> String {
    let mut seen = Vec::new();
    while seen.len() < limit && !String::from_utf8_lossy(&seen).contains(want) {
        match tokio::time::timeout(Duration::from_secs(5), response.chunk()).await {
            Ok(Ok(Some(b))) => seen.extend_from_slice(&b),
            _ => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

async fn stat(http: &reqwest::Client, url: &str, name: &str) -> u64 {
    let v: Value = get_json(http, format!("{url}/mock/stats")).await;
    v[name].as_u64().unwrap()
}

/// Poll until `name` reaches `want` (at most 5 s).
async fn wait_stat(http: &reqwest::Client, url: &str, name: &str, want: u64) -> u64 {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = stat(http, url, name).await;
        if v >= want || tokio::time::Instant::now() >= until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn hostile_answers_are_strict_bounded_and_stop_when_the_peer_leaves() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let chat = format!("{url}/v1/chat/completions");
    let messages = format!("{url}/v1/messages");
    let post = |mock: Value, stream: bool| {
        let mut req = body(json!({"mock": mock, "stream": stream}));
        req["mock"]["words"] = json!(3);
        http.post(&chat).bearer_auth("k1").json(&req).send()
    };

    // Strict still: no key, no answer, hostile or not.
    let req = body(json!({"mock": {"hostile": "endless_line"}}));
    let r = http.post(&chat).json(&req).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(&messages)
        .header("x-api-key", "k1")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "no anthropic-version");

    // Statuses: any final one hyper can write, else a 400 (never a panic).
    let r = post(json!({"status": 999}), true).await.unwrap();
    assert_eq!(r.status().as_u16(), 999);
    for bad in [
        json!(0),
        json!(100),
        json!(101),
        json!(199),
        json!(1000),
        json!(65535),
        json!(65536),
        json!(u64::MAX),
        json!(-1),
        json!("500"),
    ] {
        let r = post(json!({"status": bad}), false).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }

    let r = post(json!({"hostile": "html"}), true).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(r.text().await.unwrap().contains("<html>"));
    let r = post(json!({"hostile": "redirect"}), false).await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "https://login.example/");
    let r = post(json!({"hostile": "redirect", "status": 308}), false)
        .await
        .unwrap();
    assert_eq!(r.status(), 308);

    // A flood with an end: every copy, then the rest of the answer.
    let r = post(
        json!({"hostile": "endless_stream", "hostile_events": 1000}),
        true,
    )
    .await
    .unwrap();
    let (evs, clean) = read_events(r).await;
    assert!(clean);
    assert_eq!(
        evs.len(),
        1006,
        "role, word, 1000 copies, 2 words, finish, [DONE]"
    );
    assert_eq!(evs[2], evs[1001]);
    assert_eq!(evs.last().unwrap(), "data: [DONE]");
    let mut req =
        body(json!({"mock": {"hostile": "endless_stream", "hostile_events": 7, "words": 2}}));
    req["stream"] = json!(true);
    let r = http
        .post(&messages)
        .header("x-api-key", "k1")
        .header("anthropic-version", "2023-06-01")
        .json(&req)
        .send()
        .await
        .unwrap();
    let (evs, clean) = read_events(r).await;
    assert!(clean);
    let deltas = evs.iter().filter(|e| e.contains("text_delta")).count();
    assert_eq!(deltas, 9, "{evs:?}");
    assert!(evs.last().unwrap().contains("message_stop"));

    // The endless ones: the mock writes on while read, and stops — counted
    // as cancelled — once the reader leaves.
    let cases = [
        (
            json!({"hostile": "endless_line"}),
            true,
            200,
            "xxxx",
            1 << 20,
        ),
        (
            json!({"hostile": "endless_stream", "hostile_events": u64::MAX}),
            true,
            200,
            "logprobs",
            1 << 20,
        ),
        (
            json!({"hostile": "comments_only", "token_interval_ms": 5}),
            true,
            200,
            ": keepalive\n\n: keepalive",
            1 << 16,
        ),
        (
            json!({"hostile": "drip", "token_interval_ms": 5}),
            true,
            200,
            "data: xxx",
            1 << 16,
        ),
        (
            json!({"hostile": "endless_error_body", "status": 503}),
            false,
            503,
            "eeee",
            1 << 20,
        ),
        (
            json!({"hostile": "endless_json"}),
            false,
            200,
            "jjjj",
            1 << 20,
        ),
        // Whatever `stream` says.
        (
            json!({"hostile": "endless_line"}),
            false,
            200,
            "data: xxxx",
            1 << 16,
        ),
    ];
    for (mock, stream, status, want, limit) in cases {
        let cancelled = stat(&http, &url, "requests_cancelled").await;
        let mut r = post(mock.clone(), stream).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{mock}");
        let seen = read_until(&mut r, want, limit).await;
        assert!(
            seen.contains(want),
            "{mock}: {}",
            &seen[..seen.len().min(300)]
        );
        assert!(seen.len() >= want.len(), "{mock}");
        drop(r);
        let now = wait_stat(&http, &url, "requests_cancelled", cancelled + 1).await;
        assert_eq!(
            now,
            cancelled + 1,
            "{mock}: still writing after the peer left"
        );
    }
    let written = stat(&http, &url, "bytes_sent").await;
    let again = stat(&http, &url, "bytes_sent").await;
    assert_eq!(written, again, "nothing is written once every reader left");
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn instance_faults_fail_exactly_their_share_and_can_be_changed_while_running() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    let chat = format!("{url}/v1/chat/completions");
    let messages = format!("{url}/v1/messages");
    let faults = format!("{url}/mock/faults");
    let put = |v: Value| http.put(&faults).json(&v).send();
    assert_eq!(put(json!({"fail_rate": 0.1})).await.unwrap().status(), 200);
    let req = body(json!({"stream": false, "mock": {"words": 2}}));
    let mut failed = Vec::new();
    for i in 0..100 {
        let r = http
            .post(&chat)
            .bearer_auth("k1")
            .json(&req)
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["type"], "server_error", "{v}");
            failed.push(i);
        } else {
            assert_eq!(r.status(), 200);
        }
    }
    assert_eq!(
        failed,
        [9, 19, 29, 39, 49, 59, 69, 79, 89, 99],
        "1 in 10, evenly"
    );
    // A 401 stays a 401: the fault comes after the key.
    let r = http.post(&chat).json(&req).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Down: every request, the models list too, in the provider's shape.
    let r = put(json!({"down": true, "fail_rate": null})).await.unwrap();
    let now: Value = r.json().await.unwrap();
    assert_eq!(
        (now["down"].clone(), now["fail_rate"].clone()),
        (json!(true), Value::Null)
    );
    let r = http
        .post(&messages)
        .header("x-api-key", "k1")
        .header("anthropic-version", "2023-06-01")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "api_error");
    let models = format!("{url}/v1/models");
    let r = http.get(&models).bearer_auth("k1").send().await.unwrap();
    assert_eq!(r.status(), 503);
    // Up again: the models list in both shapes, behind the key.
    put(json!({"down": false})).await.unwrap();
    let r = http.get(&models).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = http
        .get(&models)
        .bearer_auth("k1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
    let v: Value = http
        .get(&models)
        .header("x-api-key", "k1")
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["type"], "model");
    assert_eq!(v["has_more"], false);
    // Bad faults: 400 with a clear message, nothing changed.
    for (bad, says) in [
        (json!({"fail_rate": 1.5}), "from 0 to 1"),
        (json!({"surprise": 1}), "not a fault"),
        (json!([1]), "JSON object"),
    ] {
        let r = put(bad).await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.text().await.unwrap().contains(says));
    }
    let r = http.put(&faults).body("{").send().await.unwrap();
    assert_eq!(r.status(), 400);
    // die_after cuts a stream mid-way; the counters say what happened.
    put(json!({"die_after": 3})).await.unwrap();
    let r = http
        .post(&chat)
        .bearer_auth("k1")
        .json(&body(json!({"mock": {"words": 10}})))
        .send()
        .await
        .unwrap();
    let (events, _) = read_events(r).await;
    assert!(!events.iter().any(|e| e.contains("[DONE]")), "{events:?}");
    let stats: Value = get_json(&http, format!("{url}/mock/stats")).await;
    assert_eq!(stats["requests_failed"], 12);
    assert_eq!(stats["models_requests"], 4);
    assert_eq!(get_json(&http, &faults).await["die_after"], 3);
    stop.cancel();
    tracker.close();
}
