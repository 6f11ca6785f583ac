#!/usr/bin/env bash
# Builds and tests @tidegate/client against the real gateway binary.
# Needs Node 20+ and npm. TIDEGATE_BIN: the gateway binary
# (default: <repo>/target/release/tidegate, built by `cargo build --release`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export TIDEGATE_BIN="${TIDEGATE_BIN:-$(cd ../.. && pwd)/target/release/tidegate}"
if [[ ! -x "$TIDEGATE_BIN" ]]; then
  echo "run-tests.sh: tidegate binary not found at $TIDEGATE_BIN (cargo build --release, or set TIDEGATE_BIN)" >&2
  exit 1
fi
node --version
npm ci --no-audit --no-fund
npm run build
npm test
