"""Module-generic implementation of the resumable transports.

The public classes (for ``httpx`` in :mod:`tidegate_client.transport`, for
``httpx2`` in :mod:`tidegate_client.httpx2`) are thin subclasses that pin the
httpx-like module and the base classes.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from types import ModuleType, TracebackType
from typing import Any, Self

from ._core import (
    ResumePolicy,
    TransportStats,
    _AsyncSplice,
    _SyncSplice,
    outward_headers,
    stream_identity,
)


def make_policy(
    policy: ResumePolicy | None,
    max_wait: float | None,
    max_attempts: int | None,
    initial_backoff: float,
    max_backoff: float,
) -> ResumePolicy:
    """``policy`` wins when given; otherwise build one from the individual arguments."""
    if policy is not None:
        return policy
    return ResumePolicy(
        max_wait=max_wait,
        max_attempts=max_attempts,
        initial_backoff=initial_backoff,
        max_backoff=max_backoff,
    )


@functools.cache
def sync_stream_class(hx: ModuleType) -> type:
    class SplicedStream(hx.SyncByteStream):  # type: ignore[name-defined,misc]
        """The body of a tidegate stream, spliced over reconnections."""

        def __init__(self, splice: _SyncSplice) -> None:
            self._splice = splice

        def __iter__(self) -> Iterator[bytes]:
            return iter(self._splice)

        def close(self) -> None:
            self._splice.close()

    return SplicedStream


@functools.cache
def async_stream_class(hx: ModuleType) -> type:
    class AsyncSplicedStream(hx.AsyncByteStream):  # type: ignore[name-defined,misc]
        """The body of a tidegate stream, spliced over reconnections."""

        def __init__(self, splice: _AsyncSplice) -> None:
            self._splice = splice

        def __aiter__(self) -> AsyncIterator[bytes]:
            return self._splice.__aiter__()

        async def aclose(self) -> None:
            await self._splice.aclose()

    return AsyncSplicedStream


class _Shared:
    """What both transports share: arguments, policy, and the wrapped
    response (the splice and stream classes differ)."""

    _hx: ModuleType
    _splice: type
    policy: ResumePolicy
    stats: TransportStats

    def __init__(
        self,
        transport: Any = None,
        *,
        max_wait: float | None = 60.0,
        max_attempts: int | None = None,
        initial_backoff: float = 0.1,
        max_backoff: float = 2.0,
        policy: ResumePolicy | None = None,
        resume_base_url: str | None = None,
    ) -> None:
        self._inner = transport if transport is not None else self._default_transport()
        self.policy = make_policy(policy, max_wait, max_attempts, initial_backoff, max_backoff)
        self.resume_base_url = resume_base_url
        self.stats = TransportStats()

    def _default_transport(self) -> Any:
        raise NotImplementedError

    def _stream_class(self) -> type:
        raise NotImplementedError

    @property
    def inner(self) -> Any:
        return self._inner

    def _wrap(self, request: Any, response: Any, stream_id: str, token: str | None, last_id: int) -> Any:
        hx = self._hx
        splice = self._splice(
            hx,
            self._inner,
            response,
            request=request,
            stream_id=stream_id,
            token=token,
            last_id=last_id,
            policy=self.policy,
            stats=self.stats,
            resume_base_url=self.resume_base_url,
        )
        return hx.Response(
            response.status_code,
            headers=outward_headers(response),
            stream=self._stream_class()(splice),
            extensions={k: v for k, v in response.extensions.items() if k in ("http_version", "reason_phrase")},
        )


class SyncImpl(_Shared):
    """Shared body of ``ResumableTransport`` for any httpx-like module."""

    _splice = _SyncSplice

    def _default_transport(self) -> Any:
        return self._hx.HTTPTransport()

    def _stream_class(self) -> type:
        return sync_stream_class(self._hx)

    def _handle(self, request: Any) -> Any:
        response = self._inner.handle_request(request)
        ident = stream_identity(request, response)
        if ident is None:
            return response
        return self._wrap(request, response, *ident)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.close()


class AsyncImpl(_Shared):
    """Shared body of ``AsyncResumableTransport`` for any httpx-like module."""

    _splice = _AsyncSplice

    def _default_transport(self) -> Any:
        return self._hx.AsyncHTTPTransport()

    def _stream_class(self) -> type:
        return async_stream_class(self._hx)

    async def _handle(self, request: Any) -> Any:
        response = await self._inner.handle_async_request(request)
        ident = stream_identity(request, response)
        if ident is None:
            return response
        return self._wrap(request, response, *ident)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()
