"""Copy a trained model file into the package as the bundled default, with its sampling defaults.

Usage: .venv/bin/python scripts/bundle.py runs/bundled/model.safetensors
The sampling defaults written are the recipe's (recipes/bundled.json), so the shipped file is exactly
what `inkwash train --config recipes/bundled.json` writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from inkwash.formats.checkpoint import load_model_file, save_model, strip_prefix
from inkwash.pipeline import BUNDLED

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "bundled.json"


def main(src: str) -> None:
    meta, tensors = load_model_file(src)
    meta["sampling"] = json.loads(RECIPE.read_text())["sampling"]
    parts = {p: strip_prefix(tensors, p) for p in ("model", "text_encoder")}
    save_model(BUNDLED, {p: sd for p, sd in parts.items() if sd}, meta)
    step = meta["train_args"].get("step")
    print(f"{BUNDLED} ({BUNDLED.stat().st_size / 1e6:.1f} MB, step {step}, sampling {meta['sampling']})")


if __name__ == "__main__":
    main(*sys.argv[1:])
