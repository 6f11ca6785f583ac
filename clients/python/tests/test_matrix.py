"""The SDK-accumulation matrix (issue 14): every stream shape a real provider
sends × every continuation style × a cut after every event index, through
the real gateway, with the official SDK as the client and tidegate_client's
resuming transport underneath.

One mock (demanding a key) and one gateway (memory store, one upstream per
continuation style, each serving its own model glob, all pointing at the
mock with ``api_key_env``).  For each cell the mock cuts the connection (or,
for the Anthropic ``error`` shape, sends its own ``event: error``) after K
SSE events, once (a unique ``fail_id`` per cell), and the SDK's final
message is compared with the uncut answer:

- ``exact``: equal to the uncut answer (content, reasoning, tool calls,
  blocks, finish reasons, per choice; usage ignored);
- ``best-effort``: a valid message whose text differs;
- ``ended``: the stream ended with the gateway's in-band error carrying
  ``resume: false`` and a reason (the SDK raises; the reason is recorded);
- ``CORRUPT``: anything else.

Run:  ``./run-tests.sh tests/test_matrix.py -s``  (the table is printed and
written to ``clients/python/matrix-report.md``).
``TIDEGATE_MATRIX=report`` records and prints without failing;
``TIDEGATE_MATRIX_SHAPES=text,tools`` limits the shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

httpx2 = pytest.importorskip("httpx2")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from harness import Proc, child_env, free_port, tidegate_bin  # noqa: E402
from tidegate_client.httpx2 import ResumableTransport  # noqa: E402

pytestmark = pytest.mark.integration

UPSTREAM_KEY = "matrix-upstream-key-5f1c"
KEY_ENV = "MATRIX_UPSTREAM_KEY"
# Cells run at once; small enough that the mock's request log (the last 256)
# holds a whole batch.
BATCH = 16
REPORT = Path(__file__).resolve().parents[1] / "matrix-report.md"

PROMPT = (
    "Explain how ocean tides rise and fall near granite harbor gates during winter storms, "
    "while sailors watch lanterns blink above quiet copper buoys and distant whales sing"
)

OPENAI_STYLES = ["continue_final_message", "prefix", "assistant_prefix", "instruct", "none"]
ANTHROPIC_STYLES = ["assistant_prefix", "instruct", "none"]
PREFIX_FAMILY = ["continue_final_message", "prefix", "assistant_prefix"]

# What the mock (the "provider") supports, per style under test: exactly that
# style; for instruct / none, no prefix style at all (like api.openai.com).
MOCK_STYLES = {s: [s] for s in PREFIX_FAMILY} | {"instruct": [], "none": []}

TOOLS_OPENAI = [{"type": "function", "function": {"name": "lookup", "description": "look it up",
                                                   "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
TOOLS_ANTHROPIC = [{"name": "lookup", "description": "look it up",
                    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]


@dataclass(frozen=True)
class Shape:
    name: str
    protocol: str  # "openai" | "anthropic"
    kwargs: dict[str, Any]  # SDK call arguments besides model / messages
    mock: dict[str, Any]  # the mock knobs
    styles: list[str]
    failure: str = "cut_after_events"  # or error_after_events


SHAPES = [
    Shape("text", "openai", {"max_tokens": 200}, {"words": 6}, OPENAI_STYLES),
    Shape("text+usage", "openai", {"max_tokens": 200, "stream_options": {"include_usage": True}}, {"words": 6}, OPENAI_STYLES),
    Shape("tools", "openai", {"max_tokens": 200, "tools": TOOLS_OPENAI},
          {"shape": "tools", "content_words": 2, "tool_words": 2}, OPENAI_STYLES),
    Shape("parallel_tools", "openai", {"max_tokens": 200, "tools": TOOLS_OPENAI},
          {"shape": "parallel_tools", "content_words": 2, "tool_words": 2}, OPENAI_STYLES),
    Shape("reasoning", "openai", {"max_tokens": 200}, {"shape": "reasoning", "reasoning_words": 3, "words": 3}, OPENAI_STYLES),
    Shape("n=2", "openai", {"max_tokens": 200, "n": 2}, {"words": 4}, OPENAI_STYLES),
    Shape("a:thinking+text+tool_use", "anthropic",
          {"max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 1024}, "tools": TOOLS_ANTHROPIC},
          {"shape": "thinking", "reasoning_words": 3, "words": 3, "tool_words": 2, "ping_every": 3}, ANTHROPIC_STYLES),
    Shape("a:event-error", "anthropic", {"max_tokens": 200}, {"words": 5}, ANTHROPIC_STYLES, failure="error_after_events"),
]

# Cells that must be exact: shape -> styles (the prefill styles; `instruct`
# is best-effort by design, so it only has to be valid).
EXACT: dict[str, list[str]] = {
    "text": PREFIX_FAMILY,
    "text+usage": PREFIX_FAMILY,
    "tools": PREFIX_FAMILY,
    "parallel_tools": PREFIX_FAMILY,
    "reasoning": PREFIX_FAMILY,
    "n=2": PREFIX_FAMILY,
    "a:thinking+text+tool_use": ["assistant_prefix"],
    "a:event-error": ["assistant_prefix"],
}

# Where an exact style may give something else, and why (shape, outcome kind).
NOT_EXACT_BY_DESIGN: dict[tuple[str, str], str] = {
    # A choice the client was shown nothing of is asked again with n = 1: a
    # new sample (the mock answers choice 0's words).
    ("n=2", "best-effort"): "a choice with nothing shown is asked again alone",
    # No provider continues a thinking block without its signature.
    ("a:thinking+text+tool_use", "ended"): "a cut inside a thinking block, before its signature",
}


def model_for(shape: Shape, style: str) -> str:
    return f"{'a' if shape.protocol == 'anthropic' else 'o'}-{style}-x"


# ----------------------------------------------------------------- processes


def upstream_block(protocol: str, style: str, mock_url: str, as_list: bool = False) -> str:
    prefix = "a" if protocol == "anthropic" else "o"
    continuation = f'["{style}"]' if as_list else f'"{style}"'
    return f"""
[[upstreams]]
name = "{prefix}-{style}"
protocol = "{protocol}"
base_url = "{mock_url}/v1"
api_key_env = "{KEY_ENV}"
models = ["{prefix}-{style}-*"]
continuation = {continuation}
first_byte_timeout = "5s"
idle_timeout = "5s"
"""


def config_text(port: int, blocks: list[str]) -> str:
    return f'listen = "127.0.0.1:{port}"\n\n[store]\nkind = "memory"\n' + "".join(blocks)


def gateway_env() -> dict[str, str]:
    env = child_env()
    env[KEY_ENV] = UPSTREAM_KEY
    return env


@dataclass
class Rig:
    mock_url: str
    gateway_url: str
    skipped: dict[tuple[str, str], str]  # (protocol, style) -> why it cannot be configured


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("matrix")
    binary = str(tidegate_bin())
    mock = Proc("mock-upstream", [binary, "mock-upstream", "--listen", "127.0.0.1:0", "--api-key", UPSTREAM_KEY], tmp / "mock.log")
    gateway: Proc | None = None
    try:
        port = free_port()
        accepted: list[str] = []
        skipped: dict[tuple[str, str], str] = {}
        for protocol, styles in (("openai", OPENAI_STYLES), ("anthropic", ANTHROPIC_STYLES)):
            for style in styles:
                # `continuation = "style"`, else a one-style list (per-model
                # style lists); a style the gateway does not know is skipped.
                why = ""
                for as_list in (False, True):
                    block = upstream_block(protocol, style, mock.url, as_list)
                    probe = tmp / f"probe-{protocol}-{style}.toml"
                    probe.write_text(config_text(port, [block]))
                    r = subprocess.run([binary, "check-config", "--config", str(probe)], env=gateway_env(),
                                       capture_output=True, text=True, timeout=30)
                    if r.returncode == 0:
                        accepted.append(block)
                        break
                    why = why or ((r.stderr or r.stdout).strip().splitlines() or ["check-config failed"])[-1][:200]
                else:
                    skipped[(protocol, style)] = why
        path = tmp / "gateway.toml"
        path.write_text(config_text(port, accepted))
        gateway = _start_gateway(binary, path, tmp / "gateway.log")
        yield Rig(mock.url, gateway.url, skipped)
    finally:
        if gateway is not None:
            gateway.kill()
        mock.kill()


def _start_gateway(binary: str, config: Path, log: Path) -> Proc:
    # harness.Proc passes child_env(); the upstream key must reach the gateway.
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = UPSTREAM_KEY
    try:
        return Proc("gateway", [binary, "serve", "--config", str(config)], log)
    finally:
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old


# ------------------------------------------------------- the client, recorded


class _TeeStream(httpx2.SyncByteStream):  # type: ignore[misc,name-defined]
    def __init__(self, inner: Any, sink: list[bytes]) -> None:
        self.inner = inner
        self.sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.sink.append(chunk)
            yield chunk

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class Recording(httpx2.BaseTransport):  # type: ignore[misc,name-defined]
    """What the SDK was given: the resuming transport's spliced body."""

    def __init__(self) -> None:
        self.inner = ResumableTransport(max_wait=5.0, max_attempts=4, initial_backoff=0.02, max_backoff=0.2)
        self.body: list[bytes] = []

    def handle_request(self, request: Any) -> Any:
        response = self.inner.handle_request(request)
        return httpx2.Response(status_code=response.status_code, headers=response.headers,
                               stream=_TeeStream(response.stream, self.body), extensions=response.extensions,
                               request=request)

    def close(self) -> None:
        self.inner.close()

    def events(self) -> list[dict[str, Any]]:
        text = b"".join(self.body).decode("utf-8", errors="replace").replace("\r\n", "\n")
        out = []
        for block in text.split("\n\n"):
            ev: dict[str, Any] = {"event": None, "data": None, "id": None}
            data = []
            for line in block.split("\n"):
                if line.startswith("data:"):
                    data.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
                elif line.startswith("event:"):
                    ev["event"] = line[6:].strip()
                elif line.startswith("id:"):
                    ev["id"] = line[3:].strip()
            if data:
                ev["data"] = "\n".join(data)
                out.append(ev)
        return out


# ------------------------------------------------------------------ one cell


class Corrupt(Exception):
    pass


@dataclass
class Outcome:
    kind: str  # exact | best-effort | ended | CORRUPT | skipped
    detail: str = ""
    final: Any = None
    seconds: float = 0.0


def _openai_final(c: Any) -> dict[str, Any]:
    choices = []
    for ch in sorted(c.choices, key=lambda x: x.index):
        m = ch.message
        extra = getattr(m, "model_extra", None) or {}
        calls = [(t.id, t.type, t.function.name, t.function.arguments) for t in (m.tool_calls or [])]
        choices.append({"index": ch.index, "role": m.role, "content": m.content or "", "refusal": m.refusal,
                        "reasoning": extra.get("reasoning_content") or "", "tool_calls": calls,
                        "finish_reason": ch.finish_reason})
    return {"choices": choices}


def _anthropic_final(m: Any) -> dict[str, Any]:
    blocks = []
    for b in m.content:
        d = b.to_dict() if hasattr(b, "to_dict") else dict(b)
        d.pop("citations", None)
        d.pop("parsed_output", None)
        blocks.append(d)
    return {"role": m.role, "content": blocks, "stop_reason": m.stop_reason}


def _check_openai(final: dict[str, Any], events: list[dict[str, Any]], shape: Shape) -> None:
    found: list[str] = []
    want_choices = shape.kwargs.get("n", 1)
    if len(final["choices"]) != want_choices:
        found.append(f"{len(final['choices'])} choices, want {want_choices}")
    for ch in final["choices"]:
        if ch["role"] != "assistant":
            found.append(f"choice {ch['index']} role {ch['role']!r} (a second role delta?)")
        if not ch["finish_reason"]:
            found.append(f"choice {ch['index']} unfinished")
        seen_ids = set()
        for tid, ttype, name, args in ch["tool_calls"]:
            if not tid or tid.count("call_") != 1 or tid in seen_ids:
                found.append(f"tool call id {tid!r}")
            seen_ids.add(tid)
            if ttype != "function" or name != "lookup":
                found.append(f"tool call name {name!r} / type {ttype!r}")
            try:
                json.loads(args)
            except ValueError:
                found.append(f"tool arguments do not parse: {args!r}")
        if "tools" in shape.mock.get("shape", "") and ch["finish_reason"] == "tool_calls" and not ch["tool_calls"]:
            found.append("finish_reason tool_calls without a tool call")
    # Raw: after [DONE] nothing; every data is JSON or [DONE].
    for ev in events:
        if ev["data"] == "[DONE]":
            continue
        try:
            json.loads(ev["data"])
        except ValueError:
            found.append(f"non-JSON event {ev['data'][:80]!r}")
    if found:
        raise Corrupt("; ".join(dict.fromkeys(found)))


def _check_anthropic(final: dict[str, Any], events: list[dict[str, Any]]) -> None:
    found: list[str] = []
    starts = 0
    open_index: int | None = None
    kinds: dict[int, str] = {}
    json_bufs: dict[int, str] = defaultdict(str)
    for ev in events:
        name = ev["event"]
        try:
            data = json.loads(ev["data"])
        except ValueError:
            found.append(f"non-JSON {name} event")
            continue
        if name == "message_start":
            starts += 1
            if starts > 1:
                found.append("a second message_start")
        elif name == "content_block_start":
            i = data["index"]
            if open_index is not None:
                found.append(f"block {i} started inside block {open_index}")
            if i != len(kinds):
                found.append(f"block index {i}, want {len(kinds)}")
            kinds[i] = data["content_block"]["type"]
            open_index = i
        elif name == "content_block_delta":
            i = data["index"]
            if open_index != i:
                found.append(f"delta to block {i}, open is {open_index}")
            dtype = data["delta"]["type"]
            want = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "thinking",
                    "input_json_delta": "tool_use"}.get(dtype)
            if want != kinds.get(i):
                found.append(f"{dtype} into a {kinds.get(i)} block")
            if dtype == "input_json_delta":
                json_bufs[i] += data["delta"]["partial_json"]
        elif name == "content_block_stop":
            if open_index != data["index"]:
                found.append(f"stop of block {data['index']}, open is {open_index}")
            open_index = None
    if open_index is not None:
        found.append(f"block {open_index} never stopped")
    if not events or events[-1]["event"] != "message_stop":
        found.append("no message_stop")
    for i, buf in json_bufs.items():
        try:
            json.loads(buf)
        except ValueError:
            found.append(f"tool_use {i} input does not parse: {buf!r}")
    ids = [b.get("id") for b in final["content"] if b.get("type") == "tool_use"]
    for b in final["content"]:
        if b.get("type") == "tool_use":
            if not str(b.get("id", "")).startswith("toolu_") or str(b["id"]).count("toolu_") != 1 or b.get("name") != "lookup":
                found.append(f"tool_use id/name {b.get('id')!r}/{b.get('name')!r}")
    if len(ids) != len(set(ids)):
        found.append("a tool_use id twice")
    if final["stop_reason"] is None:
        found.append("no stop_reason")
    if found:
        raise Corrupt("; ".join(dict.fromkeys(found)))


def _ended_reason(exc: BaseException) -> str | None:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error") if isinstance(body.get("error"), dict) else body
        if isinstance(err, dict) and err.get("resume") is False:
            return str(err.get("code") or err.get("type") or "?")
    return None


def run_stream(rig: Rig, shape: Shape, style: str, knobs: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """One stream through the gateway with the official SDK; its final message
    (normalized) and the events the SDK was given.  Raises what the SDK raises."""
    rec = Recording()
    http = httpx2.Client(transport=rec, timeout=30.0)
    mock = dict(shape.mock, styles=MOCK_STYLES[style], **knobs)
    messages = [{"role": "user", "content": PROMPT}]
    try:
        if shape.protocol == "openai":
            client = openai.OpenAI(base_url=f"{rig.gateway_url}/v1", api_key="client-key", http_client=http, max_retries=0)
            with client.chat.completions.stream(model=model_for(shape, style), messages=messages,
                                                extra_body={"mock": mock}, **shape.kwargs) as stream:
                for _ in stream:
                    pass
                final = _openai_final(stream.get_final_completion())
        else:
            aclient = anthropic.Anthropic(base_url=rig.gateway_url, api_key="client-key", http_client=http, max_retries=0)
            with aclient.messages.stream(model=model_for(shape, style), messages=messages,
                                         extra_body={"mock": mock}, **shape.kwargs) as astream:
                for _ in astream:
                    pass
                final = _anthropic_final(astream.get_final_message())
    finally:
        http.close()
    return final, rec.events()


def classify(rig: Rig, shape: Shape, style: str, k: int, cell_id: str, uncut: Any) -> Outcome:
    t0 = time.monotonic()
    outcome = _classify(rig, shape, style, k, cell_id, uncut)
    outcome.seconds = time.monotonic() - t0
    return outcome


def _classify(rig: Rig, shape: Shape, style: str, k: int, cell_id: str, uncut: Any) -> Outcome:
    knobs = {shape.failure: k, "fail_id": cell_id}
    try:
        final, events = run_stream(rig, shape, style, knobs)
    except Exception as exc:  # noqa: BLE001 - every exception is classified
        reason = _ended_reason(exc)
        if reason is not None:
            return Outcome("ended", reason)
        return Outcome("CORRUPT", f"{type(exc).__name__}: {str(exc)[:160]}")
    try:
        if shape.protocol == "openai":
            _check_openai(final, events, shape)
        else:
            _check_anthropic(final, events)
    except Corrupt as c:
        return Outcome("CORRUPT", str(c), final)
    if final == uncut:
        return Outcome("exact", final=final)
    return Outcome("best-effort", _diff(uncut, final), final)


def _diff(a: Any, b: Any) -> str:
    sa, sb = json.dumps(a, sort_keys=True), json.dumps(b, sort_keys=True)
    i = 0
    while i < min(len(sa), len(sb)) and sa[i] == sb[i]:
        i += 1
    return f"at {i}: want …{sa[max(0, i - 20):i + 40]}… got …{sb[max(0, i - 20):i + 40]}…"


def _generic(reason: str) -> str:
    """A reason without its particulars, to count alike ones together."""
    import re

    reason = re.sub(r"'[^']*'|\"[^\"]*\"", "…", reason)
    return re.sub(r"\d+", "N", reason)[:140]


def event_count(rig: Rig, shape: Shape) -> int:
    """How many SSE events the mock sends for this shape, uncut (asked directly)."""
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                            "mock": dict(shape.mock)}
    body.update(shape.kwargs)
    if shape.protocol == "openai":
        url, headers = f"{rig.mock_url}/v1/chat/completions", {"authorization": f"Bearer {UPSTREAM_KEY}"}
    else:
        url, headers = f"{rig.mock_url}/v1/messages", {"x-api-key": UPSTREAM_KEY, "anthropic-version": "2023-06-01"}
    with httpx2.Client(timeout=30) as c:
        r = c.post(url, json=body, headers=headers)
        r.raise_for_status()
        return len([b for b in r.text.replace("\r\n", "\n").split("\n\n") if b.strip()])


# --------------------------------------------------------------- the matrix


@dataclass
class Cell:
    shape: Shape
    style: str
    k: int
    cell_id: str
    outcome: Outcome | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)


def test_sdk_accumulation_matrix(rig: Rig) -> None:
    started = time.monotonic()
    only = [s for s in os.environ.get("TIDEGATE_MATRIX_SHAPES", "").split(",") if s]
    shapes = [s for s in SHAPES if not only or s.name in only]
    run_tag = f"{os.getpid()}-{int(time.time())}"
    uncut: dict[tuple[str, str], Any] = {}
    cells: list[Cell] = []
    skipped_cells: dict[tuple[str, str], str] = {}
    for shape in shapes:
        total = event_count(rig, shape)
        for style in shape.styles:
            why = rig.skipped.get((shape.protocol, style))
            if why is not None:
                skipped_cells[(shape.name, style)] = why
                continue
            try:
                uncut[(shape.name, style)] = run_stream(rig, shape, style, {"fail_id": f"uncut-{run_tag}-{shape.name}-{style}"})[0]
            except Exception as exc:  # noqa: BLE001
                skipped_cells[(shape.name, style)] = f"uncut stream failed: {type(exc).__name__}: {str(exc)[:120]}"
                continue
            for k in range(total):
                cells.append(Cell(shape, style, k, f"{run_tag}-{shape.name}-{style}-{k}"))

    # Batches small enough that /mock/requests (the last 256) holds each whole.
    mock_log_lost = False
    with httpx2.Client(timeout=30) as admin:
        admin.delete(f"{rig.mock_url}/mock/requests")
        with ThreadPoolExecutor(max_workers=12) as pool:
            for start in range(0, len(cells), BATCH):
                batch = cells[start:start + BATCH]
                for cell, outcome in zip(batch, pool.map(
                        lambda c: classify(rig, c.shape, c.style, c.k, c.cell_id, uncut[(c.shape.name, c.style)]), batch)):
                    cell.outcome = outcome
                log = admin.get(f"{rig.mock_url}/mock/requests").json()
                admin.delete(f"{rig.mock_url}/mock/requests")
                mock_log_lost |= len(log) >= 256
                by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
                for entry in log:
                    body = entry.get("body")
                    fid = body.get("mock", {}).get("fail_id") if isinstance(body, dict) else None
                    if fid:
                        by_id[fid].append(entry)
                for cell in batch:
                    cell.requests = by_id.get(cell.cell_id, [])

    # The table.
    table: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    examples: dict[tuple[str, str, str], str] = {}
    reasons: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        assert cell.outcome is not None
        label = cell.outcome.kind
        if label == "ended":
            label = f"ended({cell.outcome.detail})"
        table[(cell.shape.name, cell.style)][label] += 1
        key = (cell.shape.name, cell.style, cell.outcome.kind)
        if cell.outcome.kind == "CORRUPT":
            for reason in cell.outcome.detail.split("; "):
                ks = reasons[(cell.shape.name, cell.style)][_generic(reason)]
                if cell.k not in ks:
                    ks.append(cell.k)
        if cell.outcome.kind == "best-effort" and key not in examples:
            examples[key] = f"K={cell.k}: {cell.outcome.detail}"
    lines = ["| shape | style | exact | best-effort | ended (reason) | CORRUPT |", "|---|---|---|---|---|---|"]
    for shape in shapes:
        for style in shape.styles:
            if (shape.name, style) in skipped_cells:
                lines.append(f"| {shape.name} | {style} | skipped: {skipped_cells[(shape.name, style)]} | | | |")
                continue
            c = table[(shape.name, style)]
            ended = ", ".join(f"{n} {k[6:-1]}" for k, n in sorted(c.items()) if k.startswith("ended("))
            lines.append(f"| {shape.name} | {style} | {c['exact']} | {c['best-effort']} | {ended} | {c['CORRUPT']} |")
    lines.append("")
    lines.append("Why cells are CORRUPT (shape / style: reason — at cut indices K):")
    for (sn, st), by_reason in reasons.items():
        for reason, ks in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- {sn} / {st}: {reason} — K={','.join(map(str, ks))}")
    if examples:
        lines.append("")
        lines.append("First best-effort example per (shape, style):")
        for (sn, st, kind), text in sorted(examples.items()):
            lines.append(f"- {sn} / {st}: {text}")
    problems: list[str] = []
    for cell in cells:
        no_cred = [e for e in cell.requests if not e.get("has_credential")]
        rejected = [e for e in cell.requests if e.get("status") == 400]
        if no_cred:
            problems.append(f"{cell.shape.name}/{cell.style}/K={cell.k}: {len(no_cred)} provider request(s) without a credential")
        if len(rejected) > 1:
            problems.append(f"{cell.shape.name}/{cell.style}/K={cell.k}: {len(rejected)} continuations rejected with 400 (at most one fallback)")
        assert cell.outcome is not None
        if cell.outcome.kind == "CORRUPT":
            problems.append(f"{cell.shape.name}/{cell.style}/K={cell.k}: CORRUPT: {cell.outcome.detail}")
        elif (
            cell.style in EXACT.get(cell.shape.name, [])
            and cell.outcome.kind != "exact"
            and (cell.shape.name, cell.outcome.kind) not in NOT_EXACT_BY_DESIGN
        ):
            problems.append(f"{cell.shape.name}/{cell.style}/K={cell.k}: want exact, got {cell.outcome.kind}: {cell.outcome.detail}")
    slow = sorted(cells, key=lambda c: -(c.outcome.seconds if c.outcome else 0))[:5]
    lines.append("\nSlowest cells: " + ", ".join(
        f"{c.shape.name}/{c.style}/K={c.k} {c.outcome.seconds:.1f}s ({c.outcome.kind})" for c in slow if c.outcome))
    seen = [e for c in cells for e in c.requests]
    busiest = max(cells, key=lambda c: len(c.requests), default=None)
    lines.append(
        f"\nProvider requests seen for the cut cells: {len(seen)}, {sum(1 for e in seen if not e.get('has_credential'))} without a "
        f"credential, {sum(1 for e in seen if e.get('status') == 400)} answered 400; most for one stream: "
        + (f"{len(busiest.requests)} ({busiest.shape.name}/{busiest.style}/K={busiest.k})" if busiest else "-"))
    if mock_log_lost:
        lines.append("\n(note: a batch filled the mock's request log; some request checks may be incomplete)")
    elapsed = time.monotonic() - started
    lines.append(f"\n{len(cells)} cells in {elapsed:.1f} s; {len(problems)} problem(s).")
    report = "\n".join(lines)
    REPORT.write_text("# SDK-accumulation matrix\n\n" + report + "\n\n## Problems\n\n" +
                      "\n".join(f"- {p}" for p in problems) + "\n")
    print("\n" + report)
    if problems and os.environ.get("TIDEGATE_MATRIX") != "report":
        shown = "\n".join(problems[:40])
        pytest.fail(f"{len(problems)} matrix problem(s) (full list in {REPORT}):\n{shown}", pytrace=False)
