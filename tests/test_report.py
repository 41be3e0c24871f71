"""The ShapesEval HTML report, `describe_reading`, and the leaderboard (collect, sort, text/markdown/HTML)."""

import base64
import copy
import json
import re

import pytest
from PIL import Image

from inkwash.errors import UserError
from inkwash.eval.leaderboard import (
    COLUMNS,
    collect,
    format_table,
    result_row,
    sort_rows,
    to_markdown,
    write_leaderboard,
)
from inkwash.eval.report import FAILURES_PER_TASK, GRID_PROMPTS, describe_reading, write_report

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "paraphrase")
RED_CIRCLE = {"shape": "circle", "colour": "red", "size": "small", "centre": [12.0, 20.5], "half_extent": 3.1,
              "area": 30.2, "confidence": 0.99, "colour_error": 8.0}  # fmt: skip
BLUE_SQUARE = {"shape": "square", "colour": "blue", "size": "large", "centre": [22.4, 8.0], "half_extent": 6.5,
               "area": 160.0, "confidence": 0.97, "colour_error": 5.0}  # fmt: skip


def _result(overall=0.612, fid=12.3, model="shapes-unet", samples=None) -> dict:
    scores = {"overall": {"mean": overall, "lo": 0.58, "hi": 0.641}}
    for i, t in enumerate(TASKS):
        scores[t] = {"mean": 0.5 + i / 100, "lo": 0.4 + i / 100, "hi": 0.6 + i / 100, "prompts": 2, "images": 4}
    return {
        "format": "inkwash-eval/1", "benchmark": "shapeseval-v1", "date": "2026-11-26T05:10:00Z",
        "model": {"name": model, "path": "/models/shapes.safetensors", "parameters": 4648611, "image_size": 32,
                  "arch": "unet", "prediction": "v", "process": "vp"},
        "settings": {"sampler": "dpmpp_2m", "steps": 20, "guidance": 5.0, "schedule": "trailing", "per_prompt": 2,
                     "tasks": list(TASKS), "seed": 0, "fid_images": 500, "features": "shapes"},
        "scores": scores,
        "fid": None if fid is None else {"features": "shapes", "fid": fid, "kid": 0.004, "kid_std": 0.001,
                                         "n_gen": 500, "n_ref": 2000},
        "timing": {"images": 28, "seconds_per_image": 0.31, "sampling_s": 600.1, "judge_s": 5.2, "total_s": 640.0},
        "machine": {"device": "cpu", "cpu": "AMD EPYC", "threads": 2, "torch": "2.13.0"},
        "samples": [] if samples is None else samples,
    }  # fmt: skip


def _run_dir(tmp_path, name="run"):
    """A run folder with a tiny PNG per sample: per task two prompts of two images; the second prompt fails."""
    run = tmp_path / name
    (run / "images").mkdir(parents=True)
    samples = []
    for t_i, task in enumerate(TASKS):
        for p in range(2):
            pid = f"{task}-{p:03d}"
            for k in range(2):
                image = f"images/{pid}-{k}.png"
                Image.new("RGB", (32, 32), (t_i * 30, p * 100, k * 200)).save(run / image)
                correct = p == 0
                reading = {"size": 32, "background": "white", "objects": [RED_CIRCLE, BLUE_SQUARE] if k == 0 else []}
                samples.append({"id": pid, "task": task, "prompt": f"{task} prompt {p}", "k": k, "seed": 1000 + k,
                                "image": image, "correct": correct, "reading": reading})  # fmt: skip
    return run, _result(samples=samples)


# ------------------------------------------------------------------------------------------------ describe_reading


def test_describe_reading_sentences():
    reading = {"size": 32, "background": "white", "objects": [RED_CIRCLE, BLUE_SQUARE]}
    assert describe_reading(reading) == "small red circle at (12, 20), large blue square at (22, 8) on white"
    assert describe_reading({"size": 32, "background": "black", "objects": [BLUE_SQUARE]}) == (
        "large blue square at (22, 8) on black"
    )
    assert describe_reading({"size": 32, "background": "white", "objects": []}) == "nothing"
    assert describe_reading(None) == "nothing"
    assert describe_reading({"objects": [{"shape": "star", "colour": "cyan"}]}) == "cyan star"


# ------------------------------------------------------------------------------------------------ report


def test_report_has_scores_fid_timing_and_model(tmp_path):
    run, result = _run_dir(tmp_path)
    path = write_report(result, run)
    assert path == run / "report.html" and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert "shapes-unet" in text and "dpmpp_2m" in text and "20 steps" in text and "guidance 5" in text
    assert "61.2 (58.0–64.1)" in text
    for i, task in enumerate(TASKS):
        assert f"{50 + i:.1f} ({40 + i:.1f}–{60 + i:.1f})" in text, task
    order = [text.index(f"<td>{t}</td>") for t in ("overall", *TASKS)]
    assert order == sorted(order)  # overall first, paraphrase last
    assert "12.30" in text and "0.0040 ± 0.0010" in text
    assert "0.310" in text and "600.1" in text and "5.2" in text and "640.0" in text
    assert "4,648,611" in text and "AMD EPYC" in text and "2.13.0" in text


def test_report_embeds_images_and_is_self_contained(tmp_path):
    run, result = _run_dir(tmp_path)
    text = write_report(result, run).read_text(encoding="utf-8")
    uris = re.findall(r'src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', text)
    n_samples, n_failures = len(result["samples"]), sum(not s["correct"] for s in result["samples"])
    assert len(uris) == n_samples + n_failures  # every image in the grid, failures again in the gallery
    first = result["samples"][0]["image"]
    assert base64.b64decode(uris[0].split(",", 1)[1]) == (run / first).read_bytes()
    assert not re.search(r"https?://", text)
    assert "<script" not in text and "<link" not in text
    assert re.findall(r'src="([^"]*)"', text) == uris  # no other sources
    assert "image-rendering: pixelated" in text


def test_report_failure_gallery_shows_what_the_judge_read(tmp_path):
    run, result = _run_dir(tmp_path)
    text = write_report(result, run).read_text(encoding="utf-8")
    failures = text.split("<h2>Failures</h2>", 1)[1]
    for task in TASKS:
        assert f"{task} prompt 1" in failures
        assert f"{task} prompt 0" not in failures  # correct prompts are not failures
    assert "read: small red circle at (12, 20), large blue square at (22, 8) on white" in failures
    assert "read: nothing" in failures
    assert failures.count('class="thumb bad"') == len(TASKS) * 2
    assert 'class="thumb ok"' in text.split("<h2>Failures</h2>", 1)[0]


def test_report_survives_missing_images_and_limits_the_grid(tmp_path):
    run, result = _run_dir(tmp_path)
    (run / result["samples"][0]["image"]).unlink()
    result["samples"][1]["image"] = "../../outside.png"  # outside the run folder: never read
    result["samples"][2]["image"] = None
    (run / "images" / "junk.png").write_text("not a png")
    result["samples"][3]["image"] = "images/junk.png"
    many = []
    for p in range(GRID_PROMPTS + 3):
        for k in range(2):
            many.append({"id": f"counting-{100 + p}", "task": "counting", "prompt": f"<b>{p} circles</b>", "k": k,
                         "image": "images/none.png", "correct": False, "reading": None})  # fmt: skip
    result["samples"] += many
    result["fid"] = None
    text = write_report(result, run).read_text(encoding="utf-8")
    assert text.count("missing</div>") >= 4 + len(many)
    assert "not computed" in text
    assert "<b>0 circles</b>" not in text and "&lt;b&gt;0 circles&lt;/b&gt;" in text
    grid = text.split("<h2>Failures</h2>", 1)[0].split('id="samples-counting"', 1)[1].split("<h3", 1)[0]
    assert grid.count('class="prompt"') == GRID_PROMPTS
    gallery = text.split('id="failures-counting"', 1)[1].split("<h3", 1)[0]
    assert gallery.count('class="fail"') == FAILURES_PER_TASK


def test_report_of_a_sparse_result(tmp_path):
    path = write_report({"format": "inkwash-eval/1", "model": {"name": "m"}, "scores": {}}, tmp_path / "new")
    text = path.read_text(encoding="utf-8")
    assert "not computed" in text and "No samples recorded" in text


# ------------------------------------------------------------------------------------------------ leaderboard


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for name, overall, fid, model in (("a", 0.55, 20.0, "small"), ("b", 0.70, 30.0, "big"), ("c", 0.62, None, "mid")):
        d = root / "2026" / name if name == "c" else root / name
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(_result(overall=overall, fid=fid, model=model)))
    (root / "broken").mkdir()
    (root / "broken" / "result.json").write_text("{not json")
    (root / "foreign").mkdir()
    (root / "foreign" / "result.json").write_text(json.dumps({"format": "something-else/2"}))
    (root / "a" / "other.json").write_text("{}")  # not a result.json: ignored
    return root


def test_collect_skips_broken_and_foreign_with_a_warning(runs, capsys):
    rows = collect([runs])
    err = capsys.readouterr().err
    assert sorted(r["run"] for r in rows) == ["2026/c", "a", "b"]
    assert str(runs / "broken" / "result.json") in err
    assert str(runs / "foreign" / "result.json") in err
    b = next(r for r in rows if r["run"] == "b")
    assert b["model"] == "big" and b["sampler"] == "dpmpp_2m" and b["steps"] == 20 and b["guidance"] == 5.0
    assert b["overall"] == 0.70 and b["paraphrase"] == pytest.approx(0.56) and b["counting"] == pytest.approx(0.52)
    assert b["fid"] == 30.0 and b["kid"] == 0.004 and b["s_per_image"] == 0.31 and b["date"] == "2026-11-26T05:10:00Z"
    assert set(COLUMNS) <= set(b)
    assert next(r for r in rows if r["run"] == "2026/c")["fid"] is None


def test_collect_accepts_a_result_file_and_rejects_missing_paths(runs, tmp_path):
    rows = collect([runs / "a" / "result.json"])
    assert [r["run"] for r in rows] == ["a"]
    with pytest.raises(UserError, match="No such file or folder"):
        collect([tmp_path / "nowhere"])


def test_sort_rows(runs):
    rows = collect([runs])
    assert [r["run"] for r in sort_rows(rows)] == ["b", "2026/c", "a"]  # overall, descending
    assert [r["run"] for r in sort_rows(rows, "overall", descending=False)] == ["a", "2026/c", "b"]
    assert [r["run"] for r in sort_rows(rows, "fid")] == ["a", "b", "2026/c"]  # ascending, missing last
    assert [r["run"] for r in sort_rows(rows, "fid", descending=True)] == ["b", "a", "2026/c"]
    assert [r["model"] for r in sort_rows(rows, "model")] == ["big", "mid", "small"]
    with pytest.raises(UserError, match=r"Unknown leaderboard column 'speed'; valid columns are run, model, .*date\."):
        sort_rows(rows, "speed")


def test_format_table_and_markdown(runs):
    rows = sort_rows(collect([runs]))
    table = format_table(rows, ["run", "model", "overall", "fid", "kid", "s_per_image"])
    lines = table.splitlines()
    assert lines[0].split() == ["run", "model", "overall", "fid", "kid", "s_per_image"]
    assert len(lines) == 2 + len(rows)
    assert lines[2].split() == ["b", "big", "70.0", "30.00", "0.0040", "0.310"]
    assert lines[3].split() == ["2026/c", "mid", "62.0", "-", "-", "0.310"]
    ends = {len(line) for line in lines[1:]}  # numbers right-aligned: all rows end at the same column
    assert len(ends) == 1
    assert "guidance" in format_table(rows)  # all columns by default
    with pytest.raises(UserError, match="Unknown leaderboard column"):
        format_table(rows, ["run", "bogus"])

    md = to_markdown(rows).splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |"
    assert re.fullmatch(r"\|(:---|---:)(\|(:---|---:))*\|", md[1])
    assert len(md) == 2 + len(rows)
    assert md[2].startswith("| b | big | dpmpp_2m | 20 | 5 | 70.0 |")


def test_write_leaderboard(runs, tmp_path):
    rows = sort_rows(collect([runs]))
    md, page = write_leaderboard(rows, tmp_path / "out")
    assert md.name == "leaderboard.md" and page.name == "leaderboard.html"
    assert md.read_text().count("\n| ") == 1 + len(rows)
    text = page.read_text(encoding="utf-8")
    assert "<script>" in text and "addEventListener" in text and text.count("<th ") == len(COLUMNS)
    assert text.split("<tbody>", 1)[1].count("<tr>") == len(rows)
    assert not re.search(r"https?://", text)


def test_result_row_tolerates_missing_sections():
    result = copy.deepcopy(_result())
    del result["timing"], result["fid"], result["scores"]["paraphrase"]
    row = result_row(result, "x")
    assert row["s_per_image"] is None and row["fid"] is None and row["paraphrase"] is None
