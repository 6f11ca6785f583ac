// End-to-end proof against the REAL binaries ($TIDEGATE_BIN, default
// <repo>/target/release/tidegate): the official openai npm package, talking to
// the gateway through resumableFetch, survives a gateway restart mid-answer
// without noticing, and its text is exactly the mock's answer.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import OpenAI, { APIError } from "openai";
import { streamText as aiStreamText } from "ai";
import { createOpenAI } from "@ai-sdk/openai";
import { Harness, freePort, waitExit, expectedAnswer, expectedResponse, sleep, MOCK_KEY } from "../test-support/harness.mjs";
import {
  resumableFetch,
  resumeStream,
  streamText,
  streamEvents,
  chunkText,
  collectText,
  ResumeFailedError,
} from "../dist/index.js";

const T = { timeout: 60_000 };

describe("against the real gateway", () => {
  /** @type {Harness} */
  let h;
  let mock;

  before(async () => {
    h = new Harness("tidegate-ts");
    mock = await h.startMock();
  });

  after(async () => {
    await h?.close();
  });

  /** A long, visibly streaming request; each test uses its own messages. */
  const request = (content, maxTokens = 80, interval = 40) => ({
    model: "mock",
    messages: [{ role: "user", content }],
    max_tokens: maxTokens,
    mock: { token_interval_ms: interval },
  });

  /**
   * Streams `body` with the openai SDK over resumableFetch; after `afterChunks`
   * chunks, runs `disrupt()` (without awaiting it inside the loop).
   */
  async function streamThroughRestart({ gwUrl, body, afterChunks, disrupt, fetchOptions = {} }) {
    const log = [];
    const client = new OpenAI({
      baseURL: `${gwUrl}/v1`,
      apiKey: "sk-test-not-used",
      maxRetries: 0,
      fetch: resumableFetch({
        backoff: { initialDelayMs: 100, maxDelayMs: 1000 },
        onReconnecting: (i) => log.push({ kind: "reconnecting", attempt: i.attempt, status: i.status, last: i.lastEventId }),
        onResumed: (i) => log.push({ kind: "resumed", last: i.lastEventId, attempts: i.attempts }),
        ...fetchOptions,
      }),
    });
    const { data: stream, response } = await client.chat.completions.create({ ...body, stream: true }).withResponse();
    let text = "";
    let chunks = 0;
    let disruption;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? "";
      if (++chunks === afterChunks) disruption = disrupt();
    }
    await disruption;
    return { text, chunks, log, response };
  }

  test("openai SDK over resumableFetch: SIGTERM mid-answer, a NEW gateway on the same port and store; no exception, exact text", T, async () => {
    const port = await freePort();
    const dataDir = h.dataDir();
    let gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });
    const body = request("tell me about tides and gates, and why a restart must not cut a sentence in half");
    const expected = await expectedAnswer(mock.url, body);
    let exit;
    const { text, log, response } = await streamThroughRestart({
      gwUrl: gw.url,
      body,
      afterChunks: 5,
      disrupt: async () => {
        gw.proc.kill("SIGTERM");
        exit = await waitExit(gw, 10_000);
        gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });
      },
    });
    assert.ok(response.headers.get("x-tidegate-stream-id"), "the stream carries x-tidegate-stream-id");
    assert.deepEqual(exit, { code: 0, signal: null }, "SIGTERM drains and exits 0");
    assert.equal(text, expected);
    assert.ok(log.some((e) => e.kind === "reconnecting"), `the stream was really interrupted: ${JSON.stringify(log)}`);
    assert.ok(log.some((e) => e.kind === "resumed"), `and resumed: ${JSON.stringify(log)}`);
  });

  test("openai SDK over resumableFetch: SIGKILL mid-answer (a cut, no in-band word), new gateway; exact text", T, async () => {
    const port = await freePort();
    const dataDir = h.dataDir();
    let gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });
    const body = request("what happens to a stream when the process is killed without warning");
    const expected = await expectedAnswer(mock.url, body);
    const { text, log } = await streamThroughRestart({
      gwUrl: gw.url,
      body,
      afterChunks: 10,
      disrupt: async () => {
        gw.proc.kill("SIGKILL");
        await waitExit(gw, 10_000);
        await sleep(300); // stay down for a moment: the client must retry refused connections
        gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });
      },
    });
    assert.equal(text, expected);
    assert.ok(log.some((e) => e.kind === "reconnecting"), JSON.stringify(log));
    assert.ok(log.some((e) => e.kind === "resumed"), JSON.stringify(log));
  });

  /**
   * The Vercel AI SDK's streamText through resumableFetch, the gateway sent
   * SIGTERM after 5 deltas and a new one started on the same port and store.
   * The AI SDK has no pass-through body field: the inner fetch adds `knobs`
   * as the mock's. Returns the text read, the body sent, the resume log and
   * the SDK's errors; the gateway is left running.
   */
  async function vercelAcrossRestart({ model, prompt, apiKey, knobs }) {
    const port = await freePort();
    const dataDir = h.dataDir();
    let gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });
    let sent;
    const inner = async (url, init) => {
      if (init?.method === "POST" && typeof init.body === "string") {
        sent = { ...JSON.parse(init.body), mock: knobs };
        init = { ...init, body: JSON.stringify(sent) };
      }
      return fetch(url, init);
    };
    const log = [];
    const provider = createOpenAI({
      baseURL: `${gw.url}/v1`,
      apiKey,
      fetch: resumableFetch({
        fetch: inner,
        backoff: { initialDelayMs: 100, maxDelayMs: 1000 },
        onReconnecting: (i) => log.push(`reconnecting ${i.attempt}`),
        onResumed: (i) => log.push(`resumed after ${i.lastEventId}`),
      }),
    });
    const errors = [];
    const result = aiStreamText({
      model: model(provider),
      prompt,
      maxOutputTokens: 80,
      maxRetries: 0,
      onError: ({ error }) => errors.push(error),
    });
    let text = "";
    let deltas = 0;
    let restart;
    for await (const delta of result.textStream) {
      text += delta;
      if (++deltas === 5) {
        restart = (async () => {
          gw.proc.kill("SIGTERM");
          await waitExit(gw, 10_000);
          gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });
        })();
      }
    }
    await restart;
    return { text, sent, log, errors, gw };
  }

  test("Vercel AI SDK (ai + @ai-sdk/openai) over resumableFetch: SIGTERM mid-answer, new gateway; exact text", T, async () => {
    const { text, sent, log, errors } = await vercelAcrossRestart({
      model: (provider) => provider.chat("mock"),
      prompt: "the vercel ai sdk should not notice a restart either",
      apiKey: "sk-test-not-used",
      knobs: { token_interval_ms: 40 },
    });
    assert.deepEqual(errors, []);
    const expected = await expectedAnswer(mock.url, { model: "mock", messages: sent.messages, max_tokens: sent.max_tokens });
    assert.equal(sent.max_tokens, 80);
    assert.equal(text, expected);
    assert.ok(log.some((l) => l.startsWith("resumed")), JSON.stringify(log));
  });

  test("the gateway stays down past the budget: ResumeFailedError with stream id, token and cursor", T, async () => {
    const port = await freePort();
    const gw = await h.startGateway({ port, dataDir: h.dataDir(), mockUrl: mock.url });
    const body = request("a question whose answer never finishes", 80, 40);
    const client = new OpenAI({
      baseURL: `${gw.url}/v1`,
      apiKey: "sk-test-not-used",
      maxRetries: 0,
      fetch: resumableFetch({ budgetMs: 2000, backoff: { initialDelayMs: 100, maxDelayMs: 500 } }),
    });
    const { data: stream, response } = await client.chat.completions.create({ ...body, stream: true }).withResponse();
    let chunks = 0;
    let killedAt = 0;
    let err;
    try {
      for await (const _ of stream) {
        if (++chunks === 5) {
          gw.proc.kill("SIGTERM");
          killedAt = Date.now();
        }
      }
    } catch (e) {
      err = e;
    }
    const elapsed = Date.now() - killedAt;
    assert.ok(err instanceof ResumeFailedError, `expected ResumeFailedError, got ${err}`);
    assert.equal(err.streamId, response.headers.get("x-tidegate-stream-id"));
    assert.equal(err.resumeToken, response.headers.get("x-tidegate-resume-token"));
    assert.equal(err.lastEventId, chunks, "the cursor is the last event delivered");
    assert.ok(err.attempts >= 2, `attempts: ${err.attempts}`);
    // grace 1s + exit + 2s budget, with slack for a slow machine
    assert.ok(elapsed < 12_000, `gave up after ${elapsed} ms`);
    await waitExit(gw, 10_000);
  });

  test("non-tidegate responses pass through untouched", T, async () => {
    const body = request("straight to the provider", 12, 1);
    const expected = await expectedAnswer(mock.url, body);
    // the mock is not a tidegate: same Response object, no wrapping
    let inner;
    const rf = resumableFetch({ fetch: async (...a) => (inner = await fetch(...a)) });
    const res = await rf(`${mock.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${MOCK_KEY}` },
      body: JSON.stringify({ ...body, stream: true }),
    });
    assert.equal(res, inner);
    assert.equal(await collectText(res), expected);
    // and the openai SDK streams from it as usual
    const client = new OpenAI({ baseURL: `${mock.url}/v1`, apiKey: MOCK_KEY, maxRetries: 0, fetch: resumableFetch() });
    let text = "";
    for await (const c of await client.chat.completions.create({ ...body, stream: true })) text += c.choices[0]?.delta?.content ?? "";
    assert.equal(text, expected);
    // a non-streaming gateway answer is returned as is, too
    const port = await freePort();
    const gw = await h.startGateway({ port, dataDir: h.dataDir(), mockUrl: mock.url });
    const json = await rf(`${gw.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ...body, stream: false }),
    });
    assert.equal(json, inner);
    assert.equal((await json.json()).choices[0].message.content, expected);
    gw.proc.kill("SIGKILL");
  });

  test("an abort event with resume:false (DELETE /v1/streams/{id}) passes through: the openai SDK raises", T, async () => {
    const port = await freePort();
    const gw = await h.startGateway({ port, dataDir: h.dataDir(), mockUrl: mock.url });
    const client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: "k", maxRetries: 0, fetch: resumableFetch({ budgetMs: 3000 }) });
    const { data: stream, response } = await client.chat.completions
      .create({ ...request("cancel me half way", 80, 40), stream: true })
      .withResponse();
    const id = response.headers.get("x-tidegate-stream-id");
    const token = response.headers.get("x-tidegate-resume-token");
    let chunks = 0;
    let err;
    let del;
    try {
      for await (const _ of stream) {
        if (++chunks === 3) {
          del = await fetch(`${gw.url}/v1/streams/${id}`, { method: "DELETE", headers: { "x-tidegate-resume-token": token } });
        }
      }
    } catch (e) {
      err = e;
    }
    assert.ok(del?.ok, `DELETE /v1/streams/{id} answered ${del?.status}`);
    assert.ok(err instanceof APIError, `expected the SDK's APIError, got ${err}`);
    assert.equal(err.code ?? err.type, "cancelled");
    gw.proc.kill("SIGKILL");
  });

  test("resumeStream + streamText: read part of a stream, the gateway dies, resume from the cursor with the token", T, async () => {
    const port = await freePort();
    const dataDir = h.dataDir();
    let gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });
    const body = request("resume me by hand from a saved cursor", 60, 40);
    const expected = await expectedAnswer(mock.url, body);
    // a plain fetch, no resume: read ten events, remember the cursor
    const ac = new AbortController();
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ...body, stream: true }),
      signal: ac.signal,
    });
    assert.equal(res.status, 200);
    const id = res.headers.get("x-tidegate-stream-id");
    const token = res.headers.get("x-tidegate-resume-token");
    assert.ok(id && token, "stream id and resume token headers");
    let prefix = "";
    let lastEventId = 0;
    for await (const ev of streamEvents(res)) {
      prefix += chunkText(ev.data);
      lastEventId = Number(ev.id);
      if (lastEventId === 10) break;
    }
    ac.abort();
    gw.proc.kill("SIGKILL");
    await waitExit(gw, 10_000);
    gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });

    const resumed = resumeStream(`${gw.url}/v1/streams/${id}`, { token, lastEventId });
    let rest = "";
    for await (const t of streamText(resumed)) rest += t;
    assert.equal(prefix + rest, expected);

    // after completion, a resume from 0 replays the whole answer
    assert.equal(await collectText(resumeStream(`${gw.url}/v1/streams/${id}?token=${encodeURIComponent(token)}&after=0`)), expected);
    // a wrong token is refused: ResumeFailedError (404), at once
    await assert.rejects(
      resumeStream(`${gw.url}/v1/streams/${id}`, { token: "not-the-token", lastEventId: 3 }),
      (e) => e instanceof ResumeFailedError && e.status === 404 && e.streamId === id,
    );
    gw.proc.kill("SIGKILL");
  });

  describe("the OpenAI Responses API", () => {
    const responsesBody = (topic) => ({
      model: "mock",
      input: `tell me about tides and gates: ${topic}`,
      max_output_tokens: 200,
    });
    const deltasOf = (events) => events.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join("");

    for (const signal of ["SIGTERM", "SIGKILL"]) {
      test(`openai SDK alone: ${signal} mid-answer, new gateway; responses.retrieve(stream, starting_after) and responses.stream({response_id}) end exactly`, T, async () => {
        const port = await freePort();
        const dataDir = h.dataDir();
        let gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });
        const body = responsesBody(`node ${signal}`);
        const want = await expectedResponse(mock.url, { ...body, mock: { words: 60 } });
        const client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: "sk-test", maxRetries: 0 });
        const before = [];
        let deltas = 0;
        let restart;
        let exit;
        let broke;
        try {
          const stream = await client.responses.create({ ...body, stream: true, mock: { words: 60, token_interval_ms: 40 } });
          for await (const ev of stream) {
            before.push(ev);
            if (ev.type === "response.output_text.delta" && ++deltas === 8) {
              restart = (async () => {
                gw.proc.kill(signal);
                exit = await waitExit(gw, 10_000);
                gw = await h.startGateway({ port, dataDir, mockUrl: mock.url });
              })();
            }
          }
        } catch (e) {
          broke = e;
        }
        await restart;
        assert.ok(broke, "the stream broke");
        if (signal === "SIGTERM") {
          assert.deepEqual(exit, { code: 0, signal: null });
          assert.ok(broke instanceof APIError, String(broke));
          assert.equal(broke.error?.code, "server_restarting");
          assert.equal(broke.error?.resume, true);
        }
        assert.equal(before[0].type, "response.created");
        const id = before[0].response.id;
        const last = before.at(-1).sequence_number;
        const after = [];
        for await (const ev of await client.responses.retrieve(id, { stream: true, starting_after: last })) after.push(ev);
        const seqs = [...before, ...after].map((e) => e.sequence_number);
        assert.deepEqual(seqs, seqs.map((_, i) => i), "sequence numbers contiguous from 0, none repeated");
        assert.equal(after.at(-1).type, "response.completed");
        assert.equal(deltasOf([...before, ...after]), want);
        // The stream helper replays from the start, accumulates, filters.
        const helper = client.responses.stream({ response_id: id, starting_after: last });
        const rest = [];
        for await (const ev of helper) rest.push(ev);
        const final = await helper.finalResponse();
        assert.equal(final.output_text, want);
        assert.equal(rest[0].sequence_number, last + 1);
        const got = await client.responses.retrieve(id);
        assert.equal(got.status, "completed");
        assert.equal(got.output_text, want);
        // Another key: 404, as on OpenAI's API.
        const other = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: "sk-other", maxRetries: 0 });
        await assert.rejects(other.responses.retrieve(id), (e) => e instanceof APIError && e.status === 404);
        gw.proc.kill("SIGKILL");
      });
    }

    test("Vercel AI SDK with @ai-sdk/openai's Responses model over resumableFetch: SIGTERM mid-answer, new gateway; exact text", T, async () => {
      const { text, sent, log, errors, gw } = await vercelAcrossRestart({
        model: (provider) => provider.responses("mock"),
        prompt: "the responses api should not notice a restart either",
        apiKey: "sk-test",
        // The answer's length is the mock's own (`words`), not the budget's:
        // a continuation asks with a lower budget for the rest of one answer.
        knobs: { words: 50, token_interval_ms: 40 },
      });
      assert.deepEqual(errors, []);
      const { mock: _knobs, stream: _stream, ...asked } = sent;
      const expected = await expectedResponse(mock.url, { ...asked, mock: { words: 50 } });
      assert.equal(text, expected);
      assert.ok(log.some((l) => l.startsWith("resumed")), JSON.stringify(log));
      gw.proc.kill("SIGKILL");
    });
  });
});
