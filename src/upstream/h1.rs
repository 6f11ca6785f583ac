//! The pump's own HTTP/1.1 connections to plain-`http://` providers.
//!
//! reqwest (hyper) hands a response body to its reader one HTTP chunk at a
//! time, through a one-slot channel between the connection's task and the
//! reader's task. A provider that sends fifty events in one TCP segment —
//! any burst, and every answer a fast local model streams — so costs fifty
//! round trips between two tasks (benches/OPTIMISATIONS.md, "the pump's own
//! connections"). Self-hosted providers
//! (vLLM, SGLang, Ollama, llama.cpp) mostly sit on plain `http://` beside
//! the gateway, so for them the pump drives the connection itself: one
//! `read` brings whatever the kernel holds, every chunk in it is de-chunked
//! in one loop straight into the SSE decoder, and the lot is one store write.
//! `https://` upstreams, `http2 = true`, and any process with an HTTP proxy
//! in its environment keep reqwest.
//!
//! Response heads are parsed by `httparse`, the parser hyper itself uses.
//! Bodies are `Content-Length`, chunked, or delimited by the connection's
//! close. Idle connections are kept per upstream (newest first), for less
//! than the shortest keep-alive common providers use, and checked before
//! reuse. A request is sent again on a new connection only when not one
//! byte of it could be written on the reused one (the provider had closed
//! it, and certainly never saw the request). Once any of it is written,
//! a close before the answer is an error, never a second send: the
//! provider may have received it and started generating, and a second
//! send would bill the answer twice (nginx does not retry a non-idempotent
//! request either). No redirect is followed (like the reqwest client's
//! policy).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{HeaderName, HeaderValue, StatusCode};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Sink;
use crate::workers::current_runtime;

/// A provider's response head is rarely over a kilobyte; this bounds a
/// broken one.
const MAX_HEAD: usize = 64 * 1024;
/// Idle connections kept per upstream.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed rather than reused.
/// Providers close theirs after 5–75 s (uvicorn, under vLLM and SGLang:
/// 5 s; Node: 5 s): reusing one near that moment races its close, and a
/// request lost in that race is not sent again.
const IDLE_FOR: Duration = Duration::from_secs(4);
/// One `read` takes at most this much; on the stack, not in the stream's
/// state, so a held stream does not keep it.
const READ_SIZE: usize = 16 * 1024;

/// Why a request on our own connection failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("connecting to {address} took longer than {after:?}")]
    ConnectTimeout { address: String, after: Duration },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("invalid HTTP response: {0}")]
    Protocol(String),
    /// The request was written and the connection closed before any byte
    /// of an answer: the provider may be generating it, so it is not sent
    /// again.
    #[error(
        "the provider closed the connection after the request was sent, before answering (not sent again: it may have been received)"
    )]
    ClosedBeforeAnswer,
}

impl H1Error {
    fn protocol(what: impl Into<String>) -> H1Error {
        H1Error::Protocol(what.into())
    }
}

/// The provider closed or reset the connection.
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// How an exchange failed: before any byte of the request was written
/// (so it may be sent elsewhere), or after.
enum Failed {
    Unsent(io::Error),
    Sent(H1Error),
}

/// Where one upstream lives and its idle connections.
pub struct Pool {
    host: String,
    port: u16,
    /// `Host:` header value.
    authority: String,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
}

/// An idle connection, when it was checked in, and the runtime whose
/// reactor it is registered with: with thread-per-core workers a
/// connection is only reused on its own thread, where its reads wake no
/// other (see `workers`).
type Idle = (TcpStream, Instant, Option<tokio::runtime::Id>);

impl Pool {
    /// For `http://` URLs only; `None` for any other scheme.
    pub fn for_url(url: &reqwest::Url, connect_timeout: Duration) -> Option<Arc<Pool>> {
        if url.scheme() != "http" {
            return None;
        }
        let host = url
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = url.port_or_known_default()?;
        let authority = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str()?),
            None => url.host_str()?.to_owned(),
        };
        Some(Arc::new(Pool {
            host: host.to_owned(),
            port,
            authority,
            connect_timeout,
            idle: Mutex::new(VecDeque::new()),
        }))
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // Only pushes and pops happen under this lock.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest idle connection of this runtime that is still open.
    fn checkout(&self) -> Option<TcpStream> {
        let here = current_runtime();
        loop {
            let (stream, since, _) = {
                let mut idle = self.idle();
                let at = idle.iter().rposition(|(_, _, on)| *on == here)?;
                idle.remove(at)?
            };
            if since.elapsed() < IDLE_FOR && still_open(&stream) {
                return Some(stream);
            }
        }
    }

    fn checkin(&self, stream: TcpStream) {
        let mut idle = self.idle();
        while idle
            .front()
            .is_some_and(|(_, since, _)| since.elapsed() >= IDLE_FOR)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((stream, Instant::now(), current_runtime()));
        }
    }

    async fn connect(&self) -> Result<TcpStream, H1Error> {
        let address = || format!("{}:{}", self.host, self.port);
        let attempt = async {
            let mut last = None;
            for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::other("the name resolved to no address")))
        };
        let stream = match tokio::time::timeout(self.connect_timeout, attempt).await {
            Err(_) => {
                return Err(H1Error::ConnectTimeout {
                    address: address(),
                    after: self.connect_timeout,
                });
            }
            Ok(Err(source)) => {
                return Err(H1Error::Connect {
                    address: address(),
                    source,
                });
            }
            Ok(Ok(stream)) => stream,
        };
        // Events are small and latency-bound (see `server::no_delay`).
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// `POST path` with `headers` and `body`; returns once the response
    /// head is in. The caller bounds the wait (first-byte timeout).
    pub async fn post(
        self: &Arc<Self>,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: &[u8],
    ) -> Result<Response, H1Error> {
        let request = self.encode(path, headers, body);
        if let Some(stream) = self.checkout() {
            match self.exchange(stream, &request).await {
                Ok(response) => return Ok(response),
                // Not one byte went out: the provider never saw it.
                Err(Failed::Unsent(e)) if is_closed(&e) => {}
                Err(Failed::Unsent(e)) => return Err(e.into()),
                Err(Failed::Sent(e)) => return Err(e),
            }
        }
        let stream = self.connect().await?;
        self.exchange(stream, &request).await.map_err(|e| match e {
            Failed::Unsent(e) => e.into(),
            Failed::Sent(e) => e,
        })
    }

    fn encode(&self, path: &str, headers: &[(HeaderName, HeaderValue)], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(b"POST ");
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.authority.as_bytes());
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        out
    }

    /// Send the request on `stream` and read the response head.
    async fn exchange(
        self: &Arc<Self>,
        mut stream: TcpStream,
        request: &[u8],
    ) -> Result<Response, Failed> {
        let mut written = 0;
        while written < request.len() {
            match stream.write(&request[written..]).await {
                Ok(0) => {
                    return Err(Failed::Sent(
                        io::Error::from(io::ErrorKind::WriteZero).into(),
                    ));
                }
                Ok(n) => written += n,
                Err(e) if written == 0 => return Err(Failed::Unsent(e)),
                Err(e) => return Err(Failed::Sent(e.into())),
            }
        }
        // Read straight into the head's buffer: an unpaced answer often
        // comes whole with its head, and its body is then a slice of this
        // buffer instead of a copy of it (benches/OPTIMISATIONS.md, "The
        // pump's own connections").
        let mut head = BytesMut::new();
        loop {
            if head.capacity() - head.len() < READ_SIZE / 4 {
                head.reserve(READ_SIZE);
            }
            let read = match stream.read_buf(&mut head).await {
                Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            match read {
                Ok(()) => {}
                Err(e) if head.is_empty() && is_closed(&e) => {
                    return Err(Failed::Sent(H1Error::ClosedBeforeAnswer));
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(Failed::Sent(H1Error::protocol(
                        "the provider closed the connection inside the response head",
                    )));
                }
                Err(e) => return Err(Failed::Sent(e.into())),
            }
            if let Some(parsed) = parse_head(&head).map_err(Failed::Sent)? {
                let rest = head.split_off(parsed.len).freeze();
                if parsed.status.is_informational() {
                    // `100 Continue` and the like: the real head follows.
                    head = BytesMut::from(&rest[..]);
                    continue;
                }
                return Ok(Response {
                    status: parsed.status,
                    content_type: parsed.content_type,
                    headers: parsed.headers,
                    body: Body {
                        stream: Some(stream),
                        framing: parsed.framing,
                        reusable: parsed.keep_alive,
                        pending: rest,
                        pool: self.clone(),
                    },
                });
            }
            if head.len() > MAX_HEAD {
                return Err(Failed::Sent(H1Error::protocol("response head too large")));
            }
        }
    }
}

/// Whether an idle connection can carry another request: the provider has
/// neither closed it nor sent anything unasked.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        // Readiness may be stale; only a read says which it is.
        Poll::Ready(Ok(())) => matches!(
            stream.try_read(&mut [0u8; 1]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        ),
    }
}

/// Wait until `stream` is readable, read once, hand the bytes to `sink`.
/// End of stream is an `UnexpectedEof` error.
async fn read_once(stream: &mut TcpStream, mut sink: impl FnMut(&[u8])) -> io::Result<()> {
    std::future::poll_fn(|cx| poll_read_once(stream, cx, &mut sink)).await
}

/// One read into a buffer on the stack: a plain function, so the buffer is
/// never part of a waiting stream's state. Through `AsyncRead`, which takes
/// a short read as the socket drained (edge-triggered readiness), so the
/// next read waits instead of paying a system call for `EAGAIN`.
fn poll_read_once(
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    sink: &mut impl FnMut(&[u8]),
) -> Poll<io::Result<()>> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); READ_SIZE];
    let mut read = tokio::io::ReadBuf::uninit(&mut buf);
    match std::pin::Pin::new(stream).poll_read(cx, &mut read) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Ready(Ok(())) if read.filled().is_empty() => {
            Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
        }
        Poll::Ready(Ok(())) => {
            sink(read.filled());
            Poll::Ready(Ok(()))
        }
    }
}

struct Head {
    len: usize,
    status: StatusCode,
    content_type: Option<HeaderValue>,
    /// The provider's headers a client is shown (`super::passes_to_client`).
    headers: axum::http::HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// The most header lines a provider's response head may have: each gets
/// a bit of a `u64` in [`parse_head`].
const MAX_HEADERS: usize = 64;
const _: () = assert!(MAX_HEADERS <= u64::BITS as usize);

fn parse_head(buf: &[u8]) -> Result<Option<Head>, H1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(H1Error::protocol(e.to_string())),
    };
    let code = response.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| H1Error::protocol(format!("status {code}")))?;
    let mut content_type = None;
    // Sized once (growing a header map rehashes every entry): which of the
    // (at most `MAX_HEADERS`) headers pass, a bit each.
    let passing = response
        .headers
        .iter()
        .enumerate()
        .filter(|(_, h)| super::passes_to_client(h.name))
        .fold(0u64, |bits, (i, _)| bits | (1 << i));
    let mut passed = axum::http::HeaderMap::with_capacity(passing.count_ones() as usize);
    let mut length = None;
    let mut chunked = false;
    let mut keep_alive = response.version == Some(1);
    for (i, h) in response.headers.iter().enumerate() {
        let value = h.value;
        if passing & (1 << i) != 0
            && let (Ok(name), Ok(value)) = (
                axum::http::HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(value),
            )
        {
            passed.append(name, value);
        }
        if h.name.eq_ignore_ascii_case("content-type") {
            content_type = HeaderValue::from_bytes(value).ok();
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| H1Error::protocol("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::protocol("conflicting content-length"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked must be the last coding; nothing else is asked for.
            let last = value.rsplit(|b| *b == b',').next().unwrap_or_default();
            if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                chunked = true;
            } else {
                return Err(H1Error::protocol("unsupported transfer-encoding"));
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && response.version == Some(0) {
                    keep_alive = true;
                }
            }
        }
    }
    let framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(Chunked::default())
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::Close
    };
    Ok(Some(Head {
        len,
        status,
        content_type,
        headers: passed,
        framing,
        keep_alive,
    }))
}

/// A response whose head has arrived.
pub struct Response {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    /// The provider's headers a client is shown.
    pub headers: axum::http::HeaderMap,
    pub body: Body,
}

enum Framing {
    Length(u64),
    Chunked(Chunked),
    Close,
}

/// A response body being read. Dropped before its end, it closes the
/// connection: that is how the provider learns the answer is not wanted.
pub struct Body {
    /// `None` once the body is complete.
    stream: Option<TcpStream>,
    framing: Framing,
    reusable: bool,
    /// Body bytes that came in with the head.
    pending: Bytes,
    pool: Arc<Pool>,
}

impl Body {
    /// Read what is there (waiting for at least one read) and hand the
    /// body's payload to `sink`. Returns `true` once the body is complete;
    /// the connection then goes back to the pool. Cancel-safe: bytes are
    /// handed over in the same step they are read.
    pub async fn read(&mut self, sink: &mut dyn Sink) -> Result<bool, H1Error> {
        let Body {
            stream: Some(stream),
            framing,
            reusable,
            pending,
            ..
        } = self
        else {
            return Ok(true);
        };
        let result = if matches!(framing, Framing::Length(0)) {
            Ok(true)
        } else if !pending.is_empty() {
            let pending = std::mem::take(pending);
            decode(framing, reusable, &pending, sink)
        } else {
            // The stream stays in `self` across the wait: a read dropped
            // half-way (the pump's other branches) keeps the connection.
            let mut result = Ok(false);
            match read_once(stream, |bytes| {
                result = decode(framing, reusable, bytes, sink)
            })
            .await
            {
                Ok(()) => result,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.stream = None;
                    return match self.framing {
                        Framing::Close => Ok(true),
                        _ => Err(H1Error::protocol(
                            "the provider closed the connection before the response ended",
                        )),
                    };
                }
                Err(e) => Err(e.into()),
            }
        };
        match result {
            Ok(false) => Ok(false),
            Ok(true) => {
                if let Some(stream) = self.stream.take()
                    && self.reusable
                {
                    self.pool.checkin(stream);
                }
                Ok(true)
            }
            Err(e) => {
                // A broken body: the connection is not reused.
                self.stream = None;
                Err(e)
            }
        }
    }

    /// The body up to `limit` bytes, for an error answer: reading stops
    /// there, and the rest is never read (the connection is closed).
    pub async fn read_at_most(mut self, limit: usize) -> Result<Bytes, H1Error> {
        let mut out = BytesMut::new();
        loop {
            let done = self
                .read(&mut |bytes: &[u8]| {
                    let room = limit.saturating_sub(out.len());
                    out.extend_from_slice(&bytes[..bytes.len().min(room)]);
                })
                .await?;
            if done || out.len() >= limit {
                return Ok(out.freeze());
            }
        }
    }
}

/// Strip a body's framing from `bytes`. Returns whether the body is
/// complete; bytes past its end make the connection unusable.
fn decode(
    framing: &mut Framing,
    reusable: &mut bool,
    bytes: &[u8],
    sink: &mut dyn Sink,
) -> Result<bool, H1Error> {
    // At most this much payload: one reservation, not one per chunk.
    sink.reserve(bytes.len());
    let (used, done) = match framing {
        Framing::Close => {
            sink.put(bytes);
            (bytes.len(), false)
        }
        Framing::Length(left) => {
            let n = bytes
                .len()
                .min(usize::try_from(*left).unwrap_or(usize::MAX));
            sink.put(&bytes[..n]);
            *left -= n as u64;
            (n, *left == 0)
        }
        Framing::Chunked(chunked) => {
            let used = chunked.decode(bytes, sink)?;
            (used, chunked.is_done())
        }
    };
    if used < bytes.len() {
        *reusable = false;
    }
    Ok(done)
}

/// `Transfer-Encoding: chunked`, decoded a byte at a time across reads.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In the hex size.
    #[default]
    Size,
    /// In a chunk extension, until the line ends.
    Extension,
    /// After the size line's CR.
    SizeLf,
    /// In a chunk's data: this many bytes left.
    Data(u64),
    /// After a chunk's data: CRLF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (after the last chunk).
    Trailer,
    /// In a trailer field, until the line ends.
    TrailerField,
    /// After the final line's CR.
    EndLf,
    Done,
}

impl Chunked {
    fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    fn size_line_ended(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::Trailer
        } else {
            ChunkState::Data(self.size)
        };
        self.size = 0;
        self.digits = 0;
    }

    /// Hand the payload in `input` to `sink`; returns how many bytes of
    /// `input` belong to the body (all of them until it is done).
    fn decode(&mut self, input: &[u8], sink: &mut dyn Sink) -> Result<usize, H1Error> {
        use ChunkState::*;
        let bad = |what: &str| Err(H1Error::protocol(format!("chunked body: {what}")));
        let mut i = 0;
        while i < input.len() {
            let byte = input[i];
            match self.state {
                Size => match (byte as char).to_digit(16) {
                    Some(digit) => {
                        if self.digits == 15 {
                            return bad("chunk size too large");
                        }
                        self.size = self.size << 4 | u64::from(digit);
                        self.digits += 1;
                        i += 1;
                    }
                    None if self.digits == 0 => return bad("missing chunk size"),
                    None => {
                        i += 1;
                        match byte {
                            b'\r' => self.state = SizeLf,
                            b'\n' => self.size_line_ended(),
                            b';' | b' ' | b'\t' => self.state = Extension,
                            _ => return bad("invalid chunk size"),
                        }
                    }
                },
                Extension => match memchr::memchr(b'\n', &input[i..]) {
                    Some(at) => {
                        i += at + 1;
                        self.size_line_ended();
                    }
                    None => i = input.len(),
                },
                SizeLf => {
                    if byte != b'\n' {
                        return bad("expected LF after the chunk size");
                    }
                    i += 1;
                    self.size_line_ended();
                }
                Data(left) => {
                    let n = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    sink.put(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 { DataCr } else { Data(left) };
                }
                DataCr => {
                    i += 1;
                    match byte {
                        b'\r' => self.state = DataLf,
                        b'\n' => self.state = Size,
                        _ => return bad("expected CRLF after chunk data"),
                    }
                }
                DataLf => {
                    if byte != b'\n' {
                        return bad("expected LF after chunk data");
                    }
                    i += 1;
                    self.state = Size;
                }
                Trailer => {
                    i += 1;
                    match byte {
                        b'\r' => self.state = EndLf,
                        b'\n' => {
                            self.state = Done;
                            return Ok(i);
                        }
                        _ => self.state = TrailerField,
                    }
                }
                TrailerField => match memchr::memchr(b'\n', &input[i..]) {
                    Some(at) => {
                        i += at + 1;
                        self.state = Trailer;
                    }
                    None => i = input.len(),
                },
                EndLf => {
                    if byte != b'\n' {
                        return bad("expected LF at the end");
                    }
                    self.state = Done;
                    return Ok(i + 1);
                }
                Done => return Ok(i),
            }
        }
        Ok(i)
    }
}

/// The body decoder and the head parser as the fuzz targets (`fuzz/`)
/// drive them: not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::{Chunked, Framing, H1Error, Sink};

    /// A `Transfer-Encoding: chunked` body being decoded.
    #[derive(Debug, Default)]
    pub struct Dechunker(Chunked);

    impl Dechunker {
        /// How many bytes of `input` belong to the body; its payload goes
        /// to `sink`.
        pub fn decode(&mut self, input: &[u8], sink: &mut dyn Sink) -> Result<usize, H1Error> {
            self.0.decode(input, sink)
        }

        pub fn is_done(&self) -> bool {
            self.0.is_done()
        }
    }

    /// How a parsed head frames its body.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum BodyFraming {
        Length(u64),
        Chunked,
        Close,
    }

    /// What the pump reads of a response head.
    #[derive(Debug)]
    pub struct ParsedHead {
        pub len: usize,
        pub status: u16,
        pub framing: BodyFraming,
        pub keep_alive: bool,
        /// The provider's headers a client is shown.
        pub passed: axum::http::HeaderMap,
    }

    pub fn parse_head(buf: &[u8]) -> Result<Option<ParsedHead>, H1Error> {
        Ok(super::parse_head(buf)?.map(|h| ParsedHead {
            len: h.len,
            status: h.status.as_u16(),
            framing: match h.framing {
                Framing::Length(n) => BodyFraming::Length(n),
                Framing::Chunked(_) => BodyFraming::Chunked,
                Framing::Close => BodyFraming::Close,
            },
            keep_alive: h.keep_alive,
            passed: h.headers,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    /// Read one request (head and `content-length` body) from `s`;
    /// `false` at the end of the connection.
    async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    buf.drain(..end + 4 + length);
                    return true;
                }
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    #[tokio::test]
    async fn a_request_the_provider_may_have_received_is_not_sent_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        // Answers the first request, then takes the second and closes
        // without a word, as a provider that crashed while generating.
        let server = tokio_util::task::TaskTracker::new().spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                while read_request(&mut s, &mut buf).await {
                    if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    } else {
                        break;
                    }
                }
            }
        });
        let url = reqwest::Url::parse(&format!("http://127.0.0.1:{port}/v1/chat")).unwrap();
        let pool = Pool::for_url(&url, Duration::from_secs(1)).unwrap();
        let first = pool.post("/v1/chat", &[], b"{}").await.unwrap();
        assert_eq!(first.body.read_at_most(100).await.unwrap(), &b"ok"[..]);
        assert_eq!(
            pool.idle().len(),
            1,
            "the first connection went back to the pool"
        );
        let second = pool.post("/v1/chat", &[], b"{}").await;
        assert!(
            matches!(second, Err(H1Error::ClosedBeforeAnswer)),
            "{:?}",
            second.err()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(seen.load(Ordering::SeqCst), 2, "the request was sent twice");
        server.abort();
    }

    fn dechunk(parts: &[&[u8]]) -> Result<(Vec<u8>, bool, usize), H1Error> {
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let mut used = 0;
        for part in parts {
            used += c.decode(part, &mut |b: &[u8]| out.extend_from_slice(b))?;
        }
        Ok((out, c.is_done(), used))
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_are_split() {
        let body = b"5\r\nhello\r\n1;name=v\r\n \r\nA\nwhole worl\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let (out, done, used) = dechunk(&[body]).unwrap();
        assert_eq!(out, b"hello whole worl");
        assert!(done);
        assert_eq!(
            used,
            body.len() - 4,
            "the bytes after the body are not taken"
        );
        for cut in 0..body.len() {
            let (out, done, used) = dechunk(&[&body[..cut], &body[cut..]]).unwrap();
            assert_eq!(
                (out.as_slice(), done, used),
                (&b"hello whole worl"[..], true, body.len() - 4),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(dechunk(&bytes).unwrap().0, b"hello whole worl");
    }

    #[test]
    fn an_unfinished_chunked_body_is_not_done() {
        let (out, done, _) = dechunk(&[b"3\r\nabc\r\n4\r\nde"]).unwrap();
        assert_eq!(out, b"abcde");
        assert!(!done);
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        for body in [
            &b"\r\n"[..],
            b"zz\r\n",
            b"3\r\nabcX",
            b"1234567890abcdef0\r\n",
            b"3\rX",
        ] {
            assert!(
                dechunk(&[body]).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn heads_say_how_the_body_is_framed() {
        let head = |text: &str| parse_head(text.as_bytes()).unwrap().unwrap();
        let text = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\ndata";
        let h = head(text);
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.content_type.unwrap(), "text/event-stream");
        assert!(matches!(h.framing, Framing::Chunked(_)));
        assert!(h.keep_alive);
        assert_eq!(h.len, text.len() - 4);
        let h = head("HTTP/1.1 500 Internal\r\nContent-Length: 12\r\nConnection: close\r\n\r\n");
        assert!(matches!(h.framing, Framing::Length(12)));
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(h.framing, Framing::Close));
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-le")
                .unwrap()
                .is_none()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n").is_err());
        assert!(parse_head(b"SMTP ready\r\n\r\n").is_err());
    }

    // Quick properties inside `cargo test`; the coverage-guided targets
    // (cargo-fuzz, time-boxed by scripts/fuzz) are in fuzz/.
    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        fn chunked(payload: &[u8], sizes: &[usize]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut rest = payload;
            let mut sizes = sizes.iter().cycle();
            while !rest.is_empty() {
                let n = (sizes.next().copied().unwrap_or(1) % 17 + 1).min(rest.len());
                out.extend(format!("{n:x}\r\n").as_bytes());
                out.extend(&rest[..n]);
                out.extend(b"\r\n");
                rest = &rest[n..];
            }
            out.extend(b"0\r\n\r\n");
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn chunked_bodies_round_trip_however_split(
                payload in proptest::collection::vec(any::<u8>(), 0..300),
                sizes in proptest::collection::vec(any::<usize>(), 1..8),
                cut in any::<usize>(),
            ) {
                let body = chunked(&payload, &sizes);
                let cut = cut % (body.len() + 1);
                let mut c = Chunked::default();
                let mut out = Vec::new();
                let mut used = c.decode(&body[..cut], &mut |b: &[u8]| out.extend_from_slice(b)).unwrap();
                used += c.decode(&body[cut..], &mut |b: &[u8]| out.extend_from_slice(b)).unwrap();
                prop_assert_eq!(out, payload);
                prop_assert!(c.is_done());
                prop_assert_eq!(used, body.len());
            }

            #[test]
            fn the_chunked_decoder_never_panics_nor_overreads(input in proptest::collection::vec(any::<u8>(), 0..512)) {
                let mut c = Chunked::default();
                let mut total = 0;
                if let Ok(used) = c.decode(&input, &mut |b: &[u8]| total += b.len()) {
                    prop_assert!(used <= input.len());
                    prop_assert!(total <= input.len());
                }
            }

            #[test]
            fn the_head_parser_never_panics(input in proptest::collection::vec(any::<u8>(), 0..512)) {
                if let Ok(Some(head)) = parse_head(&input) {
                    prop_assert!(head.len <= input.len());
                }
            }

            #[test]
            fn heads_with_odd_headers_parse_or_fail_cleanly(
                code in 0u16..1200,
                headers in proptest::collection::vec(("[a-zA-Z-]{1,20}", "[ -~]{0,30}"), 0..10),
            ) {
                let mut text = format!("HTTP/1.1 {code} X\r\n");
                for (name, value) in &headers {
                    text.push_str(&format!("{name}: {value}\r\n"));
                }
                text.push_str("\r\n");
                match parse_head(text.as_bytes()) {
                    Ok(Some(head)) => prop_assert_eq!(head.status.as_u16(), code),
                    Ok(None) => prop_assert!(false, "a complete head read as partial"),
                    Err(_) => {}
                }
            }
        }
    }
}
