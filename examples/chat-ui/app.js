// tidegate chat demo: streams answers through the gateway with resumableFetch,
// over the Chat Completions API or the Responses API (the selector in the
// bar), shows "reconnecting…" while a gateway restart is bridged, and resumes
// an unfinished answer after a page reload from the cursor kept in
// localStorage.
import {
  resumableFetch,
  resumeStream,
  streamEvents,
  chunkText,
  eventError,
  isStreamEnd,
  getStreamInfo,
  ResumeFailedError,
} from "./client.js";

/**
 * What every question sends besides the messages. The `mock` knobs are read
 * by tidegate's built-in mock provider (one word every 60 ms, so the answer
 * visibly streams); point `model` at a real upstream and drop them for a real
 * provider.
 */
export const CHAT_REQUEST = {
  model: "mock",
  max_tokens: 60,
  mock: { token_interval_ms: 60 },
};

/** The same, for `POST /v1/responses` (the Responses API names the limit `max_output_tokens`). */
export const RESPONSES_REQUEST = {
  model: "mock",
  max_output_tokens: 60,
  mock: { token_interval_ms: 60 },
};

/** The two APIs the page can speak: the path, and the request body for a conversation. */
export const APIS = {
  chat: {
    path: "/v1/chat/completions",
    body: (messages) => ({ ...CHAT_REQUEST, messages, stream: true }),
  },
  responses: {
    path: "/v1/responses",
    body: (messages) => ({ ...RESPONSES_REQUEST, input: messages.map(({ role, content }) => ({ role, content })), stream: true }),
  },
};

/** How long one outage may last before the page gives up (ms). */
const RESUME_BUDGET_MS = 120_000;
const STORAGE_KEY = "tidegate-chat:v1";

const $ = (id) => document.getElementById(id);
const log = $("log");
const intro = $("intro");
const statusEl = $("status");
const form = $("composer");
const promptEl = $("prompt");
const sendBtn = $("send");
const apiEl = $("api");

/**
 * The conversation, the API it speaks, and the answer being streamed.
 * `pending` is what a reload needs to resume: { streamId, token, lastEventId,
 * text }. tidegate resumes a Responses stream at /v1/streams/{id} too, so
 * both APIs resume the same way.
 */
let state = { api: "chat", messages: [], pending: null };
let busy = false;
let controller = null;

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "null");
    if (saved && Array.isArray(saved.messages)) {
      state = { api: saved.api in APIS ? saved.api : "chat", messages: saved.messages, pending: saved.pending ?? null };
    }
  } catch {
    /* corrupt storage: start over */
  }
}

function save() {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(state));
  } catch {
    /* storage full or disabled: the demo still streams, it just cannot resume after a reload */
  }
}

/** status: "" | "streaming…" | "reconnecting…" | "done" | "error: …" */
function setStatus(text, kind = text.replace(/[^a-z].*$/, "")) {
  statusEl.textContent = text;
  statusEl.dataset.kind = kind;
}

function setBusy(value) {
  busy = value;
  sendBtn.disabled = value;
  promptEl.disabled = value;
  apiEl.disabled = value;
  if (!value) promptEl.focus();
}

function scrollToEnd() {
  log.scrollTop = log.scrollHeight;
}

function bubble(role, text) {
  intro.hidden = true;
  const row = document.createElement("div");
  row.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  row.append(who, body);
  log.append(row);
  scrollToEnd();
  return { row, body };
}

/** A new assistant bubble whose text element is the one `answer` test id. */
function answerBubble(text = "") {
  for (const el of log.querySelectorAll('[data-testid="answer"]')) el.removeAttribute("data-testid");
  const b = bubble("assistant", text);
  b.body.dataset.testid = "answer";
  b.row.classList.add("live");
  return b;
}

function render() {
  for (const el of log.querySelectorAll(".msg")) el.remove();
  intro.hidden = state.messages.length > 0 || state.pending !== null;
  let last = null;
  for (const m of state.messages) {
    const b = m.role === "assistant" ? answerBubble(m.content) : bubble(m.role, m.content);
    if (m.role === "assistant") {
      b.row.classList.remove("live");
      last = b;
    }
  }
  return last;
}

const streamingFetch = () =>
  resumableFetch({
    budgetMs: RESUME_BUDGET_MS,
    backoff: { initialDelayMs: 250, maxDelayMs: 2000 },
    onReconnecting: () => setStatus("reconnecting…"),
    onResumed: () => setStatus("streaming…"),
  });

/**
 * Reads a (resumable) stream into the bubble, saving the text and the cursor
 * after every event so a reload can pick up exactly here.
 */
async function consume(res, b) {
  const info = getStreamInfo(res);
  for await (const ev of streamEvents(res)) {
    if (ev.data === "[DONE]") return;
    const err = eventError(ev.data);
    if (err) throw new Error(err.message || err.type);
    const p = state.pending;
    p.text += chunkText(ev.data);
    if (ev.id !== undefined) p.lastEventId = Number(ev.id);
    if (info?.resumeToken) p.token = info.resumeToken;
    b.body.textContent = p.text;
    save();
    scrollToEnd();
    if (isStreamEnd(ev)) return; // response.completed: the Responses API sends no [DONE]
  }
  throw new Error("the stream ended before the answer was complete");
}

function finish(b) {
  state.messages.push({ role: "assistant", content: state.pending.text });
  state.pending = null;
  save();
  b.row.classList.remove("live");
  setStatus("done");
}

function fail(b, err) {
  b?.row.classList.remove("live");
  b?.row.classList.add("failed");
  if (err?.name === "AbortError") return;
  const resumable = err instanceof ResumeFailedError && err.status !== 404;
  setStatus(resumable ? "offline: reload to resume" : `error: ${err?.message ?? err}`, "error");
  if (!resumable && state.pending) {
    // The stream is gone for good: keep what arrived as the answer.
    state.messages.push({ role: "assistant", content: state.pending.text });
    state.pending = null;
    save();
  }
}

async function ask(prompt) {
  setBusy(true);
  controller = new AbortController();
  state.messages.push({ role: "user", content: prompt });
  bubble("user", prompt);
  const b = answerBubble();
  state.pending = { streamId: null, token: null, lastEventId: 0, text: "" };
  save();
  setStatus("streaming…");
  const api = APIS[state.api];
  try {
    const res = await streamingFetch()(api.path, {
      method: "POST",
      headers: { "content-type": "application/json", accept: "text/event-stream" },
      body: JSON.stringify(api.body(state.messages)),
      signal: controller.signal,
    });
    if (!res.ok) {
      let message = `HTTP ${res.status}`;
      try {
        message = (await res.json()).error?.message ?? message;
      } catch {
        /* not JSON */
      }
      state.pending = null;
      throw new Error(message);
    }
    state.pending.streamId = res.headers.get("x-tidegate-stream-id");
    state.pending.token = res.headers.get("x-tidegate-resume-token");
    save();
    await consume(res, b);
    finish(b);
  } catch (err) {
    fail(b, err);
  } finally {
    setBusy(false);
  }
}

/** After a reload: render the text received so far and resume the stream after its last event. */
async function resumePending() {
  const p = state.pending;
  if (!p.streamId || !p.token) {
    // The page went away before the gateway answered: nothing to resume, ask again.
    const lastUser = state.messages.at(-1);
    if (lastUser?.role === "user") {
      state.messages.pop();
      promptEl.value = lastUser.content;
    }
    state.pending = null;
    save();
    render();
    return;
  }
  setBusy(true);
  controller = new AbortController();
  const b = answerBubble(p.text);
  setStatus("reconnecting…");
  try {
    const res = await resumeStream(`/v1/streams/${encodeURIComponent(p.streamId)}`, {
      token: p.token,
      lastEventId: p.lastEventId,
      budgetMs: RESUME_BUDGET_MS,
      backoff: { initialDelayMs: 250, maxDelayMs: 2000 },
      onReconnecting: () => setStatus("reconnecting…"),
      onResumed: () => setStatus("streaming…"),
      signal: controller.signal,
    });
    setStatus("streaming…");
    await consume(res, b);
    finish(b);
  } catch (err) {
    fail(b, err);
  } finally {
    setBusy(false);
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = promptEl.value.trim();
  if (!prompt || busy) return;
  promptEl.value = "";
  ask(prompt);
});

apiEl.addEventListener("change", () => {
  if (busy || !(apiEl.value in APIS)) return;
  state.api = apiEl.value;
  save();
});

$("new-chat").addEventListener("click", () => {
  controller?.abort();
  state = { api: state.api, messages: [], pending: null };
  save();
  render();
  setStatus("");
  setBusy(false);
});

load();
apiEl.value = state.api;
render();
if (state.pending) resumePending();
else promptEl.focus();
