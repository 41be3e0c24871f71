#!/usr/bin/env bash
# Fills .wheels-dit with diffusers 0.42.1 and the dependencies the device image lacks, as wheels for its Python
# (3.12, manylinux x86_64), so that the GPU checks can install diffusers there offline (scripts/gpu_setup.sh).
# Idempotent; about 40 MB, carried with run(..., carry=[".wheels-dit"]). Needs PyPI, so run it here, not there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -m pip download -q -d .wheels-dit --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  diffusers==0.42.1 huggingface_hub safetensors regex importlib_metadata zipp filelock requests
du -sh .wheels-dit
