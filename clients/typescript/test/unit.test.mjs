// Unit tests of the SSE parser and the resume state machine against a scripted
// fake fetch (no processes). The end-to-end proof against the real gateway is
// in gateway.test.mjs.
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import {
  SseParser,
  serializeEvent,
  resumableFetch,
  resumeStream,
  streamText,
  collectText,
  getStreamInfo,
  ResumeFailedError,
  StreamGapError,
  StreamAbortedError,
  chunkText,
  eventError,
  isStreamEnd,
} from "../dist/index.js";

const enc = new TextEncoder();

/** A Response whose body sends `parts` and then ends, or errors (a cut) when `cut` is set. */
function sseResponse(parts, { headers = {}, cut = false, status = 200 } = {}) {
  const body = new ReadableStream({
    async pull(controller) {
      if (parts.length === 0) {
        if (cut) controller.error(new TypeError("terminated"));
        else controller.close();
        return;
      }
      await new Promise((r) => setTimeout(r, 1));
      controller.enqueue(enc.encode(parts.shift()));
    },
  });
  return new Response(body, {
    status,
    headers: { "content-type": "text/event-stream", ...headers },
  });
}

const chunk = (text) => JSON.stringify({ id: "c1", object: "chat.completion.chunk", choices: [{ index: 0, delta: { content: text } }] });
const ev = (id, text) => `id: ${id}\ndata: ${chunk(text)}\n\n`;
const abortEvent = (type, resume, last, token = "tok2") =>
  `data: ${JSON.stringify({ error: { type, code: type, message: `${type}!`, resume, stream_id: "s1", resume_token: token, last_event_id: String(last), resume_url: "/v1/streams/s1" } })}\n\n`;
const TG = { "x-tidegate-stream-id": "s1", "x-tidegate-resume-token": "tok1" };

/** A fake fetch that answers from a queue of handlers and records the requests. */
function scriptedFetch(handlers) {
  const calls = [];
  const f = async function (input, init = {}) {
    // like a browser's window.fetch, which must not be called as a method of another object
    if (this !== undefined && this !== globalThis) throw new TypeError("Illegal invocation");
    const url = String(input);
    const headers = new Headers(init.headers);
    calls.push({ url, method: init.method ?? "GET", headers });
    const h = handlers.shift();
    if (!h) throw new Error(`unexpected request ${url}`);
    return h({ url, headers, init });
  };
  f.calls = calls;
  return f;
}

async function readAll(res) {
  return await res.text();
}

describe("SseParser", () => {
  test("parses events split anywhere, CRLF and CR line ends, comments, multi-line data", () => {
    const text = "\ufeff: ping\r\nid: 1\r\ndata: a\r\ndata: b\r\n\r\nretry: 3000\n\nid: 2\rdata: c\r\rdata: [DONE]\n\n";
    for (let cut = 0; cut <= text.length; cut++) {
      const p = new SseParser();
      const out = [...p.feed(text.slice(0, cut)), ...p.feed(text.slice(cut))];
      assert.deepEqual(out, [{ id: "1", data: "a\nb" }, { id: "2", data: "c" }, { data: "[DONE]" }], `cut at ${cut}`);
      assert.equal(p.reconnectionTime, 3000);
    }
  });

  test("discards an unterminated block at the end", () => {
    const p = new SseParser();
    assert.deepEqual(p.feed("id: 1\ndata: x\n\nid: 2\ndata: half"), [{ id: "1", data: "x" }]);
    assert.deepEqual(p.end(), []);
  });

  test("serializes standard SSE", () => {
    assert.equal(serializeEvent({ id: "7", event: "x", data: "a\nb" }), "event: x\nid: 7\ndata: a\ndata: b\n\n");
  });
});

describe("resumableFetch (scripted)", () => {
  test("non-tidegate responses pass through as the very same object", async () => {
    const original = new Response("hello", { headers: { "content-type": "text/plain" } });
    const f = resumableFetch({ fetch: async () => original });
    assert.equal(await f("http://x/v1/models"), original);
  });

  test("swallows a resumable abort event, retries a 503, drops duplicates, splices the continuation", async () => {
    const reconnecting = [];
    const resumed = [];
    const fetch = scriptedFetch([
      () => sseResponse([ev(1, "a "), ": ping\n\n", ev(2, "b "), ev(3, "c "), abortEvent("server_restarting", true, 3)], { headers: TG }),
      () => { throw new TypeError("fetch failed", { cause: { code: "ECONNREFUSED" } }); },
      () => new Response(JSON.stringify({ error: { message: "draining" } }), { status: 503, headers: { "retry-after": "0" } }),
      () => sseResponse(["retry: 5000\n\n", ev(2, "b "), ev(3, "c "), ev(4, "d"), "data: [DONE]\n\n"]),
    ]);
    const rf = resumableFetch({
      fetch,
      backoff: { initialDelayMs: 5, maxDelayMs: 20 },
      onReconnecting: (i) => reconnecting.push(i),
      onResumed: (i) => resumed.push(i),
    });
    const res = await rf("http://gw.example:8080/prefix/v1/chat/completions", {
      method: "POST",
      headers: { authorization: "Bearer mykey", "content-type": "application/json", "x-custom": "1" },
      body: "{}",
    });
    assert.equal(res.headers.get("x-tidegate-stream-id"), "s1");
    const text = await readAll(res);
    assert.equal(text, ev(1, "a ") + ev(2, "b ") + ev(3, "c ") + ev(4, "d") + "data: [DONE]\n\n");
    assert.equal(fetch.calls.length, 4);
    for (const call of fetch.calls.slice(1)) {
      assert.equal(call.url, "http://gw.example:8080/prefix/v1/streams/s1");
      assert.equal(call.method, "GET");
      assert.equal(call.headers.get("last-event-id"), "3");
      assert.equal(call.headers.get("x-tidegate-resume-token"), "tok2", "token from the abort event");
      assert.equal(call.headers.get("authorization"), "Bearer mykey", "original headers kept");
      assert.equal(call.headers.get("x-custom"), "1");
      assert.equal(call.headers.get("content-type"), null);
    }
    assert.deepEqual(reconnecting.map((r) => r.attempt), [1, 2, 3]);
    assert.equal(reconnecting[0].reason instanceof StreamAbortedError, true);
    assert.equal(reconnecting[2].status, 503);
    assert.equal(resumed.length, 1);
    assert.equal(resumed[0].lastEventId, 3);
    const info = getStreamInfo(res);
    assert.equal(info.lastEventId, 4);
    assert.equal(info.resumeToken, "tok2");
  });

  test("a cut connection (read error, EOF without [DONE]) resumes with the header token", async () => {
    const fetch = scriptedFetch([
      () => sseResponse([ev(1, "a "), ev(2, "b "), "id: 3\ndata: {\"par"], { headers: TG, cut: true }),
      () => sseResponse([ev(3, "c ")]), // EOF without [DONE]: resume again
      () => sseResponse([ev(4, "d"), "data: [DONE]\n\n"]),
    ]);
    const res = await resumableFetch({ fetch, backoff: { initialDelayMs: 1 } })("http://gw/v1/chat/completions", { method: "POST", body: "{}" });
    assert.equal(await collectText(res), "a b c d");
    assert.equal(fetch.calls[1].headers.get("x-tidegate-resume-token"), "tok1");
    assert.equal(fetch.calls[1].headers.get("last-event-id"), "2");
    assert.equal(fetch.calls[2].headers.get("last-event-id"), "3");
  });

  test("a gap in the ids is an error", async () => {
    const fetch = scriptedFetch([
      () => sseResponse([ev(1, "a "), abortEvent("upstream_failed", true, 1)], { headers: TG }),
      () => sseResponse([ev(3, "c "), "data: [DONE]\n\n"]),
    ]);
    const res = await resumableFetch({ fetch })("http://gw/v1/chat/completions", { method: "POST" });
    await assert.rejects(readAll(res), (e) => e instanceof StreamGapError && e.expectedEventId === 2 && e.receivedEventId === 3);
  });

  test("abort events with resume:false pass through untouched", async () => {
    const abort = abortEvent("cancelled", false, 1);
    const fetch = scriptedFetch([() => sseResponse([ev(1, "a "), abort], { headers: TG })]);
    const res = await resumableFetch({ fetch })("http://gw/v1/chat/completions", { method: "POST" });
    assert.equal(await readAll(res), ev(1, "a ") + abort);
    assert.equal(fetch.calls.length, 1);
    const res2 = await resumableFetch({ fetch: scriptedFetch([() => sseResponse([ev(1, "a "), abort], { headers: TG })]) })("http://gw/v1/chat/completions");
    await assert.rejects(collectText(res2), (e) => e instanceof StreamAbortedError && e.type === "cancelled" && e.resume === false);
  });

  test("gives up after the budget with ResumeFailedError carrying the cursor", async () => {
    let refused = 0;
    const fetch = scriptedFetch([
      () => sseResponse([ev(1, "a "), ev(2, "b ")], { headers: TG, cut: true }),
      ...Array.from({ length: 1000 }, () => () => { refused++; throw new TypeError("fetch failed"); }),
    ]);
    const t0 = Date.now();
    const res = await resumableFetch({ fetch, budgetMs: 300, backoff: { initialDelayMs: 10, maxDelayMs: 50 } })("http://gw/v1/chat/completions");
    await assert.rejects(readAll(res), (e) => {
      assert.ok(e instanceof ResumeFailedError, String(e));
      assert.equal(e.name, "ResumeFailedError");
      assert.equal(e.streamId, "s1");
      assert.equal(e.resumeToken, "tok1");
      assert.equal(e.lastEventId, 2);
      assert.ok(e.attempts >= 3, `attempts ${e.attempts}`);
      return true;
    });
    const elapsed = Date.now() - t0;
    assert.ok(elapsed >= 250 && elapsed < 2000, `elapsed ${elapsed}`);
    assert.ok(refused >= 3 && refused < 100);
  });

  test("a 404 on resume gives up at once", async () => {
    const fetch = scriptedFetch([
      () => sseResponse([ev(1, "a ")], { headers: TG, cut: true }),
      () => new Response(JSON.stringify({ error: { message: "no such stream", type: "not_found" } }), { status: 404 }),
    ]);
    const res = await resumableFetch({ fetch })("http://gw/v1/chat/completions");
    await assert.rejects(readAll(res), (e) => e instanceof ResumeFailedError && e.status === 404 && /no such stream/.test(e.message));
  });

  test("the caller's abort signal stops the resume loop with an AbortError", async () => {
    const ac = new AbortController();
    const fetch = scriptedFetch([
      () => sseResponse([ev(1, "a ")], { headers: TG, cut: true }),
      ...Array.from({ length: 1000 }, () => () => { throw new TypeError("fetch failed"); }),
    ]);
    const res = await resumableFetch({ fetch, onReconnecting: (i) => { if (i.attempt === 2) ac.abort(); } })("http://gw/v1/chat/completions", { signal: ac.signal });
    await assert.rejects(readAll(res), (e) => e.name === "AbortError");
  });

  test("resumeStream: cursor and token from options or the URL, text iterator", async () => {
    const fetch = scriptedFetch([
      () => new Response("down", { status: 503 }),
      () => sseResponse([ev(5, "e "), ev(6, "f"), "data: [DONE]\n\n"]),
    ]);
    const reconnecting = [];
    const res = await resumeStream("http://gw/v1/streams/s%201?token=qt&after=4", { fetch, backoff: { initialDelayMs: 1 }, onReconnecting: (i) => reconnecting.push(i) });
    const parts = [];
    for await (const t of streamText(res)) parts.push(t);
    assert.deepEqual(parts, ["e ", "f"]);
    assert.equal(fetch.calls[0].url, "http://gw/v1/streams/s%201");
    assert.equal(fetch.calls[0].headers.get("last-event-id"), "4");
    assert.equal(fetch.calls[0].headers.get("x-tidegate-resume-token"), "qt");
    assert.equal(reconnecting.length, 1, "the first request is not a reconnect; the retry is");
    assert.equal(getStreamInfo(res).streamId, "s 1");

    await assert.rejects(
      resumeStream("http://gw/v1/streams/s1", { token: "bad", fetch: async () => new Response("{}", { status: 404 }) }),
      (e) => e instanceof ResumeFailedError && e.status === 404 && e.streamId === "s1",
    );
  });
});

describe("text helpers on an OpenAI Responses stream", () => {
  /** One Responses event, as the API streams it: `event:` names the `type`. */
  const rev = (obj) => `event: ${obj.type}\ndata: ${JSON.stringify(obj)}\n\n`;
  const created = { type: "response.created", sequence_number: 0, response: { id: "resp_1", status: "in_progress", error: null, output: [] } };
  const delta = (n, text) => ({ type: "response.output_text.delta", sequence_number: n, item_id: "msg_1", output_index: 0, content_index: 0, delta: text });
  const done = { type: "response.output_text.done", sequence_number: 3, item_id: "msg_1", output_index: 0, content_index: 0, text: "Hi there" };
  const completed = { type: "response.completed", sequence_number: 4, response: { id: "resp_1", status: "completed", error: null } };

  test("chunkText reads output_text deltas and nothing else; isStreamEnd ends at completed or incomplete", () => {
    assert.equal(chunkText(JSON.stringify(delta(1, "Hi "))), "Hi ");
    assert.equal(chunkText(JSON.stringify(done)), "", "the done event repeats the text: not added twice");
    assert.equal(chunkText(JSON.stringify(created)), "");
    assert.equal(chunkText({ type: "response.output_text.delta", delta: 7 }), "");
    assert.equal(chunkText({ type: "response.reasoning_summary_text.delta", delta: "thinking" }), "");
    assert.equal(isStreamEnd({ event: "response.completed", data: JSON.stringify(completed) }), true);
    assert.equal(isStreamEnd({ event: "response.incomplete", data: "{}" }), true);
    assert.equal(isStreamEnd({ event: "response.output_text.done", data: "{}" }), false);
    assert.equal(isStreamEnd({ data: "[DONE]" }), true);
    assert.equal(isStreamEnd({ event: "message_stop", data: "{}" }), true);
  });

  test("eventError: a provider's error event, response.failed, tidegate's abort; not a lifecycle event's error:null", () => {
    assert.deepEqual(eventError(JSON.stringify({ type: "error", code: "server_error", message: "boom", param: null, sequence_number: 2 })), {
      type: "error",
      code: "server_error",
      message: "boom",
    });
    const failed = eventError(JSON.stringify({ type: "response.failed", sequence_number: 5, response: { id: "r", status: "failed", error: { code: "invalid_prompt", message: "no" } } }));
    assert.equal(failed.code, "invalid_prompt");
    assert.equal(failed.message, "no");
    const abort = eventError(
      JSON.stringify({ type: "error", code: "server_restarting", message: "restarting", param: null, sequence_number: 7, error: { type: "server_restarting", code: "server_restarting", message: "restarting", resume: true } }),
    );
    assert.equal(abort.type, "server_restarting");
    assert.equal(abort.resume, true);
    assert.equal(eventError(JSON.stringify(created)), undefined);
    assert.equal(eventError(JSON.stringify(completed)), undefined);
  });

  test("streamText yields the deltas and ends at response.completed; a failed response throws", async () => {
    const parts = [];
    for await (const t of streamText(sseResponse([rev(created), rev(delta(1, "Hi ")), rev(delta(2, "there")), rev(done), rev(completed)]))) parts.push(t);
    assert.deepEqual(parts, ["Hi ", "there"]);
    await assert.rejects(
      collectText(sseResponse([rev(created), rev(delta(1, "Hi ")), rev({ type: "response.failed", sequence_number: 2, response: { id: "resp_1", status: "failed", error: { code: "server_error", message: "the model broke" } } })])),
      (e) => e instanceof StreamAbortedError && /the model broke/.test(e.message),
    );
    await assert.rejects(collectText(sseResponse([rev(created), rev(delta(1, "Hi "))])), (e) => e instanceof StreamAbortedError, "ending without response.completed is not whole");
  });
});
