"""The OpenAI Responses API through the REAL tidegate binaries, with the
official openai SDK alone (no tidegate client library).

The gateway is stopped mid-answer (SIGTERM: drain, in-band error event;
SIGKILL: a cut), a new process starts on the same port and store, and the
SDK's own resume calls — ``responses.retrieve(id, stream=True,
starting_after=N)`` and the ``responses.stream(response_id=...)`` helper,
whose accumulation checks every event's identity and order — end with
exactly the mock's answer, sequence numbers contiguous and unrepeated.
Background responses complete with no client attached, across a SIGKILL.
The mock demands a key, as OpenAI does; the gateway's Responses upstream
carries its own (``api_key_env``), which is what lets a response generated
with no client attached be continued by a new process.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from harness import Gateway, Mock, Restarter

pytestmark = pytest.mark.integration

WORDS = 60
INTERVAL_MS = 40
CUT_AFTER = 8  # text deltas received before the gateway is stopped


KEY_ENV = "TG_PY_RESPONSES_KEY"
PROVIDER_KEY = "sk-provider-responses"


def responses_upstream(mock_url: str) -> str:
    return f"""
[[upstreams]]
name = "mock-responses"
protocol = "openai_responses"
base_url = "{mock_url}/v1"
models = ["*"]
continuation = "instruct"
api_key_env = "{KEY_ENV}"
"""


@pytest.fixture
def rmock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mock]:
    """A mock that demands PROVIDER_KEY (the children inherit the env)."""
    monkeypatch.setenv(KEY_ENV, PROVIDER_KEY)
    m = Mock(tmp_path, ["--api-key-env", KEY_ENV], name="keyed-mock")
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def rgw(request: pytest.FixtureRequest, tmp_path: Path, rmock: Mock) -> Iterator[Gateway]:
    """A started gateway whose models have an OpenAI Responses upstream."""
    mock = rmock
    gw = Gateway(tmp_path, mock.url, extra=responses_upstream(mock.url))
    try:
        gw.start()
        yield gw
    finally:
        gw.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(gw.logs())
            print(mock.proc.log_tail(20))


def body(topic: str, words: int = WORDS) -> dict[str, Any]:
    return {
        "model": "mock",
        "input": f"tell me about tides and gates: {topic}",
        "max_output_tokens": 200,
    }


def exact(mock: Mock, b: dict[str, Any], words: int = WORDS) -> str:
    """The mock's whole answer to the same request, asked directly."""
    r = httpx.post(
        f"{mock.url}/v1/responses",
        json={**b, "mock": {"words": words}},
        headers={"authorization": f"Bearer {PROVIDER_KEY}"},
        timeout=30,
    )
    r.raise_for_status()
    text = "".join(
        part["text"]
        for item in r.json()["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )
    assert text
    return text


def sdk(gw: Gateway, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60)


def knobs(words: int = WORDS, interval_ms: int = INTERVAL_MS) -> dict[str, Any]:
    return {"mock": {"words": words, "token_interval_ms": interval_ms}}


def text_of(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def interrupted(gw: Gateway, client: openai.OpenAI, b: dict[str, Any], sig: int) -> tuple[str, list[Any], Restarter]:
    """Stream until CUT_AFTER deltas, stop the gateway with `sig` (a new one
    starts), read on until the SDK says the stream broke."""
    restarter = Restarter(gw, sig)
    events: list[Any] = []
    deltas = 0
    with pytest.raises((openai.APIError, openai.APIConnectionError)) as broke:
        for ev in client.responses.create(stream=True, extra_body=knobs(), **b):
            events.append(ev)
            if ev.type == "response.output_text.delta":
                deltas += 1
                if deltas == CUT_AFTER:
                    restarter.start()
    restarter.finish()
    if sig == signal.SIGTERM:
        # The drain's in-band error event, raised by the SDK as an APIError
        # whose body says how to resume.
        err = broke.value
        assert isinstance(err, openai.APIError) and not isinstance(err, openai.APIConnectionError), err
        assert isinstance(err.body, dict), err.body
        assert err.body["code"] == "server_restarting"
        assert err.body["resume"] is True
        assert restarter.exit_code == 0
    assert events and events[0].type == "response.created"
    rid = events[0].response.id
    assert rid.startswith("resp_")
    return rid, events, restarter


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_sdk_resumes_a_response_with_retrieve_and_the_stream_helper(rgw: Gateway, rmock: Mock, sig: int) -> None:
    b = body(f"responses {sig.name}")
    want = exact(rmock, b)
    client = sdk(rgw)
    rid, before, _ = interrupted(rgw, client, b, sig)
    last = before[-1].sequence_number

    # 1. The SDK's own resume: the events after the last one it has.
    after = list(client.responses.retrieve(rid, stream=True, starting_after=last))
    seqs = [e.sequence_number for e in before + after]
    assert seqs == list(range(len(seqs))), seqs
    assert after[-1].type == "response.completed"
    assert text_of(before + after) == want
    assert after[-1].response.output_text == want
    assert after[-1].response.id == rid

    # 2. The stream helper: replays from the start and accumulates every
    # event (identity, order), then filters by starting_after itself.
    with client.responses.stream(response_id=rid) as s:
        final = s.get_final_response()
    assert final.output_text == want
    assert final.id == rid
    with client.responses.stream(response_id=rid, starting_after=last) as s:
        rest = list(s)
    assert rest[0].sequence_number == last + 1
    assert text_of(rest) == text_of(after)

    # The response as it stands, by the SDK's retrieve.
    got = client.responses.retrieve(rid)
    assert got.status == "completed"
    assert got.output_text == want

    # Another key sees nothing, as on OpenAI's API.
    with pytest.raises(openai.NotFoundError):
        sdk(rgw, key="sk-someone-else").responses.retrieve(rid)


def test_the_async_sdk_resumes_a_response(rgw: Gateway, rmock: Mock) -> None:
    import asyncio

    b = body("responses async")
    want = exact(rmock, b)
    client = sdk(rgw)
    rid, before, _ = interrupted(rgw, client, b, signal.SIGTERM)
    last = before[-1].sequence_number

    async def resume() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=rgw.url + "/v1", api_key="sk-test", max_retries=0, timeout=60)
        try:
            async with aclient.responses.stream(response_id=rid, starting_after=last) as s:
                events = [e async for e in s]
                final = await s.get_final_response()
            assert final.output_text == want
            return events
        finally:
            await aclient.close()

    after = asyncio.run(resume())
    seqs = [e.sequence_number for e in before + after]
    assert seqs == list(range(len(seqs))), seqs
    assert text_of(before + after) == want


def poll(client: openai.OpenAI, rid: str, until: set[str], limit: float = 30.0) -> Any:
    deadline = time.monotonic() + limit
    while True:
        r = client.responses.retrieve(rid)
        if r.status in until or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_a_background_response_completes_with_no_client_across_a_sigkill(rgw: Gateway, rmock: Mock) -> None:
    b = body("background")
    want = exact(rmock, b)
    client = sdk(rgw)
    started = rmock.stats()["requests_started"]
    created = client.responses.create(background=True, extra_body=knobs(), **b)
    assert created.status == "queued"
    assert created.background is True
    rid = created.id
    # Generating with no client: some text is in, the answer is not done.
    deadline = time.monotonic() + 10
    while True:
        r = client.responses.retrieve(rid)
        if r.output_text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status == "in_progress" and r.output_text and r.output_text != want
    restarter = Restarter(rgw, signal.SIGKILL)
    restarter.start()
    restarter.finish()
    # The new process continues it by itself: nobody asks it to.
    done = poll(client, rid, {"completed", "failed", "cancelled", "incomplete"})
    assert done.status == "completed", done
    assert done.output_text == want
    # One call, and one continuation for the one interruption.
    assert rmock.stats()["requests_started"] - started <= 2
    # Its events replay whole, numbered from 0.
    events = list(client.responses.retrieve(rid, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert text_of(events) == want


def test_cancelling_a_background_response_drops_its_upstream(rgw: Gateway, rmock: Mock) -> None:
    client = sdk(rgw)
    cancelled = rmock.stats()["requests_cancelled"]
    created = client.responses.create(background=True, extra_body=knobs(words=400), **body("cancel", 400))
    deadline = time.monotonic() + 10
    while not client.responses.retrieve(created.id).output_text and time.monotonic() < deadline:
        time.sleep(0.05)
    out = client.responses.cancel(created.id)
    assert out.status == "cancelled"
    # The provider's generation was dropped: the mock counts it.
    deadline = time.monotonic() + 10
    while rmock.stats()["requests_cancelled"] <= cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rmock.stats()["requests_cancelled"] > cancelled
    assert client.responses.retrieve(created.id).status == "cancelled"
