//! The continuation splicer (`protocol::continuation`, the OpenAI
//! `ChunkSplice`/`ToolCallHold`, the Anthropic `BlockSplice`/`ToolUseHold`)
//! from stored events to spliced ones, as a resume runs it:
//!
//! stored events (as the pump stored them) → `Wire::partial` →
//! `Wire::closing` and `Wire::continuation` in every style → each leg's
//! splice fed the continued provider stream → the tool-call hold.
//!
//! Input, one file: a first line naming the protocol (`anthropic` in it, or
//! OpenAI) and the style to report on, a second line with the original
//! request (any JSON; a default chat request if it is not JSON), then the
//! stored SSE stream, a line `=====`, and the continued SSE stream.
//!
//! Invariants: no panic; what comes out is bounded by what went in; the
//! hold gives back everything it took, unchanged; a closed partial reads as
//! finished; and the client's message accumulated as the SDK would from the
//! stored events then the spliced ones still starts with the stored
//! partial (no text lost, none rewritten), with the original's identity
//! (OpenAI chunk id, no second role; Anthropic no second `message_start`,
//! new blocks numbered after the client's).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use tidegate::protocol::continuation::Out;
use tidegate::protocol::sse::SseEvent;
use tidegate::protocol::{Continuation, Partial, Plan, Protocol, Terminal, Wire};
use tidegate::stream::Event;
use tidegate_fuzz::{decode_events, sse_event, stored_name};

const SEPARATOR: &[u8] = b"\n=====\n";

/// Split at the first `SEPARATOR` (the second part empty without one).
fn split(input: &[u8]) -> (&[u8], &[u8]) {
    match input.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        Some(at) => (&input[..at + 1], &input[at + SEPARATOR.len()..]),
        None => (input, &[]),
    }
}

fn line(input: &[u8]) -> (&[u8], &[u8]) {
    match input.iter().position(|b| *b == b'\n') {
        Some(at) => (&input[..at], &input[at + 1..]),
        None => (input, &[]),
    }
}

/// The events of a stored stream as the pump stored them: numbered from 1,
/// without OpenAI's `[DONE]` or an in-band error.
fn stored(wire: &dyn Wire, bytes: &[u8]) -> Vec<Event> {
    decode_events(&[bytes])
        .into_iter()
        .filter(|e| {
            wire.terminal(e) != Some(Terminal::Sentinel) && wire.provider_error(e).is_none()
        })
        .enumerate()
        .map(|(i, e)| Event {
            seq: i as u64 + 1,
            name: stored_name(e.name.as_deref()),
            data: e.data,
        })
        .collect()
}

/// Offer `events` to a fresh hold, then release what is left: everything
/// offered comes out once, unchanged, and nothing stays held.
fn check_hold(wire: &dyn Wire, events: &[SseEvent]) {
    let mut hold = wire.hold();
    let mut out = Vec::new();
    let mut offered = 0;
    for e in events {
        offered += e.data.len();
        hold.offer(e.clone(), &mut out);
        let released: usize = out.iter().map(|e: &SseEvent| e.data.len()).sum();
        assert!(
            hold.held_bytes() + released <= offered,
            "the hold counts more than it took"
        );
    }
    hold.release_all(&mut out);
    assert_eq!(hold.held_bytes(), 0, "bytes still held after release_all");
    let key = |e: &SseEvent| (e.name.clone(), e.data.clone());
    let mut want: Vec<_> = events.iter().map(key).collect();
    let mut got: Vec<_> = out.iter().map(key).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "the hold lost, added or changed events");
    // After release_all, everything passes at once.
    let mut after = Vec::new();
    for e in events {
        hold.offer(e.clone(), &mut after);
    }
    assert_eq!(after.len(), events.len(), "a released hold still holds");
}

fn as_event(seq: u64, (name, data): &Out) -> Event {
    Event {
        seq,
        name: name.clone(),
        data: data.clone(),
    }
}

fn json(data: &[u8]) -> Option<Value> {
    serde_json::from_slice(data).ok()
}

/// An Anthropic continued stream whose block events each follow their
/// block's start (what a provider sends): only then can the splice keep
/// the client's blocks intact.
fn blocks_well_formed(events: &[SseEvent]) -> bool {
    let mut started = std::collections::HashSet::new();
    for e in events {
        let Some(v) = json(&e.data) else { continue };
        let index = v.get("index").and_then(Value::as_u64);
        // Read by the data's type, else by the name, as the SDK's
        // accumulation (and the splice) read it.
        let is = |kind: &str| match v.get("type").and_then(Value::as_str) {
            Some(t) => t == kind,
            None => e.name_is(kind),
        };
        if is("content_block_start") {
            match index {
                Some(i) if started.insert(i) => {}
                _ => return false,
            }
        } else if (is("content_block_delta") || is("content_block_stop"))
            && !index.is_some_and(|i| started.contains(&i))
        {
            return false;
        }
    }
    true
}

/// A stored Anthropic stream the splice can keep whole: blocks started
/// once each, in index order, only the last one possibly open, every
/// block event after its block's start.
fn stored_well_formed(events: &[Event]) -> bool {
    let mut last: Option<u64> = None;
    let mut open = false;
    for e in events {
        let Some(v) = json(&e.data) else { continue };
        let index = v.get("index").and_then(Value::as_u64);
        match v.get("type").and_then(Value::as_str) {
            Some("content_block_start") => {
                let Some(i) = index else { return false };
                if open || last.is_some_and(|l| i <= l) {
                    return false;
                }
                last = Some(i);
                open = true;
            }
            Some("content_block_delta") if !open || index != last => return false,
            Some("content_block_stop") => {
                if !open || index != last {
                    return false;
                }
                open = false;
            }
            _ => {}
        }
    }
    true
}

fn check_closing(wire: &dyn Wire, protocol: Protocol, events: &[Event], partial: &Partial) {
    let closing = wire.closing(partial);
    let mut all = events.to_vec();
    let seq = partial.last_seq;
    all.extend(
        closing
            .iter()
            .enumerate()
            .map(|(i, o)| as_event(seq + 1 + i as u64, o)),
    );
    let closed = wire.partial(&all);
    match protocol {
        Protocol::OpenAi => {
            for c in &closed.choices {
                assert!(
                    c.finish_reason.is_some(),
                    "choice {} not closed: {closing:?}",
                    c.index
                );
            }
        }
        Protocol::Anthropic => {
            assert!(
                closed.ended,
                "the closing did not end the message: {closing:?}"
            );
            assert!(
                partial.ended || closed.finish_reason().is_some(),
                "the closing gave no stop reason: {closing:?}"
            );
        }
        // The Responses API's closing is exercised for panics only.
        Protocol::OpenAiResponses => {}
    }
}

fuzz_target!(|input: &[u8]| {
    let (head, rest) = line(input);
    let (original_line, rest) = line(rest);
    let (stored_bytes, continued_bytes) = split(rest);
    let protocol = if head.windows(9).any(|w| w == b"anthropic") {
        Protocol::Anthropic
    } else if head.windows(9).any(|w| w == b"responses") {
        Protocol::OpenAiResponses
    } else {
        Protocol::OpenAi
    };
    let wire = protocol.wire();
    let original = json(original_line).unwrap_or_else(|| {
        json!({"model": "m", "max_tokens": 64, "stream": true,
               "messages": [{"role": "user", "content": "q"}]})
    });

    let events = stored(wire, stored_bytes);
    let as_sse: Vec<SseEvent> = events
        .iter()
        .map(|e| sse_event(e.name.as_deref(), e.data.clone()))
        .collect();
    check_hold(wire, &as_sse);

    let partial = wire.partial(&events);
    assert_eq!(partial.last_seq, events.len() as u64);
    check_closing(wire, protocol, &events, &partial);

    // The continued provider stream, one segment per leg (`[DONE]` ends one).
    let continued = decode_events(&[continued_bytes]);
    let mut segments: Vec<Vec<SseEvent>> = vec![Vec::new()];
    for e in continued {
        if wire.terminal(&e) == Some(Terminal::Sentinel) {
            segments.push(Vec::new());
        } else if let Some(last) = segments.last_mut() {
            last.push(e);
        }
    }
    let continued_len = continued_bytes.len();
    let continued_events: usize = segments.iter().map(Vec::len).sum();
    let stored_ok = protocol == Protocol::OpenAi || stored_well_formed(&events);

    for style in Continuation::ALL {
        let plan = wire.continuation(&original, style, &partial);
        let Plan::Continue(legs) = plan else { continue };
        assert!(!legs.is_empty(), "a plan to continue with no request");
        let one_leg = legs.len() == 1;
        let mut spliced: Vec<Out> = Vec::new();
        let mut fed: Vec<SseEvent> = Vec::new();
        'legs: for (leg, segment) in legs
            .into_iter()
            .zip(segments.iter().chain(std::iter::repeat(&Vec::new())))
        {
            assert!(
                leg.body.is_object(),
                "a continuation request that is not an object"
            );
            assert_eq!(leg.body.get("stream"), Some(&Value::Bool(true)));
            let mut splice = leg.splice;
            for e in segment {
                if wire.provider_error(e).is_some() {
                    break 'legs;
                }
                fed.push(e.clone());
                splice.event(e.clone(), &mut spliced);
                if wire.terminal(e) == Some(Terminal::Last) {
                    break 'legs;
                }
            }
        }

        // Bounded: a constant factor of what came in, plus what was held
        // from the stored text (a re-ask's overlap).
        let out_bytes: usize = spliced
            .iter()
            .map(|(n, d)| d.len() + n.as_ref().map_or(0, |n| n.len()))
            .sum();
        let bound = 4 * continued_len + 512 * (continued_events + 1) + stored_bytes.len();
        assert!(
            out_bytes <= bound,
            "{out_bytes} bytes out of {continued_len} in"
        );
        assert!(
            spliced.len() <= 3 * continued_events + 1,
            "{} events out of {continued_events}",
            spliced.len()
        );

        // The spliced events go through the hold as the pump sends them.
        let as_sse: Vec<SseEvent> = spliced
            .iter()
            .map(|(n, d)| SseEvent {
                name: n.as_ref().map(|n| Bytes::from(n.to_string())),
                data: d.clone(),
            })
            .collect();
        check_hold(wire, &as_sse);

        // The client's message: the stored events, then the spliced ones.
        let mut all = events.clone();
        let seq = partial.last_seq;
        all.extend(
            spliced
                .iter()
                .enumerate()
                .map(|(i, o)| as_event(seq + 1 + i as u64, o)),
        );
        let after = wire.partial(&all);
        let prefix_holds = match protocol {
            Protocol::OpenAi => true,
            Protocol::Anthropic => stored_ok && blocks_well_formed(&fed),
            // Exercised for panics only: its splice maps items, not choices.
            Protocol::OpenAiResponses => false,
        };
        if prefix_holds {
            for before in &partial.choices {
                let Some(now) = after.choices.iter().find(|c| c.index == before.index) else {
                    panic!("{style:?}: choice {} vanished", before.index);
                };
                assert!(
                    now.content.starts_with(&before.content),
                    "{style:?}: the text was rewritten: {:?} then {:?}",
                    before.content,
                    now.content
                );
                assert!(
                    now.reasoning.starts_with(&before.reasoning),
                    "{style:?}: the reasoning was rewritten"
                );
            }
        }
        match protocol {
            Protocol::OpenAi => {
                let role_shown = partial
                    .choices
                    .first()
                    .is_some_and(|c| c.started && c.index == 0);
                for (_, data) in &spliced {
                    let Some(v) = json(data) else { continue };
                    let Some(choices) = v.get("choices").and_then(Value::as_array) else {
                        continue;
                    };
                    if let (Some(id), Some(got)) = (&partial.chunk_id, v.get("id")) {
                        assert_eq!(
                            got.as_str(),
                            Some(id.as_str()),
                            "{style:?}: a chunk with another id"
                        );
                    }
                    if one_leg
                        && role_shown
                        && original.get("n").and_then(Value::as_u64).unwrap_or(1) <= 1
                    {
                        for c in choices {
                            assert!(
                                c.pointer("/delta/role").is_none(),
                                "{style:?}: a second role delta: {v}"
                            );
                        }
                    }
                }
            }
            Protocol::Anthropic => {
                let started = partial.choices.first().is_some_and(|c| c.started);
                // As the splice numbers them, saturating at the largest index.
                let mut next = partial
                    .blocks
                    .iter()
                    .map(|b| b.index.saturating_add(1))
                    .max()
                    .unwrap_or(0);
                for (name, data) in &spliced {
                    if started {
                        assert_ne!(
                            name.as_deref(),
                            Some("message_start"),
                            "{style:?}: a second message_start"
                        );
                    }
                    // Read by the data's type, else by the name, as the SDK
                    // accumulates it (a start that is not JSON is relayed as
                    // it came, and numbered by no one).
                    let v = json(data);
                    let kind = v
                        .as_ref()
                        .and_then(|v| v.get("type"))
                        .and_then(Value::as_str)
                        .or(name.as_deref());
                    if kind == Some("content_block_start") {
                        if let Some(index) = v
                            .as_ref()
                            .and_then(|v| v.get("index"))
                            .and_then(Value::as_u64)
                        {
                            assert_eq!(
                                index,
                                u64::from(next),
                                "{style:?}: block {index} opened, {next} expected"
                            );
                            next = next.saturating_add(1);
                        }
                    }
                }
            }
            Protocol::OpenAiResponses => {}
        }
    }
});
