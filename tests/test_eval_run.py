"""`inkwash eval`, `inkwash leaderboard` and `train --eval-every` on a tiny untrained model: files, schema,
resuming an interrupted evaluation, refusing a folder of other settings."""

import json

import pytest
import torch

from inkwash.cli import main
from inkwash.errors import UserError
from inkwash.eval.runner import EvalConfig, evaluate, image_seed
from inkwash.eval.shapeseval import GENEVAL_TASKS, TASKS
from inkwash.pipeline import load

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py


QUICK = dict(limit=1, per_prompt=2, fid_images=0, batch_size=5)


def test_eval_writes_result_report_and_images(lively_model_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["eval", str(lively_model_file), "--limit", "1", "--per-prompt", "2", "--fid", "0", "-o", str(out)])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["format"] == "inkwash-eval/1" and result["benchmark"] == "shapeseval-v1"
    assert set(result["scores"]) == {"overall", *TASKS}
    for t in TASKS:
        s = result["scores"][t]
        assert s["lo"] <= s["mean"] <= s["hi"] and s["prompts"] == 1 and s["images"] == 2
    assert len(result["samples"]) == 2 * len(TASKS)
    assert result["settings"]["sampler"] == "euler" and result["settings"]["steps"] == 3  # the model's defaults
    assert result["model"]["parameters"] > 0 and result["timing"]["seconds_per_image"] > 0
    for rec in result["samples"]:
        assert (out / rec["image"]).is_file() and isinstance(rec["correct"], bool)
    assert (out / "report.html").is_file()
    printed = capsys.readouterr().out
    assert "overall" in printed and "s/image" in printed


def test_interrupted_eval_resumes_without_redoing_work(lively_model_file, tmp_path, monkeypatch):
    pipe = load(lively_model_file)
    full = evaluate(pipe, tmp_path / "a", EvalConfig(**QUICK), progress=False, report=False)

    calls = []
    real = pipe.generate

    def counting(prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second batch
        return real(prompts, **kw)

    monkeypatch.setattr(pipe, "generate", counting)
    with pytest.raises(KeyboardInterrupt):
        evaluate(pipe, tmp_path / "b", EvalConfig(**QUICK), progress=False, report=False)
    log = (tmp_path / "b" / "samples.jsonl").read_text().splitlines()
    assert len(log) == 5  # the first batch is on disk
    (tmp_path / "b" / "samples.jsonl").write_text("\n".join(log) + '\n{"id": "cut sh')  # a torn last line
    calls.clear()
    monkeypatch.setattr(pipe, "generate", lambda prompts, **kw: (calls.append(len(prompts)), real(prompts, **kw))[1])
    resumed = evaluate(pipe, tmp_path / "b", EvalConfig(**QUICK), progress=False, report=False)
    assert sum(calls) == 2 * len(TASKS) - 5  # only what was missing
    key = lambda r: (r["id"], r["k"])  # noqa: E731
    a = sorted(full["samples"], key=key)
    b = sorted(resumed["samples"], key=key)
    assert [(r["id"], r["k"], r["seed"]) for r in a] == [(r["id"], r["k"], r["seed"]) for r in b]
    assert resumed["scores"]["overall"]["mean"] == pytest.approx(full["scores"]["overall"]["mean"], abs=0.5)


def test_eval_refuses_a_folder_with_other_settings(lively_model_file, tmp_path):
    pipe = load(lively_model_file)
    evaluate(pipe, tmp_path, EvalConfig(**QUICK, tasks=("colors",)), progress=False, report=False)
    with pytest.raises(UserError, match=r"other settings \(guidance\)"):
        evaluate(pipe, tmp_path, EvalConfig(**QUICK, tasks=("colors",), guidance=7.0), progress=False)
    more = evaluate(pipe, tmp_path, EvalConfig(**{**QUICK, "per_prompt": 3}, tasks=("colors", "counting")),
                    progress=False, report=False)  # fmt: skip
    assert more["scores"]["colors"]["images"] == 3 and more["scores"]["counting"]["images"] == 3


def test_seeds_are_fixed_by_prompt_not_by_task_selection(lively_model_file, tmp_path):
    pipe = load(lively_model_file)
    one = evaluate(pipe, tmp_path / "one", EvalConfig(**QUICK, tasks=("counting",)), progress=False, report=False)
    (rec,) = [r for r in one["samples"] if r["k"] == 1]
    assert rec["seed"] == image_seed(EvalConfig(), 0 + 49 + 70, 1)  # counting starts after 49 + 70 prompts
    assert set(one["scores"]) == {"overall", "counting"}


def test_bad_eval_options_are_one_sentence(lively_model_file, tmp_path, capsys):
    assert main(["eval", str(lively_model_file), "--tasks", "colours", "-o", str(tmp_path)]) == 2
    assert "Unknown ShapesEval task" in capsys.readouterr().err
    assert main(["eval", str(lively_model_file), "--per-prompt", "0", "-o", str(tmp_path)]) == 2
    assert main(["leaderboard", str(tmp_path / "nothing-here")]) == 2


def test_leaderboard_lists_runs(lively_model_file, tmp_path, capsys):
    for g in ("1", "3"):
        args = ["eval", str(lively_model_file), "--limit", "1", "--per-prompt", "1", "--fid", "0", "--guidance", g]
        assert main([*args, "--tasks", *GENEVAL_TASKS[:2], "-o", str(tmp_path / f"g{g}")]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(tmp_path), "--sort", "guidance"]) == 0
    out = capsys.readouterr().out
    assert out.index("g1") < out.index("g3")
    md = (tmp_path / "leaderboard.md").read_text()
    assert md.count("\n|") >= 3 and (tmp_path / "leaderboard.html").is_file()


def test_train_eval_every_logs_scores_against_compute(tmp_path):
    from test_trainer import tiny

    from inkwash.train.trainer import train

    cfg = tiny(tmp_path, steps=2, eval_every=1, eval_prompts=1, sample_every=0)
    train(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[1]["train_macs"] == 2 * recs[0]["train_macs"] > 0
    assert set(recs[0]["scores"]) == {"overall", *TASKS}


def test_train_cli_takes_eval_every(tmp_path, monkeypatch):
    import inkwash.train.trainer as T

    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg, resume=False: seen.setdefault("cfg", cfg) and tmp_path)
    assert main(["train", "--eval-every", "50", "--steps", "100", "--output-dir", str(tmp_path)]) == 0
    assert seen["cfg"].eval_every == 50 and seen["cfg"].steps == 100


def test_bf16_precision_runs_the_network_in_bf16(lively_model_file):
    pipe = load(lively_model_file)
    seen = []
    conv = next(m for m in pipe.net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    a = pipe.generate("a red circle", seed=3)
    b = pipe.generate("a red circle", seed=3, precision="bf16")
    steps = len(seen) // 2
    assert set(seen[:steps]) == {torch.float32} and set(seen[steps:]) == {torch.bfloat16}
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape  # the sampler's state stays float32
    with pytest.raises(UserError, match="unknown precision"):
        pipe.generate("a red circle", precision="fp16")


def test_workers_make_the_same_evaluation(lively_model_file, tmp_path):
    pipe = load(lively_model_file)
    one = evaluate(pipe, tmp_path / "one", EvalConfig(**QUICK), progress=False, report=False)
    two = evaluate(pipe, tmp_path / "two", EvalConfig(**QUICK, workers=2), progress=False, report=False)
    assert sorted((tmp_path / "two").glob("samples-w*.jsonl")) != []
    strip = lambda rs: sorted((r["id"], r["k"], r["seed"], r["correct"], json.dumps(r["reading"])) for r in rs)  # noqa: E731
    assert strip(one["samples"]) == strip(two["samples"])


def test_eval_with_a_refiner_uses_it_and_records_it(lively_model_file, model_file, tmp_path, capsys):
    pipe = load(lively_model_file)
    quick = {**QUICK, "tasks": ("colors",)}
    base = evaluate(pipe, tmp_path / "base", EvalConfig(**quick), progress=False, report=False)
    both = evaluate(pipe, tmp_path / "both", EvalConfig(**quick, refiner=str(model_file), handoff=0.5),
                    progress=False, report=False)  # fmt: skip
    identity = json.loads((tmp_path / "both" / "identity.json").read_text())
    assert identity["handoff"] == 0.5 and len(identity["refiner_sha256"]) == 16
    a = (tmp_path / "base" / "images").glob("*.png")
    changed = [p.name for p in a if p.read_bytes() != (tmp_path / "both" / "images" / p.name).read_bytes()]
    assert changed and len(both["samples"]) == len(base["samples"])
    with pytest.raises(UserError, match="other settings"):  # the same folder with another hand-off
        evaluate(pipe, tmp_path / "both", EvalConfig(**quick, refiner=str(model_file), handoff=0.7), progress=False)
    assert main(["eval", str(lively_model_file), "--refiner", str(tmp_path / "nope.safetensors"), "-o",
                 str(tmp_path / "c")]) == 2  # fmt: skip
    assert "refiner file" in capsys.readouterr().err.lower()
    with pytest.raises(UserError, match="handoff"):
        EvalConfig(handoff=1.5)
