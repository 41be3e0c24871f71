#!/usr/bin/env bash
# Set up (idempotently) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The studio's browser tests drive Debian's Chromium (Playwright never downloads a browser here).
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "test.sh: could not install chromium"
  else
    echo "test.sh: no chromium (apt-get install chromium); the browser tests will be skipped"
  fi
fi
.venv/bin/ruff check inkwash tests benchmarks
.venv/bin/ruff format --check -q inkwash tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
