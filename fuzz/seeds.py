#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/: provider-shaped SSE
streams of both dialects, chunked bodies, response heads, request bodies,
and stored/continued stream pairs. Run from anywhere; rewrites the seeds
(files named seed-*), leaves what the fuzzer added alone."""
import json, os, pathlib

root = pathlib.Path(__file__).resolve().parent / "corpus"

def put(target, name, data):
    d = root / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)

def j(v):
    return json.dumps(v, separators=(",", ":"))

# ---- OpenAI chat chunks
def oa(choices, cid="chatcmpl-abc", usage=None, extra=None):
    v = {"id": cid, "object": "chat.completion.chunk", "created": 1700000000,
         "model": "gpt-4o-mini", "system_fingerprint": "fp_1", "choices": choices}
    if usage is not False:
        v["usage"] = usage
    if extra:
        v.update(extra)
    return "data: " + j(v) + "\n\n"

def ch(delta, index=0, finish=None):
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

def oa_text(words, index=0, role=True, finish="stop"):
    out = []
    if role:
        out.append(oa([ch({"role": "assistant", "content": "", "refusal": None}, index)]))
    out += [oa([ch({"content": w}, index)]) for w in words]
    if finish:
        out.append(oa([ch({}, index, finish)]))
    return out

text_stream = oa_text(["The", " tide", " gate", " holds", "."])
usage = oa([], usage={"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14})
openai_done = "".join(text_stream) + usage + "data: [DONE]\n\n"
tool_stream = [
    oa([ch({"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}], "refusal": None})]),
    oa([ch({"tool_calls": [{"index": 0, "function": {"arguments": "{\"loc"}}]})]),
    oa([ch({"tool_calls": [{"index": 0, "function": {"arguments": "ation\":\"Paris\"}"}}]})]),
    oa([ch({}, 0, "tool_calls")]),
]
reasoning_stream = [
    oa([ch({"role": "assistant", "content": ""})]),
    oa([ch({"reasoning_content": "Let me"})]),
    oa([ch({"reasoning_content": " think."})]),
    oa([ch({"content": "Yes"})]),
    oa([ch({}, 0, "stop")]),
]
n2 = oa_text(["a", "b"], 0, finish=None) + oa_text(["x"], 1) + [oa([ch({"content": " c"}, 0)])]

# ---- Anthropic messages
def an(name, v):
    return f"event: {name}\ndata: {j(v)}\n\n"

def msg_start(mid="msg_01"):
    return an("message_start", {"type": "message_start", "message": {"id": mid, "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [], "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}}})

def bstart(i, block):
    return an("content_block_start", {"type": "content_block_start", "index": i, "content_block": block})

def bdelta(i, delta):
    return an("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta})

def bstop(i):
    return an("content_block_stop", {"type": "content_block_stop", "index": i})

def mdelta(reason="end_turn", out=5):
    return an("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None}, "usage": {"output_tokens": out}})

ping = an("ping", {"type": "ping"})
mstop = an("message_stop", {"type": "message_stop"})
an_text = [msg_start(), bstart(0, {"type": "text", "text": ""}), ping,
           bdelta(0, {"type": "text_delta", "text": "The tide"}),
           bdelta(0, {"type": "text_delta", "text": " gate holds "}),
           bstop(0), mdelta(), mstop]
an_thinking = [msg_start(), bstart(0, {"type": "thinking", "thinking": "", "signature": ""}),
               bdelta(0, {"type": "thinking_delta", "thinking": "Hmm, tides."}),
               bdelta(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}),
               bstop(0), bstart(1, {"type": "text", "text": ""}),
               bdelta(1, {"type": "text_delta", "text": "Gates"}),
               bdelta(1, {"type": "text_delta", "text": " hold."}), bstop(1), mdelta(), mstop]
an_tool = [msg_start(), bstart(0, {"type": "text", "text": ""}),
           bdelta(0, {"type": "text_delta", "text": "Checking."}), bstop(0),
           bstart(1, {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}),
           bdelta(1, {"type": "input_json_delta", "partial_json": ""}),
           bdelta(1, {"type": "input_json_delta", "partial_json": "{\"location\": \"Pa"}),
           bdelta(1, {"type": "input_json_delta", "partial_json": "ris\"}"}),
           bstop(1), mdelta("tool_use", 20), mstop]
an_redacted = [msg_start(), bstart(0, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3"}), bstop(0),
               bstart(1, {"type": "text", "text": ""}), bdelta(1, {"type": "text_delta", "text": "ok"})]
an_error = [msg_start(), an("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]

# ---- sse_decoder: whole streams, odd framing
put("sse_decoder", "openai-text", openai_done)
put("sse_decoder", "openai-tool", "".join(tool_stream) + "data: [DONE]\n\n")
put("sse_decoder", "openai-reasoning", "".join(reasoning_stream))
put("sse_decoder", "anthropic-text", "".join(an_text))
put("sse_decoder", "anthropic-thinking", "".join(an_thinking))
put("sse_decoder", "anthropic-tool", "".join(an_tool))
put("sse_decoder", "crlf-bom-comments", "\ufeff: keep-alive\r\nevent: a\r\ndata: x\r\n\r\ndata:y\rdata\r\rid: 7\nretry: 10\ndata: z\n\n")
put("sse_decoder", "multiline-unfinished", "data: a\ndata:  b\ndata\n\nevent\ndata:2\n\nevent: ping\n\ndata: cut")

# ---- h1_chunked: bodies as providers frame them
def chunked(payload, sizes, ext=False, trailer=False, lf=False):
    eol = "\n" if lf else "\r\n"
    out, i, k = [], 0, 0
    while i < len(payload):
        n = min(sizes[k % len(sizes)], len(payload) - i)
        out.append(f"{n:x}" + (";name=v" if ext and k == 0 else "") + eol + payload[i:i + n] + eol)
        i += n; k += 1
    out.append("0" + eol + ("x-trailer: 1" + eol if trailer else "") + eol)
    return "".join(out)

put("h1_chunked", "sse-events", chunked(openai_done, [97, 200, 31]))
put("h1_chunked", "anthropic", chunked("".join(an_text), [512]))
put("h1_chunked", "ext-trailer", chunked("hello whole world", [5, 1, 11], ext=True, trailer=True))
put("h1_chunked", "bare-lf-upper", chunked("x" * 40, [26], lf=True).replace("1a", "1A"))
put("h1_chunked", "then-next-response", chunked("ok", [2]) + "HTTP/1.1 200 OK\r\n")
put("h1_chunked", "broken", "5\r\nhel")

# ---- h1_response_head
heads = {
    "openai-sse": "HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\nopenai-processing-ms: 120\r\nopenai-version: 2020-10-01\r\nx-request-id: req_1\r\nx-ratelimit-remaining-tokens: 9000\r\n\r\ndata: {}\n\n",
    "anthropic-sse": "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nrequest-id: req_01\r\nanthropic-ratelimit-requests-remaining: 49\r\nanthropic-organization-id: org\r\ntransfer-encoding: chunked\r\n\r\n",
    "error-length": "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 73\r\nretry-after: 3\r\n\r\n{\"error\":{\"message\":\"Rate limit\",\"type\":\"rate_limit_error\",\"code\":null}}",
    "http10-close": "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n\r\n",
    "no-content": "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
    "gzip-chunked": "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n",
    "lf-only": "HTTP/1.1 503 Service Unavailable\ncontent-length: 0\n\n",
}
for name, text in heads.items():
    put("h1_response_head", name, text)

# ---- request_validation
reqs = {
    "openai": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "stream_options": {"include_usage": True}},
    "openai-tools": {"model": "gpt-4o", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"}], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}], "stream": True, "n": 2},
    "anthropic": {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "stream": True, "thinking": {"type": "enabled", "budget_tokens": 512}},
    "functions-null-stream": {"model": "m", "messages": [1], "functions": [], "stream": None, "max_tokens": 0},
}
for name, v in reqs.items():
    put("request_validation", name, j(v))
put("request_validation", "escapes-dupes", '{"model":"m\\u00e9\\n","model":"g\\"pt","messages":[{}],"stream":false,"max_tokens":18446744073709551615,"x":[[[{"y":"\\ud83d\\ude00"}]]]}')
put("request_validation", "bad", '{"model":"","messages":[],"stream":"yes","max_tokens":-1.5}')

# ---- continuation: protocol and style, original request, stored, =====, continued
def cont(name, head, original, stored, continued):
    put("continuation", name, head + "\n" + j(original) + "\n" + "".join(stored) + "\n=====\n" + "".join(continued))

oreq = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q"}], "max_tokens": 50, "stream": True}
cut = oa_text(["The", " tide", " gate"], finish=None)
again = [oa([ch({"role": "assistant", "content": ""})], cid="chatcmpl-new")] + \
        [oa([ch({"content": w})], cid="chatcmpl-new") for w in [" gate", " holds", "."]] + \
        [oa([ch({}, 0, "stop")], cid="chatcmpl-new"), oa([], cid="chatcmpl-new", usage={"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}), "data: [DONE]\n\n"]
cont("openai-instruct", "openai instruct", oreq, cut, again)
cont("openai-prefix", "openai prefix", oreq, cut, again)
cont("openai-reasoning-cut", "openai continue_final_message", oreq, reasoning_stream[:2], reasoning_stream + ["data: [DONE]\n\n"])
cont("openai-n2", "openai prefix", dict(oreq, n=2), n2, oa_text([" d"], 0) + ["data: [DONE]\n\n"])
cont("openai-tool-cut", "openai prefix", dict(oreq, tools=[{"type": "function", "function": {"name": "f"}}]), tool_stream[:2], tool_stream)
areq = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "q"}], "stream": True}
an_cut = an_text[:5]
an_again = [msg_start("msg_02"), bstart(0, {"type": "text", "text": ""}),
            bdelta(0, {"type": "text_delta", "text": "holds "}),
            bdelta(0, {"type": "text_delta", "text": "the sea."}), bstop(0), mdelta("end_turn", 4), mstop]
cont("anthropic-prefix", "anthropic assistant_prefix", areq, an_cut, an_again)
cont("anthropic-instruct", "anthropic instruct", areq, an_cut, an_again)
cont("anthropic-thinking", "anthropic assistant_prefix", dict(areq, thinking={"type": "enabled", "budget_tokens": 64}), an_thinking[:7], an_thinking)
cont("anthropic-thinking-unsigned", "anthropic assistant_prefix", areq, an_thinking[:3], an_thinking)
cont("anthropic-tool", "anthropic assistant_prefix", dict(areq, tools=[{"name": "get_weather", "input_schema": {"type": "object"}}]), an_tool[:6], an_tool)
cont("anthropic-redacted", "anthropic instruct", areq, an_redacted, an_again)
cont("anthropic-error", "anthropic assistant_prefix", areq, an_error, an_again)
