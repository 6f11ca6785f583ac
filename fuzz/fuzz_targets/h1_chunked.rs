//! The HTTP/1.1 pool's chunked-body decoder (`upstream::h1`) on arbitrary
//! bytes: no panic; never more payload or more consumed bytes than given;
//! the same payload, end and error however the bytes are split across
//! reads; and any payload, chunked in sizes, extensions and trailers the
//! input picks, decodes back to itself, ending exactly at the body's end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidegate::upstream::h1::fuzzing::Dechunker;
use tidegate_fuzz::{Rng, random_cuts};

#[derive(Debug, PartialEq)]
struct Outcome {
    payload: Vec<u8>,
    used: usize,
    done: bool,
    failed: bool,
}

fn dechunk(pieces: &[&[u8]]) -> Outcome {
    let mut d = Dechunker::default();
    let mut payload = Vec::new();
    let mut used = 0;
    let mut failed = false;
    for piece in pieces {
        match d.decode(piece, &mut |b: &[u8]| payload.extend_from_slice(b)) {
            Ok(n) => {
                assert!(
                    n <= piece.len(),
                    "consumed {n} of a {}-byte read",
                    piece.len()
                );
                used += n;
                if n < piece.len() {
                    assert!(d.is_done(), "stopped short of a read before the body's end");
                }
            }
            Err(_) => {
                // Where the error fell is told by the payload before it.
                failed = true;
                used = 0;
                break;
            }
        }
    }
    Outcome {
        payload,
        used,
        done: d.is_done(),
        failed,
    }
}

/// `payload` chunked as the input picks (sizes, extensions, bare LFs, trailers).
fn encode(payload: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = payload;
    let eol = |rng: &mut Rng| {
        if rng.below(4) == 0 {
            &b"\n"[..]
        } else {
            &b"\r\n"[..]
        }
    };
    while !rest.is_empty() {
        let n = (1 + rng.below(64)).min(rest.len());
        if rng.below(2) == 0 {
            out.extend(format!("{n:x}").as_bytes());
        } else {
            out.extend(format!("{n:X}").as_bytes());
        }
        if rng.below(5) == 0 {
            out.extend(b";ext=\"v\"");
        }
        out.extend(eol(rng));
        out.extend(&rest[..n]);
        out.extend(eol(rng));
        rest = &rest[n..];
    }
    out.extend(b"0");
    out.extend(eol(rng));
    if rng.below(3) == 0 {
        out.extend(b"x-trailer: 1");
        out.extend(eol(rng));
    }
    out.extend(eol(rng));
    out
}

fuzz_target!(|input: &[u8]| {
    let whole = dechunk(&[input]);
    assert!(whole.payload.len() <= input.len());
    assert!(whole.used <= input.len());
    let mut rng = Rng::new(input);
    for _ in 0..4 {
        let pieces = random_cuts(input, &mut rng, 12);
        assert_eq!(dechunk(&pieces), whole, "a split changed the outcome");
    }
    if input.len() <= 1024 {
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(dechunk(&bytes), whole, "byte-at-a-time changed the outcome");
    }

    // Round trip, with bytes after the body (the next response).
    let mut body = encode(input, &mut rng);
    let len = body.len();
    body.extend(b"HTTP/1.1 200 OK\r\n");
    let pieces = random_cuts(&body, &mut rng, 8);
    let back = dechunk(&pieces);
    assert!(!back.failed, "a well-formed chunked body was refused");
    assert!(back.done, "a whole chunked body did not end");
    assert_eq!(back.used, len, "the body did not end at its last byte");
    assert_eq!(back.payload, input, "the payload changed in a round trip");
});
