"""What a ShapesEval run costs: seconds per image split into text encoding, denoising, decoding to uint8,
judging and PNG writing, measured on a subset and extrapolated to the full set (or run in full).

Usage: python benchmarks/bench_eval.py [--model PATH] [--prompts 64] [--per-prompt 4] [--batch 16]
                                       [--precision bf16] [--full]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from inkwash.data.base import to_uint8_hwc
from inkwash.eval.judge import Judge
from inkwash.eval.shapeseval import load_prompts
from inkwash.pipeline import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=64, help="prompts measured (spread over all tasks)")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--full", action="store_true", help="measure every prompt instead of extrapolating")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = ap.parse_args()
    pipe, judge = load(args.model), Judge()
    prompts = load_prompts()
    total_images = len(prompts) * args.per_prompt
    if not args.full:
        prompts = prompts[:: max(1, len(prompts) // args.prompts)][: args.prompts]
    jobs = [p["prompt"] for p in prompts for _ in range(args.per_prompt)]
    s = pipe.settings()
    t = {"text": 0.0, "denoise": 0.0, "to_uint8": 0.0, "judge": 0.0, "png": 0.0}
    wrapped = pipe.encoder.forward

    def timed_encoder(texts):
        t0 = time.perf_counter()
        out = wrapped(texts)
        t["text"] += time.perf_counter() - t0
        return out

    pipe.encoder.forward = timed_encoder
    for start in range(0, len(jobs), args.batch):
        batch = jobs[start : start + args.batch]
        t0 = time.perf_counter()
        x = pipe.generate(batch, seed=list(range(start, start + len(batch))), precision=args.precision)
        t1 = time.perf_counter()
        arr = to_uint8_hwc(x)
        t2 = time.perf_counter()
        judge(arr)
        t3 = time.perf_counter()
        for a in arr:
            Image.fromarray(a).save(io.BytesIO(), format="PNG")
        t4 = time.perf_counter()
        t["denoise"] += t1 - t0
        t["to_uint8"] += t2 - t1
        t["judge"] += t3 - t2
        t["png"] += t4 - t3
    t["denoise"] -= t["text"]  # generate() includes the text encoder
    n = len(jobs)
    per = {k: v / n for k, v in t.items()}
    whole = sum(per.values())
    print(f"model {pipe.name}: {s.sampler}, {s.steps} steps, guidance {s.guidance}, {pipe.image_size} px, "
          f"batch {args.batch}, {args.precision}, {torch.get_num_threads()} threads; {n} images measured")  # fmt: skip
    print(f"{'part':10} {'ms/image':>9} {'share':>7}")
    for k, v in per.items():
        print(f"{k:10} {1000 * v:9.2f} {100 * v / whole:6.1f}%")
    print(f"{'total':10} {1000 * whole:9.2f}")
    print(f"full ShapesEval ({total_images} images): {whole * total_images / 60:.1f} min estimated")
    print(f"U-Net forwards per image: {s.steps * (2 if s.guidance != 1 else 1)}; "
          f"{np.round(s.steps * (2 if s.guidance != 1 else 1) / per['denoise'], 1)} forwards/s")  # fmt: skip


if __name__ == "__main__":
    main()
