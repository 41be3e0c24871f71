"""Using checkpoints made elsewhere: `inkwash generate --model sd.safetensors` end to end on tiny random SD files,
the family's sampling defaults, SDXL's empty-negative zeros and refiner conditions, base + refiner."""

from __future__ import annotations

import pytest
import sd_tiny
import torch
from PIL import Image

import inkwash
from inkwash.cli import main
from inkwash.errors import UserError
from inkwash.pipeline import Pipeline


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return sd_tiny.write_family(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL base and a refiner sharing its autoencoder (as the published pair does)."""
    folder = tmp_path_factory.mktemp("sdxl")
    base = sd_tiny.write_family(folder / "base", "sdxl-base", seed=1)
    from safetensors.torch import load_file

    vae = {k: v for k, v in load_file(str(base)).items() if k.startswith("first_stage_model.")}
    refiner = sd_tiny.write_family(folder / "refiner", "sdxl-refiner", seed=2, extra=vae)
    return base, refiner


def test_generate_cli_end_to_end(sd1, tmp_path, one_thread, capsys):
    out = tmp_path / "img.png"
    rc = main(["generate", "a red circle", "--model", str(sd1), "--steps", "2", "--size", "64", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    img = Image.open(out)
    assert img.size == (64, 64)
    params = img.info["parameters"]
    assert "Steps: 2, Sampler: ddim, Schedule type: leading, CFG scale: 7.5" in params
    assert "Model: tiny-sd1" in params


def test_family_defaults(sd1, sdxl):
    pipe = inkwash.load(sd1)
    s = pipe.sampling
    assert (s.sampler, s.steps, s.guidance, s.schedule, pipe.image_size) == ("ddim", 50, 7.5, "leading", 512)
    assert (pipe.prediction, pipe.latent_factor, pipe.channels) == ("eps", 2, 4)  # the tiny VAE has 2 levels
    assert pipe.meta["format"] == "sd1"
    base = inkwash.load(sdxl[0])
    s = base.sampling
    assert (s.sampler, s.steps, s.guidance, base.image_size) == ("euler", 50, 5.0, 1024)
    assert base.zero_empty_negative and not inkwash.load(sdxl[1]).zero_empty_negative


def test_sd2_prediction_default_and_override(tmp_path):
    path = sd_tiny.write_family(tmp_path, "sd2")
    assert inkwash.load(path).prediction == "v"  # SD 2.x 768-v
    assert inkwash.load(path, prediction="eps").prediction == "eps"  # its 512 px base models
    with pytest.raises(UserError, match="prediction"):
        inkwash.load(path, prediction="x0")


def test_sdxl_conditions(sdxl):
    base, refiner = (Pipeline.from_file(p) for p in sdxl)
    s = base.settings()
    cond, uncond = base.conditions(["a red circle"], "", None, s, 64)
    assert cond["context"].abs().sum() > 0
    assert torch.count_nonzero(uncond["context"]) == 0 and torch.count_nonzero(uncond["y"]) == 0
    _, uncond = base.conditions(["a red circle"], "blue", None, s, 64)
    assert torch.count_nonzero(uncond["context"]) > 0
    run = refiner.prepare("a red circle", size=64, steps=2, original_size=96)
    micro_c, micro_u = run.model.cond["micro"], run.model.uncond["micro"]
    assert micro_c.tolist() == [[96.0, 96.0, 0.0, 0.0, 6.0]] and micro_u.tolist() == [[96.0, 96.0, 0.0, 0.0, 2.5]]


def test_base_and_refiner_cli(sdxl, tmp_path, one_thread, capsys):
    base, refiner = sdxl
    out = tmp_path / "xl.png"
    rc = main(["generate", "a red circle", "--model", str(base), "--refiner", str(refiner), "--steps", "2", "--size",
               "32", "--handoff", "0.5", "-o", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.5" in Image.open(out).info["parameters"]


def test_cli_errors_are_one_sentence(tmp_path, capsys):
    (tmp_path / "m.safetensors").write_bytes(b"nope")
    assert main(["generate", "x", "--model", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inkwash: error:") and "Traceback" not in err and err.count("\n") == 1
