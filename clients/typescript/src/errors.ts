/** Base class of every error this package raises. */
export class TidegateError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "TidegateError";
  }
}

/**
 * An interrupted stream could not be resumed: the resume budget ran out while
 * the gateway was down or draining, or the gateway refused the resume (404:
 * unknown stream or wrong token). It carries everything needed to try again
 * later, e.g. with {@link resumeStream}.
 */
export class ResumeFailedError extends TidegateError {
  /** The tidegate stream id (`x-tidegate-stream-id`). */
  readonly streamId: string;
  /** The resume token (capability) of the stream. */
  readonly resumeToken: string | undefined;
  /** The id of the last event that was delivered to the caller: resume after it. */
  readonly lastEventId: number;
  /** How many resume requests were made before giving up. */
  readonly attempts: number;
  /** HTTP status of the last resume answer, if there was one. */
  readonly status: number | undefined;

  constructor(
    message: string,
    info: {
      streamId: string;
      resumeToken: string | undefined;
      lastEventId: number;
      attempts: number;
      status?: number | undefined;
      cause?: unknown;
    },
  ) {
    super(message, info.cause === undefined ? undefined : { cause: info.cause });
    this.name = "ResumeFailedError";
    this.streamId = info.streamId;
    this.resumeToken = info.resumeToken;
    this.lastEventId = info.lastEventId;
    this.attempts = info.attempts;
    this.status = info.status;
  }
}

/**
 * The event ids of a stream skipped a number: events were lost between the
 * gateway and this client. The stream cannot be spliced safely.
 */
export class StreamGapError extends TidegateError {
  readonly streamId: string;
  readonly expectedEventId: number;
  readonly receivedEventId: number;

  constructor(streamId: string, expected: number, received: number) {
    super(
      `tidegate stream ${streamId}: expected event id ${expected}, received ${received} (events were lost)`,
    );
    this.name = "StreamGapError";
    this.streamId = streamId;
    this.expectedEventId = expected;
    this.receivedEventId = received;
  }
}

/** The shape of an in-band tidegate abort event's `error` object. */
export interface TidegateAbortInfo {
  type: string;
  code?: string;
  message?: string;
  resume?: boolean;
  stream_id?: string;
  resume_token?: string;
  last_event_id?: string;
  resume_url?: string;
  [key: string]: unknown;
}

/**
 * A stream ended without its answer: an in-band abort event that cannot be
 * resumed (`cancelled`, `incomplete`, `store_failed`, an upstream error), or
 * the body ended without `[DONE]`. Raised by {@link streamText} and
 * {@link streamEvents}-based helpers; `resumableFetch` itself passes such
 * events through untouched so that SDKs raise their own errors.
 */
export class StreamAbortedError extends TidegateError {
  /** `server_restarting`, `upstream_failed`, `cancelled`, `incomplete`, `store_failed`, … */
  readonly type: string;
  readonly code: string | undefined;
  readonly resume: boolean;
  readonly streamId: string | undefined;
  readonly resumeToken: string | undefined;
  readonly lastEventId: number | undefined;
  /** The raw error object of the event, if there was one. */
  readonly error: TidegateAbortInfo | undefined;

  constructor(message: string, error?: TidegateAbortInfo) {
    super(message);
    this.name = "StreamAbortedError";
    this.error = error;
    this.type = error?.type ?? "incomplete";
    this.code = error?.code;
    this.resume = error?.resume === true;
    this.streamId = error?.stream_id;
    this.resumeToken = error?.resume_token;
    const last = error?.last_event_id;
    this.lastEventId = last !== undefined && /^\d+$/.test(String(last)) ? Number(last) : undefined;
  }
}
