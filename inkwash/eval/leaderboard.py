"""The ShapesEval leaderboard: one row per evaluation run, sorted and written as text, markdown and HTML.

Owns finding `result.json` files (schema "inkwash-eval/1") under folders, flattening each into a row of
COLUMNS, sorting rows by any column (missing values last), and formatting them: an aligned terminal table,
a GitHub markdown table, and a self-contained HTML page whose table sorts by clicking a column header.
Never loads a model.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from inkwash.errors import UserError
from inkwash.eval.shapeseval import GENEVAL_TASKS

FORMATS = ("inkwash-eval/1",)  # result.json formats this module reads
RESULT_NAME = "result.json"
TASK_COLUMNS = GENEVAL_TASKS
SCORE_COLUMNS = ("overall", *TASK_COLUMNS, "paraphrase")
COLUMNS = ("run", "model", "sampler", "steps", "guidance", *SCORE_COLUMNS, "fid", "kid", "s_per_image", "date")
TEXT_COLUMNS = ("run", "model", "sampler", "date")
DESCENDING = (*SCORE_COLUMNS, "date")  # higher is better (and newest first); everything else ascending


# ------------------------------------------------------------------------------------------------ collect


def _num(x) -> float | int | None:
    """x if it is a finite number, else None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return x if math.isfinite(x) else None


def _mean(entry) -> float | None:
    return _num(entry.get("mean")) if isinstance(entry, Mapping) else _num(entry)


def _section(result: Mapping, key: str) -> Mapping:
    v = result.get(key)
    return v if isinstance(v, Mapping) else {}


def _text(x) -> str | None:
    return None if x is None or x == "" else str(x)


def result_row(result: Mapping, run: str) -> dict:
    """The leaderboard row of one result dict; absent values are None."""
    model, settings, scores = _section(result, "model"), _section(result, "settings"), _section(result, "scores")
    fid, timing = _section(result, "fid"), _section(result, "timing")
    row = {
        "run": run,
        "model": _text(model.get("name")),
        "sampler": _text(settings.get("sampler")),
        "steps": _num(settings.get("steps")),
        "guidance": _num(settings.get("guidance")),
    }
    for col in SCORE_COLUMNS:
        row[col] = _mean(scores.get(col))
    row["fid"] = _num(fid.get("fid"))
    row["kid"] = _num(fid.get("kid"))
    row["s_per_image"] = _num(timing.get("seconds_per_image"))
    row["date"] = _text(result.get("date"))
    return row


def _result_files(path: Path) -> list[tuple[Path, str]]:
    """(result.json, run name) under path: the folder relative to path, or path's own name."""
    if path.is_file():
        return [(path, path.resolve().parent.name)]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        if RESULT_NAME in filenames:
            rel = Path(dirpath).relative_to(path)
            found.append((Path(dirpath) / RESULT_NAME, path.resolve().name if rel == Path(".") else rel.as_posix()))
    return found


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def collect(paths: list[str | Path]) -> list[dict]:
    """One row per result.json found under each path (recursively; a path may be a result.json itself).

    Rows hold COLUMNS plus "path" (the result file). Unreadable or foreign JSON files are skipped with a
    warning on stderr naming the file; a path that does not exist is a UserError.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    rows = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"No such file or folder: {p}.")
        for file, run in _result_files(p):
            try:
                result = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                _warn(f"skipping {file}: not readable JSON ({type(e).__name__}: {e})")
                continue
            fmt = result.get("format") if isinstance(result, dict) else None
            if fmt not in FORMATS:
                what = f"format {fmt!r}" if fmt is not None else "no inkwash-eval format field"
                _warn(f"skipping {file}: not an inkwash evaluation result ({what}; expected {', '.join(FORMATS)})")
                continue
            row = result_row(result, run)
            row["path"] = str(file)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ sort


def _check_columns(columns: Iterable[str] | None) -> list[str]:
    if columns is None:
        return list(COLUMNS)
    columns = [columns] if isinstance(columns, str) else list(columns)
    bad = [c for c in columns if c not in COLUMNS]
    if bad:
        raise UserError(f"Unknown leaderboard column {bad[0]!r}; valid columns are {', '.join(COLUMNS)}.")
    return columns


def _present(v) -> bool:
    return v is not None and v != "" and not (isinstance(v, float) and math.isnan(v))


def sort_rows(rows: list[dict], key: str = "overall", descending: bool | None = None) -> list[dict]:
    """The rows sorted by column `key` (a new list; stable); rows missing the value come last either way.

    By default scores (and date) sort descending, fid, kid, s_per_image, run, model and the settings ascending.
    """
    _check_columns([key])
    if descending is None:
        descending = key in DESCENDING
    have = [r for r in rows if _present(r.get(key))]
    missing = [r for r in rows if not _present(r.get(key))]
    if key in TEXT_COLUMNS:

        def sort_key(r):
            return str(r[key]).casefold()
    else:

        def sort_key(r):  # numbers before anything non-numeric that slipped in
            v = r[key]
            return (0, v, "") if _num(v) is not None else (1, 0, str(v))

    return sorted(have, key=sort_key, reverse=descending) + missing


# ------------------------------------------------------------------------------------------------ format


def format_value(column: str, value) -> str:
    """A cell as text: scores as percentages with one decimal, FID 2 decimals, KID 4, s/image 3; '-' if absent."""
    if not _present(value):
        return "-"
    if _num(value) is None:
        return str(value)
    if column in SCORE_COLUMNS:
        return f"{100 * value:.1f}"
    if column == "fid":
        return f"{value:.2f}"
    if column == "kid":
        return f"{value:.4f}"
    if column == "s_per_image":
        return f"{value:.3f}"
    if column == "guidance":
        return f"{value:g}"
    if column == "steps":
        return f"{value:.0f}"
    return str(value)


def _cells(rows: list[dict], columns: list[str]) -> list[list[str]]:
    return [[format_value(c, r.get(c)) for c in columns] for r in rows]


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """An aligned plain-text table for the terminal: text columns left-aligned, numbers right-aligned."""
    columns = _check_columns(columns)
    body = _cells(rows, columns)
    widths = [max([len(c), *(len(r[i]) for r in body)]) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        out = [
            cell.ljust(w) if col in TEXT_COLUMNS else cell.rjust(w)
            for cell, w, col in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(out).rstrip()

    lines = [line(columns), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in body]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub markdown table of the rows: one header row, one alignment row, one row per run."""
    columns = _check_columns(columns)
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join(":---" if c in TEXT_COLUMNS else "---:" for c in columns) + "|")
    lines += ["| " + " | ".join(_md_cell(x) for x in r) + " |" for r in _cells(rows, columns)]
    return "\n".join(lines) + "\n"


_HTML_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d1d1f; }
table { border-collapse: collapse; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e3e3; white-space: nowrap; }
th { cursor: pointer; user-select: none; border-bottom: 2px solid #999; text-align: left; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
tr:hover td { background: #f5f7fa; }
.note { color: #666; font-size: 13px; }
"""

# Click a header to sort by it (its default direction first, again to flip); empty cells stay last.
_HTML_JS = """
const table = document.querySelector("table"), body = table.tBodies[0], heads = [...table.tHead.rows[0].cells];
heads.forEach((th, i) => th.addEventListener("click", () => {
  const desc = th.classList.contains("desc") ? false : th.classList.contains("asc") ? true : th.dataset.desc === "1";
  const num = th.classList.contains("num"), val = (tr) => tr.cells[i].dataset.v;
  const rows = [...body.rows].sort((a, b) => {
    const x = val(a), y = val(b);
    if (x === "" || y === "") return (x === "") - (y === "");
    const c = num ? Number(x) - Number(y) : x.localeCompare(y);
    return desc ? -c : c;
  });
  heads.forEach((h) => h.classList.remove("asc", "desc"));
  th.classList.add(desc ? "desc" : "asc");
  rows.forEach((tr) => body.appendChild(tr));
}));
"""


def to_html(rows: list[dict], columns: list[str] | None = None, sorted_by: str | None = None) -> str:
    """A self-contained HTML page of the rows; clicking a column header sorts the table by it."""
    columns = _check_columns(columns)
    e = html.escape
    heads = []
    for c in columns:
        cls = ("" if c in TEXT_COLUMNS else "num") + (
            (" desc" if c in DESCENDING else " asc") if c == sorted_by else ""
        )
        heads.append(f'<th class="{cls.strip()}" data-desc="{int(c in DESCENDING)}">{e(c)}</th>')
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            raw = "" if not _present(v) else (repr(float(v)) if _num(v) is not None else str(v).casefold())
            cls = "" if c in TEXT_COLUMNS else ' class="num"'
            cells.append(f'<td{cls} data-v="{e(raw)}">{e(format_value(c, v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = (
        "Scores are percentages (ShapesEval; overall is the mean of the six GenEval tasks, paraphrase beside it); "
        "FID and KID are lower-is-better; s_per_image is sampling seconds per image. Click a header to sort."
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>ShapesEval leaderboard</title>'
        f"<style>{_HTML_CSS}</style></head>\n<body>\n<h1>ShapesEval leaderboard</h1>\n"
        f'<p class="note">{e(note)}</p>\n'
        f"<table><thead><tr>{''.join(heads)}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
        f"<script>{_HTML_JS}</script>\n</body></html>\n"
    )


def write_leaderboard(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write out_dir/leaderboard.md and a self-contained out_dir/leaderboard.html; the rows in the order given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / "leaderboard.md", out_dir / "leaderboard.html"
    md.write_text("# ShapesEval leaderboard\n\n" + to_markdown(rows), encoding="utf-8")
    page.write_text(to_html(rows), encoding="utf-8")
    return md, page
