#!/usr/bin/env bash
# Train the bundled model's GPU recipe (recipes/bundled-gpu.json) and evaluate it against the current bundled
# model with the same ShapesEval settings on the same device. Runs without installing inkwash (PYTHONPATH=.).
#
#   OUT=/path/to/out bash scripts/gpu_bundled.sh
#
# Environment (all optional):
#   OUT        where the results go (default gpu-out/): the new model (bundled as scripts/bundle.py does, in
#              parts of 15 MB: join with `cat shapes-unet-gpu.safetensors.part-* > shapes-unet-gpu.safetensors`),
#              results.tar.gz (both evaluations' result.json, metrics.jsonl, sample grid, logs), report-new.html
#              and report-old.html (when under 16 MB)
#   PYTHON     the interpreter (default python3)
#   TRAIN_S    training seconds to size the run for (default 390): steps = TRAIN_S / (measured s per step)
#   STEPS      a fixed step count instead (skips the timing); LIMIT: prompts per task in the evaluations
#              (default all); FID: images for FID/KID (default 500); RUN: the training folder (default a tmp dir)
#   MINILM     folder of the MiniLM weights + tokenizer (default .minilm-fp16 when present, else the package);
#              its model.safetensors may be gzipped (model.safetensors.gz)
#   TRAIN_SET  extra `--set key=value` options for training (space separated), e.g. for a CPU rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
TRAIN_S=${TRAIN_S:-390}
FID=${FID:-500}
RUN=${RUN:-$(mktemp -d /tmp/inkwash-gpu-XXXX)}
RECIPE=recipes/bundled-gpu.json
mkdir -p "$OUT" "$RUN"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOGS=$RUN/logs; mkdir -p "$LOGS"
MINILM=${MINILM:-}
if [ -z "$MINILM" ] && [ -f .minilm-fp16/config.json ]; then MINILM=.minilm-fp16; fi
packed=$(ls "$MINILM"/model.safetensors.{xz,gz} 2>/dev/null | head -1 || true)
if [ -n "$MINILM" ] && [ -n "$packed" ] && [ ! -f "$MINILM/model.safetensors" ]; then
  # The carried copy is compressed (it must fit the 64 MiB that travels); unpack it beside the run.
  mkdir -p "$RUN/minilm" && cp "$MINILM"/*.json "$MINILM"/*.txt "$RUN/minilm/"
  case "$packed" in *.xz) xz -dc "$packed" ;; *) gzip -dc "$packed" ;; esac > "$RUN/minilm/model.safetensors"
  MINILM=$RUN/minilm
fi
[ -n "$MINILM" ] && export INKWASH_MINILM_DIR=$MINILM
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
sets=()
for s in ${TRAIN_SET:-}; do sets+=(--set "$s"); done

stamp "machine: $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"
stamp "shared memory: $(df -h /dev/shm 2>/dev/null | tail -1)"
calibrate() {
  # Time steps of the recipe as it will run (data workers, bf16, text cache) and size the run to TRAIN_S.
  $PY - "$RECIPE" "$RUN/timing" "$TRAIN_S" "${sets[@]}" <<'PY' 2>> "$LOGS/timing.log"
import json, sys, time
import torch
from inkwash.train.trainer import Prefetcher, TrainConfig, Trainer
recipe, out, budget, sets = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[5::2]
def value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
cfg = json.loads(open(recipe).read()) | {k: value(v) for k, v in (s.split("=", 1) for s in sets)}
cfg |= {"output_dir": out, "steps": 100000, "checkpoint_every": 0}
tr = Trainer(TrainConfig.from_dict(cfg))
tr.prefetch = Prefetcher(tr, 100000, tr.cfg.data_workers) if tr.cfg.data_workers else None
bins = torch.zeros(2, 10, dtype=torch.float64)
sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
for _ in range(15):
    tr.train_step(bins)
sync(); t = time.perf_counter(); n = 40
for _ in range(n):
    tr.train_step(bins)
sync(); per = (time.perf_counter() - t) / n
steps = max(50, int(budget / per) // 50 * 50)
print(f"{per * 1000:.1f} ms/step at batch {tr.cfg.batch_size} ({tr.cfg.batch_size / per:.0f} images/s) -> {steps} steps", file=sys.stderr)
print(steps)
if tr.prefetch is not None:
    tr.prefetch.close()
PY
}
if [ -z "${STEPS:-}" ]; then
  if ! STEPS=$(calibrate); then  # e.g. worker processes failing: load data in the loop instead
    tail -5 "$LOGS/timing.log"; stamp "timing failed; again with data_workers=0"
    sets+=(--set data_workers=0); STEPS=$(calibrate)
  fi
  tail -1 "$LOGS/timing.log"
fi
stamp "training $STEPS steps into $RUN/train"
status=0
timeout $(( TRAIN_S + 100 )) $PY -m inkwash.cli train --config "$RECIPE" --steps "$STEPS" --output-dir "$RUN/train" \
  "${sets[@]}" > "$LOGS/train.log" 2>&1 || status=$?
tail -c 2000 "$LOGS/train.log" | tr '\r' '\n' | tail -4
stamp "training exited with $status"
[ -f "$RUN/train/model.safetensors" ] || { echo "no model was written"; exit 1; }
$PY scripts/bundle.py "$RUN/train/model.safetensors" --recipe "$RECIPE" --output "$RUN/shapes-unet-gpu.safetensors"
split -b 15000000 -d "$RUN/shapes-unet-gpu.safetensors" "$OUT/shapes-unet-gpu.safetensors.part-"
sha256sum "$RUN/shapes-unet-gpu.safetensors" | tee "$LOGS/model.sha256"

stamp "evaluating the new and the current bundled model (in parallel)"
ev=(--fid "$FID"); [ -n "${LIMIT:-}" ] && ev+=(--limit "$LIMIT")
$PY scripts/gpu_eval.py "$RUN/shapes-unet-gpu.safetensors" "$RUN/eval-new" "${ev[@]}" > "$LOGS/eval-new.log" 2>&1 &
p1=$!
$PY scripts/gpu_eval.py inkwash/assets/shapes-unet.safetensors "$RUN/eval-old" "${ev[@]}" > "$LOGS/eval-old.log" 2>&1 &
p2=$!
s1=0; s2=0; wait $p1 || s1=$?; wait $p2 || s2=$?
for w in new old; do echo "== $w"; tr '\r' '\n' < "$LOGS/eval-$w.log" | grep -v "it/s\]\|s/it\]" | tail -12; done
stamp "evaluations exited with $s1 $s2"

# Everything small in one archive (the files that come back are few).
files=(logs train/metrics.jsonl)
for f in "$RUN"/train/samples_*.png; do [ -f "$f" ] && files+=("train/$(basename "$f")"); done
for w in new old; do
  for f in result.json identity.json; do [ -f "$RUN/eval-$w/$f" ] && files+=("eval-$w/$f"); done
  r=$RUN/eval-$w/report.html  # beside the archive when it fits what comes back (16 MB a file)
  if [ -f "$r" ] && [ "$(stat -c %s "$r")" -lt 16000000 ]; then cp "$r" "$OUT/report-$w.html"; fi
done
tar -czf "$OUT/results.tar.gz" -C "$RUN" "${files[@]}"
ls -la "$OUT"
stamp "done"
[ "$s1" = 0 ] && [ "$s2" = 0 ]
