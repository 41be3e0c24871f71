"""ShapesEval of a model file on the GPU (or the CPU when there is none): `inkwash eval` without the CLI.

Usage: PYTHONPATH=. python scripts/gpu_eval.py MODEL OUT_DIR [--limit N] [--fid N] [--batch-size N]
Same library calls and defaults as `inkwash eval` (the model's sampling defaults, 4 images per prompt,
FID/KID on 500 images), but the pipeline is loaded onto `--device` (default: cuda when available).
Images start from CPU-seeded noise, so only the network's arithmetic differs from a CPU evaluation; compare
models evaluated on the same device.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from inkwash.eval.runner import EvalConfig, evaluate
from inkwash.eval.shapeseval import TASKS
from inkwash.pipeline import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--fid", type=int, default=500)
    p.add_argument("--per-prompt", dest="per_prompt", type=int, default=4)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    pipe = load(a.model, device=a.device)
    cfg = EvalConfig(per_prompt=a.per_prompt, tasks=TASKS, limit=a.limit, batch_size=a.batch_size,
                     fid_images=a.fid, precision=a.precision)  # fmt: skip
    result = evaluate(pipe, Path(a.out), cfg)
    for name, v in result["scores"].items():
        print(f"{name:14} {100 * v['mean']:5.1f}  ({100 * v['lo']:.1f}-{100 * v['hi']:.1f})")
    if result["fid"]:
        print(f"{'FID':14} {result['fid']['fid']:.2f}   KID {result['fid']['kid']:.4f}")
    t = result["timing"]
    print(f"{t['images']} images in {t['total_s']:.1f} s on {result['machine']}")


if __name__ == "__main__":
    main()
