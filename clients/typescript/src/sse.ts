/**
 * A small, spec-following Server-Sent Events parser and serializer
 * (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
 *
 * Only web-platform APIs are used (TextDecoder, ReadableStream), so this runs
 * unchanged in browsers, Node 20+, Deno, Bun and workers.
 */

/** One dispatched SSE event. */
export interface SseEvent {
  /** The `id:` field of this event, when it carried one. */
  id?: string;
  /** The `event:` field, when it carried one (`undefined` means "message"). */
  event?: string;
  /** The `data:` lines joined with `\n`. */
  data: string;
  /** The `retry:` field (milliseconds), when this block carried one. */
  retry?: number;
}

/**
 * Incremental parser: feed it decoded text in arbitrary pieces, it returns the
 * complete events. A block cut off by the end of the stream is discarded, as a
 * browser's EventSource does.
 */
export class SseParser {
  private buffer = "";
  private pendingCR = false;
  private dataLines: string[] = [];
  private sawData = false;
  private id: string | undefined;
  private event: string | undefined;
  private retry: number | undefined;
  private first = true;
  /** The last `retry:` value seen anywhere in the stream (milliseconds). */
  reconnectionTime: number | undefined;

  /** Feeds a piece of text; returns the events completed by it. */
  feed(text: string): SseEvent[] {
    if (this.first && text.length > 0) {
      this.first = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    const out: SseEvent[] = [];
    let start = 0;
    let i = 0;
    if (this.pendingCR && text.length > 0) {
      // A "\r" ended the previous piece: a "\n" right after it belongs to the same line break.
      this.pendingCR = false;
      if (text.charCodeAt(0) === 0x0a) {
        start = 1;
        i = 1;
      }
    }
    for (; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 0x0a && c !== 0x0d) continue;
      const line = this.buffer + text.slice(start, i);
      this.buffer = "";
      if (c === 0x0d) {
        if (i + 1 < text.length) {
          if (text.charCodeAt(i + 1) === 0x0a) i++;
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
  end(): SseEvent[] {
    this.buffer = "";
    this.reset();
    return [];
  }

  private reset(): void {
    this.dataLines = [];
    this.sawData = false;
    this.id = undefined;
    this.event = undefined;
    this.retry = undefined;
  }

  private line(line: string, out: SseEvent[]): void {
    if (line === "") {
      if (this.sawData) {
        const ev: SseEvent = { data: this.dataLines.join("\n") };
        if (this.id !== undefined) ev.id = this.id;
        if (this.event !== undefined) ev.event = this.event;
        if (this.retry !== undefined) ev.retry = this.retry;
        out.push(ev);
      }
      this.reset();
      return;
    }
    if (line.charCodeAt(0) === 0x3a /* ':' comment, e.g. ": ping" */) return;
    const colon = line.indexOf(":");
    let field: string;
    let value: string;
    if (colon === -1) {
      field = line;
      value = "";
    } else {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 0x20) value = value.slice(1);
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
        // Unknown fields are ignored.
        break;
    }
  }
}

/** Serializes one event as standard SSE text, ending with the blank line. */
export function serializeEvent(ev: SseEvent): string {
  let s = "";
  if (ev.event !== undefined) s += `event: ${ev.event}\n`;
  if (ev.id !== undefined) s += `id: ${ev.id}\n`;
  for (const line of ev.data.split("\n")) s += `data: ${line}\n`;
  return s + "\n";
}

/**
 * Parses a byte stream (a Response body) into SSE events. Comments (`: ping`)
 * are skipped.
 */
export async function* parseSse(
  body: ReadableStream<Uint8Array>,
): AsyncGenerator<SseEvent, void, undefined> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  let finished = false;
  try {
    for (;;) {
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
      reader.cancel().catch(() => {});
    }
    try {
      reader.releaseLock();
    } catch {
      /* already released */
    }
  }
}

/**
 * Whether an event named `event` is the answer's own last one, in the
 * protocols that have no `[DONE]`: Anthropic's `message_stop`, the OpenAI
 * Responses API's `response.completed` / `response.incomplete` (an answer cut
 * short by `max_output_tokens` is whole as far as the stream goes).
 */
export function endsAnswer(event: string | undefined): boolean {
  return event === "message_stop" || event === "response.completed" || event === "response.incomplete";
}
