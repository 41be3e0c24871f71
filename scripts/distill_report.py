"""Quality against sampling steps for distilled students and their teacher: full ShapesEval + FID for each, a
markdown table with the compute each distillation took, and a plot (Pillow only).

    python scripts/distill_report.py --out runs/distill-report --teacher inkwash/assets/shapes-unet.safetensors \
        --teacher-steps 50 20 --student lcm=runs/lcm --student progressive=runs/pd --student reflow=runs/rf \
        --steps 1 2 4 8 --workers 2 --plot docs/distill-steps.png

Each evaluation is `inkwash eval MODEL --steps N -o OUT/NAME-N` (resumable: finished ones are read back, an
interrupted one continues). MODEL is the student trained for N steps (`inkwash.train.distill.student_for_steps`:
progressive's stage-N student, reflow's student before its one-step stage for N > 1, else the run's student).
Students sample with their own defaults (sampler, guidance, schedule) and only the
step count changes; the teacher with its own defaults (sampler, CFG) at each of `--teacher-steps`.

Compute of a distillation, in network forward passes per training image (a backward counts as two forwards, so a
student training step is 3) times the network's multiply-adds per forward at the training size:
- lcm: teacher 2 (one DDIM step with CFG, cond + uncond) + EMA target 1 + student 3 = 6;
- progressive: teacher 2 DDIM steps, each 2 forwards with CFG (the first stage) or 1 (later stages: the previous
  student, no CFG) + student 3 = 7 or 5;
- reflow: pair generation `pair_steps` solver steps with CFG (2 forwards each) per pair, then 3 per training image
  in the reflow and one-step stages.
Wall time is summed from each stage's metrics (images per second at each logged step).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from inkwash.train.distill import student_for_steps

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"teacher": (0, 0, 0), "lcm": (31, 119, 180), "progressive": (255, 127, 14), "reflow": (44, 160, 44)}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "paraphrase")


def evaluate(
    model: Path, steps: int | None, out: Path, workers: int, fid: int, limit: int | None, extra: tuple[str, ...] = ()
) -> dict:
    """The eval's result.json (running `inkwash eval` first unless it finished before)."""
    result = out / "result.json"
    if not result.exists():
        cmd = [sys.executable, "-m", "inkwash.cli", "eval", str(model), "--workers", str(workers), "--fid", str(fid),
               "-o", str(out), *extra]  # fmt: skip
        cmd += ["--steps", str(steps)] if steps else []
        cmd += ["--limit", str(limit)] if limit else []
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(result.read_text())


def stage_cost(folder: Path, forwards: float, macs: float, batch: int) -> tuple[float, float, int]:
    """(T multiply-adds, wall seconds, optimizer steps) of one trainer run from its metrics.jsonl."""
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "images_per_s" in r]
    seconds, prev, steps = 0.0, 0, 0
    for r in rows:
        seconds += (r["step"] - prev) * batch / max(r["images_per_s"], 1e-9)
        prev = steps = r["step"]
    return steps * batch * forwards * macs / 1e12, seconds, steps


def distill_cost(run: Path, macs: float) -> dict:
    """Compute and wall time of a distillation run folder (see the module's doc for the forward counts)."""
    spec = json.loads((run / "distill.json").read_text())
    method, batch = spec["method"], spec["train"].get("batch_size", 8)
    stages, tmac, secs, steps = [], 0.0, 0.0, 0
    if method == "lcm":
        stages = [(run / "lcm", 6)]
    elif method == "progressive":
        folders = sorted((p for p in run.glob("stage-*") if p.is_dir()), key=lambda p: -int(p.name.split("-")[1]))
        stages = [(p, 7 if i == 0 else 5) for i, p in enumerate(folders)]
    elif method == "reflow":
        pairs, pair_steps = spec["pairs"], spec["pair_steps"]
        tmac += pairs * pair_steps * 2 * macs / 1e12
        stages = [(run / "reflow", 3)] + ([(run / "onestep", 3)] if (run / "onestep").exists() else [])
    for folder, forwards in stages:
        if (folder / "metrics.jsonl").exists():
            t, s, n = stage_cost(folder, forwards, macs, batch)
            tmac, secs, steps = tmac + t, secs + s, steps + n
    return {"method": method, "tmac": tmac, "train_s": secs, "steps": steps, "batch": batch, "stages": len(stages)}


def row(name: str, result: dict, steps: int, cost: str) -> str:
    s, fid = result["scores"], result.get("fid") or {}
    cells = [f"{100 * s[t]['mean']:.1f}" for t in TASKS]
    o, settings, per_image = s["overall"], result["settings"], result["timing"]["seconds_per_image"]
    head = f"| {name} | {settings['sampler']} | {steps} | {settings['guidance']:g} | "
    overall = f"**{100 * o['mean']:.1f}** ({100 * o['lo']:.1f}–{100 * o['hi']:.1f}) | "
    return head + overall + " | ".join(cells) + f" | {fid.get('fid', float('nan')):.1f} | {per_image:.3f} | {cost} |"


def plot(path: Path, series: dict[str, list[tuple[int, dict]]], teacher: list[tuple[int, dict]]) -> None:
    img = Image.new("RGB", (900, 360), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    all_steps = sorted({n for pts in series.values() for n, _ in pts} | {n for n, _ in teacher})
    fid_max = max(r["fid"]["fid"] for pts in [*series.values(), teacher] for _, r in pts) * 1.1

    def panel(box, key, ymax, title):
        x0, y0, x1, y1 = box
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((x0, y0 - 14), title, fill=(0, 0, 0))

        def at(i, y):  # steps on a log2 axis: one slot per step count
            return x0 + 20 + (x1 - x0 - 40) * i / max(len(all_steps) - 1, 1), y1 - (y1 - y0) * min(y, ymax) / ymax

        for i, n in enumerate(all_steps):
            draw.text((at(i, 0)[0] - 4, y1 + 3), str(n), fill=(0, 0, 0))
        for frac in (0, 0.5, 1):
            draw.text((x0 - 30, at(0, frac * ymax)[1] - 6), f"{frac * ymax:.0f}", fill=(0, 0, 0))
        draw.text(((x0 + x1) / 2 - 40, y1 + 16), "sampling steps", fill=(0, 0, 0))
        for name, pts in [*series.items(), ("teacher", teacher)]:
            c = COLOURS.get(name, (128, 128, 128))
            xy = [at(all_steps.index(n), value(r, key)) for n, r in pts]
            if len(xy) > 1:
                draw.line(xy, fill=c, width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)

    best = max(value(r, "overall") for pts in [*series.values(), teacher] for _, r in pts)
    panel((60, 30, 420, 290), "overall", 10 * (best // 10 + 1), "ShapesEval overall (%)")
    panel((500, 30, 860, 290), "fid", fid_max, "FID, Shapes features (lower is better)")
    for i, name in enumerate([*series, "teacher"]):
        draw.rectangle([60 + 200 * i, 326, 70 + 200 * i, 336], fill=COLOURS.get(name, (128, 128, 128)))
        draw.text((75 + 200 * i, 324), name, fill=(0, 0, 0))
    img.save(path)


def value(result: dict, key: str) -> float:
    return 100 * result["scores"]["overall"]["mean"] if key == "overall" else result["fid"]["fid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the evaluations and report.md")
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--teacher-steps", dest="teacher_steps", type=int, nargs="+", default=[50])
    ap.add_argument("--student", action="append", default=[], metavar="NAME=RUN_FOLDER")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fid", type=int, default=500)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts of each task (default: all)")
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    teacher = [(n, evaluate(a.teacher, n, a.out / f"teacher-{n}", a.workers, a.fid, a.limit)) for n in a.teacher_steps]
    macs = teacher[0][1]["model"]["macs_per_step"]
    header = ("| model | sampler | steps | guidance | ShapesEval overall | " + " | ".join(TASKS) +
              " | FID | s/image | distillation compute |")  # fmt: skip
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    lines += [row("teacher", r, n, "—") for n, r in teacher]
    series, costs = {}, {}
    for spec in a.student:
        name, folder = spec.split("=", 1)
        run = Path(folder)
        cost = costs[name] = distill_cost(run, macs)
        text = f"{cost['tmac']:.1f} T MACs, {cost['steps']} steps × {cost['batch']}, {cost['train_s'] / 60:.0f} min"
        method = json.loads((run / "distill.json").read_text())["method"]
        models = {n: student_for_steps(run, method, n)[1] for n in a.steps}  # progressive: each stage's student
        series[name] = [(n, evaluate(models[n], n, a.out / f"{name}-{n}", a.workers, a.fid, a.limit)) for n in a.steps]
        lines += [row(name, r, n, text) for n, r in series[name]]
    report = "\n".join(lines) + "\n"
    (a.out / "report.md").write_text(report)
    (a.out / "costs.json").write_text(json.dumps(costs, indent=1))
    print(report)
    if a.plot:
        plot(a.plot, series, teacher)
        print(a.plot)


if __name__ == "__main__":
    main()
