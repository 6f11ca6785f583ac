"""Unit tests of the resumable transports against the scripted fake gateway."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from types import ModuleType
from typing import Any

import httpx
import openai
import pytest

from fakegw import STREAM_ID, TOKEN, Conn, FakeGateway, Refused, Status
from tidegate_client import (
    AsyncResumableTransport,
    ResumableTransport,
    ResumeFailed,
    SSEParser,
    StreamGapError,
)

HAS_HTTPX2 = importlib.util.find_spec("httpx2") is not None
FAST: dict[str, Any] = {"initial_backoff": 0.001, "max_backoff": 0.01}
BODY = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": True}
BASE = "http://gw.test"


def _modules() -> list[Any]:
    mods: list[Any] = [pytest.param(httpx, id="httpx")]
    if HAS_HTTPX2:
        import httpx2

        mods.append(pytest.param(httpx2, id="httpx2"))
    return mods


def _transport_classes(hx: ModuleType) -> tuple[type, type]:
    if hx is httpx:
        return ResumableTransport, AsyncResumableTransport
    from tidegate_client import httpx2 as tg2

    return tg2.ResumableTransport, tg2.AsyncResumableTransport


class Result:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.events = SSEParser().feed(raw)
        self.ids = [int(e.id) for e in self.events if e.id is not None]
        self.text = ""
        for e in self.events:
            if e.data.startswith("{"):
                obj = json.loads(e.data)
                for ch in obj.get("choices", []):
                    self.text += ch.get("delta", {}).get("content") or ""
        self.done = any(e.data == "[DONE]" for e in self.events)


def run_sync(gw: FakeGateway, hx: ModuleType = httpx, url: str = BASE + "/v1/chat/completions", **kw: Any) -> tuple[Result, Any]:
    sync_cls, _ = _transport_classes(hx)
    t = sync_cls(gw.transport(), **{**FAST, **kw})
    with hx.Client(transport=t, headers={"authorization": "Bearer sk-test", "x-custom": "kept"}) as c:
        with c.stream("POST", url, json=BODY) as r:
            raw = b"".join(r.iter_bytes())
    return Result(raw), t


def run_async(gw: FakeGateway, hx: ModuleType = httpx, url: str = BASE + "/v1/chat/completions", **kw: Any) -> tuple[Result, Any]:
    _, async_cls = _transport_classes(hx)

    async def go() -> tuple[Result, Any]:
        t = async_cls(gw.transport(), **{**FAST, **kw})
        async with hx.AsyncClient(transport=t, headers={"authorization": "Bearer sk-test", "x-custom": "kept"}) as c:
            async with c.stream("POST", url, json=BODY) as r:
                raw = b"".join([b async for b in r.aiter_bytes()])
        return Result(raw), t

    return asyncio.run(go())


RUNNERS = [pytest.param(run_sync, id="sync"), pytest.param(run_async, id="async")]


def assert_complete(res: Result, gw: FakeGateway) -> None:
    assert res.text == gw.expected_text
    assert res.ids == list(range(1, gw.n + 2))
    assert res.done
    assert res.raw.endswith(b"data: [DONE]\n\n")
    assert b"ping" not in res.raw and b"retry" not in res.raw and b"server_restarting" not in res.raw


# -- pass-through --------------------------------------------------------------


def test_non_tidegate_response_is_returned_untouched() -> None:
    returned: list[httpx.Response] = []

    def handler(request: httpx.Request) -> httpx.Response:
        r = httpx.Response(200, json={"ok": True})
        returned.append(r)
        return r

    t = ResumableTransport(httpx.MockTransport(handler))
    resp = t.handle_request(httpx.Request("POST", BASE + "/v1/chat/completions", json={}))
    assert resp is returned[0]
    assert t.stats.streams == 0


def test_error_status_with_stream_header_is_returned_untouched() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"x-tidegate-stream-id": "x", "retry-after": "1"}, json={"error": {}})

    t = ResumableTransport(httpx.MockTransport(handler))
    with httpx.Client(transport=t) as c:
        r = c.post(BASE + "/v1/chat/completions", json={})
    assert r.status_code == 503 and t.stats.streams == 0


def test_sse_without_tidegate_headers_is_not_resumed() -> None:
    gw = FakeGateway(httpx, first=Conn(stop=3, end="cut"), send_headers=False)
    t = ResumableTransport(gw.transport())
    with httpx.Client(transport=t) as c, c.stream("POST", BASE + "/v1/chat/completions", json=BODY) as r:
        with pytest.raises(httpx.ReadError):
            r.read()
    assert gw.resume_requests() == [] and t.stats.streams == 0


# -- splicing --------------------------------------------------------------------


@pytest.mark.parametrize("hx", _modules())
@pytest.mark.parametrize("run", RUNNERS)
def test_uninterrupted(run: Any, hx: ModuleType) -> None:
    gw = FakeGateway(hx)
    res, t = run(gw, hx)
    assert_complete(res, gw)
    assert t.stats.streams == 1 and t.stats.interruptions == 0


@pytest.mark.parametrize("hx", _modules())
@pytest.mark.parametrize("run", RUNNERS)
def test_cut_then_refused_then_draining_then_resumed(run: Any, hx: ModuleType) -> None:
    gw = FakeGateway(
        hx,
        first=Conn(stop=5, end="cut"),
        resumes=[Refused(), Refused(), Status(503, {"retry-after": "0"}), Conn(dup=2)],
    )
    res, t = run(gw, hx)
    assert_complete(res, gw)
    assert t.stats.interruptions == 1
    assert t.stats.resume_attempts == 4 and t.stats.resumes == 1
    assert t.stats.duplicates_dropped == 2
    reqs = gw.resume_requests()
    assert len(reqs) == 4
    for req in reqs:
        assert req.method == "GET"
        assert req.url.path == f"/v1/streams/{STREAM_ID}"
        assert req.url.query == b""
        assert req.headers["authorization"] == "Bearer sk-test"  # the caller's own header is kept
        assert req.headers["x-custom"] == "kept"
        assert req.headers["x-tidegate-resume-token"] == TOKEN
        assert req.headers["last-event-id"] == "5"
        assert req.headers["accept"] == "text/event-stream"
        assert "content-type" not in req.headers and "content-length" not in req.headers
        assert req.headers["host"] == "gw.test"


@pytest.mark.parametrize("run", RUNNERS)
def test_abort_events_swallowed_and_token_from_event_used(run: Any) -> None:
    gw = FakeGateway(
        httpx,
        first=Conn(stop=4, end="abort", token="tok_rotated"),
        resumes=[Conn(stop=8, end="upstream_failed"), Conn()],
    )
    res, t = run(gw)
    assert_complete(res, gw)
    reqs = gw.resume_requests()
    assert [r.headers["last-event-id"] for r in reqs] == ["4", "8"]
    assert [r.headers["x-tidegate-resume-token"] for r in reqs] == ["tok_rotated", TOKEN]
    assert t.stats.interruptions == 2


@pytest.mark.parametrize("run", RUNNERS)
def test_eof_protocol_error_and_half_event(run: Any) -> None:
    gw = FakeGateway(
        httpx,
        first=Conn(stop=3, end="eof"),
        resumes=[Conn(stop=6, end="protocol"), Conn(stop=9, end="cut_mid_event"), Conn(dup=1)],
        split=3,
    )
    res, _ = run(gw)
    assert_complete(res, gw)
    assert [r.headers["last-event-id"] for r in gw.resume_requests()] == ["3", "6", "9"]


@pytest.mark.parametrize("run", RUNNERS)
def test_gzip_encoded_stream(run: Any) -> None:
    gw = FakeGateway(httpx, first=Conn(stop=5, end="cut", gzip=True), resumes=[Conn(gzip=True)])
    res, _ = run(gw)
    assert_complete(res, gw)


@pytest.mark.parametrize("run", RUNNERS)
def test_gap_is_an_error(run: Any) -> None:
    gw = FakeGateway(httpx, first=Conn(stop=5, end="cut"), resumes=[Conn(skip=2)])
    with pytest.raises(StreamGapError) as ei:
        run(gw)
    assert ei.value.last_event_id == 5 and ei.value.received_id == 8
    assert ei.value.stream_id == STREAM_ID and ei.value.resume_token == TOKEN


@pytest.mark.parametrize("run", RUNNERS)
def test_final_abort_is_passed_through(run: Any) -> None:
    gw = FakeGateway(httpx, first=Conn(stop=3, end="abort_final"))
    res, t = run(gw)
    assert res.ids == [1, 2, 3] and not res.done
    last = json.loads(res.events[-1].data)
    assert last["error"]["type"] == "cancelled" and last["error"]["resume"] is False
    assert gw.resume_requests() == [] and t.stats.interruptions == 0


# -- budget --------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNNERS)
def test_gives_up_after_max_wait(run: Any) -> None:
    gw = FakeGateway(httpx, first=Conn(stop=5, end="cut"), resumes=[Refused() for _ in range(10_000)])
    t0 = time.monotonic()
    with pytest.raises(ResumeFailed) as ei:
        run(gw, max_wait=0.3, initial_backoff=0.01, max_backoff=0.05)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 3.0
    e = ei.value
    assert (e.stream_id, e.resume_token, e.last_event_id) == (STREAM_ID, TOKEN, 5)
    assert e.attempts == len(gw.resume_requests()) >= 3
    assert isinstance(e.__cause__, httpx.ConnectError)
    assert TOKEN not in repr(e)


@pytest.mark.parametrize("run", RUNNERS)
def test_gives_up_after_max_attempts(run: Any) -> None:
    gw = FakeGateway(httpx, first=Conn(stop=5, end="abort"), resumes=[Status(503) for _ in range(10)])
    with pytest.raises(ResumeFailed) as ei:
        run(gw, max_attempts=3)
    assert ei.value.attempts == 3 and ei.value.status_code == 503
    assert len(gw.resume_requests()) == 3


@pytest.mark.parametrize("run", RUNNERS)
def test_404_gives_up_at_once(run: Any) -> None:
    gw = FakeGateway(httpx, first=Conn(stop=5, end="cut"), resumes=[Conn()], valid_tokens=("other",))
    with pytest.raises(ResumeFailed) as ei:
        run(gw)
    assert ei.value.status_code == 404 and ei.value.attempts == 1
    assert ei.value.body is not None and "not found" in ei.value.body


@pytest.mark.parametrize("run", RUNNERS)
def test_resumes_without_progress_count_against_the_budget(run: Any) -> None:
    # every resume is answered 200 but dies before delivering anything new
    gw = FakeGateway(httpx, first=Conn(stop=5, end="cut"), resumes=[Conn(stop=5, end="cut") for _ in range(50)])
    with pytest.raises(ResumeFailed) as ei:
        run(gw, max_attempts=4)
    assert len(gw.resume_requests()) == 4 and ei.value.last_event_id == 5


def test_budget_resets_after_progress() -> None:
    # three interruptions, each needing 2 attempts; max_attempts=2 is enough for each
    gw = FakeGateway(
        httpx,
        first=Conn(stop=2, end="cut"),
        resumes=[Refused(), Conn(stop=4, end="cut"), Refused(), Conn(stop=6, end="abort"), Refused(), Conn()],
    )
    res, t = run_sync(gw, max_attempts=2)
    assert_complete(res, gw)
    assert t.stats.interruptions == 3 and t.stats.resumes == 3


# -- URLs and cursors ------------------------------------------------------------


def test_path_prefix_and_resume_base_url() -> None:
    gw = FakeGateway(httpx, first=Conn(stop=5, end="cut"), resumes=[Conn()])
    res, _ = run_sync(gw, url=BASE + "/gw/v1/chat/completions")
    assert_complete(res, gw)
    assert gw.resume_requests()[0].url.path == f"/gw/v1/streams/{STREAM_ID}"

    gw = FakeGateway(httpx, first=Conn(stop=5, end="cut"), resumes=[Conn()])
    res, _ = run_sync(gw, resume_base_url="http://other.test/base/")
    assert_complete(res, gw)
    assert str(gw.resume_requests()[0].url) == f"http://other.test/base/v1/streams/{STREAM_ID}"


def test_a_resume_request_is_itself_spliced() -> None:
    # GET /v1/streams/{id} with Last-Event-ID 5: the transport starts at cursor 5
    gw = FakeGateway(httpx, resumes=[Conn(stop=8, end="cut"), Conn()])
    t = ResumableTransport(gw.transport(), **FAST)
    with httpx.Client(transport=t) as c:
        with c.stream(
            "GET",
            f"{BASE}/v1/streams/{STREAM_ID}",
            headers={"last-event-id": "5", "x-tidegate-resume-token": TOKEN},
        ) as r:
            res = Result(r.read())
    assert res.ids == list(range(6, gw.n + 2))
    assert res.text == "".join(gw.texts[5:])
    assert [r.headers["last-event-id"] for r in gw.resume_requests()] == ["5", "8"]


def test_consumer_closing_early_makes_no_resume() -> None:
    gw = FakeGateway(httpx, first=Conn(stop=5, end="cut"), resumes=[])
    t = ResumableTransport(gw.transport(), **FAST)
    with httpx.Client(transport=t) as c, c.stream("POST", BASE + "/v1/chat/completions", json=BODY) as r:
        it = r.iter_bytes()
        first = next(it)
        assert first.startswith(b"id: 1\n")
    assert gw.resume_requests() == []


# -- through the official openai SDK ----------------------------------------------


def _sdk_text(stream: Any) -> str:
    return "".join((ch.choices[0].delta.content or "") for ch in stream if ch.choices)


@pytest.mark.parametrize("hx", _modules())
def test_openai_sdk_sync(hx: ModuleType) -> None:
    gw = FakeGateway(
        hx, first=Conn(stop=4, end="abort"), resumes=[Refused(), Conn(stop=9, end="cut", dup=3), Conn(dup=1)]
    )
    sync_cls, _ = _transport_classes(hx)
    client = openai.OpenAI(
        base_url=BASE + "/v1", api_key="sk-test", http_client=hx.Client(transport=sync_cls(gw.transport(), **FAST))
    )
    stream = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert _sdk_text(stream) == gw.expected_text
    assert gw.resume_requests()[0].headers["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("hx", _modules())
def test_openai_sdk_async(hx: ModuleType) -> None:
    gw = FakeGateway(hx, first=Conn(stop=6, end="cut"), resumes=[Status(503), Conn(stop=7, end="abort"), Conn()])
    _, async_cls = _transport_classes(hx)

    async def go() -> str:
        client = openai.AsyncOpenAI(
            base_url=BASE + "/v1",
            api_key="sk-test",
            http_client=hx.AsyncClient(transport=async_cls(gw.transport(), **FAST)),
        )
        stream = await client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = ""
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
        await client.close()
        return text

    assert asyncio.run(go()) == gw.expected_text


def test_openai_sdk_sees_final_abort_as_api_error() -> None:
    gw = FakeGateway(httpx, first=Conn(stop=3, end="abort_final"))
    client = openai.OpenAI(
        base_url=BASE + "/v1", api_key="k", http_client=httpx.Client(transport=ResumableTransport(gw.transport()))
    )
    stream = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}], stream=True)
    got = ""
    with pytest.raises(openai.APIError) as ei:
        for ch in stream:
            got += ch.choices[0].delta.content or ""
    assert got == "".join(gw.texts[:3])
    assert ei.value.code == "cancelled" and ei.value.type == "cancelled"


def test_openai_sdk_resume_failed_is_not_wrapped() -> None:
    gw = FakeGateway(httpx, first=Conn(stop=3, end="cut"), resumes=[Refused() for _ in range(100)])
    client = openai.OpenAI(
        base_url=BASE + "/v1",
        api_key="k",
        http_client=httpx.Client(transport=ResumableTransport(gw.transport(), max_attempts=3, **FAST)),
    )
    raw = client.chat.completions.with_raw_response.create(
        model="mock", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert raw.headers["x-tidegate-stream-id"] == STREAM_ID
    stream = raw.parse()
    with pytest.raises(ResumeFailed) as ei:
        for _ in stream:
            pass
    assert ei.value.last_event_id == 3 and ei.value.resume_token == TOKEN
