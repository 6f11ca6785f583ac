"""Resumable httpx transports.

>>> import httpx, openai
>>> from tidegate_client import ResumableTransport
>>> client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1",
...                        http_client=httpx.Client(transport=ResumableTransport()))
"""

from __future__ import annotations

import httpx

from ._transport_impl import AsyncImpl, SyncImpl

__all__ = ["ResumableTransport", "AsyncResumableTransport"]

_DOC_ARGS = """
    Args:
        transport: the inner transport that does the real I/O (default: a new
            ``httpx.HTTPTransport()`` / ``httpx.AsyncHTTPTransport()``).  Note that
            options given to ``httpx.Client`` itself (``verify``, ``limits``,
            ``http2``, proxies) do not reach a custom transport: configure the
            inner transport instead.
        max_wait: seconds one interruption may last (from the cut, or the abort
            event, until a resumed stream delivers a new event) before
            :class:`~tidegate_client.ResumeFailed` is raised; ``None`` = no time
            limit (then ``max_attempts`` must be set).
        max_attempts: reconnection attempts allowed per interruption
            (``None`` = bounded by ``max_wait`` only).
        initial_backoff, max_backoff: exponential backoff bounds in seconds
            (doubling, with jitter).
        policy: a complete :class:`~tidegate_client.ResumePolicy`; when given it
            overrides the four arguments above.
        resume_base_url: where the gateway's ``/v1/streams/{id}`` lives, if not
            at the origin (and path prefix) of the original request.
"""


class ResumableTransport(SyncImpl, httpx.BaseTransport):
    __doc__ = (
        """An ``httpx`` transport that makes tidegate streams uninterruptible.

    Responses that carry ``x-tidegate-stream-id`` get a body that is one
    uninterrupted SSE stream: resumable abort events (``server_restarting``,
    ``upstream_failed``) and cut connections are swallowed, the stream is
    resumed at ``GET /v1/streams/{id}`` with ``Last-Event-ID`` and the resume
    token, and the continuation is spliced in without duplicates.  Everything
    else passes through untouched.
"""
        + _DOC_ARGS
    )

    _hx = httpx

    @property
    def inner(self) -> httpx.BaseTransport:
        """The wrapped transport."""
        return self._inner  # type: ignore[no-any-return]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._handle(request)  # type: ignore[no-any-return]


class AsyncResumableTransport(AsyncImpl, httpx.AsyncBaseTransport):
    __doc__ = (
        """The ``httpx.AsyncClient`` counterpart of :class:`ResumableTransport`
    (works under asyncio and trio).
"""
        + _DOC_ARGS
    )

    _hx = httpx

    @property
    def inner(self) -> httpx.AsyncBaseTransport:
        """The wrapped transport."""
        return self._inner  # type: ignore[no-any-return]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._handle(request)  # type: ignore[no-any-return]
