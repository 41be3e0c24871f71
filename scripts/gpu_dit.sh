#!/usr/bin/env bash
# DiT training throughput and MFU on a lent GPU (issue 6, section 4): inkwash DiT vs diffusers DiTTransformer2DModel,
# DiT-XL/2 at 256 px (latents 32x32x4), batch 256, bf16 autocast, fused AdamW; plus the loss-curve check.
#
#   OUT=/path/to/out bash scripts/gpu_dit.sh          # carry .wheels-dit (diffusers 0.42.1 and its deps, cp312)
#
# The device image has no diffusers: it is installed from .wheels-dit when that folder is there; without it (or
# if the install fails) only our rows run. Results: $OUT/bench_dit_train.json, .md (the table and loss curves),
# .txt (the full log) and pip.log. About 6 minutes on an H100/H200: rows that would start after BUDGET_S (default
# 270 s) are reported as skipped, and the run is stopped at LIMIT_S (default 390 s); the JSON is rewritten after
# every row, so a stopped run still leaves what it measured.
#
# Environment (all optional): OUT (default gpu-out), PYTHON (python3), PRESET (dit-xl2), BATCH (256), STEPS (10),
# WARMUP (3), ROWS (space-separated row names, see the benchmark's docstring; default its GPU_ROWS), BUDGET_S,
# LIMIT_S, EXTRA (more flags, e.g. "--loss-precisions fp32").
set -uo pipefail
# shellcheck source=scripts/gpu_setup.sh
source "$(dirname "$0")/gpu_setup.sh"  # OUT, PY, diffusers from .wheels-dit
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # big batches, OOM retries
# shellcheck disable=SC2086  # ROWS and EXTRA are word lists
timeout --signal=INT --kill-after=20 "${LIMIT_S:-390}" $PY benchmarks/bench_dit_train.py \
  --preset "${PRESET:-dit-xl2}" --batch "${BATCH:-256}" --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" \
  ${ROWS:+--rows $ROWS} --budget-s "${BUDGET_S:-270}" --json "$OUT/bench_dit_train.json" ${EXTRA:-} \
  2>&1 | tee "$OUT/bench_dit_train.txt"
rc=${PIPESTATUS[0]}
[ -f "$OUT/bench_dit_train.md" ] && cat "$OUT/bench_dit_train.md"
exit "$rc"
