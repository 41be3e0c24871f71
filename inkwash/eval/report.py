"""The HTML report of one ShapesEval run: scores, FID/KID, timing, model and machine, samples and failures.

Owns turning a result dict (schema "inkwash-eval/1") and its run folder into one self-contained
`report.html`: inline CSS, images embedded as base64 data URIs, no external requests, no script. Also owns
`describe_reading`, the human sentence for what the judge read in an image, which the CLI prints too.
Needs only the standard library; reads the result dict and image files, never the model or the judge.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping
from pathlib import Path

from inkwash.eval.shapeseval import GENEVAL_TASKS, TASKS

EXTRA_TASKS = tuple(t for t in TASKS if t not in GENEVAL_TASKS)  # reported beside "overall", not in it
GRID_PROMPTS = 12  # prompts shown per task in the sample grid
FAILURES_PER_TASK = 24  # incorrect images shown per task in the failure gallery
THUMB_PX = 96  # displayed side of a sample image

_IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))

_CSS = f"""
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #1d1d1f; background: #fff; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }}
h2 {{ font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }}
h3 {{ font-size: 15px; margin: 20px 0 6px; }}
.sub {{ color: #555; margin-top: 0; }}
table {{ border-collapse: collapse; margin: 8px 0; }}
th, td {{ padding: 3px 12px 3px 0; text-align: left; vertical-align: top; }}
th {{ border-bottom: 1px solid #bbb; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.overall td {{ font-weight: 600; }}
tr.beside td {{ color: #444; font-style: italic; }}
table.kv th {{ border: none; font-weight: 500; color: #555; padding-right: 16px; }}
.prompt {{ margin: 6px 0 12px; }}
.row {{ display: flex; flex-wrap: wrap; gap: 6px; }}
.caption {{ font-size: 13px; margin-bottom: 3px; }}
.caption .frac {{ color: #666; }}
.thumb {{ width: {THUMB_PX}px; height: {THUMB_PX}px; image-rendering: pixelated; object-fit: contain;
          border: 3px solid #999; box-sizing: content-box; display: block; background: #f4f4f4; }}
.ok {{ border-color: #2e9e44; }}
.bad {{ border-color: #d13b3b; }}
.missing {{ display: flex; align-items: center; justify-content: center; text-align: center; font-size: 11px;
            color: #777; background: repeating-linear-gradient(45deg, #eee, #eee 6px, #f8f8f8 6px, #f8f8f8 12px); }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.fail {{ width: {THUMB_PX + 90}px; font-size: 12px; }}
.fail .thumb {{ margin-bottom: 3px; }}
.fail .read {{ color: #a02020; }}
.note {{ color: #666; font-size: 13px; }}
"""


# ------------------------------------------------------------------------------------------------ formatting


def _num(x) -> float | None:
    """x as a finite float, or None for missing, non-numeric or NaN/inf values."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _pct(x) -> str:
    x = _num(x)
    return "–" if x is None else f"{100 * x:.1f}"


def _score_text(entry) -> str:
    """'61.2 (58.0–64.1)' from {"mean", "lo", "hi"} (fractions), or just '61.2' without an interval."""
    if not isinstance(entry, Mapping):
        return _pct(entry)
    text = _pct(entry.get("mean"))
    lo, hi = _num(entry.get("lo")), _num(entry.get("hi"))
    if lo is not None and hi is not None:
        text += f" ({100 * lo:.1f}–{100 * hi:.1f})"
    return text


def _fmt(x, spec: str = "", missing: str = "–") -> str:
    x = _num(x)
    return missing if x is None else format(x, spec)


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _px(v) -> str:
    v = _num(v)
    return "?" if v is None else f"{v:.0f}"


def describe_reading(reading: Mapping | None) -> str:
    """What the judge read, as a sentence: 'small red circle at (12, 20), large blue square at (22, 8) on white'.

    `reading` is a judge reading as a dict (`Reading.to_dict()`): "background" and "objects", each object with
    "size", "colour", "shape" and "centre" (x, y in px). No objects (or no reading) gives 'nothing'.
    """
    if not isinstance(reading, Mapping):
        return "nothing"
    objects = reading.get("objects") or []
    parts = []
    for obj in objects:
        if not isinstance(obj, Mapping):
            continue
        words = (obj.get("size"), obj.get("colour") or obj.get("color"), obj.get("shape") or "object")
        text = " ".join(str(w) for w in words if w)
        centre = obj.get("centre", obj.get("center"))
        if isinstance(centre, list | tuple) and len(centre) == 2:
            text += f" at ({_px(centre[0])}, {_px(centre[1])})"
        parts.append(text)
    if not parts:
        return "nothing"
    text = ", ".join(parts)
    if reading.get("background"):
        text += f" on {reading['background']}"
    return text


# ------------------------------------------------------------------------------------------------ images


class _Images:
    """Reads sample images from the run folder as data URIs, once each; None where missing or not an image."""

    def __init__(self, run_dir: Path):
        self.root = run_dir.resolve()
        self.cache: dict[str, str | None] = {}

    def uri(self, rel) -> str | None:
        if not isinstance(rel, str) or not rel:
            return None
        if rel not in self.cache:
            self.cache[rel] = self._load(rel)
        return self.cache[rel]

    def _load(self, rel: str) -> str | None:
        path = (self.root / rel).resolve()
        if path != self.root and self.root not in path.parents:  # only files inside the run folder
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        for magic, mime in _IMAGE_TYPES:
            if data.startswith(magic):
                return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
        return None


def _thumb(images: _Images, sample: Mapping, title: str) -> str:
    correct = sample.get("correct")
    cls = "thumb " + ("ok" if correct is True else "bad" if correct is False else "")
    uri = images.uri(sample.get("image"))
    if uri is None:
        return f'<div class="{cls} missing" title="{_e(title)}">image<br>missing</div>'
    return f'<img class="{cls}" src="{uri}" alt="{_e(sample.get("prompt"))}" title="{_e(title)}">'


# ------------------------------------------------------------------------------------------------ sections


def _task_order(names) -> list[str]:
    """GenEval tasks in their order, then any others, then paraphrase."""
    names = list(dict.fromkeys(names))
    known = [t for t in GENEVAL_TASKS if t in names]
    last = [t for t in EXTRA_TASKS if t in names]
    return known + [t for t in names if t not in known and t not in last] + last


def _kv_table(d: Mapping) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, list | tuple):
            v = ", ".join(str(x) for x in v)
        elif isinstance(v, Mapping):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        elif k == "parameters" and isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        rows.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
    return '<table class="kv">' + "".join(rows) + "</table>" if rows else '<p class="note">not recorded</p>'


def _settings_line(settings: Mapping) -> str:
    bits = []
    if settings.get("sampler"):
        bits.append(str(settings["sampler"]))
    if settings.get("steps") is not None:
        bits.append(f"{settings['steps']} steps")
    if _num(settings.get("guidance")) is not None:
        bits.append(f"guidance {settings['guidance']:g}")
    if settings.get("schedule"):
        bits.append(f"{settings['schedule']} schedule")
    if settings.get("per_prompt") is not None:
        bits.append(f"{settings['per_prompt']} images per prompt")
    if settings.get("seed") is not None:
        bits.append(f"seed {settings['seed']}")
    return ", ".join(bits)


def _scores_section(scores: Mapping) -> str:
    if not scores:
        return '<h2>Scores</h2><p class="note">No scores recorded.</p>'
    tasks = _task_order(k for k in scores if k != "overall")
    head = (
        '<tr><th>task</th><th class="num">score % (95% CI)</th><th class="num">prompts</th>'
        '<th class="num">images</th></tr>'
    )
    rows = []
    if "overall" in scores:
        included = [scores[t] for t in GENEVAL_TASKS if isinstance(scores.get(t), Mapping)]
        overall = scores["overall"] if isinstance(scores["overall"], Mapping) else {}
        prompts = overall.get("prompts", sum(_num(s.get("prompts")) or 0 for s in included) if included else None)
        n_images = overall.get("images", sum(_num(s.get("images")) or 0 for s in included) if included else None)
        rows.append(
            f'<tr class="overall"><td>overall</td><td class="num">{_e(_score_text(scores["overall"]))}</td>'
            f'<td class="num">{_fmt(prompts, ".0f")}</td><td class="num">{_fmt(n_images, ".0f")}</td></tr>'
        )
    for t in tasks:
        s = scores[t] if isinstance(scores[t], Mapping) else {"mean": scores[t]}
        cls = ' class="beside"' if t in EXTRA_TASKS else ""
        rows.append(
            f'<tr{cls}><td>{_e(t)}</td><td class="num">{_e(_score_text(s))}</td>'
            f'<td class="num">{_fmt(s.get("prompts"), ".0f")}</td>'
            f'<td class="num">{_fmt(s.get("images"), ".0f")}</td></tr>'
        )
    note = (
        '<p class="note">Overall is the mean of the GenEval tasks present; paraphrase is reported beside it, not in '
        "it. Intervals are 95% bootstrap intervals.</p>"
    )
    return f"<h2>Scores</h2><table>{head}{''.join(rows)}</table>{note}"


def _fid_section(fid) -> str:
    if not isinstance(fid, Mapping) or _num(fid.get("fid")) is None:
        return '<h2>FID / KID</h2><p class="note">not computed</p>'
    kid = _fmt(fid.get("kid"), ".4f")
    if _num(fid.get("kid_std")) is not None:
        kid += f" ± {fid['kid_std']:.4f}"
    rows = [("FID", _fmt(fid.get("fid"), ".2f")), ("KID", kid)]
    if fid.get("features"):
        rows.append(("features", str(fid["features"])))
    rows.append(("generated images", _fmt(fid.get("n_gen"), ".0f")))
    rows.append(("reference images", _fmt(fid.get("n_ref"), ".0f")))
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<h2>FID / KID</h2><table class="kv">{body}</table>'


def _timing_section(timing) -> str:
    if not isinstance(timing, Mapping) or not timing:
        return '<h2>Timing</h2><p class="note">not recorded</p>'
    rows = [("seconds per image", _fmt(timing.get("seconds_per_image"), ".3f"))]
    rows.append(("images", _fmt(timing.get("images"), ".0f")))
    parts = (("sampling", "sampling_s"), ("judge", "judge_s"))
    for label, key in parts:
        rows.append((f"{label} (s)", _fmt(timing.get(key), ".1f")))
    total, known = _num(timing.get("total_s")), [_num(timing.get(k)) for _, k in parts]
    if total is not None and all(v is not None for v in known):
        rows.append(("other (s)", f"{max(total - sum(known), 0.0):.1f}"))
    rows.append(("total (s)", _fmt(total, ".1f")))
    shown = {"seconds_per_image", "images", "total_s"} | {k for _, k in parts}
    rows += [(k, str(v)) for k, v in timing.items() if k not in shown]
    body = "".join(f'<tr><th>{_e(k)}</th><td class="num">{_e(v)}</td></tr>' for k, v in rows)
    return f'<h2>Timing</h2><table class="kv">{body}</table>'


def _by_task_and_prompt(samples: list) -> dict[str, dict[str, list[Mapping]]]:
    """{task: {prompt id: [samples sorted by k]}} in the order the samples came."""
    out: dict[str, dict[str, list[Mapping]]] = {}
    for s in samples:
        if not isinstance(s, Mapping):
            continue
        task = str(s.get("task") or "unknown")
        pid = str(s.get("id") or s.get("prompt") or "?")
        out.setdefault(task, {}).setdefault(pid, []).append(s)
    for prompts in out.values():
        for group in prompts.values():
            group.sort(key=lambda s: _num(s.get("k")) if _num(s.get("k")) is not None else math.inf)
    return out


def _samples_section(grouped: dict, images: _Images) -> str:
    if not grouped:
        return '<h2>Samples</h2><p class="note">No samples recorded.</p>'
    parts = [
        "<h2>Samples</h2>",
        '<p class="note">Green border: the judge found the prompt satisfied; red: not. Hover an image for what '
        "the judge read.</p>",
    ]
    for task in _task_order(grouped):
        prompts = grouped[task]
        shown = list(prompts.items())[:GRID_PROMPTS]
        more = f" (first {len(shown)} of {len(prompts)} prompts)" if len(prompts) > len(shown) else ""
        parts.append(f'<h3 id="samples-{_e(task)}">{_e(task)}{_e(more)}</h3>')
        for _pid, group in shown:
            n_ok = sum(1 for s in group if s.get("correct") is True)
            thumbs = "".join(_thumb(images, s, "read: " + describe_reading(s.get("reading"))) for s in group)
            parts.append(
                f'<div class="prompt"><div class="caption">{_e(group[0].get("prompt"))} '
                f'<span class="frac">({n_ok}/{len(group)})</span></div><div class="row">{thumbs}</div></div>'
            )
    return "".join(parts)


def _failures_section(grouped: dict, images: _Images) -> str:
    parts = ["<h2>Failures</h2>"]
    any_failure = False
    for task in _task_order(grouped):
        fails = [s for group in grouped[task].values() for s in group if s.get("correct") is False]
        if not fails:
            continue
        any_failure = True
        shown = fails[:FAILURES_PER_TASK]
        more = f" (first {len(shown)} of {len(fails)})" if len(fails) > len(shown) else f" ({len(fails)})"
        parts.append(f'<h3 id="failures-{_e(task)}">{_e(task)}{_e(more)}</h3><div class="gallery">')
        for s in shown:
            read = "read: " + describe_reading(s.get("reading"))
            parts.append(
                f'<div class="fail">{_thumb(images, s, read)}<div>{_e(s.get("prompt"))}</div>'
                f'<div class="read">{_e(read)}</div></div>'
            )
        parts.append("</div>")
    if not any_failure:
        parts.append('<p class="note">No incorrect images.</p>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ report


def render_report(result: Mapping, run_dir: str | Path) -> str:
    """The report as one self-contained HTML string (images read from run_dir)."""
    model = result.get("model") if isinstance(result.get("model"), Mapping) else {}
    settings = result.get("settings") if isinstance(result.get("settings"), Mapping) else {}
    machine = result.get("machine") if isinstance(result.get("machine"), Mapping) else {}
    scores = result.get("scores") if isinstance(result.get("scores"), Mapping) else {}
    samples = result.get("samples") if isinstance(result.get("samples"), list) else []
    name = model.get("name") or "unnamed model"
    benchmark = result.get("benchmark") or "ShapesEval"
    title = f"{benchmark} — {name}"
    sub = _settings_line(settings)
    if result.get("date"):
        sub = f"{sub} · {result['date']}" if sub else str(result["date"])
    grouped = _by_task_and_prompt(samples)
    images = _Images(Path(run_dir))
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(sub)}</p>' if sub else "",
        _scores_section(scores),
        _fid_section(result.get("fid")),
        _timing_section(result.get("timing")),
        "<h2>Model</h2>",
        _kv_table(model),
        "<h2>Settings</h2>",
        _kv_table(settings),
        "<h2>Machine</h2>",
        _kv_table(machine),
        _samples_section(grouped, images),
        _failures_section(grouped, images),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )


def write_report(result: dict, run_dir: str | Path) -> Path:
    """Write run_dir/report.html, one self-contained file, from the result dict and run_dir's images."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(result, run_dir), encoding="utf-8")
    os.replace(tmp, path)
    return path
