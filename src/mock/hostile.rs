//! `mock.hostile`: a provider broken at the byte level — a line that never
//! ends, a flood of events, comments or single bytes that never make an
//! event, an HTML page, a redirect, an error or JSON body that never ends.
//!
//! The mock's own memory stays bounded: endless bodies are one fixed block
//! written again and again (or one event, copied a fixed number of times
//! once), and each is a stream that hyper polls only as the socket takes
//! it, dropped — so stopped, and counted as cancelled — when the peer goes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::plan::{Delivery, Hostile};
use super::{Ending, Outcome, Renderer, Stats, sse};

/// One write of an endless body.
const BLOCK: usize = 64 * 1024;
static LINE: [u8; BLOCK] = [b'x'; BLOCK];
static ERROR_TEXT: [u8; BLOCK] = [b'e'; BLOCK];
static JSON_TEXT: [u8; BLOCK] = [b'j'; BLOCK];
/// Copies of the repeated event in one write of `endless_stream`.
const REPEATS_PER_WRITE: u64 = 200;
/// The pace of `comments_only` and `drip` without `token_interval_ms`.
const TRICKLE: Duration = Duration::from_millis(100);

const HTML: &str = "<html><head><title>Welcome to nginx!</title></head><body><h1>Welcome to nginx!</h1></body></html>\n";
const LOGIN: &str = "https://login.example/";
const JSON_OPENING: &str = r#"{"id":"chatcmpl-mock","object":"chat.completion","model":"mock","choices":[{"index":0,"message":{"role":"assistant","content":""#;

type Chunks =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// The answer `kind` gives instead of the one `renderer` would stream;
/// `status` overrides the head's (200, a redirect's 302, an error body's
/// 500).
pub fn answer(
    kind: Hostile,
    renderer: Renderer,
    delivery: &Delivery,
    stats: Arc<Stats>,
    status: Option<StatusCode>,
) -> Response {
    let interval = Some(delivery.interval)
        .filter(|i| !i.is_zero())
        .unwrap_or(TRICKLE);
    let (default, content_type, body): (StatusCode, &str, Body) = match kind {
        Hostile::EndlessLine => (
            StatusCode::OK,
            "text/event-stream",
            endless(stats, b"data: ", &LINE),
        ),
        Hostile::EndlessStream => (
            StatusCode::OK,
            "text/event-stream",
            Body::from_stream(flood(renderer, delivery.hostile_events, stats)),
        ),
        Hostile::CommentsOnly => (
            StatusCode::OK,
            "text/event-stream",
            Body::from_stream(trickle(renderer, stats, interval, b"", b": keepalive\n\n")),
        ),
        Hostile::Drip => (
            StatusCode::OK,
            "text/event-stream",
            Body::from_stream(trickle(renderer, stats, interval, b"data: ", b"x")),
        ),
        Hostile::Html => (StatusCode::OK, "text/html; charset=utf-8", Body::from(HTML)),
        Hostile::Redirect => (StatusCode::FOUND, "text/html", Body::empty()),
        Hostile::EndlessErrorBody => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            endless(stats, b"", &ERROR_TEXT),
        ),
        Hostile::EndlessJson => (
            StatusCode::OK,
            "application/json",
            endless(stats, JSON_OPENING.as_bytes(), &JSON_TEXT),
        ),
    };
    let mut response = (status.unwrap_or(default), body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if kind == Hostile::Redirect {
        headers.insert(header::LOCATION, HeaderValue::from_static(LOGIN));
    }
    response
}

/// `opening`, then `block` for ever.
fn endless(stats: Arc<Stats>, opening: &'static [u8], block: &'static [u8]) -> Body {
    let chunks: Chunks = Box::pin(async_stream::stream! {
        // Never finished: a drop is the peer leaving.
        let _outcome = Outcome::new(stats);
        if !opening.is_empty() {
            yield Ok(Bytes::from_static(opening));
        }
        loop {
            yield Ok(Bytes::from_static(block));
        }
    });
    Body::from_stream(chunks)
}

/// The answer's events up to and including its first unit's; `None` once
/// the answer ends (an answer of no units).
fn next_event(renderer: &mut Renderer, stats: &Stats) -> Option<(Bytes, bool)> {
    let out = renderer.next()?;
    stats.events_sent.fetch_add(1, Ordering::Relaxed);
    Some((sse(out.event, &out.data), out.unit))
}

/// `endless_stream`: the opening, then the first unit's event again and
/// again; after `hostile_events` repeats, the rest of the answer.
fn flood(mut renderer: Renderer, limit: Option<u64>, stats: Arc<Stats>) -> Chunks {
    Box::pin(async_stream::stream! {
        let mut outcome = Outcome::new(stats.clone());
        let mut unit = None;
        while let Some((event, is_unit)) = next_event(&mut renderer, &stats) {
            yield Ok(event.clone());
            if is_unit {
                unit = Some(event);
                break;
            }
        }
        let Some(unit) = unit else {
            outcome.ending = Ending::Finished;
            return;
        };
        // One write: the event a fixed number of times, built once.
        let mut block = Vec::with_capacity(unit.len() * REPEATS_PER_WRITE as usize);
        for _ in 0..REPEATS_PER_WRITE {
            block.extend_from_slice(&unit);
        }
        let block = Bytes::from(block);
        let mut left = limit.unwrap_or(u64::MAX);
        while left > 0 {
            let copies = left.min(REPEATS_PER_WRITE);
            if limit.is_some() {
                left -= copies;
            }
            stats.events_sent.fetch_add(copies, Ordering::Relaxed);
            stats.tokens_sent.fetch_add(copies, Ordering::Relaxed);
            let len = unit.len() * copies as usize;
            yield Ok(block.slice(..len));
        }
        let mut next = next_event(&mut renderer, &stats);
        while let Some((event, _)) = next.take() {
            next = next_event(&mut renderer, &stats);
            if next.is_none() {
                outcome.ending = Ending::Finished;
            }
            yield Ok(event);
        }
    })
}

/// `comments_only` / `drip`: the opening and first unit, then `start`,
/// then `piece` once per `interval`, for ever.
fn trickle(
    mut renderer: Renderer,
    stats: Arc<Stats>,
    interval: Duration,
    start: &'static [u8],
    piece: &'static [u8],
) -> Chunks {
    Box::pin(async_stream::stream! {
        let _outcome = Outcome::new(stats.clone());
        while let Some((event, is_unit)) = next_event(&mut renderer, &stats) {
            yield Ok(event);
            if is_unit {
                break;
            }
        }
        if !start.is_empty() {
            yield Ok(Bytes::from_static(start));
        }
        loop {
            tokio::time::sleep(interval).await;
            yield Ok(Bytes::from_static(piece));
        }
    })
}
