"""Plot a compare_budget.py folder: ShapesEval overall (left) and FID (right) against training compute.

    python scripts/plot_budget.py runs/budget-12 docs/budget-12.png

Lines: each run's quick evaluations during training (`--curve`: a few prompts per task, so noisy); dots: the
final evaluation of summary.json (with its 95% interval as a bar). Pillow only (no plotting library).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (23, 190, 207)]


def panel(draw, box, runs, key, ymax, title):
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0, y0 - 14), title, fill=(0, 0, 0))
    xmax = max(r["train_tmac"] for r in runs) * 1.05

    def at(x, y):
        return x0 + (x1 - x0) * x / xmax, y1 - (y1 - y0) * min(y, ymax) / ymax

    for tick in range(0, int(xmax) + 1, 3):
        draw.text((at(tick, 0)[0] - 4, y1 + 3), str(tick), fill=(0, 0, 0))
    for frac in (0, 0.5, 1):
        draw.text((x0 - 34, at(0, frac * ymax)[1] - 6), f"{frac * ymax:.0f}", fill=(0, 0, 0))
    draw.text(((x0 + x1) / 2 - 50, y1 + 16), "training T multiply-adds", fill=(0, 0, 0))
    for i, r in enumerate(runs):
        c = COLOURS[i % len(COLOURS)]
        if key == "overall" and r.get("curve"):
            pts = [at(t, s) for t, s in r["curve"]]
            draw.line(pts, fill=c, width=1)
        y = r["scores"]["overall"] if key == "overall" else (r["fid"] or 0)
        cx, cy = at(r["train_tmac"], y)
        if key == "overall":
            lo, hi = r["ci"]["overall"]
            draw.line([at(r["train_tmac"], lo), at(r["train_tmac"], hi)], fill=c, width=2)
        cx += (i - len(runs) / 2) * 4  # keep same-budget dots apart
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=c)


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    runs = json.loads((folder / "summary.json").read_text())
    for r in runs:
        log = folder / r["run"] / "eval.jsonl"
        if log.exists():
            rows = [json.loads(x) for x in log.read_text().splitlines()]
            r["curve"] = [(q["train_macs"] / 1e12, 100 * q["scores"]["overall"]) for q in rows]
    img = Image.new("RGB", (900, 380), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    panel(draw, (60, 30, 420, 300), runs, "overall", 40, "ShapesEval overall (%)")
    panel(draw, (500, 30, 860, 300), runs, "fid", max(r["fid"] or 0 for r in runs) * 1.1, "FID, Shapes features")
    for i, r in enumerate(runs):
        draw.rectangle([60 + 280 * (i % 3), 336 + 16 * (i // 3), 70 + 280 * (i % 3), 346 + 16 * (i // 3)],
                       fill=COLOURS[i % len(COLOURS)])  # fmt: skip
        draw.text((75 + 280 * (i % 3), 334 + 16 * (i // 3)), r["run"], fill=(0, 0, 0))
    img.save(out)
    print(out)


if __name__ == "__main__":
    main()
