// End-to-end test of the chat demo served by `tidegate serve --ui`: a real
// Chromium (Debian's, driven by playwright-core) asks a question, over the
// Chat Completions API and over the Responses API, the gateway is restarted
// (SIGTERM, then a NEW process on the same port and store) or the page is
// reloaded mid-answer, and the final answer text must be exactly the mock
// provider's answer. The mock demands its key, as a real provider does.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { Harness, freePort, waitExit, expectedAnswer, expectedResponse } from "../../../clients/typescript/test-support/harness.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const SCREENSHOT = resolve(here, "../screenshot.png");
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const T = { timeout: 90_000 };

const ANSWER = '[data-testid="answer"]';

/**
 * The two APIs the page speaks: the path it posts to, what the question
 * looks like in the body, and the mock's exact answer to that body.
 */
const APIS = {
  chat: {
    path: "/v1/chat/completions",
    conversation: (body) => body.messages,
    expected: (mockUrl, { path, ...body }) => expectedAnswer(mockUrl, body),
  },
  responses: {
    path: "/v1/responses",
    conversation: (body) => body.input,
    expected: (mockUrl, { path, ...body }) => expectedResponse(mockUrl, body),
  },
};

/** Opens the page and picks the API it speaks. */
async function open(page, url, api) {
  await page.goto(`${url}/`);
  await page.getByTestId("api").selectOption(api);
}
const STATUS = '[data-testid="status"]';

/** A fresh Chromium profile per test, so localStorage starts empty. */
async function launch() {
  const profile = mkdtempSync(join(tmpdir(), "tidegate-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 980, height: 700 },
    deviceScaleFactor: 1,
    timeout: 30_000,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  // Every value the status element takes, in order.
  await page.addInitScript(() => {
    window.__statuses = [];
    const watch = () => {
      const el = document.querySelector('[data-testid="status"]');
      if (!el) return;
      const push = () => {
        const s = el.textContent;
        if (window.__statuses.at(-1) !== s) window.__statuses.push(s);
      };
      push();
      new MutationObserver(push).observe(el, { childList: true, characterData: true, subtree: true });
    };
    document.addEventListener("DOMContentLoaded", watch);
  });
  // The body of every question the page sends (to compute the expected answer from the mock).
  const sent = [];
  page.on("request", (r) => {
    const path = new URL(r.url()).pathname;
    if (r.method() === "POST" && Object.values(APIS).some((a) => a.path === path)) sent.push({ path, ...JSON.parse(r.postData()) });
  });
  return {
    context,
    page,
    problems,
    sent,
    async close() {
      await context.close().catch(() => {});
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

const words = (page) =>
  page.evaluate((sel) => (document.querySelector(sel)?.textContent ?? "").split(/\s+/).filter(Boolean).length, ANSWER);

async function waitForWords(page, n, timeout = 20_000) {
  await page.waitForFunction(
    ([sel, n]) => (document.querySelector(sel)?.textContent ?? "").split(/\s+/).filter(Boolean).length >= n,
    [ANSWER, n],
    { timeout },
  );
}

const waitForStatus = (page, value, timeout) =>
  page.waitForFunction(([sel, v]) => document.querySelector(sel)?.textContent === v, [STATUS, value], { timeout });

describe("chat-ui served by `tidegate serve --ui`", () => {
  /** @type {Harness} */
  let h;
  let mock;

  before(async () => {
    h = new Harness("tidegate-ui");
    mock = await h.startMock();
  });

  after(async () => {
    await h?.close();
  });

  for (const api of Object.keys(APIS)) {
    test(`${api}: the gateway restarts mid-answer: the page shows reconnecting…, then finishes with the exact answer`, T, async () => {
      const port = await freePort();
      const dataDir = h.dataDir();
      let gw = await h.startGateway({ port, dataDir, mockUrl: mock.url, ui: true });
      const b = await launch();
      try {
        const { page } = b;
        await open(page, gw.url, api);
        await page.getByTestId("prompt").fill("How does a tide gate keep the water out?");
        await page.getByTestId("send").click();
        await waitForWords(page, 5);

        assert.equal(b.sent.length, 1);
        const body = b.sent[0];
        assert.equal(body.path, APIS[api].path);
        assert.equal(body.stream, true);
        assert.deepEqual(APIS[api].conversation(body), [{ role: "user", content: "How does a tide gate keep the water out?" }]);
        const expected = await APIS[api].expected(mock.url, body);

        gw.proc.kill("SIGTERM");
        await waitForStatus(page, "reconnecting…", 15_000);
        const partial = await page.locator(ANSWER).textContent();
        assert.ok(expected.startsWith(partial) && partial.length < expected.length, `mid-answer: "${partial}"`);
        if (api === "chat") await page.screenshot({ path: SCREENSHOT });

        assert.deepEqual(await waitExit(gw, 10_000), { code: 0, signal: null }, "SIGTERM drains and exits 0");
        gw = await h.startGateway({ port, dataDir, mockUrl: mock.url, ui: true });

        await waitForStatus(page, "done", 30_000);
        assert.equal(await page.locator(ANSWER).textContent(), expected);
        const statuses = await page.evaluate(() => window.__statuses);
        const i = statuses.indexOf("reconnecting…");
        assert.ok(i >= 0 && statuses.at(-1) === "done", `status went through reconnecting… and left it: ${JSON.stringify(statuses)}`);
        assert.equal(b.sent.length, 1, "the question was asked once; the rest came through the resume");
        assert.deepEqual(b.problems, []);
      } finally {
        await b.close();
        gw.proc.kill("SIGKILL");
      }
    });

    test(`${api}: a reload mid-answer resumes from localStorage and ends with the exact answer`, T, async () => {
      const port = await freePort();
      const gw = await h.startGateway({ port, dataDir: h.dataDir(), mockUrl: mock.url, ui: true });
      const b = await launch();
      try {
        const { page } = b;
        await open(page, gw.url, api);
        await page.getByTestId("prompt").fill("Tell me what happens when I reload this page");
        await page.getByTestId("send").click();
        await waitForWords(page, 8);
        assert.equal(b.sent[0].path, APIS[api].path);
        const expected = await APIS[api].expected(mock.url, b.sent[0]);
        const stored = await page.evaluate(() => JSON.parse(localStorage.getItem("tidegate-chat:v1")));
        assert.ok(stored?.pending?.streamId && stored.pending.token && stored.pending.lastEventId > 0, JSON.stringify(stored));
        assert.equal(stored.api, api, "the API is kept with the conversation");

        await page.reload();
        assert.equal(await page.getByTestId("api").inputValue(), api, "the page reopens on the same API");
        // the text received before the reload is back at once, and the answer goes on
        await page.waitForFunction((sel) => (document.querySelector(sel)?.textContent ?? "").length > 0, ANSWER, { timeout: 10_000 });
        assert.ok(expected.startsWith(await page.locator(ANSWER).textContent()));
        assert.ok((await words(page)) < expected.split(/\s+/).length, "the reload happened mid-answer");

        await waitForStatus(page, "done", 30_000);
        assert.equal(await page.locator(ANSWER).textContent(), expected);
        assert.equal(b.sent.length, 1, "the page did not ask again after the reload");
        const after = await page.evaluate(() => JSON.parse(localStorage.getItem("tidegate-chat:v1")));
        assert.equal(after.pending, null, "nothing left to resume");
        assert.deepEqual(b.problems, []);
      } finally {
        await b.close();
        gw.proc.kill("SIGKILL");
      }
    });
  }
});
