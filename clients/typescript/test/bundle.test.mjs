// The committed browser bundle of the chat demo must match the TypeScript source.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { bundle, BUNDLE_PATH } from "../scripts/bundle-ui.mjs";

test("examples/chat-ui/client.js is the current bundle of src/ (npm run bundle:ui)", async () => {
  const fresh = await bundle();
  const committed = readFileSync(BUNDLE_PATH, "utf8");
  assert.ok(committed === fresh, "examples/chat-ui/client.js is stale: run `npm run bundle:ui` in clients/typescript");
  for (const name of ["resumableFetch", "resumeStream", "streamText", "streamEvents", "ResumeFailedError"]) {
    assert.match(fresh, new RegExp(`export\\s*\\{[^}]*\\b${name}\\b`), `the bundle exports ${name}`);
  }
  assert.doesNotMatch(fresh, /\brequire\(|from\s+"node:/, "no Node-only APIs in the browser bundle");
});
