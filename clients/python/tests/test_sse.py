"""Unit tests of the SSE parser, serializer and splice logic (no network)."""

from __future__ import annotations

import pytest

from tidegate_client import ServerSentEvent, SSEParser, StreamGapError, StreamProtocolError, serialize_event
from tidegate_client._core import ResumePolicy, TransportStats, _Splicer, parse_retry_after

SAMPLE = (
    b": ping\n\n"
    b"id: 1\ndata: {\"a\":1}\n\n"
    b"retry: 3000\n\n"
    b"id: 2\r\ndata: line one\r\ndata: line two\r\n\r\n"
    b"event: message_stop\rdata: {}\r\r"
    b"data: [DONE]\n\n"
)


def _all(parser: SSEParser, pieces: list[bytes]) -> list[ServerSentEvent]:
    out: list[ServerSentEvent] = []
    for p in pieces:
        out.extend(parser.feed(p))
    return out


def _summary(evs: list[ServerSentEvent]) -> list[tuple[str | None, str | None, str, int | None]]:
    return [(e.id, e.event, e.data, e.retry) for e in evs]


EXPECTED = [
    (None, None, "", None),  # the ping block (comment only)
    ("1", None, '{"a":1}', None),
    (None, None, "", 3000),
    ("2", None, "line one\nline two", None),
    (None, "message_stop", "{}", None),
    (None, None, "[DONE]", None),
]


def test_parse_whole() -> None:
    evs = SSEParser().feed(SAMPLE)
    assert _summary(evs) == EXPECTED
    assert evs[0].comments == ["ping"]
    assert evs[-1].is_done()
    assert evs[-2].is_done()  # anthropic message_stop


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_parse_any_chunking(size: int) -> None:
    pieces = [SAMPLE[i : i + size] for i in range(0, len(SAMPLE), size)]
    assert _summary(_all(SSEParser(), pieces)) == EXPECTED


def test_every_split_point() -> None:
    for i in range(len(SAMPLE) + 1):
        assert _summary(_all(SSEParser(), [SAMPLE[:i], SAMPLE[i:]])) == EXPECTED, i


def test_bom_and_field_edge_cases() -> None:
    p = SSEParser()
    evs = _all(p, [b"\xef\xbb", b"\xbfdata:no-space\n", b"data\n", b"id: 7\n", b"unknown: x\n\n"])
    assert _summary(evs) == [("7", None, "no-space\n", None)]


def test_unterminated_event_is_held_back() -> None:
    p = SSEParser()
    assert p.feed(b"id: 3\ndata: partial") == []
    assert p.pending()
    # a cut here means the event was never delivered: nothing to emit


def test_utf8_split_inside_character() -> None:
    data = "id: 1\ndata: marée ☂\n\n".encode()
    idx = data.index("☂".encode()) + 1
    evs = _all(SSEParser(), [data[:idx], data[idx:]])
    assert evs[0].data == "marée ☂"


def test_serialize_roundtrip() -> None:
    ev = ServerSentEvent(data="a\nb", event="delta", id="42")
    raw = serialize_event(ev)
    assert raw == b"id: 42\nevent: delta\ndata: a\ndata: b\n\n"
    back = SSEParser().feed(raw)
    assert _summary(back) == [("42", "delta", "a\nb", None)]


def _ev(i: int | None, data: str = "{}") -> ServerSentEvent:
    return ServerSentEvent(data=data, id=None if i is None else str(i))


def test_splicer_drops_duplicates_and_rejects_gaps() -> None:
    stats = TransportStats()
    s = _Splicer("st", "tok", 0, stats)
    assert s.on_event(_ev(1)).emit is not None
    assert s.on_event(_ev(2)).emit is not None
    assert s.on_event(_ev(1)).emit is None  # duplicate
    assert s.on_event(_ev(2)).emit is None
    assert stats.duplicates_dropped == 2
    assert s.last_id == 2
    with pytest.raises(StreamGapError) as ei:
        s.on_event(_ev(4))
    assert ei.value.last_event_id == 2 and ei.value.received_id == 4
    assert ei.value.stream_id == "st" and ei.value.resume_token == "tok"


def test_splicer_rejects_non_numeric_id() -> None:
    s = _Splicer("st", "tok", 0, TransportStats())
    with pytest.raises(StreamProtocolError):
        s.on_event(ServerSentEvent(data="{}", id="abc"))


def test_splicer_abort_events() -> None:
    s = _Splicer("st", "tok", 3, TransportStats())
    resumable = '{"error":{"type":"server_restarting","resume":true,"resume_token":"tok2","last_event_id":"3"}}'
    d = s.on_event(_ev(None, resumable))
    assert d.resume and d.emit is None and s.token == "tok2"
    final = '{"error":{"type":"cancelled","code":"cancelled","message":"x","resume":false}}'
    d = s.on_event(_ev(None, final))
    assert d.finished and d.emit is not None and not d.resume
    anthropic = '{"type":"error","error":{"type":"upstream_failed","resume":true}}'
    assert s.on_event(ServerSentEvent(data=anthropic, event="error")).resume
    # an ordinary provider error without the tidegate "resume" flag is passed through
    plain = '{"error":{"message":"rate limited","type":"x"}}'
    d = s.on_event(_ev(None, plain))
    assert d.emit is not None and not d.finished and not d.resume


def test_splicer_done_and_comment_blocks() -> None:
    s = _Splicer("st", None, 0, TransportStats())
    assert s.on_event(ServerSentEvent(comments=["ping"])).emit is None
    assert s.on_event(ServerSentEvent(retry=5000)).emit is None
    d = s.on_event(_ev(None, "[DONE]"))
    assert d.finished and d.emit == b"data: [DONE]\n\n"


def test_policy_backoff_bounds() -> None:
    p = ResumePolicy(initial_backoff=0.1, max_backoff=2.0, jitter=0.5)
    for failures in range(1, 12):
        base = min(2.0, 0.1 * 2 ** (failures - 1))
        for _ in range(20):
            d = p.backoff(failures)
            assert base * 0.5 <= d <= base
    assert p.backoff(1, retry_after=1.5) >= 1.5
    assert p.backoff(1, retry_after=100) <= 2.0
    with pytest.raises(ValueError):
        ResumePolicy(max_wait=None, max_attempts=None)


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    v = parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT")
    assert v == 0.0
