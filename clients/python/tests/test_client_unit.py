"""Unit tests of the native API against the scripted fake gateway."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fakegw import STREAM_ID, TOKEN, Conn, FakeGateway, Refused
from tidegate_client import (
    AsyncTidegateClient,
    ResumePolicy,
    StreamAborted,
    StreamNotFound,
    TidegateClient,
    TidegateHTTPError,
)

REQ = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
FAST = ResumePolicy(max_wait=5, initial_backoff=0.001, max_backoff=0.01)


def test_stream_text_across_interruptions() -> None:
    gw = FakeGateway(httpx, first=Conn(stop=4, end="abort"), resumes=[Refused(), Conn(stop=8, end="cut"), Conn()])
    with TidegateClient("http://gw.test/v1", transport=gw.transport(), policy=FAST, api_key="sk-x") as tg:
        deltas = list(tg.stream_text(REQ))
    assert deltas == gw.texts
    post = gw.requests[0]
    assert post.url.path == "/v1/chat/completions"
    assert post.headers["authorization"] == "Bearer sk-x"
    assert b'"stream":true' in post.content.replace(b" ", b"")


def test_chat_stream_exposes_ids_and_finish_reason() -> None:
    gw = FakeGateway(httpx)
    with TidegateClient("http://gw.test", transport=gw.transport()) as tg:
        with tg.stream_chat(REQ) as s:
            assert s.stream_id == STREAM_ID and s.resume_token == TOKEN
            chunks = list(s)
        assert len(chunks) == gw.n + 1
        assert s.last_event_id == gw.n + 1 and s.finish_reason == "stop" and s.done


def test_manual_mode_surfaces_abort_and_resume_by_id() -> None:
    gw = FakeGateway(httpx, first=Conn(stop=5, end="abort"), resumes=[Conn()])
    with TidegateClient("http://gw.test", transport=gw.transport(), auto_resume=False) as tg:
        got: list[str] = []
        with pytest.raises(StreamAborted) as ei:
            got.extend(tg.stream_text(REQ))
        e = ei.value
        assert e.resumable and e.type == "server_restarting"
        assert (e.stream_id, e.resume_token, e.last_event_id) == (STREAM_ID, TOKEN, 5)
        rest = list(tg.resume_text(e.stream_id, e.resume_token or "", e.last_event_id))
    req = gw.resume_requests()[0]
    assert req.headers["last-event-id"] == "5" and req.headers["x-tidegate-resume-token"] == TOKEN
    assert rest == gw.texts[5:]


def test_state_cancel_and_not_found() -> None:
    gw = FakeGateway(httpx)
    with TidegateClient("http://gw.test", transport=gw.transport()) as tg:
        st = tg.state(STREAM_ID, TOKEN)
        assert st.status == "completed" and st.last_seq == gw.n + 1
        assert st.text == gw.expected_text and st.finish_reason == "stop"
        tg.cancel(STREAM_ID, TOKEN)
        with pytest.raises(StreamNotFound) as ei:
            tg.state(STREAM_ID, "wrong")
        assert ei.value.status_code == 404 and ei.value.error is not None
        gw.resumes.append(Conn())
        with pytest.raises(StreamNotFound):
            tg.resume(STREAM_ID, "wrong", 0)


def test_http_error_on_stream_start() -> None:
    from fakegw import Status

    gw = FakeGateway(httpx, first=Status(503, {"retry-after": "1"}, '{"error":{"message":"draining","type":"x"}}'))
    with TidegateClient("http://gw.test", transport=gw.transport()) as tg:
        with pytest.raises(TidegateHTTPError) as ei:
            list(tg.stream_text(REQ))
    assert ei.value.status_code == 503 and "draining" in str(ei.value)


def test_async_native_client() -> None:
    gw = FakeGateway(httpx, first=Conn(stop=3, end="cut"), resumes=[Conn()])

    async def go() -> tuple[list[str], str, list[str]]:
        async with AsyncTidegateClient(
            "http://gw.test", transport=httpx.MockTransport(gw.handle), policy=FAST
        ) as tg:
            deltas = [t async for t in tg.stream_text(REQ)]
            st = await tg.state(STREAM_ID, TOKEN)
            gw.resumes.append(Conn())
            rest = [t async for t in tg.resume_text(STREAM_ID, TOKEN, 7)]
        return deltas, st.status, rest

    deltas, status, rest = asyncio.run(go())
    assert deltas == gw.texts and status == "completed" and rest == gw.texts[7:]
