"""Benchmark: step caching (First-Block Cache, TeaCache, DeepCache) against no cache, as CPU seconds per image.

    OMP_NUM_THREADS=1 python benchmarks/bench_step_cache.py MODEL --caches deepcache:2 deepcache:3 [--images 8]
        [--rounds 3] [--steps N]

Samples the first `--images` ShapesEval prompts (one image each, the model's default sampler, steps and guidance,
batched classifier-free guidance) once per cache and once without, round after round, and keeps each setting's
best round. Time is the process's CPU time on one thread, not the wall clock, so other work on a shared machine
barely moves it. Prints s/image, the speed-up over no cache, the share of rows that ran the whole network, and
how far the images moved (mean and max absolute difference in [-1, 1] units). Never gates anything on a time.
"""

from __future__ import annotations

import argparse
import time

import torch

from inkwash.eval.shapeseval import load_prompts
from inkwash.pipeline import load


def run(pipe, prompts: list[str], cache: str | None) -> tuple[float, torch.Tensor, float]:
    """(CPU seconds, images, share of full rows) of one batch."""
    run = pipe.prepare(prompts, seed=list(range(len(prompts))), cache=cache)
    t = time.process_time()
    with torch.no_grad():
        x = run()
    seconds = time.process_time() - t
    log = getattr(run.model.denoiser.net, "log", None)
    rows = run.x.shape[0] * (2 if run.model.guided else 1)
    return seconds, x, (sum(log) / (rows * len(log)) if log else 1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="an inkwash model file (default: the bundled model)")
    p.add_argument("--caches", nargs="+", required=True)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load(args.model)
    if args.steps:
        pipe.sampling.steps = args.steps
    prompts = [q["prompt"] for q in load_prompts()][: args.images]
    settings = [None, *args.caches]
    best = {c: float("inf") for c in settings}
    images, full = {}, {}
    run(pipe, prompts[:1], None)  # warm-up
    for _ in range(args.rounds):
        for c in settings:
            s, images[c], full[c] = run(pipe, prompts, c)
            best[c] = min(best[c], s / len(prompts))
    s = pipe.sampling
    print(f"{pipe.name}: {s.sampler}, {s.steps} steps, guidance {s.guidance}, {len(prompts)} images, "
          f"torch {torch.__version__}, 1 thread, best of {args.rounds} rounds (CPU time)")  # fmt: skip
    print("| cache | s/image | speed-up | full rows | mean abs diff | max abs diff |\n|---|---|---|---|---|---|")
    for c in settings:
        d = (images[c] - images[None]).abs()
        print(f"| {c or 'none'} | {best[c]:.3f} | {best[None] / best[c]:.2f}x | {100 * full[c]:.0f}% | "
              f"{d.mean().item():.4f} | {d.max().item():.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
