"""tidegate-client: make tidegate's interrupted LLM streams resume transparently.

One line for the official openai SDK::

    client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1",
                           http_client=httpx.Client(transport=ResumableTransport()))

and a small native API (:class:`TidegateClient`) to stream text, resume a
stream by id and token, and read its state.
"""

from __future__ import annotations

from ._core import RESUME_TOKEN_HEADER, STREAM_ID_HEADER, ResumePolicy, TransportStats
from ._sse import ServerSentEvent, SSEParser, serialize_event
from .client import (
    AsyncChatStream,
    AsyncTidegateClient,
    ChatStream,
    StreamNotFound,
    StreamState,
    TidegateClient,
)
from .errors import (
    ResumeFailed,
    StreamAborted,
    StreamGapError,
    StreamProtocolError,
    TidegateError,
    TidegateHTTPError,
    TidegateStreamError,
)
from .transport import AsyncResumableTransport, ResumableTransport

__version__ = "0.1.0"

__all__ = [
    "ResumableTransport",
    "AsyncResumableTransport",
    "ResumePolicy",
    "TransportStats",
    "TidegateClient",
    "AsyncTidegateClient",
    "ChatStream",
    "AsyncChatStream",
    "StreamState",
    "TidegateError",
    "TidegateStreamError",
    "ResumeFailed",
    "StreamGapError",
    "StreamProtocolError",
    "StreamAborted",
    "TidegateHTTPError",
    "StreamNotFound",
    "ServerSentEvent",
    "SSEParser",
    "serialize_event",
    "STREAM_ID_HEADER",
    "RESUME_TOKEN_HEADER",
    "__version__",
]
