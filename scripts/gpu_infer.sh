#!/usr/bin/env bash
# FLUX.1 inference speed on a lent GPU (issue 8, section 4): our MMDiT vs diffusers' FluxTransformer2DModel with the
# same random weights, flux-dev at 1024 x 1024, batch 1, 512 text tokens, bf16; eager and compiled, ms per step and
# MFU against the measured bf16 matmul peak; a 28-step generation through TeaCache (seconds, calls computed); then
# ours with fp8 weights and matmuls (torch._scaled_mm).
#
#   OUT=/path/to/out bash scripts/gpu_infer.sh         # carry .wheels-dit (diffusers 0.42.1 and its deps, cp312)
#
# Without a GPU it runs the same rows on mmdit-tiny at 64 px on the CPU (eager, TeaCache and fp8 rows unless ROWS says
# otherwise): the check that the script works (tests/test_fast.py runs it). Results: $OUT/bench_infer_flux.json
# (rewritten after every row), .txt (the log) and pip.log. Both models stay resident (24 GB of bf16 weights a side
# fit an 80 GB H100); the rows run in ROWS's order, the fp8 ones last (they quantize ours in place). Stopped at
# LIMIT_S (default 540 s).
#
# Environment (all optional): OUT (default gpu-out), PYTHON (python3), PRESET, SIZE, TOKENS, STEPS (10), WARMUP (3),
# ROWS (space-separated: diffusers:eager diffusers:compiled ours:eager ours:compiled ours:teacache
# ours:teacache-compiled ours:fp8 ours:fp8-compiled),
# LIMIT_S, EXTRA (more flags for benchmarks/bench_infer.py).
set -uo pipefail
# shellcheck source=scripts/gpu_setup.sh
source "$(dirname "$0")/gpu_setup.sh"  # OUT, PY, diffusers from .wheels-dit
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  ARGS=(--preset "${PRESET:-flux-dev}" --size "${SIZE:-1024}" --tokens "${TOKENS:-512}" --steps "${STEPS:-10}"
        --warmup "${WARMUP:-3}")
else
  echo "no CUDA GPU: the CPU check on mmdit-tiny"
  ARGS=(--preset "${PRESET:-mmdit-tiny}" --size "${SIZE:-64}" --tokens "${TOKENS:-16}" --steps "${STEPS:-2}"
        --warmup "${WARMUP:-1}" --peak-n 256 --threads 1 --rows ${ROWS:-diffusers:eager ours:eager ours:teacache ours:fp8})
  ROWS=
fi
# shellcheck disable=SC2086  # ROWS and EXTRA are word lists
timeout --signal=INT --kill-after=20 "${LIMIT_S:-540}" $PY benchmarks/bench_infer.py --gpu-flux "${ARGS[@]}" \
  ${ROWS:+--rows $ROWS} --json "$OUT/bench_infer_flux.json" ${EXTRA:-} 2>&1 | tee "$OUT/bench_infer_flux.txt"
exit "${PIPESTATUS[0]}"
