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

// ------------------------------------------------------- Responses API

const PROMPT: &str = "alpha beta gamma delta epsilon zeta eta theta iota kappa";

/// A `POST /v1/responses` body: the chat tests' conversation, streamed.
fn responses_body(extra: Value) -> Value {
    let mut b = json!({"model": "m", "input": PROMPT, "stream": true});
    if let (Some(b), Some(extra)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            b.insert(k.clone(), v.clone());
        }
    }
    b
}

/// The events of a Responses stream, each checked to be `event: <type>`
/// with a `data` of the same `type`.
fn parse_responses(blocks: &[String]) -> Vec<(String, Value)> {
    blocks
        .iter()
        .map(|block| {
            let (head, data) = block.split_once('\n').unwrap();
            let name = head.strip_prefix("event: ").unwrap();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name, "{block}");
            (name.to_owned(), data)
        })
        .collect()
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

/// Sequence numbers count from 0 by 1, with no `[DONE]`.
fn assert_numbered(events: &[(String, Value)]) {
    for (i, (_, v)) in events.iter().enumerate() {
        assert_eq!(v["sequence_number"], i as u64, "{v}");
    }
}

/// What openai-python's `ResponseStreamState` makes of a stream, checked
/// by its rules (`response.created` first, one response id, an item added
/// before any content event of its output index, no output index twice,
/// every added item done with the same id before the end), and stricter:
/// every `done` agrees with the deltas. The final Response object.
fn responses_accumulate(events: &[(String, Value)]) -> Value {
    /// The added item a content event is about (its id checked).
    fn item_at<'a>(items: &'a mut BTreeMap<u64, Value>, v: &Value) -> &'a mut Value {
        let item = items
            .get_mut(&v["output_index"].as_u64().unwrap())
            .expect("the item is added before its content");
        assert_eq!(item["id"], v["item_id"], "{v}");
        item
    }
    assert_eq!(events[0].0, "response.created");
    let id = events[0].1["response"]["id"].clone();
    assert!(id.as_str().unwrap().starts_with("resp_"), "{id}");
    let mut items: BTreeMap<u64, Value> = BTreeMap::new();
    let mut done: BTreeMap<u64, Value> = BTreeMap::new();
    let mut last = None;
    for (name, v) in events {
        assert!(last.is_none(), "an event after the end: {v}");
        let k = v["output_index"].as_u64();
        let append = |slot: &mut Value, piece: &Value| {
            *slot = json!(format!(
                "{}{}",
                slot.as_str().unwrap(),
                piece.as_str().unwrap()
            ));
        };
        match name.as_str() {
            "response.created" | "response.queued" | "response.in_progress" => {
                assert_eq!(v["response"]["id"], id);
                assert_eq!(v["response"]["output"], json!([]));
                assert!(v["response"]["usage"].is_null());
            }
            "response.completed" | "response.incomplete" => {
                assert_eq!(v["response"]["id"], id);
                for (k, added) in &items {
                    let finished = done.get(k).expect("every added item is done");
                    assert_eq!(finished["id"], added["id"]);
                }
                let output: Vec<Value> = done.values().cloned().collect();
                assert_eq!(v["response"]["output"], json!(output));
                last = Some(v["response"].clone());
            }
            "response.output_item.added" => {
                let k = k.unwrap();
                assert_eq!(k as usize, items.len(), "output indices count from 0");
                assert!(items.insert(k, v["item"].clone()).is_none());
            }
            "response.content_part.added" => {
                let item = item_at(&mut items, v);
                assert_eq!(item["type"], "message");
                assert_eq!(
                    v["part"],
                    json!({"type": "output_text", "text": "", "annotations": []})
                );
                item["content"]
                    .as_array_mut()
                    .unwrap()
                    .push(v["part"].clone());
            }
            "response.output_text.delta" => {
                assert_eq!(v["logprobs"], json!([]));
                let i = v["content_index"].as_u64().unwrap() as usize;
                append(
                    &mut item_at(&mut items, v)["content"][i]["text"],
                    &v["delta"],
                );
            }
            "response.output_text.done" => {
                let i = v["content_index"].as_u64().unwrap() as usize;
                assert_eq!(item_at(&mut items, v)["content"][i]["text"], v["text"]);
            }
            "response.content_part.done" => {
                let i = v["content_index"].as_u64().unwrap() as usize;
                assert_eq!(item_at(&mut items, v)["content"][i], v["part"]);
            }
            "response.reasoning_summary_part.added" => {
                let item = item_at(&mut items, v);
                assert_eq!(item["type"], "reasoning");
                assert_eq!(v["part"], json!({"type": "summary_text", "text": ""}));
                item["summary"]
                    .as_array_mut()
                    .unwrap()
                    .push(v["part"].clone());
            }
            "response.reasoning_summary_text.delta" => {
                let i = v["summary_index"].as_u64().unwrap() as usize;
                append(
                    &mut item_at(&mut items, v)["summary"][i]["text"],
                    &v["delta"],
                );
            }
            "response.reasoning_summary_text.done" => {
                let i = v["summary_index"].as_u64().unwrap() as usize;
                assert_eq!(item_at(&mut items, v)["summary"][i]["text"], v["text"]);
            }
            "response.reasoning_summary_part.done" => {
                let i = v["summary_index"].as_u64().unwrap() as usize;
                assert_eq!(
                    item_at(&mut items, v)["summary"][i]["text"],
                    v["part"]["text"]
                );
            }
            "response.function_call_arguments.delta" => {
                let item = item_at(&mut items, v);
                assert_eq!(item["type"], "function_call");
                append(&mut item["arguments"], &v["delta"]);
            }
            "response.function_call_arguments.done" => {
                let item = item_at(&mut items, v);
                assert_eq!(item["arguments"], v["arguments"]);
                assert_eq!(item["name"], v["name"]);
            }
            "response.output_item.done" => {
                let k = k.unwrap();
                let added = items.get(&k).expect("done after added");
                assert_eq!(added["id"], v["item"]["id"]);
                match added["type"].as_str() {
                    Some("message") => assert_eq!(added["content"], v["item"]["content"]),
                    Some("reasoning") => assert_eq!(added["summary"], v["item"]["summary"]),
                    _ => assert_eq!(added["arguments"], v["item"]["arguments"]),
                }
                assert!(done.insert(k, v["item"].clone()).is_none());
            }
            other => panic!("event {other}"),
        }
    }
    last.expect("response.completed or response.incomplete")
}

/// The text of a Response object's message items.
fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "message")
        .map(|i| i["content"][0]["text"].as_str().unwrap().to_owned())
        .collect()
}

async fn post_responses(http: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    http.post(format!("{url}/v1/responses"))
        .bearer_auth("k1")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A Responses stream read to its end: its events, checked.
async fn responses_stream(http: &reqwest::Client, url: &str, body: &Value) -> Vec<(String, Value)> {
    let r = post_responses(http, url, body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let (blocks, clean) = read_events(r).await;
    assert!(clean && !blocks.iter().any(|b| b.contains("[DONE]")));
    let events = parse_responses(&blocks);
    assert_numbered(&events);
    events
}

async fn chat_whole(http: &reqwest::Client, url: &str, extra: Value) -> Value {
    let mut req = body(extra);
    req["stream"] = json!(false);
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("k1")
        .json(&req)
        .send()
        .await
        .unwrap();
    r.json::<Value>().await.unwrap()["choices"][0]["message"].clone()
}

fn deltas(events: &[(String, Value)], name: &str) -> usize {
    events.iter().filter(|(n, _)| n == name).count()
}

#[tokio::test]
async fn responses_text_stream_is_in_order_numbered_and_the_chat_answer() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    let events =
        responses_stream(&http, &url, &responses_body(json!({"mock": {"words": 5}}))).await;
    let mut want = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    want.extend(["response.output_text.delta"; 5]);
    want.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names(&events), want);
    let created = &events[0].1["response"];
    for (key, value) in [
        ("object", json!("response")),
        ("status", json!("in_progress")),
        ("model", json!("m")),
        ("output", json!([])),
        ("usage", Value::Null),
        ("error", Value::Null),
        ("incomplete_details", Value::Null),
        ("instructions", Value::Null),
        ("max_output_tokens", Value::Null),
        ("metadata", json!({})),
        ("parallel_tool_calls", json!(true)),
        ("tool_choice", json!("auto")),
        ("tools", json!([])),
        ("text", json!({"format": {"type": "text"}})),
        ("reasoning", json!({"effort": null, "summary": null})),
        ("store", json!(true)),
        ("background", json!(false)),
    ] {
        assert_eq!(created[key], value, "{key}");
    }
    assert!(created["created_at"].as_u64().unwrap() > 1_700_000_000);
    assert!(created.get("temperature").is_some() && created.get("top_p").is_some());
    let added = &events[2].1;
    assert_eq!(added["output_index"], 0);
    let item_id = added["item"]["id"].as_str().unwrap();
    assert!(item_id.starts_with("msg_"), "{item_id}");
    assert_eq!(
        added["item"],
        json!({"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []})
    );
    let finished = responses_accumulate(&events);
    assert_eq!(finished["status"], "completed");
    assert_eq!(finished["output"][0]["status"], "completed");
    assert_eq!(
        finished["usage"],
        json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15})
    );
    // The same conversation has the same words on the chat API …
    let text = output_text(&finished);
    let chat = chat_whole(&http, &url, json!({"mock": {"words": 5}})).await;
    assert_eq!(chat["content"].as_str(), Some(text.as_str()));
    // … and the whole answer is the stream's last Response object.
    let r = post_responses(
        &http,
        &url,
        &responses_body(json!({"stream": false, "mock": {"words": 5}})),
    )
    .await;
    let whole: Value = r.json().await.unwrap();
    assert_eq!(whole["status"], "completed");
    assert_eq!(output_text(&whole), text);
    assert_eq!(whole["usage"], finished["usage"]);
    assert_ne!(whole["id"], finished["id"], "every response its own id");
    // `instructions` is part of the conversation, like a system message.
    let told = responses_stream(
        &http,
        &url,
        &responses_body(json!({"instructions": "omega psi", "mock": {"words": 5}})),
    )
    .await;
    let told = responses_accumulate(&told);
    assert_eq!(told["instructions"], "omega psi");
    let mut with_system = body(json!({"mock": {"words": 5}, "stream": false}));
    with_system["messages"] =
        json!([{"role": "system", "content": "omega psi"}, {"role": "user", "content": PROMPT}]);
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("k1")
        .json(&with_system)
        .send()
        .await
        .unwrap();
    let chat: Value = r.json().await.unwrap();
    assert_eq!(
        chat["choices"][0]["message"]["content"].as_str(),
        Some(output_text(&told).as_str())
    );
    // The request log names the path.
    let log = get_json(&http, format!("{url}/mock/requests")).await;
    assert_eq!(log[0]["path"], "/v1/responses");
    assert_eq!(log[0]["status"], 200);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn responses_reasoning_and_tool_call_streams() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    // The request's `reasoning.summary` asks for a reasoning summary.
    let req = responses_body(
        json!({"reasoning": {"effort": "low", "summary": "auto"}, "mock": {"words": 3}}),
    );
    let events = responses_stream(&http, &url, &req).await;
    let mut want = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
    ];
    want.extend(["response.reasoning_summary_text.delta"; 6]);
    want.extend([
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
    ]);
    want.extend(["response.output_text.delta"; 3]);
    want.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names(&events), want);
    let rs = &events[2].1["item"];
    assert!(rs["id"].as_str().unwrap().starts_with("rs_"));
    assert_eq!(
        rs,
        &json!({"id": rs["id"], "type": "reasoning", "summary": []})
    );
    for (_, v) in &events[3..12] {
        assert_eq!(
            (&v["output_index"], &v["summary_index"]),
            (&json!(0), &json!(0))
        );
    }
    assert_eq!(events[16].1["output_index"], 1, "the message is item 1");
    let finished = responses_accumulate(&events);
    assert_eq!(
        finished["reasoning"],
        json!({"effort": "low", "summary": "auto"})
    );
    assert_eq!(
        finished["usage"]["output_tokens_details"]["reasoning_tokens"],
        6
    );
    assert_eq!(finished["usage"]["output_tokens"], 9);
    let summary = finished["output"][0]["summary"][0]["text"]
        .as_str()
        .unwrap();
    let chat = chat_whole(
        &http,
        &url,
        json!({"mock": {"words": 3, "shape": "reasoning"}}),
    )
    .await;
    assert_eq!(chat["reasoning_content"].as_str(), Some(summary));
    assert_eq!(
        chat["content"].as_str(),
        Some(output_text(&finished).as_str())
    );
    // The mock's own knob gives the same.
    let knob = responses_stream(
        &http,
        &url,
        &responses_body(json!({"mock": {"words": 3, "shape": "reasoning"}})),
    )
    .await;
    assert_eq!(
        responses_accumulate(&knob)["output"][0]["summary"],
        finished["output"][0]["summary"]
    );

    // Two calls after the text, each its own item, arguments in fragments.
    let tools = json!([{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]);
    let req = responses_body(json!({"tools": tools, "mock": {"shape": "parallel_tools"}}));
    let events = responses_stream(&http, &url, &req).await;
    let mut want = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    want.extend(["response.output_text.delta"; 3]);
    want.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]);
    for _ in 0..2 {
        want.push("response.output_item.added");
        want.extend(["response.function_call_arguments.delta"; 5]);
        want.extend([
            "response.function_call_arguments.done",
            "response.output_item.done",
        ]);
    }
    want.push("response.completed");
    assert_eq!(names(&events), want);
    let fc = &events[10].1["item"];
    assert!(fc["id"].as_str().unwrap().starts_with("fc_"));
    assert_eq!(
        fc,
        &json!({"id": fc["id"], "type": "function_call", "status": "in_progress", "call_id": fc["call_id"], "name": "lookup", "arguments": ""})
    );
    let finished = responses_accumulate(&events);
    assert_eq!(finished["tools"][0]["name"], "lookup");
    let chat = chat_whole(
        &http,
        &url,
        json!({"mock": {"shape": "parallel_tools"}, "tools": super::tests::tools()}),
    )
    .await;
    for (k, call) in finished["output"].as_array().unwrap()[1..]
        .iter()
        .enumerate()
    {
        assert_eq!(call["status"], "completed");
        assert_eq!(call["call_id"], chat["tool_calls"][k]["id"]);
        assert_eq!(
            call["arguments"],
            chat["tool_calls"][k]["function"]["arguments"]
        );
        let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(words(args["query"].as_str().unwrap()).len(), 3);
    }
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn responses_refuse_what_openai_refuses() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    let user = |text: &str| json!({"role": "user", "content": text});
    let call =
        json!({"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"});
    let cases = [
        (
            json!({"messages": [user("hi")]}),
            "unknown_parameter",
            "messages",
            "Unknown parameter: 'messages'.",
        ),
        (
            json!({"max_tokens": 100}),
            "unknown_parameter",
            "max_tokens",
            "Unknown parameter: 'max_tokens'.",
        ),
        (
            json!({"max_completion_tokens": 100}),
            "unknown_parameter",
            "max_completion_tokens",
            "",
        ),
        (json!({"n": 2}), "unknown_parameter", "n", ""),
        (
            json!({"continue_final_message": true}),
            "unknown_parameter",
            "continue_final_message",
            "",
        ),
        (
            json!({"add_generation_prompt": false}),
            "unknown_parameter",
            "add_generation_prompt",
            "",
        ),
        (
            json!({"tools": tools()}),
            "missing_required_parameter",
            "tools[0].name",
            "Missing required parameter: 'tools[0].name'.",
        ),
        (
            json!({"tools": [{"type": "function", "name": "lookup", "function": {}}]}),
            "unknown_parameter",
            "tools[0].function",
            "",
        ),
        (
            json!({"max_output_tokens": 8}),
            "integer_below_min_value",
            "max_output_tokens",
            "Expected a value >= 16, but got 8 instead.",
        ),
        (
            json!({"max_output_tokens": 16.5}),
            "invalid_type",
            "max_output_tokens",
            "",
        ),
        (json!({"model": ""}), "empty_string", "model", ""),
        (
            json!({"model": 3}),
            "invalid_type",
            "model",
            "expected a string, but got an integer instead",
        ),
        (json!({"input": ""}), "empty_string", "input", ""),
        (json!({"input": []}), "empty_array", "input", ""),
        (
            json!({"input": [{"type": "image", "url": "x"}]}),
            "invalid_value",
            "input[0].type",
            "Invalid value: 'image'.",
        ),
        (
            json!({"input": [{"role": "tool", "content": "x"}]}),
            "invalid_value",
            "input[0].role",
            "",
        ),
        (
            json!({"input": [{"role": "user", "content": "x", "name": "bob"}]}),
            "unknown_parameter",
            "input[0].name",
            "",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]}),
            "invalid_value",
            "input[0].content[0]",
            "Supported values are: 'input_text'.",
        ),
        (
            json!({"input": [{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}]}),
            "invalid_value",
            "input[0].content[0]",
            "Supported values are: 'output_text' and 'refusal'.",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}),
            "missing_required_parameter",
            "input[0].content[0].text",
            "",
        ),
        (
            json!({"input": [user("hi"), {"type": "function_call_output", "call_id": "call_9", "output": "x"}]}),
            "",
            "input",
            "No tool call found for function call output with call_id call_9.",
        ),
        (
            json!({"input": [user("hi"), call.clone()]}),
            "",
            "input",
            "No tool output found for function call call_1.",
        ),
        (
            json!({"input": [user("hi"), {"type": "reasoning", "summary": []}]}),
            "missing_required_parameter",
            "input[1].id",
            "",
        ),
        (
            json!({"previous_response_id": "resp_1"}),
            "previous_response_not_found",
            "previous_response_id",
            "Previous response with id 'resp_1' not found.",
        ),
        (
            json!({"background": true, "store": false}),
            "invalid_value",
            "store",
            "",
        ),
        (
            json!({"temperature": 3}),
            "decimal_above_max_value",
            "temperature",
            "",
        ),
        (
            json!({"reasoning": {"summary": "long"}}),
            "invalid_value",
            "reasoning.summary",
            "",
        ),
        (
            json!({"tool_choice": "sometimes"}),
            "invalid_value",
            "tool_choice",
            "",
        ),
        (json!({"stream": "yes"}), "invalid_type", "stream", ""),
    ];
    for (extra, code, param, says) in cases {
        let mut req = responses_body(json!({}));
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let r = post_responses(&http, &url, &req).await;
        assert_eq!(r.status(), 400, "{extra}");
        let v: Value = r.json().await.unwrap();
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        let want_code = if code.is_empty() {
            Value::Null
        } else {
            json!(code)
        };
        assert_eq!(
            (&e["code"], &e["param"]),
            (&want_code, &json!(param)),
            "{extra}: {v}"
        );
        assert!(e["message"].as_str().unwrap().contains(says), "{v}");
    }
    // Missing parameters.
    for name in ["model", "input"] {
        let mut req = responses_body(json!({}));
        req.as_object_mut().unwrap().remove(name);
        let v: Value = post_responses(&http, &url, &req)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["error"]["code"], "missing_required_parameter");
        assert_eq!(v["error"]["param"], name);
    }
    // What the real API takes: the items a client sends back.
    let history = json!([
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "be brief"}]},
        user("hi"),
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hmm"}]},
        {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": "let me look", "annotations": []}]},
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": "found it"},
    ]);
    let tools = json!([{"type": "function", "name": "lookup", "parameters": {"type": "object"}, "strict": false, "description": "d"}]);
    let req = responses_body(
        json!({"input": history, "tools": tools, "stream": false, "metadata": {"k": "v"}, "max_output_tokens": 16, "tool_choice": "auto", "store": true, "include": [], "truncation": "auto", "user": "u"}),
    );
    let r = post_responses(&http, &url, &req).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["metadata"], json!({"k": "v"}));
    assert_eq!(v["tools"][0]["strict"], false);
    // The key, as on the chat API; the mock's own knobs unchanged.
    let r = http
        .post(format!("{url}/v1/responses"))
        .json(&responses_body(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = post_responses(
        &http,
        &url,
        &responses_body(json!({"mock": {"status": 429}})),
    )
    .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let r = post_responses(
        &http,
        &url,
        &responses_body(json!({"mock": {"shape": "thinking"}})),
    )
    .await;
    assert_eq!(r.status(), 400);
    let stats = get_json(&http, format!("{url}/mock/stats")).await;
    assert_eq!(stats["requests_unauthorized"], 1);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

async fn responses_whole(http: &reqwest::Client, url: &str, extra: Value) -> Value {
    let mut req = responses_body(extra);
    req["stream"] = json!(false);
    let r = post_responses(http, url, &req).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn responses_instruct_reask_continues_exactly() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    let full = output_text(&responses_whole(&http, &url, json!({"mock": {"words": 10}})).await);
    let w = words(&full);
    let again = json!({"role": "user", "content": "Continue exactly where you stopped."});
    let reask = |partial: &str| {
        json!([
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": [{"type": "output_text", "text": partial, "annotations": []}]},
            again.clone(),
        ])
    };
    // The gateway's re-ask: the partial's last word said again, then the rest.
    let partial = w[..4].join(" ");
    let rest = output_text(
        &responses_whole(
            &http,
            &url,
            json!({"input": reask(&partial), "mock": {"words": 10}}),
        )
        .await,
    );
    assert_eq!(
        rest,
        w[3..].join(" "),
        "starts with a repeat of the last word"
    );
    assert_eq!(format!("{} {rest}", w[..3].join(" ")), full);
    // Streamed, the deltas say the same.
    let events = responses_stream(
        &http,
        &url,
        &responses_body(json!({"input": reask(&partial), "mock": {"words": 10}})),
    )
    .await;
    assert_eq!(output_text(&responses_accumulate(&events)), rest);
    // A partial cut inside a word: that word whole, then the rest.
    let cut = &full[..partial.len() + 2];
    let rest = output_text(
        &responses_whole(
            &http,
            &url,
            json!({"input": reask(cut), "mock": {"words": 10}}),
        )
        .await,
    );
    let (kept, _) = cut.rsplit_once(' ').unwrap();
    assert_eq!(format!("{kept} {rest}"), full);
    // As on the chat API, the same re-ask.
    let mut chat = body(json!({"mock": {"words": 10}, "stream": false}));
    push(&mut chat, json!({"role": "assistant", "content": cut}));
    push(&mut chat, again.clone());
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("k1")
        .json(&chat)
        .send()
        .await
        .unwrap();
    let chat: Value = r.json().await.unwrap();
    assert_eq!(
        chat["choices"][0]["message"]["content"].as_str(),
        Some(rest.as_str())
    );
    // A trailing assistant message alone is history, not a prefill.
    let history = json!([
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": partial},
    ]);
    let fresh = output_text(
        &responses_whole(
            &http,
            &url,
            json!({"input": history, "mock": {"words": 10}}),
        )
        .await,
    );
    assert_ne!(fresh, full[partial.len()..].trim_start());
    assert_eq!(words(&fresh).len(), 10);
    // With reasoning, the re-ask thinks again before the rest.
    let reasoning = json!({"words": 10, "shape": "reasoning"});
    let first = responses_whole(&http, &url, json!({"mock": reasoning})).await;
    let w = words(&output_text(&first))
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    let again = responses_whole(
        &http,
        &url,
        json!({"input": reask(&w[..5].join(" ")), "mock": reasoning}),
    )
    .await;
    assert_eq!(again["output"][0]["type"], "reasoning");
    assert_ne!(again["output"][0]["summary"], first["output"][0]["summary"]);
    assert_eq!(output_text(&again), w[4..].join(" "));
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// With no `words` knob, the answer's length is its budget: a re-ask with
/// the budget lowered by what was said (plus the word said again) is the
/// rest of the same answer, not a shorter one.
#[tokio::test]
async fn responses_instruct_reask_within_the_lowered_budget_is_the_rest_of_the_answer() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    let full = output_text(&responses_whole(&http, &url, json!({"max_output_tokens": 40})).await);
    let w = words(&full);
    assert_eq!(w.len(), 40);
    let input = json!([
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": w[..6].join(" ")},
        {"role": "user", "content": "Continue exactly where you stopped."},
    ]);
    let again = responses_whole(
        &http,
        &url,
        json!({"input": input, "max_output_tokens": 35}),
    )
    .await;
    assert_eq!(again["status"], "completed", "within its budget: {again}");
    assert_eq!(output_text(&again), w[5..].join(" "));
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn responses_max_output_tokens_cut_is_incomplete() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    let req = responses_body(json!({"max_output_tokens": 16, "mock": {"words": 40}}));
    let events = responses_stream(&http, &url, &req).await;
    assert_eq!(deltas(&events, "response.output_text.delta"), 16);
    assert_eq!(events.last().unwrap().0, "response.incomplete");
    assert_eq!(deltas(&events, "response.completed"), 0);
    let finished = responses_accumulate(&events);
    assert_eq!(finished["status"], "incomplete");
    assert_eq!(
        finished["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(finished["max_output_tokens"], 16);
    assert_eq!(finished["output"][0]["status"], "incomplete");
    assert_eq!(finished["usage"]["output_tokens"], 16);
    let whole = responses_whole(
        &http,
        &url,
        json!({"max_output_tokens": 16, "mock": {"words": 40}}),
    )
    .await;
    assert_eq!(whole["status"], "incomplete");
    assert_eq!(output_text(&whole), output_text(&finished));
    // A cut reasoning summary is incomplete too.
    let req = responses_body(
        json!({"max_output_tokens": 16, "mock": {"shape": "reasoning", "reasoning_words": 30}}),
    );
    let events = responses_stream(&http, &url, &req).await;
    let finished = responses_accumulate(&events);
    assert_eq!(finished["output"].as_array().unwrap().len(), 1);
    assert_eq!(finished["output"][0]["status"], "incomplete");
    assert_eq!(
        finished["usage"]["output_tokens_details"]["reasoning_tokens"],
        16
    );
    // Without `words`, the answer fills the budget and is complete.
    let whole = responses_whole(&http, &url, json!({"max_output_tokens": 20})).await;
    assert_eq!(whole["status"], "completed");
    assert_eq!(words(&output_text(&whole)).len(), 20);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// The complete events of a stream read until it holds at least `n`
/// (the response is dropped after: the client leaves).
async fn first_events(mut response: reqwest::Response, n: usize) -> Vec<String> {
    let mut buf = String::new();
    while buf.matches("\n\n").count() < n {
        match response.chunk().await {
            Ok(Some(b)) => buf.push_str(&String::from_utf8_lossy(&b)),
            _ => break,
        }
    }
    let complete = &buf[..buf.rfind("\n\n").map_or(0, |i| i + 2)];
    complete
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn get_response(http: &reqwest::Client, url: &str, path: &str) -> reqwest::Response {
    http.get(format!("{url}/v1/responses/{path}"))
        .bearer_auth("k1")
        .send()
        .await
        .unwrap()
}

/// Poll `GET /v1/responses/{id}` until its status is `want` (at most 5 s).
async fn wait_status(http: &reqwest::Client, url: &str, id: &str, want: &str) -> Value {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v: Value = get_response(http, url, id).await.json().await.unwrap();
        if v["status"] == want || tokio::time::Instant::now() >= until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn responses_background_poll_reattach_and_cancel() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    // Create: queued at once, then polled to completed with the answer.
    let knobs = json!({"words": 8, "token_interval_ms": 5});
    let queued = responses_whole(&http, &url, json!({"background": true, "mock": knobs})).await;
    assert_eq!(
        (&queued["status"], &queued["background"]),
        (&json!("queued"), &json!(true))
    );
    assert_eq!(queued["output"], json!([]));
    let id = queued["id"].as_str().unwrap();
    let done = wait_status(&http, &url, id, "completed").await;
    assert_eq!(done["status"], "completed");
    let plain = responses_whole(&http, &url, json!({"mock": knobs})).await;
    assert_eq!(output_text(&done), output_text(&plain));
    assert_eq!(done["usage"], plain["usage"]);

    // Streamed, then the client leaves: the generation goes on, and a
    // re-attach after the last event seen gets exactly the rest.
    let req =
        responses_body(json!({"background": true, "mock": {"words": 12, "token_interval_ms": 20}}));
    let seen = first_events(post_responses(&http, &url, &req).await, 6).await;
    let seen = parse_responses(&seen);
    assert_eq!(
        names(&seen)[..4],
        [
            "response.created",
            "response.queued",
            "response.in_progress",
            "response.output_item.added"
        ]
    );
    assert_eq!(seen[0].1["response"]["status"], "queued");
    assert_eq!(seen[2].1["response"]["status"], "in_progress");
    let id = seen[0].1["response"]["id"].as_str().unwrap().to_owned();
    let last = seen.last().unwrap().1["sequence_number"].as_u64().unwrap();
    let running: Value = get_response(&http, &url, &id).await.json().await.unwrap();
    assert_eq!(running["status"], "in_progress");
    let r = get_response(
        &http,
        &url,
        &format!("{id}?stream=true&starting_after={last}"),
    )
    .await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let (rest, clean) = read_events(r).await;
    assert!(clean);
    let rest = parse_responses(&rest);
    assert_eq!(rest[0].1["sequence_number"], last + 1);
    let mut all = seen.clone();
    all.extend(rest);
    assert_numbered(&all);
    let finished = responses_accumulate(&all);
    assert_eq!(finished["status"], "completed");
    // The whole stream replayed is the same events, byte for byte.
    let (replay, _) =
        read_events(get_response(&http, &url, &format!("{id}?stream=true")).await).await;
    assert_eq!(parse_responses(&replay), all);
    let stored: Value = get_response(&http, &url, &id).await.json().await.unwrap();
    assert_eq!(stored, finished);
    let stats = get_json(&http, format!("{url}/mock/stats")).await;
    assert_eq!(stats["requests_cancelled"], 0, "leaving does not cancel it");

    // A connection cut mid-stream: the rest is still there.
    let req =
        responses_body(json!({"background": true, "mock": {"words": 6, "cut_after_events": 5}}));
    let (cut, clean) = read_events(post_responses(&http, &url, &req).await).await;
    assert!(!clean && cut.len() == 5, "{cut:?}");
    let cut = parse_responses(&cut);
    let id = cut[0].1["response"]["id"].as_str().unwrap().to_owned();
    let (rest, clean) =
        read_events(get_response(&http, &url, &format!("{id}?stream=true&starting_after=4")).await)
            .await;
    assert!(clean);
    let mut all = cut;
    all.extend(parse_responses(&rest));
    assert_numbered(&all);
    assert_eq!(responses_accumulate(&all)["status"], "completed");

    // Refusals: a bad `starting_after`, streaming a non-background
    // response, an unknown id, cancelling a non-background one.
    let r = get_response(&http, &url, &format!("{id}?stream=true&starting_after=x")).await;
    assert_eq!(r.status(), 400);
    let plain_id = plain["id"].as_str().unwrap();
    let r = get_response(&http, &url, &format!("{plain_id}?stream=true")).await;
    assert_eq!(r.status(), 400);
    let r = get_response(&http, &url, "resp_nope").await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["error"]["message"],
        "No response found with id 'resp_nope'."
    );
    let cancel = |id: &str| {
        http.post(format!("{url}/v1/responses/{id}/cancel"))
            .bearer_auth("k1")
            .send()
    };
    let r = cancel(plain_id).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["error"]["message"],
        "Only background responses can be cancelled."
    );
    let r = http
        .get(format!("{url}/v1/responses/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the key, as on create");

    // Cancel: the generation stops at once, and is counted.
    let slow = json!({"background": true, "mock": {"words": 1000, "token_interval_ms": 10}});
    let queued = responses_whole(&http, &url, slow).await;
    let id = queued["id"].as_str().unwrap();
    wait_status(&http, &url, id, "in_progress").await;
    let started = wait_stat(
        &http,
        &url,
        "tokens_sent",
        stat(&http, &url, "tokens_sent").await + 3,
    )
    .await;
    let r = cancel(id).await.unwrap();
    assert_eq!(r.status(), 200);
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let tokens = stat(&http, &url, "tokens_sent").await;
    assert!(tokens >= started);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        stat(&http, &url, "tokens_sent").await,
        tokens,
        "no more units"
    );
    assert_eq!(stat(&http, &url, "requests_cancelled").await, 1);
    let (replay, clean) =
        read_events(get_response(&http, &url, &format!("{id}?stream=true")).await).await;
    assert!(clean, "a re-attach to a cancelled response ends");
    assert!(!replay.iter().any(|e| e.contains("response.completed")));
    let again: Value = cancel(id).await.unwrap().json().await.unwrap();
    assert_eq!(again["status"], "cancelled");
    let finished_id = all[0].1["response"]["id"].as_str().unwrap().to_owned();
    let unchanged: Value = cancel(&finished_id).await.unwrap().json().await.unwrap();
    assert_eq!(
        unchanged["status"], "completed",
        "a finished one is answered as it is"
    );
    assert_eq!(stat(&http, &url, "requests_cancelled").await, 1);

    // A non-background stream whose client leaves is dropped, as on chat.
    let req = responses_body(json!({"mock": {"words": 100, "token_interval_ms": 20}}));
    let seen = parse_responses(&first_events(post_responses(&http, &url, &req).await, 6).await);
    let id = seen[0].1["response"]["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_stat(&http, &url, "requests_cancelled", 2).await, 2);
    let dropped: Value = get_response(&http, &url, &id).await.json().await.unwrap();
    assert_eq!(dropped["status"], "cancelled");
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn responses_faults_mid_stream() {
    let (url, stop, tracker) = serve_mock(Some("k1")).await;
    let http = reqwest::Client::new();
    // The provider's own error: `event: error`, numbered, then the end.
    let req = responses_body(json!({"mock": {"words": 6, "error_after_events": 5}}));
    let r = post_responses(&http, &url, &req).await;
    let (blocks, clean) = read_events(r).await;
    assert!(clean && blocks.len() == 6, "{blocks:?}");
    let events = parse_responses(&blocks);
    assert_numbered(&events);
    assert_eq!(
        events[5].1,
        json!({"type": "error", "code": "server_error", "message": "The server had an error while processing your request.", "param": null, "sequence_number": 5})
    );
    let id = events[0].1["response"]["id"].as_str().unwrap().to_owned();
    let stored: Value = get_response(&http, &url, &id).await.json().await.unwrap();
    assert_eq!(stored["status"], "failed");
    assert_eq!(stored["error"]["code"], "server_error");
    // In background mode the failure is the response's: kept, replayed.
    let mut req = req.clone();
    req["background"] = json!(true);
    req["mock"]["error_after_events"] = json!(7);
    let (blocks, clean) = read_events(post_responses(&http, &url, &req).await).await;
    assert!(
        clean && blocks.len() == 8 && blocks[7].starts_with("event: error\n"),
        "{blocks:?}"
    );
    let id = parse_responses(&blocks)[0].1["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = wait_status(&http, &url, &id, "failed").await;
    assert_eq!(failed["status"], "failed");
    let (replay, _) =
        read_events(get_response(&http, &url, &format!("{id}?stream=true&starting_after=6")).await)
            .await;
    assert_eq!(replay, blocks[7..]);
    // `fail_after`: cut once the answer holds that many units (deltas).
    let req = responses_body(json!({"mock": {"words": 6, "fail_after": 3}}));
    let (blocks, clean) = read_events(post_responses(&http, &url, &req).await).await;
    assert!(!clean);
    assert_eq!(
        deltas(&parse_responses(&blocks), "response.output_text.delta"),
        3
    );
    // `cut_after_events` with a fail id: the first request only.
    let req =
        responses_body(json!({"mock": {"words": 6, "cut_after_events": 3, "fail_id": "r-1"}}));
    let (blocks, clean) = read_events(post_responses(&http, &url, &req).await).await;
    assert!(!clean && blocks.len() == 3);
    let (blocks, clean) = read_events(post_responses(&http, &url, &req).await).await;
    assert!(clean && blocks.len() == 14, "{}", blocks.len());
    // The instance's faults: `--die-after` cuts every stream, re-attaches too.
    http.put(format!("{url}/mock/faults"))
        .json(&json!({"die_after": 2}))
        .send()
        .await
        .unwrap();
    let req = responses_body(json!({"background": true, "mock": {"words": 6}}));
    let (blocks, clean) = read_events(post_responses(&http, &url, &req).await).await;
    assert!(!clean);
    let events = parse_responses(&blocks);
    assert_eq!(deltas(&events, "response.output_text.delta"), 2);
    let id = events[0].1["response"]["id"].as_str().unwrap().to_owned();
    let (_, clean) =
        read_events(get_response(&http, &url, &format!("{id}?stream=true")).await).await;
    assert!(!clean, "from the start, cut at the same point");
    let after = events.last().unwrap().1["sequence_number"]
        .as_u64()
        .unwrap();
    let (rest, clean) = read_events(
        get_response(
            &http,
            &url,
            &format!("{id}?stream=true&starting_after={after}"),
        )
        .await,
    )
    .await;
    assert!(clean, "past the cut, a re-attach is not cut again");
    assert!(
        rest.last()
            .unwrap()
            .starts_with("event: response.completed\n")
    );
    http.put(format!("{url}/mock/faults"))
        .json(&json!({"die_after": null, "down": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(post_responses(&http, &url, &req).await.status(), 503);
    assert_eq!(get_response(&http, &url, &id).await.status(), 503);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}
