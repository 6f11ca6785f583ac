"""A small native API for tidegate: stream chat text, resume by id and token, read state.

>>> from tidegate_client import TidegateClient
>>> with TidegateClient("http://127.0.0.1:8080") as tg:
...     for text in tg.stream_text({"model": "mock", "messages": [{"role": "user", "content": "hi"}]}):
...         print(text, end="", flush=True)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from ._core import RESUME_TOKEN_HEADER, STREAM_ID_HEADER, ResumePolicy
from ._sse import ServerSentEvent, SSEParser
from .errors import StreamAborted, TidegateHTTPError
from .transport import AsyncResumableTransport, ResumableTransport

__all__ = [
    "TidegateClient",
    "AsyncTidegateClient",
    "ChatStream",
    "AsyncChatStream",
    "StreamState",
    "StreamNotFound",
    "DEFAULT_TIMEOUT",
]

#: 10 minutes to read (streams can idle between tokens), 5 s to connect.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)


class StreamNotFound(TidegateHTTPError):
    """404 from a stream endpoint: unknown stream, expired, or wrong resume token
    (the gateway deliberately does not say which)."""


@dataclass(frozen=True, slots=True)
class StreamState:
    """``GET /v1/streams/{id}/state``: the job state of a stream."""

    status: str  #: running | completed | interrupted | failed | cancelled
    last_seq: int | None
    text: str | None
    finish_reason: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StreamState:
        last_seq = obj.get("last_seq")
        return cls(
            status=str(obj.get("status", "")),
            last_seq=int(last_seq) if isinstance(last_seq, (int, str)) and str(last_seq).isdigit() else None,
            text=obj.get("text") if isinstance(obj.get("text"), str) else None,
            finish_reason=obj.get("finish_reason") if isinstance(obj.get("finish_reason"), str) else None,
            raw=obj,
        )


def _origin(base_url: str) -> str:
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base


def _http_error(status: int, body: bytes) -> TidegateHTTPError:
    text = body.decode("utf-8", errors="replace")
    error: dict[str, Any] | None = None
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            error = obj["error"]
    except ValueError:
        pass
    cls = StreamNotFound if status == 404 else TidegateHTTPError
    return cls(status, text, error)


def _chunk_text(chunk: Mapping[str, Any]) -> str:
    """``choices[0].delta.content`` of an OpenAI chat.completion.chunk, or ''."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return ""
    first = choices[0]
    if not isinstance(first, dict):
        return ""
    delta = first.get("delta")
    if not isinstance(delta, dict):
        return ""
    content = delta.get("content")
    return content if isinstance(content, str) else ""


class _StreamBase:
    def __init__(self, response: httpx.Response, stream_id: str, resume_token: str | None, last_event_id: int) -> None:
        self.response = response
        #: the stream's id (``x-tidegate-stream-id``)
        self.stream_id = stream_id
        #: the capability to resume it or read its state
        self.resume_token = resume_token
        #: id of the last event delivered by this iterator (the cursor to resume after)
        self.last_event_id = last_event_id
        #: ``finish_reason`` of the last chunk that had one
        self.finish_reason: str | None = None
        self.done = False
        self._parser = SSEParser()

    def _events(self, chunk: bytes) -> Iterator[dict[str, Any]]:
        for ev in self._parser.feed(chunk):
            out = self._on_event(ev)
            if out is not None:
                yield out
            if self.done:
                return

    def _on_event(self, ev: ServerSentEvent) -> dict[str, Any] | None:
        if ev.is_done():
            self.done = True
            return None
        if not ev.data:
            return None
        obj = ev.json()
        if ev.id is not None and ev.id.isdigit():
            self.last_event_id = int(ev.id)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            err: dict[str, Any] = obj["error"]
            self.done = True
            token = err.get("resume_token")
            if isinstance(token, str) and token:
                self.resume_token = token
            raise StreamAborted(
                str(err.get("message") or err.get("type") or "the stream was aborted"),
                stream_id=str(err.get("stream_id") or self.stream_id),
                resume_token=self.resume_token,
                last_event_id=self.last_event_id,
                type=err.get("type"),
                code=err.get("code"),
                resumable=err.get("resume") is True,
                error=err,
            )
        if isinstance(obj, dict):
            choices = obj.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                fr = choices[0].get("finish_reason")
                if isinstance(fr, str):
                    self.finish_reason = fr
            return obj
        return None


class ChatStream(_StreamBase):
    """A chat completion stream: iterate it for ``chat.completion.chunk`` dicts,
    or call :meth:`text` for the text deltas.  Close it (or use ``with``) when
    you stop early."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.done:
            return
        try:
            for chunk in self.response.iter_bytes():
                yield from self._events(chunk)
                if self.done:
                    return
        finally:
            self.close()

    def text(self) -> Iterator[str]:
        """The text deltas (``choices[0].delta.content``), empty ones left out."""
        for chunk in self:
            t = _chunk_text(chunk)
            if t:
                yield t

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncChatStream(_StreamBase):
    """The async counterpart of :class:`ChatStream`."""

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if self.done:
            return
        try:
            async for chunk in self.response.aiter_bytes():
                for obj in self._events(chunk):
                    yield obj
                if self.done:
                    return
        finally:
            await self.aclose()

    async def text(self) -> AsyncIterator[str]:
        async for chunk in self:
            t = _chunk_text(chunk)
            if t:
                yield t

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _stream_request(request: Mapping[str, Any]) -> dict[str, Any]:
    body = dict(request)
    body["stream"] = True
    return body


def _resume_headers(resume_token: str, last_event_id: int) -> dict[str, str]:
    return {
        RESUME_TOKEN_HEADER: resume_token,
        "last-event-id": str(last_event_id),
        "accept": "text/event-stream",
    }


class TidegateClient:
    """Native, synchronous tidegate client.

    Args:
        base_url: the gateway, e.g. ``http://127.0.0.1:8080`` (a trailing ``/v1``
            is accepted and ignored).
        api_key: sent as ``Authorization: Bearer`` (a tidegate client key, or a
            provider key in bring-your-own-key setups).
        auto_resume: splice interrupted streams transparently (via
            :class:`ResumableTransport`).  When False, a resumable abort surfaces
            as :class:`StreamAborted` and a cut as an ``httpx`` error, and you
            call :meth:`resume` yourself.
        max_wait, max_attempts, policy: the resume budget (see
            :class:`ResumableTransport`).
        transport: the inner transport (default ``httpx.HTTPTransport()``).
        timeout, headers: passed to the ``httpx.Client``.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        api_key: str | None = None,
        auto_resume: bool = True,
        max_wait: float | None = 60.0,
        max_attempts: int | None = None,
        policy: ResumePolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = _origin(base_url)
        hdrs = dict(headers or {})
        if api_key:
            hdrs["authorization"] = f"Bearer {api_key}"
        self.transport: httpx.BaseTransport
        if auto_resume:
            self.transport = ResumableTransport(
                transport, max_wait=max_wait, max_attempts=max_attempts, policy=policy
            )
        else:
            self.transport = transport or httpx.HTTPTransport()
        self._http = httpx.Client(base_url=self.base_url, transport=self.transport, timeout=timeout, headers=hdrs)

    # -- streams ---------------------------------------------------------------
    def stream_chat(self, request: Mapping[str, Any]) -> ChatStream:
        """POST ``/v1/chat/completions`` with ``stream: true``; returns the open stream."""
        req = self._http.build_request("POST", "/v1/chat/completions", json=_stream_request(request))
        response = self._http.send(req, stream=True)
        return self._open(response, None, None, 0)

    def stream_text(self, request: Mapping[str, Any]) -> Iterator[str]:
        """The text deltas of a chat stream (one uninterrupted iterator)."""
        with self.stream_chat(request) as stream:
            yield from stream.text()

    def resume(self, stream_id: str, resume_token: str, last_event_id: int = 0) -> ChatStream:
        """``GET /v1/streams/{id}``: the events after ``last_event_id``, then the live rest."""
        req = self._http.build_request(
            "GET", f"/v1/streams/{quote(stream_id, safe='')}", headers=_resume_headers(resume_token, last_event_id)
        )
        response = self._http.send(req, stream=True)
        return self._open(response, stream_id, resume_token, last_event_id)

    def resume_text(self, stream_id: str, resume_token: str, last_event_id: int = 0) -> Iterator[str]:
        with self.resume(stream_id, resume_token, last_event_id) as stream:
            yield from stream.text()

    def _open(self, response: httpx.Response, stream_id: str | None, token: str | None, cursor: int) -> ChatStream:
        if response.status_code != 200:
            body = response.read()
            response.close()
            raise _http_error(response.status_code, body)
        sid = response.headers.get(STREAM_ID_HEADER) or stream_id or ""
        tok = response.headers.get(RESUME_TOKEN_HEADER) or token
        return ChatStream(response, sid, tok, cursor)

    # -- state -----------------------------------------------------------------
    def state(self, stream_id: str, resume_token: str) -> StreamState:
        """``GET /v1/streams/{id}/state``."""
        r = self._http.get(
            f"/v1/streams/{quote(stream_id, safe='')}/state", headers={RESUME_TOKEN_HEADER: resume_token}
        )
        if r.status_code != 200:
            raise _http_error(r.status_code, r.content)
        return StreamState.from_json(r.json())

    def cancel(self, stream_id: str, resume_token: str) -> None:
        """``DELETE /v1/streams/{id}``: stop the stream wherever it runs."""
        r = self._http.delete(f"/v1/streams/{quote(stream_id, safe='')}", headers={RESUME_TOKEN_HEADER: resume_token})
        if r.status_code >= 300:
            raise _http_error(r.status_code, r.content)

    # -- lifecycle ---------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TidegateClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncTidegateClient:
    """Native asyncio/trio tidegate client; same arguments as :class:`TidegateClient`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        api_key: str | None = None,
        auto_resume: bool = True,
        max_wait: float | None = 60.0,
        max_attempts: int | None = None,
        policy: ResumePolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = _origin(base_url)
        hdrs = dict(headers or {})
        if api_key:
            hdrs["authorization"] = f"Bearer {api_key}"
        self.transport: httpx.AsyncBaseTransport
        if auto_resume:
            self.transport = AsyncResumableTransport(
                transport, max_wait=max_wait, max_attempts=max_attempts, policy=policy
            )
        else:
            self.transport = transport or httpx.AsyncHTTPTransport()
        self._http = httpx.AsyncClient(
            base_url=self.base_url, transport=self.transport, timeout=timeout, headers=hdrs
        )

    async def stream_chat(self, request: Mapping[str, Any]) -> AsyncChatStream:
        req = self._http.build_request("POST", "/v1/chat/completions", json=_stream_request(request))
        response = await self._http.send(req, stream=True)
        return await self._open(response, None, None, 0)

    async def stream_text(self, request: Mapping[str, Any]) -> AsyncIterator[str]:
        stream = await self.stream_chat(request)
        async with stream:
            async for t in stream.text():
                yield t

    async def resume(self, stream_id: str, resume_token: str, last_event_id: int = 0) -> AsyncChatStream:
        req = self._http.build_request(
            "GET", f"/v1/streams/{quote(stream_id, safe='')}", headers=_resume_headers(resume_token, last_event_id)
        )
        response = await self._http.send(req, stream=True)
        return await self._open(response, stream_id, resume_token, last_event_id)

    async def resume_text(self, stream_id: str, resume_token: str, last_event_id: int = 0) -> AsyncIterator[str]:
        stream = await self.resume(stream_id, resume_token, last_event_id)
        async with stream:
            async for t in stream.text():
                yield t

    async def _open(
        self, response: httpx.Response, stream_id: str | None, token: str | None, cursor: int
    ) -> AsyncChatStream:
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            raise _http_error(response.status_code, body)
        sid = response.headers.get(STREAM_ID_HEADER) or stream_id or ""
        tok = response.headers.get(RESUME_TOKEN_HEADER) or token
        return AsyncChatStream(response, sid, tok, cursor)

    async def state(self, stream_id: str, resume_token: str) -> StreamState:
        r = await self._http.get(
            f"/v1/streams/{quote(stream_id, safe='')}/state", headers={RESUME_TOKEN_HEADER: resume_token}
        )
        if r.status_code != 200:
            raise _http_error(r.status_code, r.content)
        return StreamState.from_json(r.json())

    async def cancel(self, stream_id: str, resume_token: str) -> None:
        r = await self._http.delete(
            f"/v1/streams/{quote(stream_id, safe='')}", headers={RESUME_TOKEN_HEADER: resume_token}
        )
        if r.status_code >= 300:
            raise _http_error(r.status_code, r.content)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncTidegateClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
