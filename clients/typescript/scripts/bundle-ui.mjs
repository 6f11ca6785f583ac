// Builds the single-file browser ESM bundle of @tidegate/client that the chat
// demo imports (examples/chat-ui/client.js). The bundle is committed so the
// Rust build, which embeds it, needs no node. `--check` only verifies that the
// committed file is up to date (exit 1 if not).
import { build } from "esbuild";
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const BUNDLE_PATH = resolve(here, "../../../examples/chat-ui/client.js");

export async function bundle() {
  const result = await build({
    entryPoints: [resolve(here, "../src/index.ts")],
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "es2020",
    write: false,
    legalComments: "none",
    charset: "utf8",
    banner: {
      js:
        "// @tidegate/client, browser ESM bundle. GENERATED from clients/typescript/src by\n" +
        "// `npm run bundle:ui` in clients/typescript: do not edit by hand.",
    },
  });
  return result.outputFiles[0].text;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const code = await bundle();
  if (process.argv.includes("--check")) {
    const current = existsSync(BUNDLE_PATH) ? readFileSync(BUNDLE_PATH, "utf8") : "";
    if (current !== code) {
      console.error(`${BUNDLE_PATH} is out of date: run \`npm run bundle:ui\` in clients/typescript`);
      process.exit(1);
    }
    console.log(`${BUNDLE_PATH} is up to date`);
  } else {
    writeFileSync(BUNDLE_PATH, code);
    console.log(`wrote ${BUNDLE_PATH} (${code.length} bytes)`);
  }
}
