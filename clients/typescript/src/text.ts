import { StreamAbortedError, TidegateError, type TidegateAbortInfo } from "./errors.js";
import { parseSse, endsAnswer, type SseEvent } from "./sse.js";

/** Anything the stream helpers read from. */
export type StreamSource = Response | Promise<Response> | ReadableStream<Uint8Array>;

async function bodyOf(source: StreamSource): Promise<ReadableStream<Uint8Array>> {
  const resolved = await source;
  if (typeof Response !== "undefined" && resolved instanceof Response) {
    if (!resolved.ok) {
      let detail = "";
      try {
        detail = (await resolved.text()).slice(0, 300);
      } catch {
        /* no body */
      }
      throw new TidegateError(`HTTP ${resolved.status}${detail ? `: ${detail}` : ""}`);
    }
    if (!resolved.body) throw new TidegateError("the response has no body");
    return resolved.body;
  }
  return resolved as ReadableStream<Uint8Array>;
}

/**
 * Iterates the SSE events of a streaming response (comments skipped),
 * including the final `[DONE]` event.
 */
export async function* streamEvents(source: StreamSource): AsyncGenerator<SseEvent, void, undefined> {
  yield* parseSse(await bodyOf(source));
}

/**
 * The text an event's data adds to the answer: `choices[0].delta.content` of
 * an OpenAI chat.completion.chunk, the `text_delta` of an Anthropic
 * `content_block_delta`, or the `delta` of an OpenAI Responses
 * `response.output_text.delta`. "" for anything else.
 */
export function chunkText(data: string | unknown): string {
  let obj: unknown = data;
  if (typeof data === "string") {
    try {
      obj = JSON.parse(data);
    } catch {
      return "";
    }
  }
  if (!obj || typeof obj !== "object") return "";
  const o = obj as {
    choices?: Array<{ delta?: { content?: unknown }; text?: unknown }>;
    type?: unknown;
    delta?: unknown;
  };
  const choice = Array.isArray(o.choices) ? o.choices[0] : undefined;
  if (choice) {
    if (typeof choice.delta?.content === "string") return choice.delta.content;
    if (typeof choice.text === "string") return choice.text;
    return "";
  }
  if (o.type === "response.output_text.delta") return typeof o.delta === "string" ? o.delta : "";
  const d = o.delta as { type?: unknown; text?: unknown } | undefined;
  if (o.type === "content_block_delta" && d?.type === "text_delta" && typeof d.text === "string") return d.text;
  return "";
}

/** Whether an event ends the answer: `[DONE]`, or the protocol's last event (see {@link endsAnswer}). */
export function isStreamEnd(ev: SseEvent): boolean {
  return ev.data === "[DONE]" || endsAnswer(ev.event);
}

/**
 * The in-band error object of an event's data (`{"error":{...}}`, OpenAI
 * style, or `{"type":"error","error":{...}}`, Anthropic style), or of an
 * OpenAI Responses `error` event (`{"type":"error","code","message"}`) or
 * `response.failed` (its `response.error`), if it is one.
 */
export function eventError(data: string): TidegateAbortInfo | undefined {
  if (!data.includes('"error"')) return undefined;
  try {
    const obj = JSON.parse(data) as { type?: unknown; error?: unknown; code?: unknown; message?: unknown; response?: { error?: unknown } };
    const err = obj?.type === "response.failed" ? obj.response?.error : obj?.error;
    if (err && typeof err === "object") {
      const e = err as TidegateAbortInfo;
      return { ...e, type: typeof e.type === "string" ? e.type : "error" };
    }
    if (obj?.type === "error" && typeof obj.message === "string") {
      // A provider's own Responses `error` event: its fields are top-level.
      return { type: "error", message: obj.message, ...(typeof obj.code === "string" ? { code: obj.code } : {}) };
    }
  } catch {
    /* not JSON */
  }
  return undefined;
}

/**
 * Iterates the text deltas of a streaming answer (OpenAI chat, Anthropic, or
 * OpenAI Responses). Ends at `[DONE]` / `message_stop` /
 * `response.completed`; throws
 * {@link StreamAbortedError} on an in-band abort event, or when the body ends
 * before the answer did.
 *
 * ```ts
 * for await (const text of streamText(resumeStream(url, { token, lastEventId }))) out.append(text);
 * ```
 */
export async function* streamText(source: StreamSource): AsyncGenerator<string, void, undefined> {
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

/** Reads a whole streaming answer into one string (see {@link streamText}). */
export async function collectText(source: StreamSource): Promise<string> {
  let out = "";
  for await (const t of streamText(source)) out += t;
  return out;
}
