"""A small, incremental Server-Sent Events parser and serializer.

The parser follows the WHATWG "event stream interpretation" rules: lines end
with CRLF, LF or CR; a line starting with ``:`` is a comment; ``field: value``
has one optional space stripped after the colon; a blank line dispatches the
event.  Unlike a browser it keeps the ``id`` of each event separately (an event
without an ``id:`` line has ``id is None``) because the splicer needs to know
which events carry a sequence number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ServerSentEvent", "SSEParser", "serialize_event"]


@dataclass(slots=True)
class ServerSentEvent:
    """One dispatched SSE event."""

    data: str = ""
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)

    def is_done(self) -> bool:
        """``data: [DONE]`` (OpenAI chat), ``event: message_stop`` (Anthropic), or
        ``event: response.completed`` / ``response.incomplete`` (OpenAI Responses)."""
        return self.data.strip() == "[DONE]" or self.event in (
            "message_stop",
            "response.completed",
            "response.incomplete",
        )


class SSEParser:
    """Feed bytes, get complete events.

    Incomplete trailing data (an event not yet terminated by a blank line) is
    kept until more bytes arrive; :meth:`pending` tells whether any is held.
    Per the SSE specification, an unterminated event at end-of-stream is
    discarded, which is exactly what a resuming client wants: it has not been
    delivered, so it will be replayed.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._first = True
        self._reset_event()

    def _reset_event(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._comments: list[str] = []
        self._has_fields = False

    def pending(self) -> bool:
        return bool(self._buf) or self._has_fields

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not chunk:
            return []
        self._buf += chunk
        if self._first:
            if len(self._buf) < 3 and b"\xef\xbb\xbf".startswith(bytes(self._buf)):
                return []  # could still be a BOM
            if self._buf.startswith(b"\xef\xbb\xbf"):
                del self._buf[:3]
            self._first = False
        events: list[ServerSentEvent] = []
        buf = self._buf
        start = 0
        n = len(buf)
        while True:
            i_lf = buf.find(b"\n", start)
            i_cr = buf.find(b"\r", start)
            if i_lf < 0 and i_cr < 0:
                break
            if i_cr >= 0 and (i_lf < 0 or i_cr < i_lf):
                # CR line ending; if it is the last byte we cannot yet know
                # whether an LF follows (CRLF split across chunks).
                if i_cr + 1 >= n:
                    break
                end = i_cr
                nxt = i_cr + 2 if buf[i_cr + 1] == 0x0A else i_cr + 1
            else:
                end = i_lf
                nxt = i_lf + 1
            line = bytes(buf[start:end]).decode("utf-8", errors="replace")
            start = nxt
            ev = self._line(line)
            if ev is not None:
                events.append(ev)
        if start:
            del buf[:start]
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if line == "":
            if not self._has_fields:
                return None
            ev: ServerSentEvent | None = None
            if self._data or self._event is not None or self._id is not None:
                ev = ServerSentEvent(
                    data="\n".join(self._data),
                    event=self._event,
                    id=self._id,
                    retry=self._retry,
                    comments=self._comments,
                )
            elif self._retry is not None or self._comments:
                # A block with only retry:/comments: surface it so callers may
                # look at it, but it carries no data.
                ev = ServerSentEvent(retry=self._retry, comments=self._comments)
            self._reset_event()
            return ev
        if line.startswith(":"):
            self._comments.append(line[1:].removeprefix(" "))
            self._has_fields = True
            return None
        name, sep, value = line.partition(":")
        if sep:
            value = value.removeprefix(" ")
        self._has_fields = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry":
            if value.isdigit():
                self._retry = int(value)
        # unknown fields are ignored
        return None


def serialize_event(ev: ServerSentEvent) -> bytes:
    """Serialize an event as standard SSE (``id:``, ``event:``, ``data:`` lines).

    Comments and ``retry:`` hints are not re-emitted: they are transport
    details between the gateway and this client.
    """
    parts: list[str] = []
    if ev.id is not None:
        parts.append(f"id: {ev.id}\n")
    if ev.event is not None:
        parts.append(f"event: {ev.event}\n")
    for line in ev.data.split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")
