//! A client's SSE body: replay what the store holds after the client's
//! cursor, then follow the live stream until it ends.
//!
//! **Invariant:** every body ends on purpose — with the stream's own end
//! (`[DONE]` / `message_stop`) or an in-band abort event carrying the id of
//! the last event this client was sent. The drain deadline ends it too, so a
//! graceful shutdown never waits on an open body.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use tokio_util::sync::CancellationToken;

use super::end::{StreamIdentity, end_frame};
use super::live::{Behind, LiveStream, Subscription};
use crate::protocol::sse::write_frame;
use crate::store::SharedStore;
use crate::stream::{AbortKind, End, Event};

/// How many events a client that fell behind the live window reads from
/// the store at a time (one write to it; the next page once it is taken).
const CATCH_UP_PAGE: usize = 512;

/// A replay hands the client what it has framed once it holds this much.
const REPLAY_FLUSH_BYTES: usize = 64 * 1024;

/// How long a body waits, after the drain deadline, for its pump to record
/// the stream's end before it says `server_restarting` itself.
const DEADLINE_SETTLE: Duration = Duration::from_millis(500);

pub struct Follow {
    pub who: StreamIdentity,
    /// The last event id the client has.
    pub cursor: u64,
    /// The run to follow after the replay; `None` for a stream that is over.
    pub live: Option<(Arc<LiveStream>, Subscription)>,
    /// How a stream that is over ends after its replay, and what its abort
    /// says beyond its kind.
    pub end_after_replay: End,
    pub detail: Option<String>,
    /// The stream's stored events from seq 1, when the caller has read
    /// them already: the replay then reads the store only if they fall
    /// short of the run it follows.
    pub stored: Option<Vec<Event>>,
    pub store: SharedStore,
    pub heartbeat: Duration,
    /// `retry:` hint for a browser `EventSource` (resume streams).
    pub retry_hint: Option<Duration>,
    /// The drain deadline.
    pub deadline: CancellationToken,
}

pub fn body(f: Follow) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    async_stream::stream! {
        let Follow { who, mut cursor, live, end_after_replay, detail, stored, store, heartbeat, retry_hint, deadline } = f;
        // Grown by what is framed into it: a held stream writes one small event
        // at a time.
        let mut buf = BytesMut::new();
        // The hint rides in the first frame's block (no blank line of its
        // own): a block of `retry:` alone makes the official SDKs' decoders
        // dispatch an empty event, which openai-python fails to parse.
        if let Some(hint) = retry_hint {
            buf.put_slice(format!("retry: {}\n", hint.as_millis()).as_bytes());
        }

        // Replay what only the store has: events before this run started. A
        // page at a time, each taken by the client before the next is read:
        // a long answer is never held whole, in memory or in one write.
        let replay_to = live.as_ref().map_or(u64::MAX, |(l, _)| l.base);
        let covers = |events: &Vec<Event>| {
            live.is_none() || events.last().map_or(0, |e| e.seq) >= replay_to
        };
        // Events the caller read already serve the replay only if they reach
        // the run it follows.
        let mut stored = stored.filter(covers).map(Vec::into_iter);
        while cursor < replay_to {
            let page = match stored.as_mut() {
                Some(events) => Ok(events.by_ref().take(CATCH_UP_PAGE).collect::<Vec<_>>()),
                None => store.events_page(&who.id, cursor, CATCH_UP_PAGE).await,
            };
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(stream = %who.id, error = %e, "replay failed");
                    end_frame(&mut buf, End::Abort(AbortKind::StoreFailed), &who, cursor, None);
                    yield Ok(buf.split().freeze());
                    return;
                }
            };
            let Some(last) = page.last().map(|e| e.seq) else {
                // Past a full page, nothing: the end of an answer of a whole
                // number of pages, or a stream the store dropped (evicted,
                // expired) while it was replayed. Never a silent cut.
                if stored.is_none() && cursor > 0 && live.is_none()
                    && !matches!(store.get(&who.id).await, Ok(Some(_)))
                {
                    tracing::warn!(stream = %who.id, "the stream left the store during its replay");
                    end_frame(&mut buf, End::Abort(AbortKind::StoreFailed), &who, cursor, None);
                    yield Ok(buf.split().freeze());
                    return;
                }
                break;
            };
            let after = cursor;
            let fresh = page.iter().skip_while(|e| e.seq <= after);
            for event in fresh.take_while(|e| e.seq <= replay_to) {
                write_frame(&mut buf, event);
                cursor = event.seq;
            }
            if last >= replay_to || (stored.is_none() && page.len() < CATCH_UP_PAGE) {
                break;
            }
            if buf.len() >= REPLAY_FLUSH_BYTES {
                yield Ok(buf.split().freeze());
            }
        }
        let Some((live, _subscription)) = live else {
            end_frame(&mut buf, end_after_replay, &who, cursor, detail.as_deref());
            yield Ok(buf.split().freeze());
            return;
        };

        let mut changes = live.watch();
        let mut settle: Option<tokio::time::Instant> = None;
        // Rule: one heartbeat timer, moved only when it fires, never reset
        // per write.
        let beat = tokio::time::sleep(heartbeat);
        tokio::pin!(beat);
        let mut last_write = tokio::time::Instant::now();
        // The first write goes at once: it joins the response head.
        let mut first = true;
        loop {
            changes.borrow_and_update();
            let written = match live.write_after(&mut cursor, &mut buf) {
                Ok(end) => end,
                Err(Behind) => {
                    // A slow reader: the run went on without it. What it
                    // missed is in the store (written ahead); a page at a
                    // time, each taken by the client before the next.
                    match store.events_page(&who.id, cursor, CATCH_UP_PAGE).await {
                        Ok(events) if !events.is_empty() => {
                            for event in &events {
                                write_frame(&mut buf, event);
                                cursor = event.seq;
                            }
                            yield Ok(buf.split().freeze());
                            continue;
                        }
                        result => {
                            if let Err(e) = result {
                                tracing::error!(stream = %who.id, error = %e, "catch-up read failed");
                            }
                            end_frame(&mut buf, End::Abort(AbortKind::StoreFailed), &who, cursor, None);
                            yield Ok(buf.split().freeze());
                            return;
                        }
                    }
                }
            };
            if let Some(end) = written {
                end_frame(&mut buf, end, &who, cursor, live.detail().as_deref());
                yield Ok(buf.split().freeze());
                return;
            }
            if !buf.is_empty() {
                if !std::mem::take(&mut first) {
                    // Coalesce: give the pump one turn to publish what the
                    // provider already sent, so a burst becomes one write,
                    // not one syscall per event. A paced stream loses a
                    // scheduler turn (microseconds), nothing more. Its end
                    // waits for the next turn of the loop.
                    tokio::task::yield_now().await;
                    let _ = live.write_after(&mut cursor, &mut buf);
                }
                last_write = tokio::time::Instant::now();
                yield Ok(buf.split().freeze());
                continue;
            }
            tokio::select! {
                biased;
                _ = changes.changed() => {}
                _ = deadline.cancelled(), if settle.is_none() => {
                    settle = Some(tokio::time::Instant::now() + DEADLINE_SETTLE);
                }
                _ = tokio::time::sleep_until(settle.unwrap_or_else(tokio::time::Instant::now)), if settle.is_some() => {
                    end_frame(&mut buf, End::Abort(AbortKind::ServerRestarting), &who, cursor, None);
                    yield Ok(buf.split().freeze());
                    return;
                }
                _ = &mut beat => {
                    let due = last_write + heartbeat;
                    if tokio::time::Instant::now() >= due {
                        last_write = tokio::time::Instant::now();
                        beat.as_mut().reset(last_write + heartbeat);
                        // A comment line with no blank line after it:
                        // nothing for a parser to dispatch. (`: ping\n\n`
                        // after an `id:` makes the official SDKs' decoder —
                        // it keeps the last id, as the spec says — yield an
                        // empty event, which openai-python then fails to
                        // parse as JSON.)
                        yield Ok(Bytes::from_static(b": ping\n"));
                    } else {
                        beat.as_mut().reset(due);
                    }
                }
            }
        }
    }
}
