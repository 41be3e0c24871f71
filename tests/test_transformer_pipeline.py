"""DiT, PixArt-α and MMDiT as first-class models: learned sigma, class labels, guidance-distilled sampling,
`inkwash info` of their presets, a few training steps of each, and the transformer recipes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_latent import vae_file  # tests/ is on sys.path under pytest
from test_trainer import TINY_TEXT

import inkwash
from inkwash.cli import main
from inkwash.diffusion import VP, Denoiser, Flow, process_from_dict
from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_model_file, save_model
from inkwash.models.dit import DiTConfig
from inkwash.models.registry import build_model, config_from_dict, config_to_dict, get_preset
from inkwash.pipeline import Pipeline, Sampling
from inkwash.sampling import SAMPLERS
from inkwash.text import TextEncoderConfig, build_text_encoder
from inkwash.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TEXT = TextEncoderConfig.from_dict(TINY_TEXT)


def lively(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised adaLN gates and output layers included), scaled small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.05))
    return net.eval()


def pipeline(cfg, process=None, prediction="eps", size=16, guidance=2.0) -> Pipeline:
    encoder = build_text_encoder(TEXT).eval()
    widths = {k: v for k, v in (("context_dim", encoder.dim), ("y_dim", encoder.pooled_dim)) if getattr(cfg, k, 0)}
    cfg = dataclasses.replace(cfg, **widths)
    torch.manual_seed(0)
    net = lively(build_model(cfg))
    sampling = Sampling(steps=2, guidance=guidance)
    return Pipeline(net, cfg, process or VP(), prediction, encoder, size, cfg.in_channels, sampling, "tiny")


SIGMA_DIT = DiTConfig(in_channels=3, out_channels=3, hidden_size=32, depth=1, num_heads=2, y_dim=16, sample_size=16,
                      learn_sigma=True)  # fmt: skip
CLASS_DIT = dataclasses.replace(SIGMA_DIT, y_dim=0, num_classes=10)


# ---------------------------------------------------------------------------- learned sigma


def test_learned_sigma_the_denoiser_uses_only_the_prediction_half():
    net = lively(build_model(SIGMA_DIT))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([500.0, 20.0]), torch.randn(2, 16)
    scale = VP().input_scale(t).float()[:, None, None, None]
    full = net(x * scale, VP().net_time(t).float(), y=y)
    assert full.shape[1] == 6 and not torch.allclose(full[:, :3], full[:, 3:])  # the prediction, then the variance
    assert torch.equal(Denoiser(net, VP(), "eps", learn_sigma=True).raw(x, t, y=y), full[:, :3])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_learned_sigma_model_samples_with_every_sampler(sampler):
    pipe = pipeline(SIGMA_DIT, size=8)
    x = pipe.generate("a red circle", sampler=sampler, steps=2, seed=1)
    assert x.shape == (1, 3, 8, 8) and x.isfinite().all()


# ---------------------------------------------------------------------------- class labels


def test_class_conditional_dit_samples_a_label_and_guides_with_the_null_class():
    pipe = pipeline(CLASS_DIT, size=8, guidance=3.0)
    seen = []
    forward = pipe.net.forward
    pipe.net.forward = lambda x, t, **kw: seen.append(kw["y"].tolist()) or forward(x, t, **kw)
    images = pipe(class_label=[3, 7], n=1, seed=0)
    assert len(images) == 2 and images[0].info["parameters"].startswith("class 3\n")
    assert seen[0] == [3, 7, 10, 10]  # cond, then the null class (num_classes) for guidance, in one batch
    with pytest.raises(UserError, match="class-conditional .* takes no prompt"):
        pipe("a red circle", class_label=3)
    with pytest.raises(UserError, match="give a class label"):
        pipe.generate(None)
    with pytest.raises(UserError, match="not one of this model's classes 0..9"):
        pipe.generate(None, class_label=10)
    with pytest.raises(UserError, match="has no class labels"):
        pipeline(SIGMA_DIT, size=8).generate("a circle", class_label=1)


def test_cli_generates_a_class_and_refuses_a_prompt(tmp_path, capsys):
    pipe = pipeline(CLASS_DIT, size=8)
    meta = {
        "model": config_to_dict(pipe.model_cfg), "process": VP().to_dict(), "prediction": "eps",
        "text_encoder": TEXT.to_dict(), "image_size": 8, "channels": 3,
        "sampling": {"sampler": "dpmpp_2m", "steps": 2, "guidance": 4.0}, "train_args": {},
    }  # fmt: skip
    path = save_model(tmp_path / "dit.safetensors", {"model": pipe.net.state_dict(),
                                                     "text_encoder": pipe.encoder.state_dict()}, meta)  # fmt: skip
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(path), "--class-label", "4", "-o", str(out)]) == 0
    assert out.is_file()
    assert main(["generate", "a cat", "--model", str(path)]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_info_of_transformer_presets_counts_on_the_meta_device(capsys):
    assert main(["info", "dit-xl2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["macs_per_step"] == 118_621_421_568 and info["input_shape"] == [4, 32, 32]  # DiT paper: 118.6 GF
    assert main(["info", "flux-dev"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 11_901_408_320 and "guidance" in info["conditioning"] and info["macs_per_step"] > 0
    assert main(["info", "mmdit-shapes", "--size", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == [4, 16, 16]


# ---------------------------------------------------------------------------- guidance-distilled MMDiT


def test_guidance_distilled_mmdit_takes_the_scale_and_runs_one_forward_per_step():
    cfg = dataclasses.replace(get_preset("mmdit-tiny"), in_channels=3, out_channels=3, guidance_embed=True)
    pipe = pipeline(cfg, Flow(dynamic_shift=True), "flow", size=8, guidance=3.5)
    calls = []
    forward = pipe.net.forward
    pipe.net.forward = lambda x, t, **kw: calls.append((x.shape[0], kw["guidance"].tolist())) or forward(x, t, **kw)
    x = pipe.generate(["a red circle", "a blue square"], sampler="flow_euler", steps=3)
    assert x.isfinite().all() and calls == [(2, [3.5, 3.5])] * 3  # no classifier-free guidance batch
    params = pipe("a red circle", sampler="flow_euler")[0].info["parameters"]
    assert "CFG scale: 1, Distilled CFG Scale: 3.5," in params
    with pytest.raises(UserError, match="guidance-distilled"):
        pipe.generate("a circle", negative_prompt="blurry")


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "arch, model, process, prediction, time_sampling, latent",
    [
        ("dit", {**config_to_dict(get_preset("dit-tiny")), "learn_sigma": True}, "vp", "v", "uniform", False),
        ("pixart", "pixart-tiny", {"kind": "flow"}, "flow", "logit_normal", False),
        ("mmdit", "mmdit-tiny", {"kind": "flow", "dynamic_shift": True}, "flow", "logit_normal", False),
        ("mmdit", "mmdit-tiny", "vp", "v", "uniform", True),
    ],
)
def test_transformers_train_and_sample(tmp_path, arch, model, process, prediction, time_sampling, latent):
    vae = str(vae_file(tmp_path / "vae.safetensors")) if latent else None
    cfg = TrainConfig(
        model=model, process=process, prediction=prediction, time_sampling=time_sampling, text_encoder=TINY_TEXT,
        image_size=32, batch_size=2, steps=3, lr=1e-3, warmup_steps=1, output_dir=str(tmp_path / "run"),
        log_every=1, sample_prompts=(), sampling={"sampler": "euler", "steps": 2, "guidance": 2.0}, vae=vae,
        # FLUX's resolution shift in training needs the token count: the trainer must pass it (else UserError)
        time_sampling_args={"shift": "process"} if isinstance(process, dict) and process.get("dynamic_shift") else {},
    )  # fmt: skip
    path = train(cfg)
    meta, _ = load_model_file(path)
    assert meta["model"]["arch"] == arch and meta["train_args"]["time_sampling"] == time_sampling
    assert meta["channels"] == meta["model"]["in_channels"] == (4 if latent else 3)
    pipe = inkwash.load(path)
    first = "flow_euler" if prediction == "flow" else "euler"
    for sampler in (first, "dpmpp_2m"):
        x = pipe.generate("a red circle", sampler=sampler, steps=2)
        assert x.shape == (1, 3, 32, 32) and x.isfinite().all()


def test_class_and_guidance_distilled_configs_are_refused_for_training(tmp_path):
    base = dict(text_encoder=TINY_TEXT, image_size=16, batch_size=2, steps=1, output_dir=str(tmp_path))
    dit = config_to_dict(dataclasses.replace(CLASS_DIT, learn_sigma=False))
    with pytest.raises(UserError, match="class-conditional"):
        train(TrainConfig(model=dit, **base))
    flux = {**config_to_dict(get_preset("mmdit-tiny")), "guidance_embed": True}
    with pytest.raises(UserError, match="guidance-distilled"):
        train(TrainConfig(model=flux, process="flow", prediction="flow", **base))


@pytest.mark.parametrize(
    "name", ["dit-shapes-latent", "mmdit-shapes-latent", "mmdit-shapes-s-latent", "mmdit-shapes-m-latent",
             "pixart-shapes-latent"],
)  # fmt: skip
def test_transformer_recipes_parse(name):
    d = json.loads((RECIPES / f"{name}.json").read_text())
    cfg = TrainConfig.from_dict(d)
    arch = name.split("-")[0]
    mcfg = get_preset(cfg.model) if isinstance(cfg.model, str) else config_from_dict(cfg.model)
    assert config_to_dict(mcfg)["arch"] == arch and mcfg.in_channels == 4
    process = process_from_dict({"kind": cfg.process} if isinstance(cfg.process, str) else cfg.process)
    if arch == "mmdit":
        assert isinstance(process, Flow) and cfg.prediction == "flow" and cfg.time_sampling == "logit_normal"
    else:
        assert isinstance(process, VP) and cfg.prediction == "v"
    unet = TrainConfig.from_dict(json.loads((RECIPES / "compare-latent-64.json").read_text()))  # same data, batch
    assert (cfg.batch_size, cfg.image_size, cfg.latent_cache) == (unet.batch_size, 64, unet.latent_cache)
    assert cfg.vae == "inkwash/assets/shapes-vae-f4.safetensors" and 3e-4 <= cfg.lr <= 1e-3 and cfg.warmup_steps > 0
