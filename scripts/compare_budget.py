"""Train several recipes at equal training compute, then evaluate each with ShapesEval + FID, and print one table.

    python scripts/compare_budget.py --budget 12 --limit 10 recipes/compare-pixel-64.json recipes/compare-latent-64.json

Each recipe trains for the optimizer steps that spend `--budget` tera multiply-adds on its own network at its own
data shape (forward + backward = 3 x the forward's MACs per training image, counted on the meta device), in
`runs/budget-<B>/<recipe name>/`. Runs go `--jobs` at a time with one thread each (the same conditions for every
run), a killed run resumes from its last checkpoint, and finished runs and evaluations are reused. `--refiner
BASE:REFINER_RECIPE:STEPS` also trains a refiner from BASE's weights on the low-noise part (the recipe's
time_sampling_args) and evaluates the pair. `--curve K` runs a quick ShapesEval K times during each run (the
trainer's eval_every: score against training compute, in each run's eval.jsonl). Writes `summary.json` and
`summary.md` in the budget folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inkwash.train.trainer import TrainConfig, macs_per_training_image  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def plan(recipe: Path, budget_tmac: float, folder: Path, steps: int | None = None) -> dict:
    """A run of `recipe` spending `budget_tmac` (or exactly `steps` optimizer steps when given)."""
    cfg = TrainConfig.from_dict(json.loads(recipe.read_text()))
    macs = macs_per_training_image(cfg)
    steps = steps or max(1, int(budget_tmac * 1e12 / (3 * macs * cfg.batch_size * cfg.grad_accum)))
    return {"name": recipe.stem, "recipe": str(recipe), "model": cfg.model if isinstance(cfg.model, str) else "dict",
            "macs_per_image": macs, "steps": steps, "batch": cfg.batch_size * cfg.grad_accum,
            "out": str(folder / recipe.stem)}  # fmt: skip


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    if code:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {code}); see {log}")


def train(p: dict, extra: list[str] = ()) -> None:
    out = Path(p["out"])
    if (out / "model.safetensors").exists() and _steps_done(out) >= p["steps"]:
        return
    resume = ["--resume"] if (out / "state.safetensors").exists() else []
    curve = ["--set", f"eval_every={max(1, p['steps'] // p['curve'])}"] if p.get("curve") else []
    cmd = [PY, "-m", "inkwash.cli", "train", "--config", p["recipe"], "--steps", str(p["steps"]),
           "--output-dir", str(out), "--set", f"checkpoint_every={max(1, p['steps'] // 10)}", "--set", "sample_every=0",
           *curve, *extra, *resume]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    run(cmd, out.parent / f"{out.name}.log")


def _steps_done(out: Path) -> int:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def train_speed(out: Path) -> float:
    """Median training images/s over the run's logged intervals."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(r["images_per_s"] for r in rows if "images_per_s" in r)
    return speeds[len(speeds) // 2] if speeds else float("nan")


def evaluate(model: Path, out: Path, limit: int, fid: int, extra: list[str] = ()) -> dict:
    if not (out / "result.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [PY, "-m", "inkwash.cli", "eval", str(model), "--limit", str(limit), "--fid", str(fid), "-o", str(out),
               *extra]  # fmt: skip
        run(cmd, out.parent / f"{out.name}.log")
    return json.loads((out / "result.json").read_text())


def row(name: str, p: dict, result: dict) -> dict:
    fid = result.get("fid") or {}
    return {"run": name, "model": p["model"], "macs_per_image": p["macs_per_image"], "steps": p["steps"],
            "images": p["steps"] * p["batch"], "train_images_per_s": train_speed(Path(p["out"])),
            "train_tmac": round(3 * p["macs_per_image"] * p["steps"] * p["batch"] / 1e12, 2),
            "scores": {k: round(100 * v["mean"], 1) for k, v in result["scores"].items()},
            "ci": {k: [round(100 * v["lo"], 1), round(100 * v["hi"], 1)] for k, v in result["scores"].items()},
            "fid": fid.get("fid"), "kid": fid.get("kid"),
            "sample_s_per_image": result["timing"]["seconds_per_image"]}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    tasks = [t for t in rows[0]["scores"] if t != "overall"]
    head = ["run", "model", "MMAC/img", "steps", "TMAC", "train img/s", "overall", *tasks, "FID", "sample s/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o, (lo, hi) = r["scores"]["overall"], r["ci"]["overall"]
        cells = [r["run"], r["model"], f"{r['macs_per_image'] / 1e6:,.0f}", str(r["steps"]), f"{r['train_tmac']:g}",
                 f"{r['train_images_per_s']:.1f}", f"**{o}** ({lo}-{hi})", *[str(r["scores"][t]) for t in tasks],
                 f"{r['fid']:.1f}" if r["fid"] is not None else "-", f"{r['sample_s_per_image']:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", type=Path)
    ap.add_argument("--budget", type=float, default=12.0, help="tera multiply-adds of training per recipe")
    ap.add_argument("--limit", type=int, default=10, help="ShapesEval prompts per task")
    ap.add_argument("--fid", type=int, default=500, help="images for FID (0: none)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    ap.add_argument("--curve", type=int, default=0, help="quick ShapesEvals during each run (score vs compute)")
    ap.add_argument(
        "--refiner",
        action="append",
        default=[],
        metavar="BASE:RECIPE:STEPS",
        help="train RECIPE for STEPS from BASE's final weights, then evaluate BASE + refiner",
    )
    ap.add_argument("--handoff", type=float, default=0.8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    folder = args.out or ROOT / "runs" / f"budget-{args.budget:g}"
    folder.mkdir(parents=True, exist_ok=True)
    plans = [plan(r, args.budget, folder) for r in args.recipes]
    for p in plans:
        p["curve"] = args.curve
        print(f"{p['name']}: {p['macs_per_image'] / 1e6:,.0f} M MACs/image -> {p['steps']} steps of {p['batch']}",
              flush=True)  # fmt: skip
    t = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, plans))
    print(f"trained in {time.time() - t:.0f} s", flush=True)

    jobs = [(p["name"], p, Path(p["out"]) / "model.safetensors", folder / "evals" / p["name"], []) for p in plans]
    by_name = {p["name"]: p for p in plans}
    for spec in args.refiner:
        base, recipe, steps = spec.split(":")
        b = by_name[base]
        rp = {**plan(Path(recipe), 0, folder, steps=int(steps)), "curve": 0}
        train(rp, ["--set", f"init_from={Path(b['out']) / 'model.safetensors'}"])
        name = f"{base}+{rp['name']}@{args.handoff:g}"
        extra = ["--refiner", str(Path(rp["out"]) / "model.safetensors"), "--handoff", str(args.handoff)]
        jobs.append((name, b, Path(b["out"]) / "model.safetensors", folder / "evals" / name, extra))
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: evaluate(j[2], j[3], args.limit, args.fid, j[4]), jobs))
    rows = [row(name, p, r) for (name, p, *_), r in zip(jobs, results)]
    (folder / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    (folder / "summary.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
