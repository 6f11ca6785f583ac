#!/usr/bin/env bash
# Run the tidegate-client test suite (unit tests + integration tests against
# the real binaries).  Usage: ./run-tests.sh [pytest args...]
#
#   TIDEGATE_BIN  the gateway binary (default: <repo>/target/release/tidegate)
#   PYTHON        the interpreter to build the venv with (default: python3.11, else python3)
#
# Dependencies go into clients/python/.venv (created on first run; re-installed
# when pyproject.toml changes).  If a venv cannot be created (no ensurepip on
# the machine) they are installed into the current interpreter instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$here"

export TIDEGATE_BIN="${TIDEGATE_BIN:-$repo/target/release/tidegate}"

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"tidegate-client needs Python >= 3.11, {sys.executable} is {sys.version.split()[0]}")
PY

venv="$here/.venv"
if [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv" >/dev/null 2>&1; then
  py="$venv/bin/python"
else
  echo "run-tests.sh: could not create a venv; installing into $("$PYTHON" -c 'import sys; print(sys.executable)')" >&2
  rm -rf "$venv"
  py="$PYTHON"
  export PIP_BREAK_SYSTEM_PACKAGES=1  # a distro interpreter marked externally-managed
fi

stamp_dir="$("$py" -c 'import sys; print(sys.prefix)')"
stamp="$stamp_dir/.tidegate-client-installed"
want="$("$py" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' pyproject.toml)"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$want" ]] || ! "$py" -c 'import tidegate_client, openai, pytest' >/dev/null 2>&1; then
  "$py" -m pip install --disable-pip-version-check -q --upgrade pip >/dev/null 2>&1 || true
  "$py" -m pip install --disable-pip-version-check -q -e ".[test]"
  echo "$want" > "$stamp" 2>/dev/null || true
fi

"$py" - <<'PY'
import importlib.metadata as m
print("tidegate-client test env:", ", ".join(f"{p} {m.version(p)}" for p in ("openai", "httpx", "httpx2", "pytest")))
PY
echo "TIDEGATE_BIN=$TIDEGATE_BIN"

exec "$py" -m pytest "$@"
