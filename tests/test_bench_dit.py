"""benchmarks/bench_dit_train.py in its CPU tiny mode: every row runs, the loss curves of ours and diffusers agree,
the MFU arithmetic is right, failures stay inside their row, and our DiT compiles without graph breaks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


def _load_benchmark():
    """benchmarks/ is not a package: load the script by path (registered, so its dataclasses resolve)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dit_train.py"
    spec = importlib.util.spec_from_file_location("bench_dit_train", path)
    module = sys.modules.setdefault("bench_dit_train", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


B = _load_benchmark()

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py


def test_mfu_arithmetic_on_the_issue_numbers():
    macs, params = B.forward_macs(B.bench_config("dit-xl2"))
    assert (macs, params) == (118_621_421_568, 674_834_720)  # the paper's 118.6 GMAC and 675M
    assert B.mfu(macs, 450, 788e12) == pytest.approx(0.4065, abs=1e-4)  # diffusers eager on the H200: 41%
    assert B.mfu(macs, 614, 788e12) == pytest.approx(0.5546, abs=1e-4)  # compiled: 55%
    assert B.mfu(macs, 700, 788e12) > 0.63  # the target


def test_matmul_peak_is_a_plausible_rate():
    assert 1e8 < B.matmul_peak(torch.device("cpu"), n=64, reps=2, rounds=2) < 1e14


def test_tiny_run_has_every_row_and_matching_loss_curves(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "r" / "bench.json"
    args = B.parse_args(["--tiny", "--device", "cpu", "--peak-tflops", "0.05", "--json", str(out)])
    res = B.run(args)
    assert [r["name"] for r in res["rows"]] == ["ours:eager", "diffusers:eager"]
    assert all(r["error"] is None and r["img_s"] > 0 and r["batch"] == 4 for r in res["rows"])
    (check,) = res["loss_checks"]
    assert check["precision"] == "fp32" and len(check["ours"]) == len(check["diffusers"]) == 3
    assert check["max_rel_diff"] < 1e-4
    saved = json.loads(out.read_text())
    assert saved["rows"] == res["rows"] and saved["macs_per_image"] == res["macs_per_image"]
    table = out.with_suffix(".md").read_text()
    assert "| ours:eager | 4 |" in table and "| diffusers:eager | 4 |" in table and "max relative difference" in table
    row = res["rows"][0]  # the table's MFU is the formula's
    assert row["mfu"] == pytest.approx(B.mfu(res["macs_per_image"], row["img_s"], 0.05e12))


def test_compiled_rows_and_bf16_run_on_cpu():
    pytest.importorskip("diffusers")
    argv = ["--tiny", "--compile", "--compile-backend", "aot_eager", "--precision", "bf16", "--peak-tflops", "1"]
    argv += ["--rows", "ours:blocks+cudnn", "diffusers:blocks", "--loss-precisions", "bf16"]
    res = B.run(B.parse_args(argv))
    assert [r["error"] for r in res["rows"]] == [None] * 2
    assert res["loss_checks"][0]["max_rel_diff"] < 1e-2  # bf16 autocast: same curve up to rounding


def test_ours_traces_as_one_graph_forward_and_backward():
    cfg = B.bench_config(None)
    model = B.Models(cfg, torch.device("cpu"), with_diffusers=False).ours()
    x, t, y, target = B.make_batch(cfg, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    explained = torch._dynamo.explain(model)(x, t, y=y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, t, y=y)
    torch.nn.functional.mse_loss(out.float(), target).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_out_of_memory_halves_the_batch_and_errors_stay_in_their_row(monkeypatch):
    args = B.parse_args(["--tiny", "--batch", "8", "--min-batch", "2"])
    models = B.Models(B.bench_config(None), torch.device("cpu"), with_diffusers=False)

    def fake(row, spec, *_):
        if spec.mode == "compile":
            raise RuntimeError("inductor exploded\nmore detail")
        if row.batch > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if row.batch > 2:  # inductor may wrap the allocator's error
            raise RuntimeError("Triton Error [CUDA]: out of memory")
        row.img_s, row.step_ms, row.mfu = 10.0, 200.0, 0.5

    monkeypatch.setattr(B, "_time_once", fake)
    ok, bad = B.time_row("ours:eager", models, args, 1, 1.0), B.time_row("ours:compile", models, args, 1, 1.0)
    assert ok.batch == 2 and ok.error is None and ok.note == "OOM at batch 8; OOM at batch 4"
    assert bad.error == "RuntimeError: inductor exploded" and bad.img_s is None
    table = B.table([ok, bad], "header")
    assert "| ours:eager | 2 | 10.0 | 200.0 | 50.0% |" in table and "ERROR RuntimeError: inductor exploded" in table
    monkeypatch.setattr(B, "_time_once", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    assert B.time_row("ours:eager", models, args, 1, 1.0).error == "out of memory"


def test_without_diffusers_only_our_rows_run(monkeypatch):
    monkeypatch.setattr(B, "have_diffusers", lambda: False)
    res = B.run(B.parse_args(["--tiny", "--peak-tflops", "1", "--rows", "ours:eager", "diffusers:eager"]))
    assert [r["name"] for r in res["rows"]] == ["ours:eager"] and res["loss_checks"] == []


def test_bad_row_names_are_refused():
    with pytest.raises(SystemExit, match="bad row"):
        B.parse_args(["--rows", "ours:fast"])
    assert B.RowSpec.parse("diffusers:blocks+cudnn+max") == B.RowSpec("diffusers", "blocks", True, True)
