// Test harness (Node only): starts the REAL tidegate binaries — the mock
// provider and gateway generations on a fixed port and store path — and kills
// every process it started in teardown. Shared by the TypeScript client's
// tests and the chat-ui end-to-end test.
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync, existsSync, createWriteStream } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = resolve(here, "../../..");
export const BIN = process.env.TIDEGATE_BIN || join(REPO_ROOT, "target/release/tidegate");

/** Fails with a clear message when the gateway binary is not built. */
export function requireBinary() {
  if (!existsSync(BIN)) {
    throw new Error(
      `tidegate binary not found at ${BIN}: build it first (cargo build --release at the repo root) or set TIDEGATE_BIN`,
    );
  }
}

/** A free TCP port on 127.0.0.1 (bound once, then released for the gateway). */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolvePort(port));
    });
  });
}

/**
 * Owns a temp dir and every process started through it. `close()` kills what
 * is still running (SIGKILL) and removes the temp dir (kept when
 * TIDEGATE_KEEP_TEST_DIR is set, for its logs).
 */
/**
 * The key the test mock demands, as every real provider does (a request
 * without it gets the provider's 401). The gateway carries it to the mock
 * through `api_key_env`; a test that talks to the mock directly sends it.
 */
export const MOCK_KEY_ENV = "TG_TS_UPSTREAM_KEY";
export const MOCK_KEY = "sk-tidegate-ts-test-upstream";
process.env[MOCK_KEY_ENV] = MOCK_KEY;

export class Harness {
  constructor(name = "tidegate-test") {
    requireBinary();
    this.dir = mkdtempSync(join(tmpdir(), `${name}-`));
    this.procs = new Set();
    this.seq = 0;
  }

  /** Spawns `tidegate ARGS`, waits for its `listening on URL` line; returns { proc, url, port, log, logPath }. */
  async start(args, { name = args[0], timeoutMs = 15_000 } = {}) {
    const logPath = join(this.dir, `${String(++this.seq).padStart(2, "0")}-${name}.log`);
    const logFile = createWriteStream(logPath);
    const proc = spawn(BIN, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info" } });
    this.procs.add(proc);
    const exited = new Promise((res) => proc.once("exit", (code, signal) => res({ code, signal })));
    proc.exitInfo = exited;
    exited.then(() => {
      this.procs.delete(proc);
      logFile.end();
    });
    let tail = "";
    const keep = (chunk) => {
      logFile.write(chunk);
      tail = (tail + chunk.toString()).slice(-4000);
    };
    proc.stderr.on("data", keep);
    const url = await new Promise((res, reject) => {
      let buf = "";
      const timer = setTimeout(() => {
        reject(new Error(`${name} did not print "listening on" within ${timeoutMs} ms; log:\n${tail}`));
      }, timeoutMs);
      proc.stdout.on("data", (chunk) => {
        keep(chunk);
        buf += chunk.toString();
        const m = buf.match(/listening on (http:\/\/[^\s]+)/);
        if (m) {
          clearTimeout(timer);
          res(m[1].replace(/\/$/, ""));
        }
      });
      exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`${name} exited (code ${code}, signal ${signal}) before listening; log:\n${tail}`));
      });
    });
    const port = Number(new URL(url).port);
    return { proc, url, port, logPath, log: () => tail, exit: exited };
  }

  /** `tidegate mock-upstream --listen 127.0.0.1:0 --api-key-env TG_TS_UPSTREAM_KEY`: it demands {@link MOCK_KEY}. */
  startMock() {
    return this.start(["mock-upstream", "--listen", "127.0.0.1:0", "--api-key-env", MOCK_KEY_ENV], { name: "mock" });
  }

  /** Writes the test config (fixed port, embedded store at `dataDir`) and starts `tidegate serve`. */
  startGateway({ port, dataDir, mockUrl, ui = false, grace = "1s", exitTimeout = "2s" }) {
    const config = join(this.dir, `gateway-${port}.toml`);
    writeFileSync(
      config,
      `listen = "127.0.0.1:${port}"

[drain]
grace = "${grace}"
exit_timeout = "${exitTimeout}"

[store]
kind = "embedded"
path = "${dataDir}"

[[upstreams]]
name = "mock"
protocol = "openai"
base_url = "${mockUrl}/v1"
models = ["*"]
api_key_env = "${MOCK_KEY_ENV}"
continuation = "continue_final_message"

[[upstreams]]
name = "mock-responses"
protocol = "openai_responses"
base_url = "${mockUrl}/v1"
models = ["*"]
api_key_env = "${MOCK_KEY_ENV}"
continuation = "instruct"
`,
    );
    const args = ["serve", "--config", config, "--listen", `127.0.0.1:${port}`];
    if (ui) args.push("--ui");
    return this.start(args, { name: `gateway-${port}` });
  }

  /** A fresh store directory inside the temp dir. */
  dataDir() {
    return mkdtempSync(join(this.dir, "data-"));
  }

  async close() {
    const waits = [];
    for (const proc of this.procs) {
      waits.push(proc.exitInfo);
      try {
        proc.kill("SIGKILL");
      } catch {
        /* already gone */
      }
    }
    await Promise.race([Promise.all(waits), new Promise((r) => setTimeout(r, 5000))]);
    if (!process.env.TIDEGATE_KEEP_TEST_DIR) rmSync(this.dir, { recursive: true, force: true });
    else console.error(`test dir kept: ${this.dir}`);
  }
}

/** Waits for a started process to exit; rejects after `timeoutMs`. Resolves { code, signal }. */
export function waitExit(started, timeoutMs = 10_000) {
  return Promise.race([
    started.exit,
    new Promise((_, reject) =>
      setTimeout(() => reject(new Error(`process did not exit within ${timeoutMs} ms; log:\n${started.log()}`)), timeoutMs),
    ),
  ]);
}

/**
 * The exact answer: the same body with stream:false, sent DIRECTLY to the
 * mock; its choices[0].message.content.
 */
/** The mock's JSON answer to `body` at `path`, asked directly, not streamed. */
async function askMock(mockUrl, path, body) {
  const res = await fetch(`${mockUrl}/v1/${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${MOCK_KEY}` },
    body: JSON.stringify({ ...body, stream: false }),
  });
  if (!res.ok) throw new Error(`mock answered ${res.status}: ${await res.text()}`);
  return await res.json();
}

export async function expectedAnswer(mockUrl, body) {
  const json = await askMock(mockUrl, "chat/completions", body);
  const text = json?.choices?.[0]?.message?.content;
  if (typeof text !== "string" || text.length === 0) throw new Error(`mock answer has no content: ${JSON.stringify(json)}`);
  return text;
}

/** The mock's whole answer to an OpenAI Responses request, asked directly. */
export async function expectedResponse(mockUrl, body) {
  const json = await askMock(mockUrl, "responses", body);
  const text = (json.output ?? [])
    .filter((item) => item.type === "message")
    .flatMap((item) => item.content)
    .filter((part) => part.type === "output_text")
    .map((part) => part.text)
    .join("");
  if (!text) throw new Error(`mock response has no text: ${JSON.stringify(json)}`);
  return text;
}

export async function mockStats(mockUrl) {
  const res = await fetch(`${mockUrl}/mock/stats`, { headers: { authorization: `Bearer ${MOCK_KEY}` } });
  return await res.json();
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
