"""Copy a trained model file into the package as the bundled teacher, with its sampling defaults (the default
model is its LCM student, `inkwash distill --config recipes/distill-lcm.json`, copied as is).

Usage: .venv/bin/python scripts/bundle.py runs/bundled/model.safetensors [--recipe R] [--output FILE]
The sampling defaults written are the recipe's (default recipes/bundled.json), so the shipped file is exactly
what `inkwash train --config RECIPE` writes. `--output` writes elsewhere than the package's bundled model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from inkwash.formats.checkpoint import load_model_file, save_model, strip_prefix
from inkwash.pipeline import BUNDLED_TEACHER

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "bundled.json"


def main(src: str, recipe: Path = RECIPE, dest: Path = BUNDLED_TEACHER) -> None:
    meta, tensors = load_model_file(src)
    meta["sampling"] = json.loads(Path(recipe).read_text())["sampling"]
    parts = {p: strip_prefix(tensors, p) for p in ("model", "text_encoder")}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_model(dest, {p: sd for p, sd in parts.items() if sd}, meta)
    step = meta["train_args"].get("step")
    print(f"{dest} ({dest.stat().st_size / 1e6:.1f} MB, step {step}, sampling {meta['sampling']})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Bundle a trained model file with its recipe's sampling defaults.")
    ap.add_argument("src")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--output", type=Path, default=BUNDLED_TEACHER)
    a = ap.parse_args()
    main(a.src, a.recipe, a.output)
