#!/usr/bin/env bash
# Create .venv and install corrvos with everything the app and the tests need (idempotent).
# Usage: bash scripts/setup.sh [--test]   (--test also installs Debian chromium for the browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  # The browser test drives Debian's chromium through Playwright (no browser download).
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "note: chromium could not be installed; the browser test will be skipped"
  fi
fi
