//! What the fuzz targets share: deterministic splits of an input (so a
//! crash reproduces from its artifact alone) and SSE decoding into events.

use bytes::Bytes;
use tidegate::protocol::sse::{SseDecoder, SseEvent};

/// A small deterministic generator seeded from the input itself.
pub struct Rng(u64);

impl Rng {
    pub fn new(data: &[u8]) -> Rng {
        // FNV-1a of the input: the same input, the same cuts.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in data {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h | 1)
    }

    pub fn step(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.step() % n as u64) as usize
        }
    }
}

/// `data` cut into pieces at a few pseudo-random points (some empty).
pub fn random_cuts<'a>(data: &'a [u8], rng: &mut Rng, max_cuts: usize) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = (0..rng.below(max_cuts + 1))
        .map(|_| rng.below(data.len() + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(data.len());
    let mut at = 0;
    cuts.into_iter()
        .map(|cut| {
            let piece = &data[at..cut];
            at = cut;
            piece
        })
        .collect()
}

/// Every event `pieces` decode to, fed one piece at a time.
pub fn decode_events(pieces: &[&[u8]]) -> Vec<SseEvent> {
    let mut d = SseDecoder::default();
    let mut out = Vec::new();
    for piece in pieces {
        d.feed(piece);
        while let Some(e) = d.next_event() {
            out.push(e);
        }
    }
    out
}

/// An event's name as the pump stores it.
pub fn stored_name(name: Option<&[u8]>) -> Option<Box<str>> {
    match name {
        None | Some(b"") | Some(b"message") => None,
        Some(other) => Some(String::from_utf8_lossy(other).into()),
    }
}

/// An event as a new `SseEvent` (the pump's form of a spliced event).
pub fn sse_event(name: Option<&str>, data: Bytes) -> SseEvent {
    SseEvent {
        name: name.map(|n| Bytes::from(n.to_owned())),
        data,
    }
}
