"""Step caching and quantization, speed against quality: for each model and setting (a cache such as deepcache:3
or fbcache:0.2, or a quantization mode such as int8-dynamic), the speed-up (CPU time on one thread) and the change
in ShapesEval and FID against the same model as it is, as a markdown table.

    python scripts/cache_report.py --out runs/cache-full \
        --model unet=inkwash/assets/shapes-unet.safetensors --cache unet=deepcache:2 --cache unet=deepcache:3 \
        --model dit=runs/budget-12/dit-shapes-latent/model.safetensors --cache dit=fbcache:0.1 --cache dit=fbcache:0.2 \
        [--baseline unet=evals/shapes-unet-dpmpp_2m-20-g5] [--limit N] [--fid 500] [--workers 1]

Quality: `inkwash eval MODEL [--cache|--quantize SETTING] -o OUT/NAME-SETTING` for the model as it is and with each
setting
(resumable: finished evaluations are read back, an interrupted one continues), each with the model's default
sampler, steps and guidance. `--baseline NAME=FOLDER` reuses an earlier uncached evaluation of the same model
and protocol. Every run draws the same prompts and seeds, so the change in ShapesEval is a paired difference
(`paired_difference`): its interval is far narrower than the runs' own intervals, narrow enough to resolve the
issue's "at most 1 point lost" on the full protocol. "agree" is the share of images whose verdict is unchanged.

Speed: `bench_step_cache.run` on the first `--speed-images` prompts, each setting and no cache alternately for
`--rounds` rounds, best round, in process CPU time on one thread (a shared machine barely moves it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "benchmarks")]

from bench_step_cache import run as timed_run  # noqa: E402
from distill_report import evaluate  # noqa: E402

from inkwash.accel.fast import accelerate  # noqa: E402
from inkwash.accel.quant import MODES  # noqa: E402
from inkwash.eval.runner import _read_done  # noqa: E402
from inkwash.eval.shapeseval import TASKS, load_prompts, paired_difference  # noqa: E402
from inkwash.pipeline import load  # noqa: E402


def verdicts(folder: Path, keys: set | None = None) -> dict[str, np.ndarray]:
    """bool [prompts, images] per task from an evaluation folder's samples, ordered by (prompt id, k)."""
    done = _read_done(folder)
    keys = set(done) if keys is None else keys
    out = {}
    for task in TASKS:
        mine = sorted(k for k in keys if done[k]["task"] == task)
        if mine:
            per_prompt = len({k for i, k in mine if i == mine[0][0]})
            out[task] = np.array([done[k]["correct"] for k in mine]).reshape(-1, per_prompt)
    return out


def flags(setting: str) -> tuple[str, str]:
    """The `inkwash eval` option of a setting: a quantization mode or a step cache."""
    return ("--quantize", setting) if setting in MODES else ("--cache", setting)


def speeds(model: str, settings: list[str], images: int, rounds: int) -> dict[str | None, tuple[float, float]]:
    """{setting: (best CPU s/image, share of full rows)} with None for the model as it is."""
    plain = load(model)
    pipes = {}
    for mode in (s for s in settings if s in MODES):
        pipes[mode] = load(model)
        accelerate(pipes[mode], quantize_mode=mode)
    prompts = [q["prompt"] for q in load_prompts()][:images]
    best: dict[str | None, tuple[float, float]] = {}
    timed_run(plain, prompts[:1], None)  # warm-up
    for _ in range(rounds):
        for c in [None, *settings]:
            pipe, cache = (pipes[c], None) if c in pipes else (plain, c)
            s, _, full = timed_run(pipe, prompts, cache)
            if c not in best or s / len(prompts) < best[c][0]:
                best[c] = (s / len(prompts), full)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the evaluations and report.md")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=FILE")
    ap.add_argument(
        "--cache",
        action="append",
        required=True,
        metavar="NAME=SETTING",
        help="a step cache (deepcache:3, fbcache:0.2) or a quantization mode (int8, int8-dynamic)",
    )
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--fid", type=int, default=500)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts of each task (default: all)")
    ap.add_argument("--speed-images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true", help="leave the speed columns empty")
    a = ap.parse_args()
    torch.set_num_threads(1)
    models = dict(s.split("=", 1) for s in a.model)
    baselines = {k: Path(v) for k, v in (s.split("=", 1) for s in a.baseline)}
    caches: dict[str, list[str]] = {}
    for spec in a.cache:
        name, setting = spec.split("=", 1)
        if name not in models:
            raise SystemExit(f"--cache {spec}: no --model {name}=FILE")
        caches.setdefault(name, []).append(setting)
    a.out.mkdir(parents=True, exist_ok=True)
    lines = ["| model | cache | CPU s/image | speed-up | full rows | ShapesEval | Δ ShapesEval, paired (95% CI) "
             "| agree | FID | Δ FID |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, model in models.items():
        settings = caches.get(name, [])
        folders = {c: a.out / f"{name}-{c.replace(':', '-')}" for c in settings}
        folders[None] = baselines.get(name, a.out / f"{name}-none")
        base = evaluate(Path(model), None, folders[None], a.workers, a.fid, a.limit)
        runs = {c: evaluate(Path(model), None, folders[c], a.workers, a.fid, a.limit, flags(c)) for c in settings}
        speed = {} if a.skip_speed else speeds(model, settings, a.speed_images, a.rounds)
        base_done = set(_read_done(folders[None]))
        for c in [None, *settings]:
            r = base if c is None else runs[c]
            o, fid = r["scores"]["overall"], (r.get("fid") or {}).get("fid", float("nan"))
            s, full = speed.get(c, (float("nan"), float("nan")))
            score = f"{100 * o['mean']:.1f} ({100 * o['lo']:.1f}–{100 * o['hi']:.1f})"
            cells = [name, c or "none", f"{s:.3f}", f"{speed[None][0] / s:.2f}×" if speed else "—",
                     f"{100 * full:.0f}%" if speed else "—", score]  # fmt: skip
            if c is None:
                cells += ["—", "—", f"{fid:.1f}", "—"]
            else:
                keys = base_done & set(_read_done(folders[c]))
                d = paired_difference(verdicts(folders[None], keys), verdicts(folders[c], keys))
                do = d["overall"]
                base_fid = (base.get("fid") or {}).get("fid", float("nan"))
                cells += [
                    f"{100 * do['mean']:+.1f} ({100 * do['lo']:+.1f}, {100 * do['hi']:+.1f})",
                    f"{100 * d['agree']:.0f}%",
                    f"{fid:.1f}",
                    f"{fid - base_fid:+.1f}",
                ]
            cells = [x.replace("+nan", "—").replace("nan", "—") for x in cells]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    (a.out / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
