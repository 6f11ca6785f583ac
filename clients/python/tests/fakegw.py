"""A scripted, in-process imitation of the tidegate wire contract, for unit tests.

It speaks through ``httpx.MockTransport`` (or ``httpx2.MockTransport``), so the
transports can be tested on every path (cuts, abort events, refused
connections, 503s, duplicates, gaps, 404s) without the real gateway.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

STREAM_ID = "st_fake123"
TOKEN = "tok_original"


def words(n: int) -> list[str]:
    return [f"w{i} " for i in range(1, n + 1)]


def chunk_json(i: int, text: str, finish: str | None = None) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "mock",
            "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}],
        }
    )


def content_event(i: int, text: str) -> bytes:
    return f"id: {i}\ndata: {chunk_json(i, text)}\n\n".encode()


def abort_event(kind: str, resume: bool, last: int, token: str = TOKEN) -> bytes:
    err = {
        "error": {
            "type": kind,
            "code": kind,
            "message": f"fake {kind}",
            "resume": resume,
            "stream_id": STREAM_ID,
            "resume_token": token,
            "last_event_id": str(last),
            "resume_url": f"/v1/streams/{STREAM_ID}",
        }
    }
    return f"data: {json.dumps(err)}\n\n".encode()


@dataclass
class Conn:
    """What one stream connection does: sends events (start, stop], then ``end``.

    end: "done" | "cut" (read error) | "eof" (clean close, no [DONE]) |
         "abort" (server_restarting, resume:true) | "upstream_failed" |
         "abort_final" (cancelled, resume:false) | "cut_mid_event" |
         "protocol" (remote protocol error)
    dup: on a resume, replay this many events at or before the cursor too.
    skip: jump this many ids (to provoke a gap).
    """

    stop: int | None = None
    end: str = "done"
    dup: int = 0
    skip: int = 0
    token: str | None = None  # token carried by the abort event
    ping: bool = True
    extra_headers: dict[str, str] = field(default_factory=dict)
    gzip: bool = False


@dataclass
class Status:
    code: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error":{"message":"no","type":"x","code":"x"}}'


class Refused:
    """The connection is refused (gateway down)."""


Action = Conn | Status | Refused


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


class FakeGateway:
    def __init__(
        self,
        hx: ModuleType,
        *,
        n: int = 12,
        first: Conn | Status | None = None,
        resumes: list[Action] | None = None,
        valid_tokens: tuple[str, ...] = (TOKEN, "tok_rotated"),
        split: int = 7,
        send_headers: bool = True,
    ) -> None:
        self.hx = hx
        self.n = n
        self.first = first or Conn()
        self.resumes = list(resumes or [])
        self.valid_tokens = valid_tokens
        self.split = split
        self.send_headers = send_headers
        self.requests: list[Any] = []
        self.texts = words(n)

    @property
    def expected_text(self) -> str:
        return "".join(self.texts)

    def transport(self) -> Any:
        return self.hx.MockTransport(self.handle)

    def resume_requests(self) -> list[Any]:
        return [r for r in self.requests if r.method == "GET"]

    # -- handler -------------------------------------------------------------
    def handle(self, request: Any) -> Any:
        self.requests.append(request)
        hx = self.hx
        path = request.url.path
        if request.method == "POST" and path.endswith("/v1/chat/completions"):
            body = json.loads(request.content)
            if not body.get("stream"):
                text = self.expected_text
                return hx.Response(
                    200,
                    json={
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": 1700000000,
                        "model": "mock",
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                    },
                )
            return self._serve(request, self.first, cursor=0)
        if "/v1/streams/" in path and (path.endswith("/state") or request.method == "DELETE"):
            if request.headers.get("x-tidegate-resume-token") not in self.valid_tokens:
                return hx.Response(404, json={"error": {"message": "stream not found", "type": "not_found", "code": "not_found"}})
            if request.method == "DELETE":
                return hx.Response(204)
            return hx.Response(
                200,
                json={"status": "completed", "last_seq": self.n + 1, "text": self.expected_text, "finish_reason": "stop"},
            )
        if request.method == "GET" and "/v1/streams/" in path:
            if not self.resumes:
                raise AssertionError(f"unexpected resume request #{len(self.resume_requests())}")
            action = self.resumes.pop(0)
            if isinstance(action, Refused):
                raise hx.ConnectError("[Errno 111] Connection refused", request=request)
            token = request.headers.get("x-tidegate-resume-token")
            if token not in self.valid_tokens:
                return hx.Response(404, json={"error": {"message": "stream not found", "type": "not_found", "code": "not_found"}})
            if isinstance(action, Status):
                return hx.Response(action.code, headers=action.headers, content=action.body.encode())
            cursor = int(request.headers.get("last-event-id", "0"))
            return self._serve(request, action, cursor=cursor)
        return hx.Response(404, json={"error": {"message": "no route"}})

    def _serve(self, request: Any, conn: Conn | Status, cursor: int) -> Any:
        hx = self.hx
        if isinstance(conn, Status):
            return hx.Response(conn.code, headers=conn.headers, content=conn.body.encode())
        start = max(0, cursor - conn.dup)
        stop = self.n if conn.stop is None else conn.stop
        pieces: list[bytes] = []
        if conn.ping:
            pieces.append(b": ping\n\n")
        if start > 0:
            pieces.append(b"retry: 5000\n\n")
        i = start + 1 + conn.skip
        while i <= stop:
            pieces.append(content_event(i, self.texts[i - 1]))
            i += 1
        last_sent = stop
        error: BaseException | None = None
        if conn.end == "done":
            if stop >= self.n:
                pieces.append(f"id: {self.n + 1}\ndata: {chunk_json(self.n + 1, '', 'stop')}\n\n".encode())
                pieces.append(b"data: [DONE]\n\n")
        elif conn.end == "abort":
            pieces.append(abort_event("server_restarting", True, last_sent, conn.token or TOKEN))
        elif conn.end == "upstream_failed":
            pieces.append(abort_event("upstream_failed", True, last_sent, conn.token or TOKEN))
        elif conn.end == "abort_final":
            pieces.append(abort_event("cancelled", False, last_sent))
        elif conn.end == "cut":
            error = hx.ReadError("connection reset by peer")
        elif conn.end == "protocol":
            error = hx.RemoteProtocolError("peer closed connection without sending complete message body")
        elif conn.end == "cut_mid_event":
            pieces.append(content_event(stop + 1, self.texts[stop])[:-5])
            error = hx.ReadError("connection reset by peer")
        elif conn.end == "eof":
            pass
        else:  # pragma: no cover
            raise AssertionError(conn.end)
        data = b"".join(pieces)
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        if self.send_headers and request.method == "POST":
            headers["x-tidegate-stream-id"] = STREAM_ID
            headers["x-tidegate-resume-token"] = TOKEN
        headers.update(conn.extra_headers)
        chunks = _split(data, self.split)
        if conn.gzip:
            headers["content-encoding"] = "gzip"
            comp = zlib.compressobj(wbits=31)
            chunks = [comp.compress(c) + comp.flush(zlib.Z_SYNC_FLUSH) for c in chunks] + [comp.flush()]
        return hx.Response(200, headers=headers, stream=_stream_class(hx)(chunks, error))


_CLASSES: dict[ModuleType, type] = {}


def _stream_class(hx: ModuleType) -> type:
    if hx in _CLASSES:
        return _CLASSES[hx]

    class ScriptedStream(hx.SyncByteStream, hx.AsyncByteStream):  # type: ignore[misc,name-defined]
        def __init__(self, chunks: list[bytes], error: BaseException | None) -> None:
            self.chunks = chunks
            self.error = error
            self.closed = False

        def __iter__(self) -> Iterator[bytes]:
            for c in self.chunks:
                if self.closed:
                    raise hx.ReadError("closed")
                yield c
            if self.error is not None:
                raise self.error

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for c in self.chunks:
                if self.closed:
                    raise hx.ReadError("closed")
                yield c
            if self.error is not None:
                raise self.error

        def close(self) -> None:
            self.closed = True

        async def aclose(self) -> None:
            self.closed = True

    _CLASSES[hx] = ScriptedStream
    return ScriptedStream
