"""Shapes throughput: images/s of `ShapesDataset.batch` at 32, 64 and 128 px (one process, bounded time).

Usage: python benchmarks/bench_shapes.py [--seconds 3] [--batch 256]
"""

from __future__ import annotations

import argparse
import time

from inkwash.data.shapes import ShapesDataset


def bench(size: int, batch: int, seconds: float) -> tuple[float, float]:
    """-> (images/s of batch(), scenes/s of scene() alone) over about `seconds`."""
    ds = ShapesDataset(size=size, seed=0)
    ds.batch(range(batch))  # warm the mask caches
    n, start, i = 0, time.perf_counter(), batch
    while time.perf_counter() - start < seconds:
        ds.batch(range(i, i + batch))
        n, i = n + batch, i + batch
    images_per_s = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for j in range(i, i + 2000):
        ds.scene(j)
    return images_per_s, 2000 / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    print(f"{'size':>6} {'images/s':>10} {'scenes/s':>10}")
    for size in (32, 64, 128):
        ips, sps = bench(size, args.batch, args.seconds)
        print(f"{size:>6} {ips:>10.0f} {sps:>10.0f}")


if __name__ == "__main__":
    main()
