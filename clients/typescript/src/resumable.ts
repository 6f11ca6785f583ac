import { ResumeFailedError, StreamGapError, StreamAbortedError, type TidegateAbortInfo } from "./errors.js";
import { SseParser, serializeEvent, endsAnswer, type SseEvent } from "./sse.js";

/** Header names of the tidegate wire contract. */
export const STREAM_ID_HEADER = "x-tidegate-stream-id";
export const RESUME_TOKEN_HEADER = "x-tidegate-resume-token";

type FetchLike = (input: RequestInfo | URL, init?: RequestInit) => Promise<Response>;

/** Passed to `onReconnecting` before every resume attempt. */
export interface ReconnectingInfo {
  streamId: string;
  /** The cursor the resume will send (`Last-Event-ID`). */
  lastEventId: number;
  /** 1 for the first attempt of this outage, then 2, 3, … */
  attempt: number;
  /** How long the client waits before this attempt (0 for the first one). */
  delayMs: number;
  /** Why the stream is being resumed: the cut, the abort event, the last failed attempt. */
  reason: unknown;
  /** HTTP status of the previous failed attempt (503 while the gateway drains), if any. */
  status?: number | undefined;
}

/** Passed to `onResumed` when a resume request was answered with the continuation. */
export interface ResumedInfo {
  streamId: string;
  resumeToken: string | undefined;
  /** The cursor the continuation starts after. */
  lastEventId: number;
  /** How many attempts this outage took. */
  attempts: number;
}

/** Exponential backoff with jitter between resume attempts. */
export interface BackoffOptions {
  /** Delay before the second attempt (the first is immediate). Default 200 ms. */
  initialDelayMs?: number;
  /** Upper bound of one delay, also caps a server's `Retry-After`. Default 5000 ms. */
  maxDelayMs?: number;
  /** Growth factor per attempt. Default 2. */
  multiplier?: number;
  /** Fraction of each delay that is randomised away (0 = none, 1 = full jitter). Default 0.5. */
  jitter?: number;
}

export interface ResumableFetchOptions {
  /** The fetch to wrap. Default: `globalThis.fetch` (looked up at call time). */
  fetch?: FetchLike;
  /**
   * How long one outage may last before the client gives up with
   * {@link ResumeFailedError}, in milliseconds, measured from the moment the
   * stream was interrupted. Default 30 000.
   */
  budgetMs?: number;
  /** At most this many resume requests per outage. Default 100. */
  maxAttempts?: number;
  /** Backoff between attempts while the gateway is down (refused) or draining (503). */
  backoff?: BackoffOptions;
  /**
   * Treat a stream that delivered no byte (not even a `: ping` heartbeat) for
   * this long as cut, and resume it. 0 (the default) disables the check.
   */
  idleTimeoutMs?: number;
  /** Called before every resume attempt: show "reconnecting…". */
  onReconnecting?: (info: ReconnectingInfo) => void;
  /** Called when a resume was accepted and the continuation starts flowing. */
  onResumed?: (info: ResumedInfo) => void;
  /**
   * Maps a stream id to its resume URL. Default: the request URL with its
   * `/v1/chat/completions` (or `/v1/messages`, `/v1/responses`) suffix replaced by
   * `/v1/streams/{id}`, so a path prefix in front of the gateway is kept.
   */
  resumeUrl?: (streamId: string, requestUrl: URL) => string | URL;
}

/** A live view of a tidegate stream handled by this package. */
export interface StreamInfo {
  readonly streamId: string;
  readonly resumeToken: string | undefined;
  /** The id of the last event delivered to the reader of the body. */
  readonly lastEventId: number;
  /** The URL that resumes this stream (`GET /v1/streams/{id}`). */
  readonly resumeUrl: string;
}

interface Ctx {
  fetchImpl: FetchLike;
  opts: ResumableFetchOptions;
  streamId: string;
  resumeToken: string | undefined;
  lastEventId: number;
  resumeUrl: string;
  headers: Headers;
  requestInit: RequestInit;
  userSignal: AbortSignal | undefined;
}

const infos = new WeakMap<Response, Ctx>();

/**
 * Returns the stream id, resume token and last delivered event id of a
 * Response returned by {@link resumableFetch} or {@link resumeStream}
 * (undefined for responses that are not tidegate streams). The values are
 * live: they follow the stream as it is read and resumed.
 */
export function getStreamInfo(response: Response): StreamInfo | undefined {
  const ctx = infos.get(response);
  if (!ctx) return undefined;
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
    },
  };
}

/**
 * Returns a `fetch`-compatible function that makes tidegate streams survive
 * gateway restarts and cut connections.
 *
 * For a response that carries `x-tidegate-stream-id`, the returned body is one
 * uninterrupted SSE stream: an in-band `server_restarting` / `upstream_failed`
 * event with `resume: true` and a cut connection are swallowed, the stream is
 * resumed at `GET /v1/streams/{id}` with `Last-Event-ID` and the resume token
 * (retrying with backoff while the gateway is down or draining), and the
 * continuation is spliced in. Event ids are never duplicated or reordered.
 * Every other response is returned untouched.
 *
 * ```ts
 * const client = new OpenAI({ baseURL: "http://127.0.0.1:8080/v1", fetch: resumableFetch() });
 * ```
 */
export function resumableFetch(options: ResumableFetchOptions = {}): typeof fetch {
  const wrapped = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const fetchImpl = options.fetch ?? globalThis.fetch;
    const res = await fetchImpl(input, init);
    const streamId = res.headers.get(STREAM_ID_HEADER);
    if (!streamId || !res.ok || !res.body || !isEventStream(res)) return res;

    const request = typeof Request !== "undefined" && input instanceof Request ? input : undefined;
    const requestUrl = new URL(request ? request.url : String(input), baseUrl());
    const headers = new Headers(request?.headers);
    new Headers(init?.headers).forEach((value, key) => headers.set(key, value));
    const resumeUrl = String(options.resumeUrl?.(streamId, requestUrl) ?? defaultResumeUrl(streamId, requestUrl));
    const ctx: Ctx = {
      fetchImpl,
      opts: options,
      streamId,
      resumeToken: res.headers.get(RESUME_TOKEN_HEADER) ?? undefined,
      lastEventId: 0,
      resumeUrl,
      headers: resumeHeaders(headers),
      requestInit: pickInit(init, request),
      userSignal: init?.signal ?? request?.signal ?? undefined,
    };
    return wrapResponse(res, splice(res.body, ctx), ctx);
  };
  return wrapped as typeof fetch;
}

/** Options of {@link resumeStream}. */
export interface ResumeStreamOptions extends ResumableFetchOptions {
  /** The stream's resume token (`x-tidegate-resume-token`). Default: the URL's `?token=`. */
  token?: string | undefined;
  /** Resume after this event id. Default: the URL's `?after=`, else 0 (from the start). */
  lastEventId?: number | string | undefined;
  /** Extra request headers, e.g. your own `Authorization` for the gateway. */
  headers?: HeadersInit;
  signal?: AbortSignal | undefined;
}

/**
 * Resumes a tidegate stream: `GET {url}` (`/v1/streams/{id}`, absolute or,
 * in a browser, relative to the page) with `Last-Event-ID` and the resume
 * token. Resolves to a Response whose body replays the events after
 * `lastEventId` and continues the answer to its end, resuming again by itself
 * if the gateway restarts meanwhile. Rejects with {@link ResumeFailedError}
 * when the gateway answers 404 (unknown stream, wrong token) or stays
 * unreachable past the budget.
 */
export async function resumeStream(url: string | URL, options: ResumeStreamOptions = {}): Promise<Response> {
  const u = new URL(String(url), baseUrl());
  const match = u.pathname.match(/\/streams\/([^/]+)\/?$/);
  if (!match) throw new TypeError(`resumeStream: ${u.href} is not a /v1/streams/{id} URL`);
  const streamId = decodeURIComponent(match[1]!);
  const token = options.token ?? u.searchParams.get("token") ?? undefined;
  const after = options.lastEventId ?? u.searchParams.get("after") ?? 0;
  const lastEventId = Number(after);
  if (!Number.isInteger(lastEventId) || lastEventId < 0) {
    throw new TypeError(`resumeStream: lastEventId must be a non-negative integer, got ${String(after)}`);
  }
  u.searchParams.delete("token");
  u.searchParams.delete("after");
  const ctx: Ctx = {
    fetchImpl: options.fetch ?? globalThis.fetch,
    opts: options,
    streamId,
    resumeToken: token,
    lastEventId,
    resumeUrl: u.href,
    headers: resumeHeaders(new Headers(options.headers)),
    requestInit: {},
    userSignal: options.signal,
  };
  const res = await reconnect(ctx, undefined, options.signal, true);
  return wrapResponse(res, splice(res.body!, ctx), ctx);
}

// ---------------------------------------------------------------------------

function baseUrl(): string | undefined {
  const loc = (globalThis as { location?: { href?: string } }).location;
  return loc?.href;
}

function isEventStream(res: Response): boolean {
  const ct = res.headers.get("content-type");
  return ct === null || ct.toLowerCase().includes("text/event-stream");
}

function defaultResumeUrl(streamId: string, requestUrl: URL): string {
  const u = new URL(requestUrl.href);
  const m = u.pathname.match(/^(.*?)\/v1\/(?:chat\/completions|messages|completions|responses)\/?$/);
  const prefix = m ? m[1] : "";
  u.pathname = `${prefix}/v1/streams/${encodeURIComponent(streamId)}`;
  u.search = "";
  u.hash = "";
  return u.href;
}

/** The original request's headers, minus those that describe its body or the cursor. */
function resumeHeaders(src: Headers): Headers {
  const h = new Headers(src);
  for (const name of [
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "host",
    "connection",
    "last-event-id",
    RESUME_TOKEN_HEADER,
  ]) {
    h.delete(name);
  }
  h.set("accept", "text/event-stream");
  return h;
}

function pickInit(init: RequestInit | undefined, request: Request | undefined): RequestInit {
  const out: RequestInit = { cache: "no-store" };
  const credentials = init?.credentials ?? request?.credentials;
  if (credentials) out.credentials = credentials;
  const mode = init?.mode ?? request?.mode;
  if (mode && mode !== "navigate") out.mode = mode;
  const referrerPolicy = init?.referrerPolicy ?? request?.referrerPolicy;
  if (referrerPolicy) out.referrerPolicy = referrerPolicy;
  return out;
}

function wrapResponse(res: Response, body: ReadableStream<Uint8Array>, ctx: Ctx): Response {
  const headers = new Headers(res.headers);
  headers.delete("content-length");
  headers.delete("content-encoding");
  const out = new Response(body, { status: res.status, statusText: res.statusText, headers });
  try {
    Object.defineProperty(out, "url", { value: res.url, enumerable: true });
  } catch {
    /* some runtimes forbid it; url stays "" */
  }
  infos.set(out, ctx);
  return out;
}

function abortReason(signal: AbortSignal | undefined): unknown {
  const reason = signal?.reason;
  if (reason !== undefined) return reason;
  return new DOMException("This operation was aborted", "AbortError");
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
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

const RETRYABLE_STATUS = new Set([408, 425, 429, 500, 502, 503, 504]);

function parseRetryAfter(value: string | null): number | undefined {
  if (!value) return undefined;
  if (/^\d+$/.test(value.trim())) return Number(value.trim()) * 1000;
  const date = Date.parse(value);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - Date.now());
}

function backoffDelay(retry: number, b: BackoffOptions | undefined): number {
  const initial = b?.initialDelayMs ?? 200;
  const max = b?.maxDelayMs ?? 5000;
  const mult = b?.multiplier ?? 2;
  const jitter = Math.min(1, Math.max(0, b?.jitter ?? 0.5));
  const base = Math.min(max, initial * Math.pow(mult, retry - 1));
  return Math.round(base * (1 - jitter * Math.random()));
}

function describe(err: unknown): string {
  if (err instanceof Error) {
    const cause = (err as { cause?: unknown }).cause;
    const code = cause && typeof cause === "object" && "code" in cause ? ` (${String((cause as { code: unknown }).code)})` : "";
    return `${err.message}${code}`;
  }
  return String(err);
}

async function errorMessageOf(res: Response): Promise<string> {
  try {
    const text = await res.text();
    try {
      const obj = JSON.parse(text) as { error?: { message?: string } };
      if (obj?.error?.message) return obj.error.message;
    } catch {
      /* not JSON */
    }
    return text.slice(0, 200);
  } catch {
    return "";
  }
}

/**
 * Sends `GET /v1/streams/{id}` until the gateway answers with the stream, with
 * backoff while it is down or draining, within the budget. `initial` is the
 * first connection of resumeStream (not a *re*-connection).
 */
async function reconnect(
  ctx: Ctx,
  reason: unknown,
  signal: AbortSignal | undefined,
  initial = false,
): Promise<Response> {
  const opts = ctx.opts;
  const budgetMs = opts.budgetMs ?? 30_000;
  const maxAttempts = opts.maxAttempts ?? 100;
  const maxDelay = opts.backoff?.maxDelayMs ?? 5000;
  const started = Date.now();
  const deadline = started + budgetMs;
  let attempt = 0;
  let lastError: unknown = reason;
  let lastStatus: number | undefined;
  let retryAfterMs: number | undefined;

  const fail = (why: string, cause: unknown): never => {
    throw new ResumeFailedError(
      `could not resume tidegate stream ${ctx.streamId} after event ${ctx.lastEventId}: ${why}`,
      {
        streamId: ctx.streamId,
        resumeToken: ctx.resumeToken,
        lastEventId: ctx.lastEventId,
        attempts: attempt,
        status: lastStatus,
        cause,
      },
    );
  };

  for (;;) {
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
          lastError,
        );
      }
      delay = backoffDelay(attempt, opts.backoff);
      if (retryAfterMs !== undefined) delay = Math.max(delay, Math.min(retryAfterMs, maxDelay));
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
        status: lastStatus,
      });
    }
    await sleep(delay, signal);

    const headers = new Headers(ctx.headers);
    headers.set("last-event-id", String(ctx.lastEventId));
    if (ctx.resumeToken) headers.set(RESUME_TOKEN_HEADER, ctx.resumeToken);
    let res: Response;
    try {
      // Called as a plain function: a browser's fetch throws "Illegal invocation" when `this` is not the window.
      const fetchImpl = ctx.fetchImpl;
      res = await fetchImpl(ctx.resumeUrl, {
        ...ctx.requestInit,
        method: "GET",
        headers,
        ...(signal ? { signal } : {}),
      });
    } catch (err) {
      if (signal?.aborted) throw abortReason(signal);
      // Connection refused / reset: the gateway is down or restarting.
      lastError = err;
      lastStatus = undefined;
      retryAfterMs = undefined;
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
          attempts: initial ? attempt - 1 : attempt,
        });
      }
      return res;
    }
    lastStatus = res.status;
    const message = await errorMessageOf(res);
    if (RETRYABLE_STATUS.has(res.status)) {
      // 503 while the gateway drains: try again (on another replica, or the next generation).
      lastError = new Error(`HTTP ${res.status}${message ? `: ${message}` : ""}`);
      retryAfterMs = parseRetryAfter(res.headers.get("retry-after"));
      continue;
    }
    fail(`the gateway answered HTTP ${res.status}${message ? `: ${message}` : ""}`, lastError);
  }
}

class IdleTimeoutError extends Error {
  constructor(ms: number) {
    super(`no data for ${ms} ms`);
    this.name = "IdleTimeoutError";
  }
}

function parseAbort(data: string): TidegateAbortInfo | undefined {
  if (!data.includes('"error"')) return undefined;
  try {
    const obj = JSON.parse(data) as { error?: unknown };
    const err = obj?.error;
    if (err && typeof err === "object" && typeof (err as { type?: unknown }).type === "string") {
      return err as TidegateAbortInfo;
    }
  } catch {
    /* not JSON: not an abort event */
  }
  return undefined;
}

/**
 * The heart of the package: reads the first body, and whenever it is cut or
 * ends with a resumable abort event, resumes the stream and keeps reading,
 * emitting one clean SSE stream.
 */
function splice(firstBody: ReadableStream<Uint8Array>, ctx: Ctx): ReadableStream<Uint8Array> {
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
  let current: ReadableStreamDefaultReader<Uint8Array> | undefined;

  const read = (reader: ReadableStreamDefaultReader<Uint8Array>): Promise<ReadableStreamReadResult<Uint8Array>> => {
    if (idleMs <= 0) return reader.read();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        reader.cancel().catch(() => {});
        reject(new IdleTimeoutError(idleMs));
      }, idleMs);
    });
    return Promise.race([reader.read(), timeout]).finally(() => clearTimeout(timer));
  };

  async function* run(): AsyncGenerator<Uint8Array, void, undefined> {
    let body = firstBody;
    let fruitless = 0; // consecutive resumes that delivered no new event
    for (;;) {
      const reader = body.getReader();
      current = reader;
      const decoder = new TextDecoder();
      const parser = new SseParser();
      let finished = false; // [DONE], message_stop, response.completed, or a final (non-resumable) abort event
      let sawMessageStop = false;
      let progressed = false;
      let why: unknown;
      try {
        reading: for (;;) {
          const { value, done } = await read(reader);
          if (internal.signal.aborted) throw abortReason(internal.signal);
          const events: SseEvent[] = done
            ? parser.feed(decoder.decode())
            : parser.feed(decoder.decode(value, { stream: true }));
          for (const ev of events) {
            if (ev.id !== undefined && /^\d+$/.test(ev.id)) {
              const seq = Number(ev.id);
              if (seq <= ctx.lastEventId) continue; // replayed duplicate
              if (seq !== ctx.lastEventId + 1) throw new StreamGapError(ctx.streamId, ctx.lastEventId + 1, seq);
              ctx.lastEventId = seq;
              progressed = true;
              if (endsAnswer(ev.event)) sawMessageStop = true;
              yield encoder.encode(serializeEvent({ id: ev.id, event: ev.event, data: ev.data } as SseEvent));
              continue;
            }
            if (ev.data === "[DONE]") {
              yield encoder.encode(serializeEvent({ data: ev.data, event: ev.event } as SseEvent));
              finished = true;
              break reading;
            }
            const abort = parseAbort(ev.data);
            if (abort) {
              if (abort.resume === true) {
                // server_restarting / upstream_failed: swallow it and resume.
                if (typeof abort.resume_token === "string" && abort.resume_token) {
                  ctx.resumeToken = abort.resume_token;
                }
                why = new StreamAbortedError(abort.message ?? abort.type, abort);
                break reading;
              }
              // cancelled / incomplete / store_failed / provider error: hand it on so the SDK raises.
              yield encoder.encode(serializeEvent({ data: ev.data, event: ev.event } as SseEvent));
              finished = true;
              break reading;
            }
            if (endsAnswer(ev.event)) sawMessageStop = true;
            yield encoder.encode(serializeEvent({ data: ev.data, event: ev.event } as SseEvent));
          }
          if (done) {
            if (sawMessageStop) finished = true; // Anthropic and Responses streams end without [DONE]
            else why = new Error("the connection ended before the stream was complete");
            break;
          }
        }
      } catch (err) {
        if (internal.signal.aborted) throw abortReason(internal.signal);
        if (err instanceof StreamGapError) throw err;
        why = err; // fetch/body read error: the connection was cut
      } finally {
        current = undefined;
        reader.cancel().catch(() => {});
        try {
          reader.releaseLock();
        } catch {
          /* a pending read keeps the lock in old runtimes: harmless */
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
            cause: why,
          },
        );
      }
      const res = await reconnect(ctx, why, internal.signal);
      body = res.body!;
    }
  }

  const gen = run();
  return new ReadableStream<Uint8Array>({
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
          /* the reader already went away */
        }
      }
    },
    cancel(reason) {
      cleanup();
      internal.abort(reason ?? new DOMException("The stream was cancelled", "AbortError"));
      current?.cancel(reason).catch(() => {});
    },
  });
}
