"""The CLI and the Python API: generation end to end, and one clear sentence (exit 2) for each user mistake."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import inkwash
from inkwash.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_png_with_parameters(model_file, tmp_path, capsys):
    code, out, err = run(capsys, "generate", "a red circle", "--model", str(model_file), "-o", str(tmp_path), "-n", "2")
    assert code == 0, err
    paths = out.split()
    assert len(paths) == 2
    img = Image.open(paths[0])
    assert img.size == (16, 16)
    params = img.text["parameters"]
    assert params.startswith("a red circle\nSteps: 3, Sampler: euler, CFG scale: 2.0, Seed: 0, Size: 16x16")


def test_same_seed_same_image_any_batch(lively_model_file):
    pipe = inkwash.load(lively_model_file)
    a = pipe.generate("a blue square", seed=5, n=1)
    b = pipe.generate("a blue square", seed=4, n=2)  # image 1 of this batch has seed 5
    assert torch.allclose(a[0], b[1], atol=1e-5)
    images = pipe(["a green triangle", "a red star"], steps=2, sampler="dpmpp_2m", negative_prompt="blurry")
    assert len(images) == 2 and images[1].info["parameters"].startswith("a red star\nNegative prompt: blurry")


def test_info(model_file, capsys):
    code, out, _ = run(capsys, "info", str(model_file))
    info = json.loads(out)
    assert code == 0 and info["parameters"] > 0 and info["macs_per_step"] > 0 and info["image_size"] == 16


def _corrupt(tmp_path):
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(b"\x00\x01not a safetensors file at all")
    return p


def _foreign(tmp_path):
    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    return p


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "   "], "prompt is empty"),
        (["generate", "a red circle", "--sampler", "magic"], "unknown sampler 'magic'; valid: ddim"),
        (["generate", "a red circle", "--schedule", "wiggly"], "unknown schedule 'wiggly'; valid: leading"),
        (["generate", "a red circle", "--size", "13"], "size 13 is not one this model can take"),
        (["generate", "a red circle", "--steps", "0"], "steps must be a positive whole number"),
        (["generate", "a red circle", "--model", "MISSING/nothing.safetensors"], "does not exist"),
        (["generate", "a red circle", "--model", "CORRUPT"], "corrupt"),
        (["generate", "a red circle", "--model", "FOREIGN"], "not a checkpoint inkwash recognises"),
    ],
)
def test_user_mistakes_get_one_sentence_and_exit_2(argv, needle, model_file, tmp_path, capsys):
    subst = {"CORRUPT": str(_corrupt(tmp_path)), "FOREIGN": str(_foreign(tmp_path))}
    argv = [subst.get(a, a) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(model_file)]
    code, out, err = run(capsys, *argv, "-o", str(tmp_path))
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle.lower() in err.lower(), err


def test_a_sentence_starting_with_a_path_keeps_the_path_as_written(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--config", "recipes/dit-shapes-latent.json", "--steps", "1",
                       "--set", 'latent_cache="runs/no-such-cache"', "--output-dir", str(tmp_path))  # fmt: skip
    assert code == 2 and "error: runs/no-such-cache is not a finished latent cache" in err, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["serve", "--model", "MISSING/nothing.safetensors"], "does not exist"),
        (["serve", "--model", "FOREIGN"], "not a checkpoint inkwash recognises"),
        (["serve", "--port", "0"], "--port must be between 1 and 65535"),
        (["serve", "--max-n", "0"], "--max-n must be at least 1, got 0"),
        (["serve", "--max-size", "-8"], "--max-size must be at least 1, got -8"),
        (["serve", "--arena", "MISSING/arena.json"], "arena file MISSING/arena.json does not exist"),
        (["serve", "--arena", "ARENA:{not json"], "is not valid JSON"),
        (["serve", "--arena", 'ARENA:{"name": "a"}'], "must be a JSON list of"),
        (["serve", "--arena", 'ARENA:[{"name": "a", "model": "sdxl"}]'], "names model 'sdxl', which is not served"),
        (["serve", "--arena", 'ARENA:[{"name": "a", "settings": {"steps": 500}}]'], "steps must be between 1 and 100"),
    ],
)
def test_serve_mistakes_get_one_sentence_and_exit_2(argv, needle, model_file, tmp_path, capsys):
    def subst(a):
        if a.startswith("ARENA:"):
            (tmp_path / "arena.json").write_text(a[6:])
            return str(tmp_path / "arena.json")
        return {"FOREIGN": str(_foreign(tmp_path))}.get(a, a)

    argv = [subst(a) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(model_file)]
    code, out, err = run(capsys, *argv, "--data-dir", str(tmp_path / "data"))
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle.lower() in err.lower(), err
