#!/usr/bin/env bash
# The serving benchmark on a lent GPU: `inkwash serve --device cuda`, batched vs one request at a time.
# Carry .wheels-serve (fastapi, uvicorn, greenlet, pydantic wheels for the GPU image's Python) and .minilm-fp16
# (MiniLM weights, gzipped, + tokenizer). Results: $OUT/bench_serve_gpu.json and $OUT/bench_serve_gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
$PY -m pip install -q --no-index --find-links .wheels-serve fastapi uvicorn greenlet 2>&1 | tail -3 || true
M=$(mktemp -d); cp .minilm-fp16/*.json .minilm-fp16/*.txt "$M"/
xz -dc .minilm-fp16/model.safetensors.xz > "$M/model.safetensors"
export INKWASH_MINILM_DIR=$M PYTHONPATH=. PYTHONUNBUFFERED=1
$PY benchmarks/bench_serve.py --device "${DEVICE:-cuda}" --clients ${CLIENTS:-1 4 16 64} --requests "${REQUESTS:-3}" \
  --out "$OUT/bench_serve_gpu.json" 2>&1 | tee "$OUT/bench_serve_gpu.txt"
