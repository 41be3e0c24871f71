"""Benchmark: a model sampled through onnxruntime (its `inkwash export-onnx` graphs) vs PyTorch eager.

Both sides run the same Pipeline (sampler, guidance, seeds); rounds alternate the two and the median is kept.
Prints seconds per image (text encoding, every denoising step with classifier-free guidance, decoding) and the
largest pixel difference between the two sides' images.
Usage: python benchmarks/bench_onnx.py [--model FILE] [--onnx FOLDER] [--steps 20] [--n 1] [--rounds 5]
       [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    from inkwash.accel.onnx import export_onnx
    from inkwash.pipeline import load

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="an inkwash model file (default: the bundled LCM student)")
    ap.add_argument("--onnx", default=None, help="its export folder (default: export into a temporary folder)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=1, help="images per generate call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    eager = load(args.model)
    folder = args.onnx
    if folder is None:
        folder = tempfile.mkdtemp(prefix="inkwash-onnx-")
        t0 = time.perf_counter()
        export_onnx(eager, folder)
        print(f"export: {time.perf_counter() - t0:.1f} s -> {folder}")
    ort = load(folder)
    prompts = ["a red circle above a blue square"] * args.n
    kw = dict(steps=args.steps, seed=0)
    times: dict[str, list[float]] = {"torch eager": [], "onnxruntime": []}
    images = {}
    for r in range(args.rounds + 1):  # round 0 warms both up
        for name, pipe in (("torch eager", eager), ("onnxruntime", ort)):
            t0 = time.perf_counter()
            images[name] = pipe.generate(prompts, **kw)
            if r:
                times[name].append((time.perf_counter() - t0) / args.n)
    s = eager.settings(steps=args.steps)
    print(f"{eager.name}: {s.sampler}, {s.steps} steps, guidance {s.guidance}, {args.n} image(s) per call, "
          f"{args.threads} thread(s), median of {args.rounds}")  # fmt: skip
    base = statistics.median(times["torch eager"])
    print(f"{'':14} {'s/image':>8} {'speed-up':>9}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:14} {m:8.3f} {base / m:8.2f}x   (min {min(ts):.3f}, max {max(ts):.3f})")
    a, b = ((images[k] + 1) * 127.5 for k in times)
    print(f"largest pixel difference: {(a - b).abs().max().item():.3f} grey levels")


if __name__ == "__main__":
    main()
