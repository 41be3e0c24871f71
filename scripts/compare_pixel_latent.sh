#!/usr/bin/env bash
# Pixel vs latent diffusion at equal training compute (issue 5, section 4): the same U-Net (unet-xs, the bundled
# recipe) on Shapes 64x64 pixels and on the f = 4 autoencoder's 16x16x4 latents, each trained for BUDGET
# tera multiply-adds (forward + backward = 3 x the forward's MACs per image), then ShapesEval + FID on both.
#
#   bash scripts/compare_pixel_latent.sh [BUDGET_TMAC=40] [EVAL_LIMIT=20] [CACHE_ITEMS=20000]
#
# Runs both trainings side by side with one thread each (same machine, same wall-clock conditions), resumes
# where a killed run stopped, and prints both runs' folders; `inkwash leaderboard runs/compare-evals` compares.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-40}; LIMIT=${2:-20}; ITEMS=${3:-20000}
PY=.venv/bin/python
VAE=inkwash/assets/shapes-vae-f4.safetensors
export OMP_NUM_THREADS=1
[ -f runs/cache-shapes-64/meta.json ] || $PY -m inkwash.cli cache-latents --vae "$VAE" -o runs/cache-shapes-64 \
  --image-size 64 --items "$ITEMS"
steps_for() {  # optimizer steps that spend BUDGET TMAC on the recipe's network at its data shape
  $PY - "$1" "$BUDGET" <<'PY'
import json, sys
import torch
from inkwash.models.flops import count_flops
from inkwash.models.registry import build_model, config_from_dict, config_to_dict, get_preset
from inkwash.pipeline import load_vae
r, budget = json.load(open(sys.argv[1])), float(sys.argv[2]) * 1e12
side, ch = r["image_size"], 3
if r.get("vae"):
    vae = load_vae(r["vae"]); side //= vae.cfg.downsample; ch = vae.cfg.latent_channels
cfg = {**config_to_dict(get_preset(r["model"])), "in_channels": ch, "out_channels": ch, "context_dim": 384, "y_dim": 384}
with torch.device("meta"):
    net = build_model(config_from_dict(cfg))
    macs = count_flops(net, {"x": torch.zeros(1, ch, side, side), "t": torch.zeros(1),
                             "context": torch.zeros(1, 8, 384), "y": torch.zeros(1, 384)})
print(max(1, int(budget / (3 * macs * r["batch_size"]))))
PY
}
pids=()
for kind in pixel latent; do
  recipe=recipes/compare-$kind-64.json
  steps=$(steps_for "$recipe")
  out=runs/compare-$kind-64
  resume=(); [ -f "$out/state.safetensors" ] && resume=(--resume)
  echo "$kind: $steps steps of batch 32 for $BUDGET TMAC"
  $PY -m inkwash.cli train --config "$recipe" --steps "$steps" "${resume[@]}" > "runs/compare-$kind.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for kind in pixel latent; do
  $PY -m inkwash.cli eval "runs/compare-$kind-64/model.safetensors" --precision bf16 --limit "$LIMIT" \
    -o "runs/compare-evals/$kind" | tail -12
done
