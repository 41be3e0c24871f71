"""`--fast` and `--quantize` (inkwash.accel.fast): the plan per device, the network it builds against the eager one,
and what generate and eval record (PNG parameters, evaluation identity)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inkwash
from inkwash.accel.fast import Plan, accelerate, apply, plan_for
from inkwash.accel.quant import QuantLinear
from inkwash.cli import main
from inkwash.errors import UserError
from inkwash.eval.runner import EvalConfig, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plan_per_device(monkeypatch):
    assert plan_for("cpu") == Plan(compile=True)
    assert plan_for("mps") == Plan()  # nothing measured there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert plan_for("cuda") == Plan(precision="bf16", quantize="fp8", compile=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert plan_for("cuda") == Plan(precision="bf16", compile=True)
    assert Plan(precision="bf16", quantize="fp8", compile=True).label() == "compile, bf16, fp8"
    assert Plan().label() == "none"


@pytest.mark.slow
def test_compiled_channels_last_network_matches_eager(lively_model_file):
    pipe = inkwash.load(lively_model_file)
    ref = pipe.generate("a red circle", seed=3)
    net = apply(pipe.net, Plan(channels_last=True, compile=True), backend="aot_eager")  # inductor: the benchmark
    assert net is not pipe.net and net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pipe.net = net
    torch.testing.assert_close(pipe.generate("a red circle", seed=3), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dynamic, graphs", [(False, 3), (True, 2)])
def test_a_server_compiles_for_any_batch_size_rather_than_one_graph_per_size(lively_model_file, dynamic, graphs):
    """`serve --fast` compiles with dynamic shapes: batches of 2, 4 and 6 rows cost two compilations (the first
    shape, then one graph for every size) where static shapes cost one per size."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    pipe, counter = inkwash.load(lively_model_file), CompileCounter()
    net = apply(pipe.net, Plan(compile=True), backend=counter, dynamic=dynamic)
    ctx = torch.randn(1, 3, pipe.net.cfg.context_dim)
    with torch.no_grad():
        for b in (2, 4, 6):
            x = torch.randn(b, pipe.channels, 16, 16)
            torch.testing.assert_close(net(x, torch.full((b,), 500.0), context=ctx.expand(b, -1, -1)),
                                       pipe.net(x, torch.full((b,), 500.0), context=ctx.expand(b, -1, -1)))  # fmt: skip
    assert counter.frame_count == graphs
    torch._dynamo.reset()


def test_generate_quantized_records_it_in_the_png(lively_model_file, tmp_path, capsys):
    out = tmp_path / "q.png"
    code = main(["generate", "a red circle", "--model", str(lively_model_file), "--quantize", "int8", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).text["parameters"].endswith(", Quantize: int8")
    float_img = inkwash.load(lively_model_file)("a red circle")[0]
    diff = np.abs(np.asarray(Image.open(out), dtype=float) - np.asarray(float_img, dtype=float))
    assert 0 < diff.mean() < 3  # grey levels: changed, slightly


def test_accelerate_quantizes_and_labels(lively_model_file):
    pipe = inkwash.load(lively_model_file)
    plan = accelerate(pipe, quantize_mode="int8-dynamic")
    assert plan == Plan(quantize="int8-dynamic") and pipe.accel == {"Quantize": "int8-dynamic"}
    assert any(isinstance(m, QuantLinear) for m in pipe.net.modules())
    with pytest.raises(UserError, match="unknown quantization"):
        accelerate(inkwash.load(lively_model_file), quantize_mode="int3")


def test_eval_identity_records_quantization(lively_model_file, tmp_path):
    cfg = dict(limit=1, per_prompt=1, fid_images=0, batch_size=8, tasks=("colors",))
    result = evaluate(inkwash.load(lively_model_file), tmp_path, EvalConfig(**cfg, quantize="int8"), progress=False,
                      report=False)  # fmt: skip
    identity = json.loads((tmp_path / "identity.json").read_text())
    assert identity["quantize"] == "int8" and identity["fast"] is False
    assert result["settings"]["quantize"] == "int8"
    with pytest.raises(UserError, match="other settings"):  # the float model's images are not these
        evaluate(inkwash.load(lively_model_file), tmp_path, EvalConfig(**cfg), progress=False, report=False)


def test_eval_cli_names_the_run_after_the_quantization(lively_model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["eval", str(lively_model_file), "--limit", "1", "--per-prompt", "1", "--fid", "0", "--tasks", "colors",
                 "--quantize", "int8-dynamic"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "evals" / "tiny-euler-3-g2-int8-dynamic" / "result.json").is_file()


@pytest.mark.slow
def test_gpu_infer_script_falls_back_to_a_tiny_cpu_run(tmp_path):
    """scripts/gpu_infer.sh without a GPU: the FLUX benchmark's rows on mmdit-tiny, each timed, none failed."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the script runs FLUX.1 at full size")
    pytest.importorskip("diffusers")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "LIMIT_S": "1500"}
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_infer.sh")], env=env, capture_output=True, text=True, timeout=1600
    )  # fmt: skip (generous limits: a CPU shared with training runs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "bench_infer_flux.json").read_text())
    assert res["preset"] == "mmdit-tiny" and res["tflop_per_step"] > 0 and res["peak_tflops"] > 0
    names = [r["name"] for r in res["rows"]]
    assert names == ["diffusers eager", "ours eager", "ours teacache:0.4 28 steps", "ours fp8"]
    timed = [r for r in res["rows"] if "teacache" not in r["name"]]
    assert all("error" not in r and r["ms"] > 0 and 0 < r["mfu"] < 1 for r in timed), res["rows"]
    gen = res["rows"][2]  # a whole generation through TeaCache: timed, and some calls skipped the blocks
    assert "error" not in gen and gen["seconds"] > 0 and 1 <= gen["computed"] < gen["steps"] == 28, gen
    assert res["max_abs_diff"] < 1e-4  # same weights, same network


def test_info_counts_the_architecture_whatever_its_storage(lively_model_file):
    pipe = inkwash.load(lively_model_file)
    before = pipe.info()["parameters"]
    accelerate(pipe, quantize_mode="int8")
    float_net = inkwash.load(lively_model_file).net
    assert pipe.info()["parameters"] == before == sum(p.numel() for p in float_net.parameters())


def test_quantize_refuses_weights_already_stored_another_way(lively_model_file):
    pipe = inkwash.load(lively_model_file).set_memory(dtype="bf16")
    with pytest.raises(UserError, match="without --dtype and --offload"):
        accelerate(pipe, quantize_mode="int8")
