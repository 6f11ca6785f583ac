//! `text/event-stream`, the framing every protocol here streams in:
//! decoding the provider's bytes without a copy per event, and framing
//! relayed events for clients.
//!
//! Rule: the bytes the provider sends go once into a small per-stream
//! buffer; an event's `data` is a slice of that buffer (`Bytes`), which the
//! store, the live stream and every subscriber then share by reference
//! count. (Why not `eventsource-stream`, which makes a `String` per event:
//! benches/OPTIMISATIONS.md, "SSE decoder".)
//!
//! Framing follows the WHATWG "interpreting an event stream" rules: lines
//! end in CRLF, LF or CR (also when a CRLF is split across reads); a leading
//! BOM is dropped; `:` lines are comments; a field without a colon has an
//! empty value; one space after the colon is dropped; several `data` lines
//! join with `\n`; an empty line dispatches an event if any `data` was seen;
//! `id` and `retry` are ignored (the gateway numbers events itself); an
//! unfinished event at the end of the stream is not dispatched. Payloads
//! are relayed as bytes, not checked as UTF-8.
//!
//! A decoder made with [`SseDecoder::with_limits`] holds at most one
//! line (or one event's joined `data`) of `max_event` bytes and takes at
//! most `max_total` bytes in all: past either, it drops what it holds,
//! takes nothing more and says why ([`SseDecoder::overflow`]), so a
//! provider that never sends a line end cannot make it grow.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::stream::Event;

/// The first buffer of a stream; later ones are as large as needed.
/// Small, because a slow stream holds one for as long as it lives.
const INITIAL_BUFFER: usize = 1024;

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub name: Option<Bytes>,
    pub data: Bytes,
}

impl SseEvent {
    pub fn name_is(&self, name: &str) -> bool {
        self.name.as_deref() == Some(name.as_bytes())
    }
}

/// Why a decoder stopped taking bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// A line, or an event's data, was longer than `max_event` bytes.
    Event(usize),
    /// The stream brought more than `max_total` bytes.
    Answer(u64),
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overflow::Event(n) => write!(f, "an event or line longer than {n} bytes"),
            Overflow::Answer(n) => write!(f, "an answer longer than {n} bytes"),
        }
    }
}

/// The sans-IO decoder: [`feed`](Self::feed) bytes, take events with
/// [`next_event`](Self::next_event).
#[derive(Debug)]
pub struct SseDecoder {
    /// Undecoded bytes, starting at the beginning of a line.
    buf: BytesMut,
    /// How much of `buf` is known to hold no line end.
    scanned: usize,
    /// The last line ended with CR: a LF that follows belongs to it.
    after_cr: bool,
    /// The BOM check at the start of the stream is done.
    started: bool,
    name: Option<Bytes>,
    data: Data,
    /// The longest line or event data held.
    max_event: usize,
    /// The most bytes taken in all.
    max_total: u64,
    /// Bytes taken so far.
    fed: u64,
    /// Set once a limit is passed: nothing more is taken.
    overflow: Option<Overflow>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        SseDecoder::with_limits(usize::MAX, u64::MAX)
    }
}

#[derive(Debug, Default)]
enum Data {
    #[default]
    None,
    /// One `data` line: a slice of the input, no copy.
    One(Bytes),
    /// Several: joined with `\n`.
    Many(BytesMut),
}

impl SseDecoder {
    pub fn with_limits(max_event: usize, max_total: u64) -> SseDecoder {
        SseDecoder {
            buf: BytesMut::new(),
            scanned: 0,
            after_cr: false,
            started: false,
            name: None,
            data: Data::None,
            max_event,
            max_total,
            fed: 0,
            overflow: None,
        }
    }

    /// Bytes held now, undecoded (for the fuzz targets' memory bound).
    #[doc(hidden)]
    pub fn buffered(&self) -> usize {
        self.buf.len()
            + match &self.data {
                Data::None => 0,
                Data::One(d) => d.len(),
                Data::Many(d) => d.len(),
            }
    }

    /// Why the decoder stopped taking bytes, once it has.
    pub fn overflow(&self) -> Option<Overflow> {
        self.overflow
    }

    /// Pass a limit: drop everything held, take nothing more.
    fn overflowed(&mut self, why: Overflow) {
        self.overflow = Some(why);
        self.buf = BytesMut::new();
        self.scanned = 0;
        self.name = None;
        self.data = Data::None;
    }

    /// About `additional` bytes are coming: grow once for them.
    pub fn reserve(&mut self, additional: usize) {
        if self.overflow.is_some() {
            return;
        }
        if self.buf.is_empty() && self.buf.capacity() < additional {
            // Nothing pending: a buffer of just this size. Growing the old
            // one (which earlier events still share) would allocate at
            // least its original size for every read of a paced stream.
            self.buf = BytesMut::with_capacity(additional);
        } else {
            self.buf.reserve(additional);
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.overflow.is_some() {
            return;
        }
        self.fed = self.fed.saturating_add(chunk.len() as u64);
        if self.fed > self.max_total {
            return self.overflowed(Overflow::Answer(self.max_total));
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve(INITIAL_BUFFER.max(chunk.len()));
        }
        self.buf.put_slice(chunk);
    }

    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let len = self.next_line()?;
            if len == 0 {
                self.end_line(0);
                let name = self.name.take();
                let data = match std::mem::take(&mut self.data) {
                    Data::None => continue,
                    Data::One(data) => data,
                    Data::Many(data) => data.freeze(),
                };
                return Some(SseEvent { name, data });
            }
            self.field(len);
        }
    }

    /// The length of the next complete line, which starts `buf`; the
    /// caller consumes it (and its end) with [`end_line`](Self::end_line).
    /// Only the values kept are split off the buffer: an empty line or a
    /// comment costs no reference count.
    fn next_line(&mut self) -> Option<usize> {
        if self.after_cr && !self.buf.is_empty() {
            if self.buf[0] == b'\n' {
                self.buf.advance(1);
            }
            self.after_cr = false;
        }
        if !self.started {
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                return None;
            }
            if self.buf.starts_with(BOM) {
                self.buf.advance(BOM.len());
            }
            self.started = true;
        }
        let Some(at) = memchr::memchr2(b'\n', b'\r', &self.buf[self.scanned..]) else {
            self.scanned = self.buf.len();
            // What is left is one unfinished line.
            if self.buf.len() > self.max_event {
                self.overflowed(Overflow::Event(self.max_event));
            }
            return None;
        };
        if self.scanned + at > self.max_event {
            self.overflowed(Overflow::Event(self.max_event));
            return None;
        }
        let len = self.scanned + at;
        self.scanned = 0;
        Some(len)
    }

    /// Drop the first `len` bytes of `buf` and the line end after them.
    fn end_line(&mut self, len: usize) {
        self.after_cr = self.buf[len] == b'\r';
        self.buf.advance(len + 1);
    }

    /// Take the field on the next line, `len` bytes long.
    fn field(&mut self, len: usize) {
        let line = &self.buf[..len];
        if line[0] == b':' {
            return self.end_line(len);
        }
        let (name_len, value_at) = match memchr::memchr(b':', line) {
            Some(colon) if line.get(colon + 1) == Some(&b' ') => (colon, colon + 2),
            Some(colon) => (colon, colon + 1),
            None => (len, len),
        };
        let is_data = &line[..name_len] == b"data";
        if !is_data && &line[..name_len] != b"event" {
            return self.end_line(len);
        }
        self.buf.advance(value_at);
        let value = self.buf.split_to(len - value_at).freeze();
        self.end_line(0);
        if is_data {
            self.data = match std::mem::take(&mut self.data) {
                Data::None => Data::One(value),
                Data::One(first) => {
                    let mut joined = BytesMut::with_capacity(first.len() + 1 + value.len());
                    joined.put_slice(&first);
                    joined.put_u8(b'\n');
                    joined.put_slice(&value);
                    Data::Many(joined)
                }
                Data::Many(mut joined) => {
                    joined.put_u8(b'\n');
                    joined.put_slice(&value);
                    Data::Many(joined)
                }
            };
            if let Data::Many(joined) = &self.data
                && joined.len() > self.max_event
            {
                self.overflowed(Overflow::Event(self.max_event));
            }
        } else {
            self.name = Some(value);
        }
    }
}

/// About how many bytes [`write_frame`] writes for `event`, to reserve.
pub fn frame_size(event: &Event) -> usize {
    event.data.len() + event.name.as_ref().map_or(0, |n| n.len() + 8) + 40
}

/// Append one relayed event as an SSE frame, `id:` (its seq) first.
pub fn write_frame(out: &mut BytesMut, event: &Event) {
    out.put_slice(b"id: ");
    out.put_slice(itoa::Buffer::new().format(event.seq).as_bytes());
    out.put_u8(b'\n');
    if let Some(name) = &event.name {
        out.put_slice(b"event: ");
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
    }
    write_data(out, &event.data);
}

/// Append `data` as the `data:` lines of a frame, and the empty line that
/// dispatches it. Always inlined: it is [`write_frame`]'s loop, run once
/// per relayed event.
#[inline(always)]
pub fn write_data(out: &mut BytesMut, data: &[u8]) {
    let mut rest = data;
    while let Some(at) = memchr::memchr(b'\n', rest) {
        data_line(out, &rest[..at]);
        rest = &rest[at + 1..];
    }
    data_line(out, rest);
    out.put_u8(b'\n');
}

#[inline]
fn data_line(out: &mut BytesMut, line: &[u8]) {
    out.put_slice(b"data: ");
    out.put_slice(line);
    out.put_u8(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> Vec<(Option<String>, String)> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for chunk in chunks {
            d.feed(chunk);
            while let Some(e) = d.next_event() {
                out.push((
                    e.name.map(|n| String::from_utf8(n.to_vec()).unwrap()),
                    String::from_utf8(e.data.to_vec()).unwrap(),
                ));
            }
        }
        out
    }

    fn data(items: &[&str]) -> Vec<(Option<String>, String)> {
        items.iter().map(|d| (None, d.to_string())).collect()
    }

    #[test]
    fn decodes_openai_chunks() {
        let got = decode(&[b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n"]);
        assert_eq!(got, data(&["{\"a\":1}", "{\"a\":2}", "[DONE]"]));
    }

    #[test]
    fn same_events_however_the_bytes_are_split() {
        let text =
            b"\xEF\xBB\xBFevent: a\r\ndata: x\r\n\r\n: comment\n\ndata:y\rdata\r\rdata: z\n\n";
        let whole = decode(&[text]);
        assert_eq!(
            whole,
            vec![
                (Some("a".into()), "x".into()),
                (None, "y\n".into()),
                (None, "z".into())
            ]
        );
        for cut in 0..text.len() {
            assert_eq!(decode(&[&text[..cut], &text[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(decode(&bytes), whole);
    }

    #[test]
    fn joins_data_lines_and_keeps_empty_data() {
        let got = decode(&[b"data: a\ndata:  b\ndata\n\ndata:\n\nid: 7\nretry: 5\n\n"]);
        assert_eq!(got, data(&["a\n b\n", ""]));
    }

    #[test]
    fn names_reset_after_each_event_and_unfinished_events_are_dropped() {
        let got =
            decode(&[b"event: ping\n\nevent: message_stop\ndata: {}\n\ndata: {}\n\ndata: cut"]);
        assert_eq!(
            got,
            vec![
                (Some("message_stop".into()), "{}".into()),
                (None, "{}".into())
            ]
        );
    }

    #[test]
    fn a_field_without_space_or_colon() {
        let got = decode(&[b"event:x\ndata:1\n\nevent\ndata:2\n\n"]);
        assert_eq!(
            got,
            vec![
                (Some("x".into()), "1".into()),
                (Some("".into()), "2".into())
            ]
        );
    }

    #[test]
    fn a_line_without_end_stops_at_the_limit() {
        let mut d = SseDecoder::with_limits(1024, u64::MAX);
        d.feed(b"data: a\n\n");
        assert!(d.next_event().is_some());
        for _ in 0..100 {
            d.feed(&[b'x'; 100]);
            assert!(d.next_event().is_none());
        }
        assert_eq!(d.overflow(), Some(Overflow::Event(1024)));
        assert!(
            d.buf.capacity() < 4096,
            "the decoder kept {} bytes",
            d.buf.capacity()
        );
        d.feed(b"\n\ndata: b\n\n");
        assert!(
            d.next_event().is_none(),
            "nothing is taken after an overflow"
        );
    }

    #[test]
    fn a_long_line_in_one_read_and_many_data_lines_overflow() {
        let mut d = SseDecoder::with_limits(1024, u64::MAX);
        let mut long = b"data: ".to_vec();
        long.extend([b'y'; 2000]);
        long.extend(b"\n\n");
        d.feed(&long);
        assert!(d.next_event().is_none());
        assert_eq!(d.overflow(), Some(Overflow::Event(1024)));
        let mut d = SseDecoder::with_limits(1024, u64::MAX);
        for _ in 0..50 {
            d.feed(b"data: 0123456789012345678901234567890123456789\n");
        }
        assert!(d.next_event().is_none());
        assert_eq!(d.overflow(), Some(Overflow::Event(1024)));
    }

    #[test]
    fn the_whole_answer_is_capped() {
        let mut d = SseDecoder::with_limits(1024, 100);
        d.feed(b"data: 0123456789\n\n");
        assert!(d.next_event().is_some());
        for _ in 0..10 {
            d.feed(b"data: 0123456789\n\n");
        }
        assert_eq!(d.overflow(), Some(Overflow::Answer(100)));
    }

    #[test]
    fn frames() {
        let mut out = BytesMut::new();
        write_frame(
            &mut out,
            &Event {
                seq: 3,
                name: None,
                data: Bytes::from_static(b"{\"a\":1}"),
            },
        );
        assert_eq!(&out[..], b"id: 3\ndata: {\"a\":1}\n\n");
        let mut out = BytesMut::new();
        write_frame(
            &mut out,
            &Event {
                seq: 4,
                name: Some("ping".into()),
                data: Bytes::from_static(b"a\nb"),
            },
        );
        assert_eq!(&out[..], b"id: 4\nevent: ping\ndata: a\ndata: b\n\n");
    }

    // Quick properties inside `cargo test` (bounded cases); the
    // coverage-guided target (cargo-fuzz, time-boxed by scripts/fuzz) is
    // fuzz/fuzz_targets/sse_decoder.rs.
    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        fn events(input: &[u8], cuts: &[usize], limits: (usize, u64)) -> (Vec<SseEvent>, usize) {
            let mut d = SseDecoder::with_limits(limits.0, limits.1);
            let mut out = Vec::new();
            let mut most = 0;
            let mut at = 0;
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(input.len());
            for cut in cuts {
                d.feed(&input[at..cut.max(at)]);
                at = cut.max(at);
                while let Some(e) = d.next_event() {
                    out.push(e);
                }
                most = most.max(d.buf.len());
            }
            (out, most)
        }

        /// Bytes that look like an event stream more often than noise does.
        fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                Just(b"data: ".to_vec()),
                Just(b"event: x\n".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"\r\n".to_vec()),
                Just(b"\r".to_vec()),
                Just(b": c\n".to_vec()),
                Just(b"\xEF\xBB\xBF".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..40),
            ];
            proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_split_gives_the_same_events(input in stream_bytes(), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
                let (whole, _) = events(&input, &[], (usize::MAX, u64::MAX));
                let (split, _) = events(&input, &cuts, (usize::MAX, u64::MAX));
                prop_assert_eq!(whole, split);
            }

            #[test]
            fn limits_bound_what_is_held(input in proptest::collection::vec(any::<u8>(), 0..4096), cuts in proptest::collection::vec(any::<usize>(), 0..16)) {
                let (_, most) = events(&input, &cuts, (64, 2048));
                // At most one line over the limit, plus one read.
                prop_assert!(most <= 64 + input.len().min(4096));
                let mut d = SseDecoder::with_limits(64, 2048);
                d.feed(&input);
                while d.next_event().is_some() {}
                prop_assert!(d.overflow().is_some() || d.buf.len() <= 64);
            }
        }
    }
}
