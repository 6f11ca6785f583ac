/**
 * @tidegate/client — invisible stream resume for tidegate, the streaming SSE
 * gateway for LLM traffic. Web-platform APIs only: runs in browsers, Node 20+,
 * Deno, Bun and workers.
 */
export {
  resumableFetch,
  resumeStream,
  getStreamInfo,
  STREAM_ID_HEADER,
  RESUME_TOKEN_HEADER,
  type ResumableFetchOptions,
  type ResumeStreamOptions,
  type BackoffOptions,
  type ReconnectingInfo,
  type ResumedInfo,
  type StreamInfo,
} from "./resumable.js";
export { streamText, streamEvents, collectText, chunkText, eventError, isStreamEnd, type StreamSource } from "./text.js";
export { parseSse, serializeEvent, SseParser, endsAnswer, type SseEvent } from "./sse.js";
export {
  TidegateError,
  ResumeFailedError,
  StreamGapError,
  StreamAbortedError,
  type TidegateAbortInfo,
} from "./errors.js";
