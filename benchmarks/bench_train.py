"""Training throughput of the one loop: optimizer steps/s and images/s per model, size and precision.

    .venv/bin/python benchmarks/bench_train.py [--steps 10] [--presets unet-tiny unet-s] [--sizes 32]

Prints a table; never fails on a time.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from inkwash.train import trainer as T


def bench(preset: str, size: int, batch: int, precision: str, steps: int, out: str) -> tuple[float, float]:
    cfg = T.TrainConfig(
        model=preset,
        text_encoder={"name": "small", "dim": 64, "layers": 2, "heads": 4},
        image_size=size,
        batch_size=batch,
        steps=steps + 2,
        precision=precision,
        output_dir=out,
        sample_prompts=(),
    )
    tr = T.Trainer(cfg)
    tr.net.train()
    bins = torch.zeros(2, T.LOSS_BINS, dtype=torch.float64)
    for _ in range(2):  # warm-up: allocator, kernels, caches
        tr.train_step(bins)
    if tr.device.type == "cuda":
        torch.cuda.synchronize(tr.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step(bins)
    if tr.device.type == "cuda":
        torch.cuda.synchronize(tr.device)
    dt = time.perf_counter() - t0
    return steps / dt, steps * tr.global_batch / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["unet-tiny", "unet-s"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[32])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}, batch {args.batch}, {args.steps} timed steps after 2 warm-up steps")
    print(f"{'model':<12}{'size':>6}{'precision':>11}{'steps/s':>10}{'images/s':>10}")
    for preset in args.presets:
        for size in args.sizes:
            for precision in args.precisions:
                with tempfile.TemporaryDirectory() as out:
                    sps, ips = bench(preset, size, args.batch, precision, args.steps, out)
                print(f"{preset:<12}{size:>6}{precision:>11}{sps:>10.2f}{ips:>10.1f}")


if __name__ == "__main__":
    main()
