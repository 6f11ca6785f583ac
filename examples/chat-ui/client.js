// @tidegate/client, browser ESM bundle. GENERATED from clients/typescript/src by
// `npm run bundle:ui` in clients/typescript: do not edit by hand.
var __defProp = Object.defineProperty;
var __defNormalProp = (obj, key, value) => key in obj ? __defProp(obj, key, { enumerable: true, configurable: true, writable: true, value }) : obj[key] = value;
var __publicField = (obj, key, value) => __defNormalProp(obj, typeof key !== "symbol" ? key + "" : key, value);

// src/errors.ts
var TidegateError = class extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = "TidegateError";
  }
};
var ResumeFailedError = class extends TidegateError {
  constructor(message, info) {
    super(message, info.cause === void 0 ? void 0 : { cause: info.cause });
    /** The tidegate stream id (`x-tidegate-stream-id`). */
    __publicField(this, "streamId");
    /** The resume token (capability) of the stream. */
    __publicField(this, "resumeToken");
    /** The id of the last event that was delivered to the caller: resume after it. */
    __publicField(this, "lastEventId");
    /** How many resume requests were made before giving up. */
    __publicField(this, "attempts");
    /** HTTP status of the last resume answer, if there was one. */
    __publicField(this, "status");
    this.name = "ResumeFailedError";
    this.streamId = info.streamId;
    this.resumeToken = info.resumeToken;
    this.lastEventId = info.lastEventId;
    this.attempts = info.attempts;
    this.status = info.status;
  }
};
var StreamGapError = class extends TidegateError {
  constructor(streamId, expected, received) {
    super(
      `tidegate stream ${streamId}: expected event id ${expected}, received ${received} (events were lost)`
    );
    __publicField(this, "streamId");
    __publicField(this, "expectedEventId");
    __publicField(this, "receivedEventId");
    this.name = "StreamGapError";
    this.streamId = streamId;
    this.expectedEventId = expected;
    this.receivedEventId = received;
  }
};
var StreamAbortedError = class extends TidegateError {
  constructor(message, error) {
    super(message);
    /** `server_restarting`, `upstream_failed`, `cancelled`, `incomplete`, `store_failed`, … */
    __publicField(this, "type");
    __publicField(this, "code");
    __publicField(this, "resume");
    __publicField(this, "streamId");
    __publicField(this, "resumeToken");
    __publicField(this, "lastEventId");
    /** The raw error object of the event, if there was one. */
    __publicField(this, "error");
    this.name = "StreamAbortedError";
    this.error = error;
    this.type = error?.type ?? "incomplete";
    this.code = error?.code;
    this.resume = error?.resume === true;
    this.streamId = error?.stream_id;
    this.resumeToken = error?.resume_token;
    const last = error?.last_event_id;
    this.lastEventId = last !== void 0 && /^\d+$/.test(String(last)) ? Number(last) : void 0;
  }
};

// src/sse.ts
var SseParser = class {
  constructor() {
    __publicField(this, "buffer", "");
    __publicField(this, "pendingCR", false);
    __publicField(this, "dataLines", []);
    __publicField(this, "sawData", false);
    __publicField(this, "id");
    __publicField(this, "event");
    __publicField(this, "retry");
    __publicField(this, "first", true);
    /** The last `retry:` value seen anywhere in the stream (milliseconds). */
    __publicField(this, "reconnectionTime");
  }
  /** Feeds a piece of text; returns the events completed by it. */
  feed(text) {
    if (this.first && text.length > 0) {
      this.first = false;
      if (text.charCodeAt(0) === 65279) text = text.slice(1);
    }
    const out = [];
    let start = 0;
    let i = 0;
    if (this.pendingCR && text.length > 0) {
      this.pendingCR = false;
      if (text.charCodeAt(0) === 10) {
        start = 1;
        i = 1;
      }
    }
    for (; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = this.buffer + text.slice(start, i);
      this.buffer = "";
      if (c === 13) {
        if (i + 1 < text.length) {
          if (text.charCodeAt(i + 1) === 10) i++;
        } else {
          this.pendingCR = true;
        }
      }
      start = i + 1;
      this.line(line, out);
    }
    this.buffer += text.slice(start);
    return out;
  }
  /** Ends the stream: an unterminated last block is discarded. */
  end() {
    this.buffer = "";
    this.reset();
    return [];
  }
  reset() {
    this.dataLines = [];
    this.sawData = false;
    this.id = void 0;
    this.event = void 0;
    this.retry = void 0;
  }
  line(line, out) {
    if (line === "") {
      if (this.sawData) {
        const ev = { data: this.dataLines.join("\n") };
        if (this.id !== void 0) ev.id = this.id;
        if (this.event !== void 0) ev.event = this.event;
        if (this.retry !== void 0) ev.retry = this.retry;
        out.push(ev);
      }
      this.reset();
      return;
    }
    if (line.charCodeAt(0) === 58) return;
    const colon = line.indexOf(":");
    let field;
    let value;
    if (colon === -1) {
      field = line;
      value = "";
    } else {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1);
    }
    switch (field) {
      case "data":
        this.dataLines.push(value);
        this.sawData = true;
        break;
      case "id":
        if (!value.includes("\0")) this.id = value;
        break;
      case "event":
        this.event = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) {
          this.retry = Number(value);
          this.reconnectionTime = this.retry;
        }
        break;
      default:
        break;
    }
  }
};
function serializeEvent(ev) {
  let s = "";
  if (ev.event !== void 0) s += `event: ${ev.event}
`;
  if (ev.id !== void 0) s += `id: ${ev.id}
`;
  for (const line of ev.data.split("\n")) s += `data: ${line}
`;
  return s + "\n";
}
async function* parseSse(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  let finished = false;
  try {
    for (; ; ) {
      const { value, done } = await reader.read();
      if (done) {
        finished = true;
        yield* parser.feed(decoder.decode());
        parser.end();
        return;
      }
      yield* parser.feed(decoder.decode(value, { stream: true }));
    }
  } finally {
    if (!finished) {
      reader.cancel().catch(() => {
      });
    }
    try {
      reader.releaseLock();
    } catch {
    }
  }
}
function endsAnswer(event) {
  return event === "message_stop" || event === "response.completed" || event === "response.incomplete";
}

// src/resumable.ts
var STREAM_ID_HEADER = "x-tidegate-stream-id";
var RESUME_TOKEN_HEADER = "x-tidegate-resume-token";
var infos = /* @__PURE__ */ new WeakMap();
function getStreamInfo(response) {
  const ctx = infos.get(response);
  if (!ctx) return void 0;
  return {
    get streamId() {
      return ctx.streamId;
    },
    get resumeToken() {
      return ctx.resumeToken;
    },
    get lastEventId() {
      return ctx.lastEventId;
    },
    get resumeUrl() {
      return ctx.resumeUrl;
    }
  };
}
function resumableFetch(options = {}) {
  const wrapped = async (input, init) => {
    const fetchImpl = options.fetch ?? globalThis.fetch;
    const res = await fetchImpl(input, init);
    const streamId = res.headers.get(STREAM_ID_HEADER);
    if (!streamId || !res.ok || !res.body || !isEventStream(res)) return res;
    const request = typeof Request !== "undefined" && input instanceof Request ? input : void 0;
    const requestUrl = new URL(request ? request.url : String(input), baseUrl());
    const headers = new Headers(request?.headers);
    new Headers(init?.headers).forEach((value, key) => headers.set(key, value));
    const resumeUrl = String(options.resumeUrl?.(streamId, requestUrl) ?? defaultResumeUrl(streamId, requestUrl));
    const ctx = {
      fetchImpl,
      opts: options,
      streamId,
      resumeToken: res.headers.get(RESUME_TOKEN_HEADER) ?? void 0,
      lastEventId: 0,
      resumeUrl,
      headers: resumeHeaders(headers),
      requestInit: pickInit(init, request),
      userSignal: init?.signal ?? request?.signal ?? void 0
    };
    return wrapResponse(res, splice(res.body, ctx), ctx);
  };
  return wrapped;
}
async function resumeStream(url, options = {}) {
  const u = new URL(String(url), baseUrl());
  const match = u.pathname.match(/\/streams\/([^/]+)\/?$/);
  if (!match) throw new TypeError(`resumeStream: ${u.href} is not a /v1/streams/{id} URL`);
  const streamId = decodeURIComponent(match[1]);
  const token = options.token ?? u.searchParams.get("token") ?? void 0;
  const after = options.lastEventId ?? u.searchParams.get("after") ?? 0;
  const lastEventId = Number(after);
  if (!Number.isInteger(lastEventId) || lastEventId < 0) {
    throw new TypeError(`resumeStream: lastEventId must be a non-negative integer, got ${String(after)}`);
  }
  u.searchParams.delete("token");
  u.searchParams.delete("after");
  const ctx = {
    fetchImpl: options.fetch ?? globalThis.fetch,
    opts: options,
    streamId,
    resumeToken: token,
    lastEventId,
    resumeUrl: u.href,
    headers: resumeHeaders(new Headers(options.headers)),
    requestInit: {},
    userSignal: options.signal
  };
  const res = await reconnect(ctx, void 0, options.signal, true);
  return wrapResponse(res, splice(res.body, ctx), ctx);
}
function baseUrl() {
  const loc = globalThis.location;
  return loc?.href;
}
function isEventStream(res) {
  const ct = res.headers.get("content-type");
  return ct === null || ct.toLowerCase().includes("text/event-stream");
}
function defaultResumeUrl(streamId, requestUrl) {
  const u = new URL(requestUrl.href);
  const m = u.pathname.match(/^(.*?)\/v1\/(?:chat\/completions|messages|completions|responses)\/?$/);
  const prefix = m ? m[1] : "";
  u.pathname = `${prefix}/v1/streams/${encodeURIComponent(streamId)}`;
  u.search = "";
  u.hash = "";
  return u.href;
}
function resumeHeaders(src) {
  const h = new Headers(src);
  for (const name of [
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "host",
    "connection",
    "last-event-id",
    RESUME_TOKEN_HEADER
  ]) {
    h.delete(name);
  }
  h.set("accept", "text/event-stream");
  return h;
}
function pickInit(init, request) {
  const out = { cache: "no-store" };
  const credentials = init?.credentials ?? request?.credentials;
  if (credentials) out.credentials = credentials;
  const mode = init?.mode ?? request?.mode;
  if (mode && mode !== "navigate") out.mode = mode;
  const referrerPolicy = init?.referrerPolicy ?? request?.referrerPolicy;
  if (referrerPolicy) out.referrerPolicy = referrerPolicy;
  return out;
}
function wrapResponse(res, body, ctx) {
  const headers = new Headers(res.headers);
  headers.delete("content-length");
  headers.delete("content-encoding");
  const out = new Response(body, { status: res.status, statusText: res.statusText, headers });
  try {
    Object.defineProperty(out, "url", { value: res.url, enumerable: true });
  } catch {
  }
  infos.set(out, ctx);
  return out;
}
function abortReason(signal) {
  const reason = signal?.reason;
  if (reason !== void 0) return reason;
  return new DOMException("This operation was aborted", "AbortError");
}
function sleep(ms, signal) {
  if (ms <= 0) return Promise.resolve();
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(abortReason(signal));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortReason(signal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
var RETRYABLE_STATUS = /* @__PURE__ */ new Set([408, 425, 429, 500, 502, 503, 504]);
function parseRetryAfter(value) {
  if (!value) return void 0;
  if (/^\d+$/.test(value.trim())) return Number(value.trim()) * 1e3;
  const date = Date.parse(value);
  if (Number.isNaN(date)) return void 0;
  return Math.max(0, date - Date.now());
}
function backoffDelay(retry, b) {
  const initial = b?.initialDelayMs ?? 200;
  const max = b?.maxDelayMs ?? 5e3;
  const mult = b?.multiplier ?? 2;
  const jitter = Math.min(1, Math.max(0, b?.jitter ?? 0.5));
  const base = Math.min(max, initial * Math.pow(mult, retry - 1));
  return Math.round(base * (1 - jitter * Math.random()));
}
function describe(err) {
  if (err instanceof Error) {
    const cause = err.cause;
    const code = cause && typeof cause === "object" && "code" in cause ? ` (${String(cause.code)})` : "";
    return `${err.message}${code}`;
  }
  return String(err);
}
async function errorMessageOf(res) {
  try {
    const text = await res.text();
    try {
      const obj = JSON.parse(text);
      if (obj?.error?.message) return obj.error.message;
    } catch {
    }
    return text.slice(0, 200);
  } catch {
    return "";
  }
}
async function reconnect(ctx, reason, signal, initial = false) {
  const opts = ctx.opts;
  const budgetMs = opts.budgetMs ?? 3e4;
  const maxAttempts = opts.maxAttempts ?? 100;
  const maxDelay = opts.backoff?.maxDelayMs ?? 5e3;
  const started = Date.now();
  const deadline = started + budgetMs;
  let attempt = 0;
  let lastError = reason;
  let lastStatus;
  let retryAfterMs;
  const fail = (why, cause) => {
    throw new ResumeFailedError(
      `could not resume tidegate stream ${ctx.streamId} after event ${ctx.lastEventId}: ${why}`,
      {
        streamId: ctx.streamId,
        resumeToken: ctx.resumeToken,
        lastEventId: ctx.lastEventId,
        attempts: attempt,
        status: lastStatus,
        cause
      }
    );
  };
  for (; ; ) {
    if (signal?.aborted) throw abortReason(signal);
    if (attempt >= maxAttempts) {
      fail(`gave up after ${attempt} attempts (last error: ${describe(lastError)})`, lastError);
    }
    let delay = 0;
    if (attempt > 0) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) {
        fail(
          `gave up after ${attempt} attempts in ${Date.now() - started} ms (budget ${budgetMs} ms; last error: ${describe(lastError)})`,
          lastError
        );
      }
      delay = backoffDelay(attempt, opts.backoff);
      if (retryAfterMs !== void 0) delay = Math.max(delay, Math.min(retryAfterMs, maxDelay));
      delay = Math.min(delay, remaining);
    }
    attempt++;
    if (!initial || attempt > 1) {
      opts.onReconnecting?.({
        streamId: ctx.streamId,
        lastEventId: ctx.lastEventId,
        attempt: initial ? attempt - 1 : attempt,
        delayMs: delay,
        reason: lastError,
        status: lastStatus
      });
    }
    await sleep(delay, signal);
    const headers = new Headers(ctx.headers);
    headers.set("last-event-id", String(ctx.lastEventId));
    if (ctx.resumeToken) headers.set(RESUME_TOKEN_HEADER, ctx.resumeToken);
    let res;
    try {
      const fetchImpl = ctx.fetchImpl;
      res = await fetchImpl(ctx.resumeUrl, {
        ...ctx.requestInit,
        method: "GET",
        headers,
        ...signal ? { signal } : {}
      });
    } catch (err) {
      if (signal?.aborted) throw abortReason(signal);
      lastError = err;
      lastStatus = void 0;
      retryAfterMs = void 0;
      continue;
    }
    if (res.ok && res.body) {
      const token = res.headers.get(RESUME_TOKEN_HEADER);
      if (token) ctx.resumeToken = token;
      if (!initial || attempt > 1) {
        opts.onResumed?.({
          streamId: ctx.streamId,
          resumeToken: ctx.resumeToken,
          lastEventId: ctx.lastEventId,
          attempts: initial ? attempt - 1 : attempt
        });
      }
      return res;
    }
    lastStatus = res.status;
    const message = await errorMessageOf(res);
    if (RETRYABLE_STATUS.has(res.status)) {
      lastError = new Error(`HTTP ${res.status}${message ? `: ${message}` : ""}`);
      retryAfterMs = parseRetryAfter(res.headers.get("retry-after"));
      continue;
    }
    fail(`the gateway answered HTTP ${res.status}${message ? `: ${message}` : ""}`, lastError);
  }
}
var IdleTimeoutError = class extends Error {
  constructor(ms) {
    super(`no data for ${ms} ms`);
    this.name = "IdleTimeoutError";
  }
};
function parseAbort(data) {
  if (!data.includes('"error"')) return void 0;
  try {
    const obj = JSON.parse(data);
    const err = obj?.error;
    if (err && typeof err === "object" && typeof err.type === "string") {
      return err;
    }
  } catch {
  }
  return void 0;
}
function splice(firstBody, ctx) {
  const internal = new AbortController();
  const onUserAbort = () => internal.abort(abortReason(ctx.userSignal));
  if (ctx.userSignal) {
    if (ctx.userSignal.aborted) onUserAbort();
    else ctx.userSignal.addEventListener("abort", onUserAbort, { once: true });
  }
  const cleanup = () => ctx.userSignal?.removeEventListener("abort", onUserAbort);
  const encoder = new TextEncoder();
  const idleMs = ctx.opts.idleTimeoutMs ?? 0;
  const maxAttempts = ctx.opts.maxAttempts ?? 100;
  let current;
  const read = (reader) => {
    if (idleMs <= 0) return reader.read();
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => {
        reader.cancel().catch(() => {
        });
        reject(new IdleTimeoutError(idleMs));
      }, idleMs);
    });
    return Promise.race([reader.read(), timeout]).finally(() => clearTimeout(timer));
  };
  async function* run() {
    let body = firstBody;
    let fruitless = 0;
    for (; ; ) {
      const reader = body.getReader();
      current = reader;
      const decoder = new TextDecoder();
      const parser = new SseParser();
      let finished = false;
      let sawMessageStop = false;
      let progressed = false;
      let why;
      try {
        reading: for (; ; ) {
          const { value, done } = await read(reader);
          if (internal.signal.aborted) throw abortReason(internal.signal);
          const events = done ? parser.feed(decoder.decode()) : parser.feed(decoder.decode(value, { stream: true }));
          for (const ev of events) {
            if (ev.id !== void 0 && /^\d+$/.test(ev.id)) {
              const seq = Number(ev.id);
              if (seq <= ctx.lastEventId) continue;
              if (seq !== ctx.lastEventId + 1) throw new StreamGapError(ctx.streamId, ctx.lastEventId + 1, seq);
              ctx.lastEventId = seq;
              progressed = true;
              if (endsAnswer(ev.event)) sawMessageStop = true;
              yield encoder.encode(serializeEvent({ id: ev.id, event: ev.event, data: ev.data }));
              continue;
            }
            if (ev.data === "[DONE]") {
              yield encoder.encode(serializeEvent({ data: ev.data, event: ev.event }));
              finished = true;
              break reading;
            }
            const abort = parseAbort(ev.data);
            if (abort) {
              if (abort.resume === true) {
                if (typeof abort.resume_token === "string" && abort.resume_token) {
                  ctx.resumeToken = abort.resume_token;
                }
                why = new StreamAbortedError(abort.message ?? abort.type, abort);
                break reading;
              }
              yield encoder.encode(serializeEvent({ data: ev.data, event: ev.event }));
              finished = true;
              break reading;
            }
            if (endsAnswer(ev.event)) sawMessageStop = true;
            yield encoder.encode(serializeEvent({ data: ev.data, event: ev.event }));
          }
          if (done) {
            if (sawMessageStop) finished = true;
            else why = new Error("the connection ended before the stream was complete");
            break;
          }
        }
      } catch (err) {
        if (internal.signal.aborted) throw abortReason(internal.signal);
        if (err instanceof StreamGapError) throw err;
        why = err;
      } finally {
        current = void 0;
        reader.cancel().catch(() => {
        });
        try {
          reader.releaseLock();
        } catch {
        }
      }
      if (finished) return;
      fruitless = progressed ? 0 : fruitless + 1;
      if (fruitless > maxAttempts) {
        throw new ResumeFailedError(
          `could not resume tidegate stream ${ctx.streamId}: ${fruitless} resumes in a row delivered nothing`,
          {
            streamId: ctx.streamId,
            resumeToken: ctx.resumeToken,
            lastEventId: ctx.lastEventId,
            attempts: fruitless,
            cause: why
          }
        );
      }
      const res = await reconnect(ctx, why, internal.signal);
      body = res.body;
    }
  }
  const gen = run();
  return new ReadableStream({
    async pull(controller) {
      try {
        const next = await gen.next();
        if (next.done) {
          cleanup();
          controller.close();
        } else {
          controller.enqueue(next.value);
        }
      } catch (err) {
        cleanup();
        try {
          controller.error(err);
        } catch {
        }
      }
    },
    cancel(reason) {
      cleanup();
      internal.abort(reason ?? new DOMException("The stream was cancelled", "AbortError"));
      current?.cancel(reason).catch(() => {
      });
    }
  });
}

// src/text.ts
async function bodyOf(source) {
  const resolved = await source;
  if (typeof Response !== "undefined" && resolved instanceof Response) {
    if (!resolved.ok) {
      let detail = "";
      try {
        detail = (await resolved.text()).slice(0, 300);
      } catch {
      }
      throw new TidegateError(`HTTP ${resolved.status}${detail ? `: ${detail}` : ""}`);
    }
    if (!resolved.body) throw new TidegateError("the response has no body");
    return resolved.body;
  }
  return resolved;
}
async function* streamEvents(source) {
  yield* parseSse(await bodyOf(source));
}
function chunkText(data) {
  let obj = data;
  if (typeof data === "string") {
    try {
      obj = JSON.parse(data);
    } catch {
      return "";
    }
  }
  if (!obj || typeof obj !== "object") return "";
  const o = obj;
  const choice = Array.isArray(o.choices) ? o.choices[0] : void 0;
  if (choice) {
    if (typeof choice.delta?.content === "string") return choice.delta.content;
    if (typeof choice.text === "string") return choice.text;
    return "";
  }
  if (o.type === "response.output_text.delta") return typeof o.delta === "string" ? o.delta : "";
  const d = o.delta;
  if (o.type === "content_block_delta" && d?.type === "text_delta" && typeof d.text === "string") return d.text;
  return "";
}
function isStreamEnd(ev) {
  return ev.data === "[DONE]" || endsAnswer(ev.event);
}
function eventError(data) {
  if (!data.includes('"error"')) return void 0;
  try {
    const obj = JSON.parse(data);
    const err = obj?.type === "response.failed" ? obj.response?.error : obj?.error;
    if (err && typeof err === "object") {
      const e = err;
      return { ...e, type: typeof e.type === "string" ? e.type : "error" };
    }
    if (obj?.type === "error" && typeof obj.message === "string") {
      return { type: "error", message: obj.message, ...typeof obj.code === "string" ? { code: obj.code } : {} };
    }
  } catch {
  }
  return void 0;
}
async function* streamText(source) {
  for await (const ev of streamEvents(source)) {
    if (ev.data === "[DONE]") return;
    const err = eventError(ev.data);
    if (err) throw new StreamAbortedError(`the stream was aborted: ${err.type}${err.message ? `: ${err.message}` : ""}`, err);
    const text = chunkText(ev.data);
    if (text) yield text;
    if (endsAnswer(ev.event)) return;
  }
  throw new StreamAbortedError("the stream ended before the answer was complete");
}
async function collectText(source) {
  let out = "";
  for await (const t of streamText(source)) out += t;
  return out;
}
export {
  RESUME_TOKEN_HEADER,
  ResumeFailedError,
  STREAM_ID_HEADER,
  SseParser,
  StreamAbortedError,
  StreamGapError,
  TidegateError,
  chunkText,
  collectText,
  endsAnswer,
  eventError,
  getStreamInfo,
  isStreamEnd,
  parseSse,
  resumableFetch,
  resumeStream,
  serializeEvent,
  streamEvents,
  streamText
};
