#!/usr/bin/env bash
# Set up (idempotently) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check inkwash tests benchmarks
.venv/bin/ruff format --check -q inkwash tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
