"""Transport-independent machinery of the resumable transports.

Everything here is written against an "httpx-like" module (``httpx`` or its
API-compatible successor ``httpx2``), passed around as ``hx``, so the same code
serves both.  The pieces:

* :class:`ResumePolicy` - the reconnection budget and backoff;
* :class:`_Splicer` - the pure, sans-io decision logic: which event to emit,
  which to drop, when the stream is finished and when it must be resumed;
* :class:`_SyncSplice` / :class:`_AsyncSplice` - the drivers that read an inner
  response, feed the splicer, reconnect to ``GET /v1/streams/{id}`` and splice
  the continuation in.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import quote, unquote

import anyio

from ._sse import ServerSentEvent, SSEParser, serialize_event
from .errors import ResumeFailed, StreamGapError, StreamProtocolError

logger = logging.getLogger("tidegate_client")

STREAM_ID_HEADER = "x-tidegate-stream-id"
RESUME_TOKEN_HEADER = "x-tidegate-resume-token"

# Request headers that must not be copied from the original request onto a
# resume request (body-related, or set by us).
_DROP_ON_RESUME = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "expect",
        "accept",
        "last-event-id",
        RESUME_TOKEN_HEADER,
        "idempotency-key",
    }
)
# Response headers that no longer describe the body we hand out.
_DROP_FROM_RESPONSE = frozenset({"content-length", "content-encoding"})

RETRYABLE_STATUS = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class ResumePolicy:
    """How hard to try to resume an interrupted stream.

    The budget applies to one *interruption*: it starts when the stream is cut
    (or an abort event with ``resume: true`` arrives) and is reset as soon as a
    resumed stream delivers a new event.  Within it, reconnections are spaced
    by exponential backoff with jitter: attempt ``n`` (n >= 1 failures so far)
    waits ``min(max_backoff, initial_backoff * multiplier**(n-1))``, of which
    the fraction ``jitter`` is randomised.  A ``Retry-After`` header on a 503 is
    honoured, but never beyond ``max_backoff``.

    ``max_wait`` (seconds) and ``max_attempts`` bound the interruption; when
    either is exhausted :class:`~tidegate_client.ResumeFailed` is raised.  At
    least one of them must be set.
    """

    max_wait: float | None = 60.0
    max_attempts: int | None = None
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_wait is None and self.max_attempts is None:
            raise ValueError("ResumePolicy needs max_wait or max_attempts (or both)")
        if self.max_wait is not None and self.max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff durations must be >= 0")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")

    def backoff(self, failures: int, retry_after: float | None = None) -> float:
        """Delay before the next attempt after ``failures`` failed attempts (>= 1)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, failures - 1))
        delay = base * (1 - self.jitter) + random.uniform(0, base * self.jitter)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay


@dataclass(slots=True)
class TransportStats:
    """Counters kept by a resumable transport (over all its streams)."""

    streams: int = 0  #: tidegate streams wrapped
    interruptions: int = 0  #: cuts and resumable abort events seen
    resume_attempts: int = 0  #: reconnection attempts made
    resumes: int = 0  #: reconnections answered with a 200 stream
    duplicates_dropped: int = 0  #: events dropped because their id was already emitted
    failures: int = 0  #: ResumeFailed raised
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def is_event_stream(response: Any) -> bool:
    ctype: str = response.headers.get("content-type", "")
    return ctype.split(";", 1)[0].strip().lower() == "text/event-stream"


def _api_prefix(path: str) -> str:
    """``/gw/v1/chat/completions`` -> ``/gw``: where the gateway's routes are mounted."""
    i = path.find("/v1/")
    return path[:i] if i >= 0 else ""


def _resume_target(request: Any) -> tuple[str, str | None, int] | None:
    """For a ``GET .../v1/streams/{id}`` request: (stream id, token, cursor)."""
    if request.method != "GET":
        return None
    path: str = request.url.path
    i = path.find("/v1/streams/")
    if i < 0:
        return None
    rest = path[i + len("/v1/streams/") :]
    if not rest or "/" in rest:
        return None
    stream_id = unquote(rest)
    params = request.url.params
    token = request.headers.get(RESUME_TOKEN_HEADER) or params.get("token")
    cursor_raw = request.headers.get("last-event-id") or params.get("after") or "0"
    try:
        cursor = int(cursor_raw)
    except ValueError:
        cursor = 0
    return stream_id, token, cursor


@dataclass(slots=True)
class _Decision:
    emit: bytes | None = None
    finished: bool = False  # the stream ended on purpose: stop, no resume
    resume: bool = False  # a resumable abort: stop reading, resume


class _Splicer:
    """Sans-io splice logic for one stream: ids, duplicates, terminal events."""

    def __init__(self, stream_id: str, token: str | None, last_id: int, stats: TransportStats) -> None:
        self.stream_id = stream_id
        self.token = token
        self.last_id = last_id
        self.stats = stats
        self.progressed = False  # set when an event advanced the stream (reset by the driver)

    def on_event(self, ev: ServerSentEvent) -> _Decision:
        if ev.id is not None and ev.id != "":
            try:
                n = int(ev.id)
            except ValueError:
                raise StreamProtocolError(
                    f"tidegate stream event has a non-numeric id {ev.id!r}",
                    stream_id=self.stream_id,
                    resume_token=self.token,
                    last_event_id=self.last_id,
                ) from None
            if n <= self.last_id:
                self.stats.bump("duplicates_dropped")
                return _Decision()
            if n != self.last_id + 1:
                raise StreamGapError(
                    f"tidegate stream skipped events: expected id {self.last_id + 1}, got {n}",
                    stream_id=self.stream_id,
                    resume_token=self.token,
                    last_event_id=self.last_id,
                    received_id=n,
                )
            self.last_id = n
            self.progressed = True
        if ev.is_done():
            self.progressed = True
            return _Decision(emit=serialize_event(ev), finished=True)
        error = _abort_error(ev)
        if error is not None:
            if error.get("resume") is True:
                token = error.get("resume_token")
                if isinstance(token, str) and token:
                    self.token = token
                return _Decision(resume=True)
            # resume:false: hand it to the consumer (the SDK raises APIError)
            return _Decision(emit=serialize_event(ev), finished=True)
        if ev.data == "" and ev.event is None and ev.id is None:
            return _Decision()  # retry:/comment-only block
        return _Decision(emit=serialize_event(ev))


def _abort_error(ev: ServerSentEvent) -> dict[str, Any] | None:
    """The error object of an in-band abort event, else None.

    OpenAI shape: ``{"error": {..., "resume": bool}}``; Anthropic shape:
    ``{"type": "error", "error": {..., "resume": bool}}``.
    """
    data = ev.data
    if '"error"' not in data or not data.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict) and "resume" in err:
        return err
    return None


class _Reconnector:
    """Budget bookkeeping for the current interruption."""

    def __init__(self, policy: ResumePolicy) -> None:
        self.policy = policy
        self.started: float | None = None
        self.failures = 0
        self.retry_after: float | None = None
        self.last_reason = ""
        self.last_status: int | None = None
        self.last_body: str | None = None
        self.last_exc: BaseException | None = None

    def begin(self, reason: str) -> None:
        if self.started is None:
            self.started = time.monotonic()
            self.failures = 0
        else:
            # the previous resume was answered but produced nothing new before
            # it ended again: it counts as a failed attempt (so backoff applies)
            self.failures += 1
        self.last_reason = reason

    def progress(self) -> None:
        self.started = None
        self.failures = 0
        self.retry_after = None
        self.last_status = None
        self.last_body = None
        self.last_exc = None

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when the budget is spent."""
        p = self.policy
        if p.max_attempts is not None and self.failures >= p.max_attempts:
            return None
        if self.failures == 0:
            return 0.0
        delay = p.backoff(self.failures, self.retry_after)
        self.retry_after = None
        if p.max_wait is not None:
            remaining = p.max_wait - self.elapsed()
            if remaining <= 0:
                return None
            delay = min(delay, remaining)
        return delay

    def fail(self, reason: str, *, status: int | None = None, body: str | None = None,
             exc: BaseException | None = None, retry_after: float | None = None) -> None:
        self.failures += 1
        self.last_reason = reason
        self.last_status = status
        self.last_body = body
        self.last_exc = exc
        self.retry_after = retry_after


class _Common:
    """State shared by the sync and async drivers."""

    def __init__(
        self,
        hx: ModuleType,
        *,
        request: Any,
        stream_id: str,
        token: str | None,
        last_id: int,
        policy: ResumePolicy,
        stats: TransportStats,
        resume_base_url: str | None,
    ) -> None:
        self.hx = hx
        self.request = request
        self.splicer = _Splicer(stream_id, token, last_id, stats)
        self.policy = policy
        self.stats = stats
        self.reconnector = _Reconnector(policy)
        self.resume_base_url = resume_base_url
        self.closed = False
        stats.bump("streams")

    # -- errors treated as "the connection was cut" --------------------------
    def is_cut(self, exc: BaseException) -> bool:
        hx = self.hx
        return isinstance(exc, (hx.NetworkError, hx.TimeoutException, hx.RemoteProtocolError))

    def resume_url(self) -> Any:
        sid = quote(self.splicer.stream_id, safe="")
        if self.resume_base_url is not None:
            return self.hx.URL(self.resume_base_url.rstrip("/") + f"/v1/streams/{sid}")
        url = self.request.url
        prefix = _api_prefix(url.path)
        return url.copy_with(path=f"{prefix}/v1/streams/{sid}", query=None, fragment=None)

    def resume_request(self) -> Any:
        headers = [
            (k, v) for k, v in self.request.headers.multi_items() if k.lower() not in _DROP_ON_RESUME
        ]
        headers.append(("accept", "text/event-stream"))
        headers.append(("last-event-id", str(self.splicer.last_id)))
        if self.splicer.token:
            headers.append((RESUME_TOKEN_HEADER, self.splicer.token))
        return self.hx.Request(
            "GET", self.resume_url(), headers=headers, extensions=dict(self.request.extensions)
        )

    def interrupted(self, reason: str) -> None:
        self.stats.bump("interruptions")
        if self.reconnector.started is None:
            logger.info(
                "tidegate stream %s interrupted after id %d (%s); resuming",
                self.splicer.stream_id, self.splicer.last_id, reason,
            )
        self.reconnector.begin(reason)

    def give_up(self) -> ResumeFailed:
        r = self.reconnector
        self.stats.bump("failures")
        msg = (
            f"could not resume tidegate stream after {r.failures} attempt(s) in "
            f"{r.elapsed():.1f}s: {r.last_reason}"
        )
        logger.warning("%s (stream %s)", msg, self.splicer.stream_id)
        err = ResumeFailed(
            msg,
            stream_id=self.splicer.stream_id,
            resume_token=self.splicer.token,
            last_event_id=self.splicer.last_id,
            attempts=r.failures,
            status_code=r.last_status,
            body=r.last_body,
        )
        err.__cause__ = r.last_exc
        return err

    def fatal(self, status: int, body: str) -> ResumeFailed:
        self.reconnector.fail(f"the gateway answered HTTP {status}", status=status, body=body)
        return self.give_up()

    def on_resume_response(self, response: Any) -> str | None:
        """Classify a resume answer: None = use it; "retry" = retryable; "fatal" = give up."""
        status: int = response.status_code
        if status == 200 and is_event_stream(response):
            return None
        if status in RETRYABLE_STATUS:
            return "retry"
        return "fatal"

    def accept(self, response: Any) -> None:
        self.stats.bump("resumes")
        token = response.headers.get(RESUME_TOKEN_HEADER)
        if token:
            self.splicer.token = token
        logger.info(
            "tidegate stream %s resumed after id %d", self.splicer.stream_id, self.splicer.last_id
        )

    def after_events(self) -> None:
        if self.splicer.progressed:
            self.splicer.progressed = False
            self.reconnector.progress()


def _snippet(data: bytes) -> str:
    return data[:2000].decode("utf-8", errors="replace")


def outward_headers(response: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _DROP_FROM_RESPONSE]


class _SyncSplice(_Common):
    """Sync driver: an iterator of SSE bytes over as many connections as needed."""

    def __init__(self, hx: ModuleType, transport: Any, response: Any, **kw: Any) -> None:
        super().__init__(hx, **kw)
        self.transport = transport
        self.current: Any = response

    def close(self) -> None:
        self.closed = True
        cur, self.current = self.current, None
        if cur is not None:
            cur.close()

    def __iter__(self) -> Iterator[bytes]:
        try:
            while True:
                if self.current is None:
                    if self.closed:
                        return
                    self.current = self._reconnect()
                outcome = yield from self._pump(self.current)
                cur, self.current = self.current, None
                if cur is not None:
                    cur.close()
                if outcome is None:
                    return
                self.interrupted(outcome)
        finally:
            cur, self.current = self.current, None
            if cur is not None:
                cur.close()

    def _pump(self, response: Any) -> Generator[bytes, None, str | None]:
        """Yield spliced bytes from one connection.

        Returns None when the stream finished on purpose, else the reason it
        must be resumed.
        """
        parser = SSEParser()
        body = response.iter_bytes()
        try:
            while True:
                try:
                    chunk = next(body)
                except StopIteration:
                    return "the connection ended before the stream was complete"
                except Exception as exc:
                    if self.is_cut(exc) and not self.closed:
                        return f"{type(exc).__name__}: {exc}"
                    raise
                out = []
                resume = False
                for ev in parser.feed(chunk):
                    d = self.splicer.on_event(ev)
                    if d.emit is not None:
                        out.append(d.emit)
                    if d.finished or d.resume:
                        resume = d.resume
                        break
                else:
                    self.after_events()
                    if out:
                        yield b"".join(out)
                    continue
                self.after_events()
                if out:
                    yield b"".join(out)
                return "resumable abort event" if resume else None
        finally:
            body.close()

    def _reconnect(self) -> Any:
        r = self.reconnector
        while True:
            delay = r.next_delay()
            if delay is None:
                raise self.give_up()
            if delay > 0:
                time.sleep(delay)
            if self.closed:
                raise self.give_up()
            self.stats.bump("resume_attempts")
            req = self.resume_request()
            try:
                response = self.transport.handle_request(req)
            except Exception as exc:
                if self.is_cut(exc):
                    r.fail(f"{type(exc).__name__}: {exc}", exc=exc)
                    logger.debug("resume attempt failed: %r", exc)
                    continue
                raise
            kind = self.on_resume_response(response)
            if kind is None:
                self.accept(response)
                return response
            try:
                body = _snippet(response.read())
            except Exception:
                body = ""
            finally:
                response.close()
            if kind == "retry":
                r.fail(
                    f"the gateway answered HTTP {response.status_code}",
                    status=response.status_code,
                    body=body,
                    retry_after=parse_retry_after(response.headers.get("retry-after")),
                )
                continue
            raise self.fatal(response.status_code, body)


class _AsyncSplice(_Common):
    """Async driver (asyncio or trio, via anyio)."""

    def __init__(self, hx: ModuleType, transport: Any, response: Any, **kw: Any) -> None:
        super().__init__(hx, **kw)
        self.transport = transport
        self.current: Any = response

    async def aclose(self) -> None:
        self.closed = True
        cur, self.current = self.current, None
        if cur is not None:
            await cur.aclose()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while True:
                if self.current is None:
                    if self.closed:
                        return
                    self.current = await self._reconnect()
                outcome: str | None = None
                finished = False
                async with contextlib.aclosing(self._pump(self.current)) as pump:
                    async for item in pump:
                        if isinstance(item, bytes):
                            yield item
                        else:
                            outcome = item.reason
                            finished = item.finished
                cur, self.current = self.current, None
                if cur is not None:
                    await cur.aclose()
                if finished:
                    return
                self.interrupted(outcome or "the connection ended")
        finally:
            cur, self.current = self.current, None
            if cur is not None:
                with anyio.CancelScope(shield=True):
                    await cur.aclose()

    async def _pump(self, response: Any) -> AsyncGenerator[bytes | _End, None]:
        parser = SSEParser()
        async with contextlib.aclosing(response.aiter_bytes()) as body:
            it = body.__aiter__()
            while True:
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    yield _End("the connection ended before the stream was complete", False)
                    return
                except Exception as exc:
                    if self.is_cut(exc) and not self.closed:
                        yield _End(f"{type(exc).__name__}: {exc}", False)
                        return
                    raise
                out = []
                end: _End | None = None
                for ev in parser.feed(chunk):
                    d = self.splicer.on_event(ev)
                    if d.emit is not None:
                        out.append(d.emit)
                    if d.resume:
                        end = _End("resumable abort event", False)
                        break
                    if d.finished:
                        end = _End("", True)
                        break
                self.after_events()
                if out:
                    yield b"".join(out)
                if end is not None:
                    yield end
                    return

    async def _reconnect(self) -> Any:
        r = self.reconnector
        while True:
            delay = r.next_delay()
            if delay is None:
                raise self.give_up()
            if delay > 0:
                await anyio.sleep(delay)
            if self.closed:
                raise self.give_up()
            self.stats.bump("resume_attempts")
            req = self.resume_request()
            try:
                response = await self.transport.handle_async_request(req)
            except Exception as exc:
                if self.is_cut(exc):
                    r.fail(f"{type(exc).__name__}: {exc}", exc=exc)
                    logger.debug("resume attempt failed: %r", exc)
                    continue
                raise
            kind = self.on_resume_response(response)
            if kind is None:
                self.accept(response)
                return response
            try:
                body = _snippet(await response.aread())
            except Exception:
                body = ""
            finally:
                await response.aclose()
            if kind == "retry":
                r.fail(
                    f"the gateway answered HTTP {response.status_code}",
                    status=response.status_code,
                    body=body,
                    retry_after=parse_retry_after(response.headers.get("retry-after")),
                )
                continue
            raise self.fatal(response.status_code, body)


@dataclass(frozen=True, slots=True)
class _End:
    reason: str
    finished: bool


def stream_identity(request: Any, response: Any) -> tuple[str, str | None, int] | None:
    """If ``response`` is a tidegate stream: (stream id, resume token, starting cursor)."""
    if response.status_code != 200 or not is_event_stream(response):
        return None
    sid = response.headers.get(STREAM_ID_HEADER)
    target = _resume_target(request)
    token = response.headers.get(RESUME_TOKEN_HEADER)
    if sid:
        if target is not None and target[0] == sid:
            return sid, token or target[1], target[2]
        return sid, token, 0
    if target is not None:
        return target[0], token or target[1], target[2]
    return None
