"""Integration tests against the REAL tidegate binaries (TIDEGATE_BIN).

Each test starts its own gateway (embedded store in a temp dir) in front of one
shared mock provider, and may stop it (SIGTERM: drain; SIGKILL: cut) and start
a new process on the same port and store, as a deploy would.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from types import ModuleType
from typing import Any

import httpx
import openai
import pytest

from harness import Gateway, Mock, Restarter
from tidegate_client import (
    AsyncResumableTransport,
    ResumableTransport,
    ResumeFailed,
    StreamNotFound,
    TidegateClient,
)

pytestmark = pytest.mark.integration

MAX_TOKENS = 60
INTERVAL_MS = 40
CUT_AFTER = 8  # chunks received before the gateway is stopped


def chat_body(topic: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {
        "model": "mock",
        "messages": [{"role": "user", "content": f"tell me about tides and gates: {topic}"}],
        "max_tokens": max_tokens,
    }


def sdk_kwargs(body: dict[str, Any], interval_ms: int = INTERVAL_MS) -> dict[str, Any]:
    return {**body, "stream": True, "extra_body": {"mock": {"token_interval_ms": interval_ms}}}


def http_modules() -> list[Any]:
    mods: list[Any] = [pytest.param("httpx", id="httpx")]
    try:
        import httpx2  # noqa: F401

        mods.append(pytest.param("httpx2", id="httpx2"))
    except ImportError:  # pragma: no cover
        pass
    return mods


def sync_client(module: str, transport_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    if module == "httpx":
        t: Any = ResumableTransport(**transport_kwargs)
        return httpx.Client(transport=t), t
    import httpx2

    from tidegate_client.httpx2 import ResumableTransport as R2

    t = R2(**transport_kwargs)
    return httpx2.Client(transport=t), t


def restart_during_sdk_stream(gw: Gateway, mock: Mock, sig: int, topic: str, module: str = "httpx") -> None:
    body = chat_body(topic)
    expected = mock.complete(body)
    http_client, transport = sync_client(module, {"max_wait": 45.0})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-test", http_client=http_client,
                           max_retries=0, timeout=60)
    restarter = Restarter(gw, sig)
    text = ""
    n = 0
    t0 = time.monotonic()
    with client.chat.completions.create(**sdk_kwargs(body)) as stream:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            n += 1
            if n == CUT_AFTER:
                restarter.start()
    elapsed = time.monotonic() - t0
    restarter.finish()
    client.close()

    assert text == expected, f"spliced text differs from the mock's answer\n got: {text!r}\nwant: {expected!r}"
    if sig == signal.SIGTERM:
        assert restarter.exit_code == 0, f"drained gateway exited with {restarter.exit_code}"
    # the interruption really happened, and was resumed through the new process
    assert transport.stats.interruptions >= 1, transport.stats
    assert transport.stats.resumes >= 1, transport.stats
    assert restarter.t_up is not None and t0 + elapsed > restarter.t_up
    assert len(gw.generations) == 2


# 1. SIGTERM (drain -> in-band server_restarting -> exit 0), new process, same port/store
@pytest.mark.parametrize("module", http_modules())
def test_openai_sdk_survives_sigterm_restart(gateway: Gateway, mock: Mock, module: str) -> None:
    restart_during_sdk_stream(gateway, mock, signal.SIGTERM, f"sigterm via {module}", module)


# 2. SIGKILL (connection cut, no in-band word), new process, same port/store
def test_openai_sdk_survives_sigkill_restart(gateway: Gateway, mock: Mock) -> None:
    restart_during_sdk_stream(gateway, mock, signal.SIGKILL, "sigkill")


# 3. the same with AsyncOpenAI + AsyncResumableTransport
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="sigterm"), pytest.param(signal.SIGKILL, id="sigkill")])
def test_async_openai_sdk_survives_restart(gateway: Gateway, mock: Mock, sig: int) -> None:
    body = chat_body(f"async {sig}")
    expected = mock.complete(body)
    transport = AsyncResumableTransport(max_wait=45.0)
    restarter = Restarter(gateway, sig)

    async def consume() -> str:
        client = openai.AsyncOpenAI(
            base_url=gateway.url + "/v1",
            api_key="sk-test",
            http_client=httpx.AsyncClient(transport=transport),
            max_retries=0,
            timeout=60,
        )
        text = ""
        n = 0
        stream = await client.chat.completions.create(**sdk_kwargs(body))
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            n += 1
            if n == CUT_AFTER:
                restarter.start()  # runs in its own thread: the event loop keeps reading
        await client.close()
        return text

    text = asyncio.run(asyncio.wait_for(consume(), timeout=90))
    restarter.finish()
    assert text == expected
    if sig == signal.SIGTERM:
        assert restarter.exit_code == 0
    assert transport.stats.interruptions >= 1 and transport.stats.resumes >= 1, transport.stats


# 4. the gateway stays down past the budget -> ResumeFailed; the caller resumes later
def test_gateway_down_past_budget_raises_resume_failed(gateway: Gateway, mock: Mock) -> None:
    body = chat_body("down past the budget")
    expected = mock.complete(body)
    transport = ResumableTransport(max_wait=3.0)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-test",
                           http_client=httpx.Client(transport=transport), max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(**sdk_kwargs(body))
    stream_id = raw.headers["x-tidegate-stream-id"]
    token = raw.headers["x-tidegate-resume-token"]
    assert stream_id and token
    stream = raw.parse()
    text = ""
    n = 0
    t_kill = 0.0
    with pytest.raises(ResumeFailed) as ei:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            n += 1
            if n == 5:
                gateway.proc.signal(signal.SIGKILL)
                gateway.proc.wait(10)
                t_kill = time.monotonic()
    waited = time.monotonic() - t_kill
    e = ei.value
    assert e.stream_id == stream_id
    assert e.resume_token == token
    assert e.last_event_id == n  # one event per chunk: the cursor is the last chunk delivered
    assert e.attempts >= 2
    assert 2.5 <= waited < 15, waited
    assert isinstance(e.__cause__, httpx.ConnectError)
    client.close()

    # ... and the caller can finish the answer later with what the exception carries
    gateway.start()
    # The original carried the client's own key to the provider: a
    # continuation needs it presented again beside the token.
    with TidegateClient(gateway.url, max_wait=30) as tg:
        with pytest.raises(Exception) as refused:
            "".join(tg.resume_text(e.stream_id, e.resume_token or "", e.last_event_id))
        assert "provider_credential_required" in str(refused.value) or "401" in str(refused.value)
    with TidegateClient(gateway.url, api_key="sk-test", max_wait=30) as tg:
        rest = "".join(tg.resume_text(e.stream_id, e.resume_token or "", e.last_event_id))
    assert text + rest == expected


# 5. a non-tidegate response (non-streaming completion, errors) passes through untouched
def test_non_stream_responses_pass_through(gateway: Gateway, mock: Mock) -> None:
    body = chat_body("not streaming", max_tokens=20)
    expected = mock.complete(body)
    transport = ResumableTransport()
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-test",
                           http_client=httpx.Client(transport=transport), max_retries=0, timeout=30)
    completion = client.chat.completions.create(**body, stream=False)
    assert completion.choices[0].message.content == expected

    with httpx.Client(transport=transport, timeout=30) as http:
        r = http.post(gateway.url + "/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "error" in r.json()
        h = http.get(gateway.url + "/healthz/live")
        assert h.status_code == 200
    assert transport.stats.streams == 0
    client.close()


# 6. native API: text deltas, state (running, then completed), resume by id and token
def test_native_api_text_state_and_resume(gateway: Gateway, mock: Mock) -> None:
    body = chat_body("native api", max_tokens=30)
    expected = mock.complete(body)
    req = {**body, "mock": {"token_interval_ms": 30}}
    with TidegateClient(gateway.url, max_wait=30) as tg:
        assert "".join(tg.stream_text(req)) == expected

        events: list[tuple[int, str]] = []
        with tg.stream_chat(req) as s:
            assert s.stream_id and s.resume_token
            for chunk in s:
                delta = ""
                if chunk.get("choices"):
                    delta = chunk["choices"][0].get("delta", {}).get("content") or ""
                events.append((s.last_event_id, delta))
                if len(events) == 3:
                    mid = tg.state(s.stream_id, s.resume_token)
                    assert mid.status == "running", mid
                    assert mid.last_seq is not None and mid.last_seq >= 3
                    assert mid.text is not None and mid.text.startswith("".join(d for _, d in events))
        assert [i for i, _ in events] == list(range(1, len(events) + 1))
        assert "".join(d for _, d in events) == expected

        st = tg.state(s.stream_id, s.resume_token)
        assert st.status == "completed", st
        assert st.text == expected
        assert st.last_seq == s.last_event_id
        assert st.finish_reason == s.finish_reason

        # replay after event 5 of a finished stream: exactly the rest
        rest = "".join(tg.resume_text(s.stream_id, s.resume_token, 5))
        assert rest == "".join(d for i, d in events if i > 5)

        with pytest.raises(StreamNotFound):
            tg.state(s.stream_id, "not-the-token")
        with pytest.raises(StreamNotFound):
            list(tg.resume_text(s.stream_id, "not-the-token", 0))


# 7. a network cut while the gateway stays up (RST through a proxy): resume attaches again
def test_openai_sdk_survives_network_cut(gateway: Gateway, mock: Mock) -> None:
    from tcpproxy import CuttableProxy

    body = chat_body("network cut")
    expected = mock.complete(body)
    proxy = CuttableProxy("127.0.0.1", gateway.port)
    try:
        transport = ResumableTransport(max_wait=30.0)
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test",
                               http_client=httpx.Client(transport=transport), max_retries=0, timeout=60)
        text = ""
        n = 0
        with client.chat.completions.create(**sdk_kwargs(body)) as stream:
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                n += 1
                if n in (CUT_AFTER, 3 * CUT_AFTER):
                    proxy.cut_all()
        client.close()
    finally:
        proxy.close()
    assert text == expected
    assert transport.stats.interruptions >= 2 and transport.stats.resumes >= 2, transport.stats
    assert proxy.connections >= 3
    assert len(gateway.generations) == 1 and gateway.proc.running()


# Heartbeats and the retry hint in the official SDK's own decoder: a quiet
# stream gets `: ping` lines between its events, and a resume stream starts
# with `retry:`. A block of either alone (ended by a blank line) after an
# `id:` makes the Stainless decoder yield an empty event, which
# openai-python then fails to parse as JSON.
def test_openai_sdk_reads_heartbeats_and_the_retry_hint(tmp_path: Any, mock: Mock) -> None:
    gw = Gateway(tmp_path, mock.url, extra='\n[streams]\nheartbeat = "100ms"\n')
    gw.start()
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
        body = chat_body("quiet stream", max_tokens=4)
        expected = mock.complete(body)
        text = ""
        with client.chat.completions.create(**sdk_kwargs(body, interval_ms=350)) as stream:
            stream_id = stream.response.headers["x-tidegate-stream-id"]
            token = stream.response.headers["x-tidegate-resume-token"]
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        assert text == expected
        raw = httpx.get(
            f"{gw.url}/v1/streams/{stream_id}", headers={"x-tidegate-resume-token": token}, timeout=10
        ).text
        assert raw.startswith("retry: "), raw[:80]
        assert ": ping\n\n" not in raw
        # The replay, as the SDK's own decoder and stream read it.
        replay = openai.Stream(
            cast_to=openai.types.chat.ChatCompletionChunk,
            response=httpx.Response(200, content=raw.encode(), request=httpx.Request("GET", gw.url)),
            client=client,
        )
        replayed = "".join(c.choices[0].delta.content or "" for c in replay if c.choices)
        assert replayed == expected
        client.close()
    finally:
        gw.stop_all()


def test_openai_sdk_reads_one_answer_across_a_failover(tmp_path: Any, mock: Mock, monkeypatch: Any) -> None:
    """The first upstream dies mid-answer; the stream goes on on the second.

    The official SDK's own accumulation helper sees one normal stream: the
    failover is said only in an SSE comment, which its decoder skips. (The
    upstreams hold their own key: a client's own key never moves.)
    """
    monkeypatch.setenv("TG_PY_UPSTREAM_KEY", "sk-upstream")
    dying = Mock(tmp_path, ["--die-after", "6"], name="dying-mock")
    extra = f"""
[[upstreams]]
name = "next"
protocol = "openai"
base_url = "{mock.url}/v1"
models = ["*"]
weight = 0
continuation = "continue_final_message"
api_key_env = "TG_PY_UPSTREAM_KEY"
"""
    gw = Gateway(tmp_path, dying.url, extra=extra, upstream='api_key_env = "TG_PY_UPSTREAM_KEY"')
    gw.start()
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
        body = chat_body("failed over", max_tokens=16)
        expected = mock.complete(body)
        kwargs = {k: v for k, v in sdk_kwargs(body, interval_ms=5).items() if k != "stream"}
        with client.chat.completions.stream(**kwargs) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        assert final.choices[0].message.content == expected
        assert final.choices[0].finish_reason == "stop"
        assert dying.stats()["requests_started"] == 1
        raw_stats = httpx.get(f"{gw.url}/metrics", timeout=10).text
        assert "tidegate_failovers_total 1" in raw_stats
        client.close()
    finally:
        gw.stop_all()
        dying.stop()
