//! The SSE decoder (`protocol::sse`) on arbitrary provider bytes: no
//! panic; the same events however the bytes are split across reads; the
//! same events as a plain reading of the WHATWG rules; with limits, never
//! more held than one line over the limit plus one read, and what it
//! yields before it stops is what an unlimited decoder yields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidegate::protocol::sse::SseDecoder;
use tidegate_fuzz::{Rng, decode_events, random_cuts};

/// The WHATWG "interpreting an event stream" rules as tidegate reads them,
/// written the slow, obvious way.
fn reference(input: &[u8]) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let mut rest = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    let mut out = Vec::new();
    let mut name: Option<Vec<u8>> = None;
    let mut data: Option<Vec<u8>> = None;
    while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
        let line = &rest[..end];
        let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
        if line.is_empty() {
            if let Some(d) = data.take() {
                out.push((name.take(), d));
            }
            name = None;
            continue;
        }
        if line[0] == b':' {
            continue;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => match &mut data {
                Some(d) => {
                    d.push(b'\n');
                    d.extend_from_slice(value);
                }
                None => data = Some(value.to_vec()),
            },
            b"event" => name = Some(value.to_vec()),
            _ => {}
        }
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let whole = decode_events(&[input]);
    let expected = reference(input);
    let got: Vec<(Option<Vec<u8>>, Vec<u8>)> = whole
        .iter()
        .map(|e| (e.name.as_ref().map(|n| n.to_vec()), e.data.to_vec()))
        .collect();
    assert_eq!(got, expected, "the decoder disagrees with the WHATWG rules");

    let mut rng = Rng::new(input);
    for _ in 0..4 {
        let pieces = random_cuts(input, &mut rng, 12);
        assert_eq!(decode_events(&pieces), whole, "a split changed the events");
    }
    if input.len() <= 2048 {
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            decode_events(&bytes),
            whole,
            "byte-at-a-time changed the events"
        );
    }

    // Limits: a small line limit and an answer limit inside the input.
    let max_event = 1 + rng.below(128);
    let max_total = rng.below(input.len() + 64) as u64;
    let mut d = SseDecoder::with_limits(max_event, max_total);
    let mut limited = Vec::new();
    let mut fed = 0usize;
    for piece in random_cuts(input, &mut rng, 16) {
        d.feed(piece);
        fed += piece.len();
        while let Some(e) = d.next_event() {
            assert!(
                e.data.len() <= max_event,
                "an event over the limit was yielded"
            );
            limited.push(e);
        }
        // Drained, it holds at most one unfinished line and one event's
        // data, each within the limit, whatever the read was.
        assert!(
            d.buffered() <= 2 * max_event + 1,
            "held {} bytes with a {max_event}-byte limit after a {}-byte read",
            d.buffered(),
            piece.len()
        );
        if d.overflow().is_some() {
            assert_eq!(d.buffered(), 0, "an overflowed decoder still holds bytes");
        }
    }
    assert!(
        fed as u64 <= max_total || d.overflow().is_some(),
        "the answer limit was passed"
    );
    assert!(limited.len() <= whole.len());
    assert_eq!(
        &whole[..limited.len()],
        &limited[..],
        "a limited decoder yielded other events"
    );
    if d.overflow().is_none() {
        assert_eq!(limited, whole, "no limit was hit, yet events were lost");
    }
});
