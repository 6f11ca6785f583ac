"""Exceptions raised by tidegate_client."""

from __future__ import annotations

from typing import Any

__all__ = [
    "TidegateError",
    "TidegateStreamError",
    "ResumeFailed",
    "StreamGapError",
    "StreamProtocolError",
    "StreamAborted",
    "TidegateHTTPError",
]


class TidegateError(Exception):
    """Base class of every exception raised by this library."""


class TidegateStreamError(TidegateError):
    """An error about one tidegate stream.

    Carries what a caller needs to resume the stream later with
    :meth:`tidegate_client.TidegateClient.resume`: ``stream_id``,
    ``resume_token`` and ``last_event_id`` (the id of the last event that was
    delivered to the consumer; 0 when none was).
    """

    def __init__(
        self,
        message: str,
        *,
        stream_id: str,
        resume_token: str | None,
        last_event_id: int,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.stream_id = stream_id
        self.resume_token = resume_token
        self.last_event_id = last_event_id

    def __str__(self) -> str:
        return f"{self.message} (stream_id={self.stream_id!r}, last_event_id={self.last_event_id})"

    def __repr__(self) -> str:
        # never show the token: it is a capability
        return (
            f"{type(self).__name__}({self.message!r}, stream_id={self.stream_id!r}, "
            f"last_event_id={self.last_event_id})"
        )


class ResumeFailed(TidegateStreamError):
    """The stream was interrupted and could not be resumed within the budget.

    ``status_code`` is the HTTP status of the last resume answer, if one was
    received (e.g. 404 for a wrong token or unknown stream); ``attempts`` is the
    number of reconnection attempts made for this interruption.  The underlying
    exception, if any, is chained as ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        stream_id: str,
        resume_token: str | None,
        last_event_id: int,
        attempts: int = 0,
        status_code: int | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(
            message,
            stream_id=stream_id,
            resume_token=resume_token,
            last_event_id=last_event_id,
        )
        self.attempts = attempts
        self.status_code = status_code
        self.body = body


class StreamGapError(TidegateStreamError):
    """The gateway sent an event id beyond ``last_event_id + 1``: events are missing."""

    def __init__(
        self,
        message: str,
        *,
        stream_id: str,
        resume_token: str | None,
        last_event_id: int,
        received_id: int,
    ) -> None:
        super().__init__(
            message,
            stream_id=stream_id,
            resume_token=resume_token,
            last_event_id=last_event_id,
        )
        self.received_id = received_id


class StreamProtocolError(TidegateStreamError):
    """The gateway sent something this client cannot splice (e.g. a non-numeric id)."""


class StreamAborted(TidegateStreamError):
    """Native API: the stream ended with an abort event that cannot be resumed
    (``cancelled``, ``incomplete``, ``store_failed``, ...), or that was resumable
    but automatic resumption was turned off.

    ``type``/``code`` are the abort event's; ``error`` is the whole error object.
    """

    def __init__(
        self,
        message: str,
        *,
        stream_id: str,
        resume_token: str | None,
        last_event_id: int,
        type: str | None,
        code: str | None,
        resumable: bool,
        error: dict[str, Any],
    ) -> None:
        super().__init__(
            message,
            stream_id=stream_id,
            resume_token=resume_token,
            last_event_id=last_event_id,
        )
        self.type = type
        self.code = code
        self.resumable = resumable
        self.error = error


class TidegateHTTPError(TidegateError):
    """Native API: the gateway answered with a non-success HTTP status."""

    def __init__(self, status_code: int, body: str, error: dict[str, Any] | None = None) -> None:
        self.status_code = status_code
        self.body = body
        self.error = error
        msg = None
        if error is not None:
            m = error.get("message")
            msg = m if isinstance(m, str) else None
        super().__init__(f"HTTP {status_code}: {msg or body[:500]}")
