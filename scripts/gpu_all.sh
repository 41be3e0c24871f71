#!/usr/bin/env bash
# Every open GPU check in one device call (about 9 minutes): issue 6's DiT-XL/2 training benchmark
# (scripts/gpu_dit.sh), then issue 8's FLUX.1 inference benchmark (scripts/gpu_infer.sh), each under its own time
# limit so that one running long cannot take the other's time. Their JSON files are rewritten after every row,
# so a stopped run still leaves what it measured.
#
#   bash scripts/gpu_wheels.sh    # here first (PyPI): fills .wheels-dit, diffusers for the device
#   run(command="bash scripts/gpu_all.sh", carry=[".wheels-dit"], kind="nvidia-h200", timeout_s=590)
#
# The issues' reference numbers were measured on an H200, so ask for one. Results under $OUT (default gpu-out):
# bench_dit_train.{json,md,txt} and bench_infer_flux.{json,txt}. Environment: DIT_S (default 250) and FLUX_S (290)
# are the two limits in seconds; FLUX_ROWS the FLUX rows in the order they run (ours and diffusers' eager rows
# first, then compiled, then a 28-step TeaCache generation with compiled blocks, then fp8, so the comparison
# survives a cut).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
LIMIT_S=${DIT_S:-250} BUDGET_S=$(( ${DIT_S:-250} - 80 )) bash scripts/gpu_dit.sh; dit=$?
echo "gpu_dit.sh: exit $dit after $(( SECONDS - start )) s"
LIMIT_S=${FLUX_S:-290} ROWS=${FLUX_ROWS:-ours:eager diffusers:eager ours:compiled diffusers:compiled ours:teacache-compiled ours:fp8 ours:fp8-compiled} \
  bash scripts/gpu_infer.sh; flux=$?
echo "gpu_infer.sh: exit $flux after $(( SECONDS - start )) s"
exit $(( dit || flux ))
