#!/usr/bin/env bash
# End-to-end test of the chat demo: Playwright (playwright-core from npm) drives
# Debian's Chromium against the real gateway started with `serve --ui`.
# Needs Node 20+, npm, and root or sudo for apt when Chromium is missing.
# TIDEGATE_BIN: the gateway binary (default: <repo>/target/release/tidegate).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export TIDEGATE_BIN="${TIDEGATE_BIN:-$(cd ../.. && pwd)/target/release/tidegate}"
export CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [[ ! -x "$TIDEGATE_BIN" ]]; then
  echo "run-tests.sh: tidegate binary not found at $TIDEGATE_BIN (cargo build --release, or set TIDEGATE_BIN)" >&2
  exit 1
fi
if [[ ! -x "$CHROMIUM_PATH" ]]; then
  echo "run-tests.sh: installing Debian's chromium (browser downloads by Playwright are not used)" >&2
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
node --version
"$CHROMIUM_PATH" --version 2>/dev/null || true
cd tests
npm ci --no-audit --no-fund
npm test
