# Sourced by the scripts/gpu_*.sh device checks: the output folder, the Python, diffusers from the carried wheels.
#
# The device image has no diffusers: it is installed from .wheels-dit (made here by scripts/gpu_wheels.sh) when
# that folder is there; without it (or if the install fails) the checks run our rows only. Sets OUT (default
# gpu-out, created) and PY (PYTHON, default python3); exports PYTHONPATH (this checkout first) and PYTHONUNBUFFERED.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .wheels-dit ] && ! $PY -c "import diffusers" 2>/dev/null; then
  { $PY -m pip install --no-index --find-links .wheels-dit diffusers \
    || $PY -m pip install --no-index --find-links .wheels-dit --break-system-packages diffusers; } >"$OUT/pip.log" 2>&1
  tail -2 "$OUT/pip.log"
fi
$PY -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "no diffusers: our rows only"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
