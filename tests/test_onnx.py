"""ONNX export and the onnxruntime sampling path: every exported graph against the torch module it came from, on
inputs of another batch size and token count than the export saw, and whole generations through the pipeline's
own samplers (the bundled model; a tiny latent DiT with the small text encoder and a VAE)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from inkwash.accel.onnx import (
    MANIFEST,
    OnnxNetwork,
    OnnxTextEncoder,
    OnnxVAEDecoder,
    denoiser_inputs,
    export_denoiser,
    export_onnx,
    export_text_encoder,
    export_vae_decoder,
)
from inkwash.cli import main
from inkwash.diffusion import Flow
from inkwash.errors import UserError
from inkwash.formats.checkpoint import save_model
from inkwash.models.registry import build_model, config_to_dict, get_preset
from inkwash.models.vae import VAEConfig
from inkwash.pipeline import BUNDLED, BUNDLED_TEACHER, load
from inkwash.text import TextEncoderConfig, build_text_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # float32 graphs against float32 eager


def lively(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight at random: zero-initialised gates and output layers would make any two graphs agree at 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (fan_in**-0.5 if p.dim() > 1 else 0.1))
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return module.eval()


NETWORKS = {
    "unet-sdxl-like": dataclasses.replace(get_preset("unet-tiny"), y_dim=16, micro_conditions=6),
    "dit-text": get_preset("dit-tiny"),
    "dit-classes": dataclasses.replace(get_preset("dit-tiny"), y_dim=0, num_classes=10, learn_sigma=True),
    "pixart-sizes": dataclasses.replace(get_preset("pixart-tiny"), hidden_size=48, size_conditioning=True),
    "mmdit-flux-dev-like": dataclasses.replace(get_preset("mmdit-tiny"), guidance_embed=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_exported_denoiser_matches_torch_at_other_batch_and_token_counts(tmp_path, name):
    cfg = NETWORKS[name]
    net = lively(build_model(cfg))
    side = 8
    entry = export_denoiser(net, cfg, side, tmp_path / "net.onnx")
    onnx_net = OnnxNetwork(tmp_path / "net.onnx", entry)
    assert entry["inputs"] == list(denoiser_inputs(cfg, side))
    kw = denoiser_inputs(cfg, side, tokens=5, batch=3)  # the export saw batch 2 and 7 tokens
    kw["t"] = torch.tensor([0.0, 400.0, 999.0])
    with torch.no_grad():
        want = net(**kw)
    got = onnx_net(**kw)
    assert got.shape == want.shape and want.abs().max() > 0.1
    assert (got - want).abs().max() < TOL
    if "context_mask" in kw:  # padding is masked the same way: changing what sits under the mask changes nothing
        kw["context"] = kw["context"].masked_fill(~kw["context_mask"][..., None], 7.0)
        assert (onnx_net(**kw) - want).abs().max() < TOL


def test_small_text_encoder_graph_matches_torch(tmp_path):
    cfg = TextEncoderConfig(name="small", dim=32, layers=2, heads=2, max_length=12)
    torch_enc = lively(build_text_encoder(cfg))
    entry = export_text_encoder(torch_enc, tmp_path / "text.onnx")
    enc = OnnxTextEncoder(tmp_path, entry, cfg)
    prompts = ["", "a red circle", "three purple hexagons beneath a tiny zebra on the far left edge"]  # truncated
    want, got = torch_enc(prompts), enc(prompts)
    assert torch.equal(got.mask, want.mask) and got.mask.shape[1] == 12
    assert (got.tokens - want.tokens).abs().max() < TOL and (got.pooled - want.pooled).abs().max() < TOL


def test_vae_decoder_graph_matches_torch_with_scale_and_shift(tmp_path):
    cfg = VAEConfig(channels=(8, 16), layers_per_block=1, latent_channels=4, norm_groups=4, scaling_factor=0.7,
                    shift_factor=0.1)  # fmt: skip
    vae = lively(build_model(cfg))
    entry = export_vae_decoder(vae, 4, tmp_path / "vae.onnx")
    dec = OnnxVAEDecoder(tmp_path / "vae.onnx", entry, cfg)
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vae.decode_latent(z)
    got = dec.decode_latent(z)
    assert got.shape == (3, 3, 8, 8) and (got - want).abs().max() < TOL


# ---------------------------------------------------------------------------- the bundled model, end to end


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled Shapes U-Net (the teacher: classifier-free guidance) with MiniLM, exported once by the CLI:
    (torch pipeline, ONNX folder)."""
    folder = tmp_path_factory.mktemp("onnx") / "shapes"
    assert main(["export-onnx", str(BUNDLED_TEACHER), "-o", str(folder)]) == 0
    return load(BUNDLED_TEACHER), folder


@pytest.mark.slow
def test_bundled_export_writes_three_graphs_and_a_manifest(bundled):
    pipe, folder = bundled
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["graphs"]["denoiser"]["inputs"] == ["x", "t", "context", "context_mask", "y"]
    assert manifest["graphs"]["text_encoder"]["outputs"] == ["tokens", "pooled"]
    assert "vae_decoder" not in manifest["graphs"]  # a pixel-space model
    assert manifest["meta"]["model"] == pipe.meta["model"] and manifest["meta"]["sampling"] == pipe.meta["sampling"]
    assert (folder / "tokenizer").is_dir() and manifest["size"] == 32


@pytest.mark.slow
def test_minilm_graph_matches_torch(bundled):
    pipe, folder = bundled
    onnx_pipe = load(folder)
    prompts = ["a red circle", "", "a large yellow star above two small green triangles on the left " * 3]
    want, got = pipe.encoder(prompts), onnx_pipe.encoder(prompts)
    assert torch.equal(got.mask, want.mask) and got.tokens.shape == want.tokens.shape == (3, 32, 384)
    assert (got.tokens - want.tokens).abs().max() < TOL and (got.pooled - want.pooled).abs().max() < TOL


@pytest.mark.slow
def test_bundled_generation_through_onnxruntime_matches_torch(bundled):
    pipe, folder = bundled
    onnx_pipe = load(folder)
    kw = dict(negative_prompt="a blue square", seed=5, steps=4)
    want = pipe(["a red circle", "two green triangles"], **kw)
    got = onnx_pipe(["a red circle", "two green triangles"], **kw)
    for a, b in zip(want, got):
        a, b = torch.from_numpy(np.asarray(a, dtype=np.int16)), torch.from_numpy(np.asarray(b, dtype=np.int16))
        assert (a - b).abs().max() <= 2  # grey levels
    assert [g.info["parameters"] for g in got] == [w.info["parameters"] for w in want]
    ancestral = dict(kw, sampler="euler_ancestral")  # later noise from the same seeded generator
    x, y = pipe.generate("a star", **ancestral), onnx_pipe.generate("a star", **ancestral)
    assert (x - y).abs().max() < 1e-3


@pytest.mark.slow
def test_cli_generates_from_an_onnx_folder_and_refuses_mistakes(bundled, tmp_path, capsys):
    pipe, folder = bundled
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--onnx", str(folder), "--steps", "2", "--seed", "3", "-o", str(out)]) == 0
    img = Image.open(out)
    assert "Steps: 2, Sampler: dpmpp_2m" in img.info["parameters"] and "Model: shapes-unet" in img.info["parameters"]
    assert main(["generate", "a red circle", "--onnx", str(folder), "--size", "64"]) == 2
    assert "export again with --size" in capsys.readouterr().err
    assert main(["generate", "x", "--onnx", str(folder), "--model", str(BUNDLED)]) == 2
    assert main(["generate", "x", "--model", str(folder), "--dtype", "bf16"]) == 2
    assert "float32 through onnxruntime" in capsys.readouterr().err
    assert main(["generate", "x", "--onnx", str(tmp_path)]) == 2
    assert "is not an ONNX export" in capsys.readouterr().err
    assert main(["export-onnx", str(folder), "-o", str(tmp_path / "again")]) == 2
    with pytest.raises(UserError, match="on the CPU"):
        load(folder, device="meta")


@pytest.mark.slow
def test_the_default_lcm_student_takes_its_guidance_scale_as_an_input_through_onnxruntime(tmp_path):
    assert main(["export-onnx", "-o", str(tmp_path / "lcm")]) == 0  # no model: the default, guidance-distilled
    graphs = json.loads((tmp_path / "lcm" / MANIFEST).read_text())["graphs"]
    assert graphs["denoiser"]["inputs"] == ["x", "t", "context", "context_mask", "y", "guidance"]
    pipe, onnx_pipe = load(), load(tmp_path / "lcm")
    for guidance in (2.0, 6.0):
        want = pipe("a red circle", seed=2, guidance=guidance)[0]
        got = onnx_pipe("a red circle", seed=2, guidance=guidance)[0]
        assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 2
        assert got.info["parameters"] == want.info["parameters"]


# ---------------------------------------------------------------------------- a latent model, end to end


def latent_dit_file(path):
    """A tiny latent DiT with the small text encoder and a VAE inside the file (every weight at random), flow."""
    text_cfg = TextEncoderConfig(name="small", dim=32, layers=1, heads=2)
    vae_cfg = VAEConfig(channels=(8, 16), layers_per_block=1, latent_channels=4, norm_groups=4, scaling_factor=0.7,
                        shift_factor=0.1)  # fmt: skip
    cfg = dataclasses.replace(get_preset("dit-tiny"), in_channels=4, out_channels=4, y_dim=32, sample_size=8)
    net, encoder, vae = lively(build_model(cfg)), lively(build_text_encoder(text_cfg), 1), lively(build_model(vae_cfg))
    with torch.no_grad():
        net.final.linear.weight.mul_(0.1)  # x0 estimates well inside the latent range
    meta = {
        "model": config_to_dict(cfg), "process": Flow().to_dict(), "prediction": "x0", "image_size": 16,
        "text_encoder": text_cfg.to_dict(), "vae": config_to_dict(vae_cfg), "channels": 4,
        "sampling": {"sampler": "euler", "steps": 3, "guidance": 3.0, "schedule": None}, "train_args": {},
    }  # fmt: skip
    sd = {"model": net.state_dict(), "text_encoder": encoder.state_dict(), "vae": vae.state_dict()}
    return save_model(path, sd, meta)


@pytest.mark.slow
def test_latent_dit_with_small_encoder_and_vae_samples_the_same_through_onnxruntime(tmp_path):
    pipe = load(latent_dit_file(tmp_path / "latent.safetensors"))
    export_onnx(pipe, tmp_path / "onnx")
    graphs = json.loads((tmp_path / "onnx" / MANIFEST).read_text())["graphs"]
    assert sorted(graphs) == ["denoiser", "text_encoder", "vae_decoder"]
    onnx_pipe = load(tmp_path / "onnx")
    prompts = ["a red circle", "two blue squares on the left"]
    want = pipe.generate(prompts, seed=1, sampler="dpmpp_2m")
    got = onnx_pipe.generate(prompts, seed=1, sampler="dpmpp_2m")
    assert got.shape == (2, 3, 16, 16) and want.std() > 0.05
    assert (got - want).abs().max() < 1e-3


def test_export_refuses_what_it_cannot_export_before_writing_anything(tmp_path, lively_model_file):
    pipe = load(lively_model_file)
    pipe.meta = dict(pipe.meta, text_encoder={"name": "class", "labels": ["a", "b"], "dim": 32})
    with pytest.raises(UserError, match="'class' text encoder has no ONNX export"):
        export_onnx(pipe, tmp_path / "x")
    with pytest.raises(UserError, match="takes an inkwash model file"):
        export_onnx(load("unet-tiny"), tmp_path / "x")
    with pytest.raises(UserError, match="size 15"):
        export_onnx(load(lively_model_file), tmp_path / "x", size=15)
    assert not (tmp_path / "x").exists()
