"""Few-step distillation (LCM, progressive, reflow) on tiny teachers: formulas against closed forms and diffusers,
exact resume, loadable students whose defaults are the distilled settings, the evaluation gate, user errors."""

from __future__ import annotations

import json

import pytest
import torch

import inkwash
from inkwash.cli import main
from inkwash.diffusion import VP, Flow, from_x0_eps, to_x0_eps
from inkwash.errors import UserError
from inkwash.formats.checkpoint import file_sha256, load_model_file, load_state, read_meta, save_model, strip_prefix
from inkwash.models.registry import build_model, config_from_dict, config_to_dict, get_preset
from inkwash.sampling import make_times
from inkwash.sampling.samplers import ddim, lcm
from inkwash.text import TextEncoderConfig, build_text_encoder
from inkwash.train import distill as D
from inkwash.train import trainer as T

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_NET = {**config_to_dict(get_preset("unet-tiny")), "model_channels": 16, "num_heads": 2, "context_dim": 16}
TINY_TEXT = TextEncoderConfig(name="small", dim=16, layers=1, heads=2, max_length=24)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 32 px TINY_NET teacher (Shapes' smallest size) with random lively weights, as conftest's lively model."""
    torch.manual_seed(0)
    encoder = build_text_encoder(TINY_TEXT)
    net = build_model(config_from_dict(TINY_NET))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0, p[0].numel() ** -0.5) if p.dim() > 1 else p.normal_(1.0 if "norm" in name else 0.0, 0.1)
        net.conv_out.weight.mul_(0.3)
    meta = {
        "model": TINY_NET, "process": VP().to_dict(), "prediction": "x0", "text_encoder": TINY_TEXT.to_dict(),
        "image_size": 32, "channels": 3, "train_args": {},
        "sampling": {"sampler": "euler", "steps": 3, "guidance": 2.0, "schedule": None},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(path, {"model": net.state_dict(), "text_encoder": encoder.state_dict()}, meta)
    return path


def spec(tmp_path, teacher, method, **kw) -> D.DistillConfig:
    train = dict(batch_size=2, steps=2, log_every=1, lr=1e-3, output_dir=str(tmp_path / "run"), seed=0)
    train |= kw.pop("train", {})
    opts = dict(method=method, teacher=str(teacher), gate_limit=0, gate_fid=0, start_steps=4, end_steps=1, pairs=4,
                pair_batch=2, pair_steps=2, ddim_steps=10, guidance_embed_dim=16)  # fmt: skip
    return D.DistillConfig(**{**opts, **kw}, train=train)


def states(run_dir) -> dict[str, torch.Tensor]:
    """Every tensor that determines a run's continuation, across its stage folders."""
    out = {}
    for path in sorted(run_dir.glob("*/state.safetensors")):
        _, groups = load_state(path)
        out |= {f"{path.parent.name}/{g}.{k}": v for g, sd in groups.items() if g != "rng" for k, v in sd.items()}
    return out


# ---------------------------------------------------------------------------- formulas


def test_skipping_step_ddim_matches_diffusers():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True)  # fmt: skip
    sched.set_timesteps(50)  # k = 20 timesteps per step, the LCM skipping step
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    proc = VP()
    for t in (999, 519, 39):
        a, s = (float(v) for v in proc.alpha_sigma(t))
        x0 = (x - s * eps) / a
        ours = D.ddim_step(proc, x, x0, torch.full((2,), float(t)), torch.full((2,), float(t - 20)))
        theirs = sched.step(eps, t, x).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_boundary_condition_is_the_lcm_samplers():
    proc, g = VP(), torch.Generator().manual_seed(1)
    x, x0 = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    t = torch.tensor([499.0])
    out = lcm(lambda x_, t_: x0, x, torch.tensor([499.0, proc.t_clean], dtype=torch.float64), process=proc)
    c_skip, c_out = D.boundary(proc, t, x, D.TIMESTEP_SCALING)
    torch.testing.assert_close(out, c_skip * x + c_out * x0)
    c_skip, c_out = D.boundary(proc, torch.tensor([0.0]), x, D.TIMESTEP_SCALING)
    assert float(c_skip.flatten()[0]) == 1.0 and float(c_out.flatten()[0]) == 0.0  # identity at timestep 0


@pytest.mark.parametrize("process", [VP(schedule="cosine"), Flow(shift=3.0)])
def test_progressive_target_is_two_teacher_ddim_steps(process):
    """Salimans & Ho Alg. 2: one DDIM step from z_t with x_tilde lands where two teacher DDIM steps land."""
    times = make_times(process, 8)
    t, t1, t2 = times[2], times[3], times[4]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 3, 4, 4, generator=g)

    def teacher(x, t):  # any nonlinear x0 estimate
        return torch.tanh(x) * (1 + 0.001 * float(t))

    z2 = ddim(teacher, z, torch.stack([t, t1, t2]), process=process)
    x_tilde = D.two_step_target(process, z, z2, t.reshape(1), t2.reshape(1))
    torch.testing.assert_close(ddim(lambda x_, t_: x_tilde, z, torch.stack([t, t2]), process=process), z2)
    a, s = D.coeffs(process, t.reshape(1), z)
    v = from_x0_eps(x_tilde, (z - a * x_tilde) / s, a, s, "v")  # the student's v target gives back x_tilde
    torch.testing.assert_close(to_x0_eps(v, z, a, s, "v")[0], x_tilde, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- LCM


def test_lcm_fresh_student_is_the_teacher(tmp_path, teacher):
    s = spec(tmp_path, teacher, "lcm")
    meta = read_meta(teacher)
    stage = D._stages(s, meta)[0]
    tr = D.Distiller(D._train_config(s, stage, meta, teacher), s, stage)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([999.0, 259.0])
    emb = tr.teacher.encoder(["a red circle", ""])
    cond = {"context": emb.tokens, "context_mask": emb.mask}
    with torch.no_grad():
        student = tr.net(x, t, **cond, guidance=torch.tensor([2.0, 7.5]))
        teacher = tr.teacher.net(x, t, **cond)
    assert torch.equal(student, teacher)
    assert tr.model_cfg.guidance_embed and not tr.teacher.model_cfg.guidance_embed


def test_guidance_features_are_diffusers_lcm_embedding():
    """inkwash's scale w is LCM's w + 1, so a diffusers LCM U-Net's time_cond_proj sees the same features."""
    from diffusers import LatentConsistencyModelPipeline

    from inkwash.models.unet import guidance_features

    w = torch.tensor([1.0, 2.5, 8.0])
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=16)
    torch.testing.assert_close(guidance_features(w, 16), theirs, atol=1e-4, rtol=0)  # float32 sines of ~7000 rad


def _kill_at(monkeypatch, stage: str, step: int):
    real = T.Trainer.train_step

    def killed(self, bins):
        if getattr(self, "stage", None) is not None and self.stage.name == stage and self.step == step:
            raise KeyboardInterrupt
        return real(self, bins)

    monkeypatch.setattr(T.Trainer, "train_step", killed)
    return real


CASES = {  # method: (options, the stage and step where the run is killed, the student's default sampling)
    "lcm": ({"train": {"steps": 3}}, "lcm", 2, {"sampler": "lcm", "steps": 4, "schedule": "lcm", "guidance": 2.0}),
    "progressive": ({}, "stage-001", 1, {"sampler": "ddim", "steps": 1, "guidance": 1.0}),
    "reflow": ({"onestep_steps": 2}, "onestep", 1, {"sampler": "euler", "steps": 1, "guidance": 1.0}),
}


@pytest.mark.parametrize("method", list(CASES))
def test_distill_resumes_bit_identically_and_writes_a_default_student(tmp_path, teacher, monkeypatch,
                                                                      method):  # fmt: skip
    opts, stage, step, sampling = CASES[method]
    train = {"checkpoint_every": 1, **opts.get("train", {})}
    straight = D.distill(spec(tmp_path / "a", teacher, method, **{**opts, "train": train}), progress=False)
    killed = spec(tmp_path / "b", teacher, method, **{**opts, "train": train})
    real = _kill_at(monkeypatch, stage, step)
    with pytest.raises(KeyboardInterrupt):
        D.distill(killed, progress=False)
    monkeypatch.setattr(T.Trainer, "train_step", real)
    resumed = D.distill(killed, resume=True, progress=False)

    a, b = states(tmp_path / "a" / "run"), states(tmp_path / "b" / "run")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    (_, sa), (_, sb) = load_model_file(straight), load_model_file(resumed)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    pipe = inkwash.load(resumed)
    assert {k: getattr(pipe.sampling, k) for k in sampling} == sampling
    assert pipe.meta["distill"]["method"] == method
    images = pipe.generate("a red circle", seed=0)  # the distilled defaults, no flags
    assert images.shape == (1, 3, 32, 32) and images.isfinite().all()
    if method == "reflow":
        assert pipe.process.kind == "flow" and pipe.prediction == "flow"
    if method == "progressive":
        assert [p.name for p in sorted((tmp_path / "a" / "run").glob("stage-*"))] == ["stage-001", "stage-002"]
        assert pipe.prediction == "v"
        run = tmp_path / "b" / "run"  # each stage's teacher is the previous stage's student
        assert pipe.meta["distill"]["teacher_sha256"] == file_sha256(run / "stage-002" / "model.safetensors")
        assert read_meta(run / "stage-002" / "model.safetensors")["distill"]["teacher_guidance"] == 2.0


def test_reflow_pairs_are_the_teachers_ode_from_the_stored_noise(tmp_path, teacher):
    s = spec(tmp_path, teacher, "reflow", pair_steps=3)
    teacher = D.load_teacher(teacher)
    meta = teacher.meta
    stage = D._stages(s, meta)[0]
    store = D._reflow_pairs(s, teacher, D._train_config(s, stage, meta, teacher), stage, progress=False)
    first = store.path(1).read_bytes()
    pair_meta, groups = load_state(store.path(1))
    noise, x0 = groups["pairs"]["noise"], groups["pairs"]["x0"]
    run = teacher.prepare(pair_meta["captions"], sampler="dpmpp_2m", steps=3, guidance=stage.guidance)
    again = D.SAMPLERS["dpmpp_2m"](run.model, noise, run.times, process=run.process)
    torch.testing.assert_close(again, x0, atol=1e-6, rtol=0)
    assert not torch.equal(noise, groups["pairs"]["noise"].roll(1, 0))  # distinct noise per pair

    store.path(1).unlink()  # an interrupted generation resumes with the same pairs
    D._reflow_pairs(s, teacher, D._train_config(s, stage, meta, teacher), stage, progress=False)
    assert store.path(1).read_bytes() == first
    x, captions, _ = store.batch([0, 3])
    assert x.shape == (2, 6, 32, 32) and len(captions) == 2


# ---------------------------------------------------------------------------- the gate, the CLI, errors


def test_each_step_count_is_sampled_by_the_student_trained_for_it(tmp_path):
    run = tmp_path / "run"
    for stage in ("stage-004", "stage-002", "stage-001", "reflow"):
        (run / stage).mkdir(parents=True)
        (run / stage / "model.safetensors").write_bytes(b"")
    final = run / "model.safetensors"
    assert D.student_for_steps(run, "progressive", 2) == ("stage-002", run / "stage-002" / "model.safetensors")
    assert D.student_for_steps(run, "progressive", 8) == ("student", final)  # no 8-step stage in this run
    assert D.student_for_steps(run, "lcm", 2) == ("student", final)
    assert D.student_for_steps(run, "reflow", 2) == ("student", final)  # no one-step stage: the reflowed student
    (run / "onestep").mkdir()
    assert D.student_for_steps(run, "reflow", 1) == ("student", final)  # the one-step student
    assert D.student_for_steps(run, "reflow", 4) == ("reflow", run / "reflow" / "model.safetensors")


def test_gate_writes_its_table(tmp_path, teacher, capsys):
    s = spec(tmp_path, teacher, "lcm", gate_limit=1, gate_steps=(1, 2))
    report = D.gate(teacher, teacher, s)
    rows = json.loads((tmp_path / "run" / "gate.json").read_text())["rows"]
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher", 3), ("student", 1), ("student", 2)]
    assert rows == report["rows"] and 0 <= rows[0]["scores"]["overall"] <= 1
    table = (tmp_path / "run" / "gate.md").read_text()
    assert "| teacher | euler | 3 |" in table and table.strip() in capsys.readouterr().out


def test_cli_distill_then_generate_uses_the_distilled_settings(tmp_path, teacher, capsys):
    out = tmp_path / "cli"
    argv = ["distill", "--method", "lcm", "--teacher", str(teacher), "--steps", "1", "--output-dir",
            str(out), "--set", "batch_size=2", "--set", "gate_limit=0", "--set", "ddim_steps=10"]  # fmt: skip
    assert main(argv) == 0
    assert (
        main(["generate", "a red circle", "--model", str(out / "model.safetensors"), "-o", str(tmp_path / "i.png")])
        == 0
    )
    from PIL import Image

    text = Image.open(tmp_path / "i.png").info["parameters"]
    assert "Steps: 4, Sampler: lcm, Schedule type: lcm" in text and "Distilled CFG Scale: 2.0" in text


def test_user_errors(tmp_path, teacher, capsys):
    with pytest.raises(UserError, match="does not exist"):
        D.distill(spec(tmp_path, tmp_path / "missing.safetensors", "lcm"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        D.distill(spec(tmp_path, junk, "lcm"))
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, foreign)
    with pytest.raises(UserError, match="without inkwash metadata"):
        D.distill(spec(tmp_path, foreign, "lcm"))
    vae_like = tmp_path / "vae.safetensors"
    save_model(vae_like, {"vae": {"w": torch.zeros(1)}}, {"vae": {}})
    with pytest.raises(UserError, match="not an inkwash diffusion model"):
        D.distill(spec(tmp_path, vae_like, "lcm"))
    with pytest.raises(UserError, match="Unknown distillation method"):
        spec(tmp_path, teacher, "consistency")
    with pytest.raises(UserError, match="power of two"):
        spec(tmp_path, teacher, "progressive", start_steps=24)
    with pytest.raises(UserError, match="come from the teacher"):
        spec(tmp_path, teacher, "lcm", train={"model": "unet-s"})
    with pytest.raises(UserError, match="sample_steps"):
        spec(tmp_path, teacher, "lcm", train={"sampling": {"steps": 2}})
    with pytest.raises(UserError, match="Unknown distillation options"):
        D.DistillConfig.from_dict({"method": "lcm", "teacher": "x", "w_maximum": 3})
    with pytest.raises(UserError, match="deterministic"):
        spec(tmp_path, teacher, "reflow", pair_sampler="euler_ancestral")
    with pytest.raises(UserError, match="Nothing to resume"):
        D.distill(spec(tmp_path / "fresh", teacher, "lcm"), resume=True)
    flow_teacher = tmp_path / "flow.safetensors"
    meta, tensors = load_model_file(teacher)
    groups = {"model": strip_prefix(tensors, "model"), "text_encoder": strip_prefix(tensors, "text_encoder")}
    save_model(flow_teacher, groups, {**meta, "process": Flow().to_dict()})
    with pytest.raises(UserError, match="needs a VP teacher"):
        D.distill(spec(tmp_path, flow_teacher, "lcm"))
    assert main(["distill", "--method", "bogus", "--teacher", str(teacher)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inkwash: error: Unknown distillation method") and err.count("\n") == 1


@pytest.mark.parametrize("method", list(CASES))
def test_a_latent_teacher_distils_into_a_latent_student(tmp_path, method):
    from test_latent import latent_cfg, vae_file  # tests/ is on sys.path under pytest

    latent_teacher = T.train(latent_cfg(tmp_path / "t", vae_file(tmp_path / "vae.safetensors"), steps=1))
    s = spec(tmp_path, latent_teacher, method, onestep_steps=1, train={"steps": 1})
    pipe = inkwash.load(D.distill(s, progress=False))
    assert pipe.vae is not None and pipe.channels == 4 and pipe.meta["model"]["in_channels"] == 4
    assert pipe.generate("a red circle", seed=0).shape == (1, 3, 32, 32)
    if method == "reflow":
        _, groups = load_state(tmp_path / "run" / "pairs" / "pairs-00000.safetensors")
        assert groups["pairs"]["x0"].shape == (2, 4, 16, 16)  # pairs live in the latent space
