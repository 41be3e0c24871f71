"""The VAE trainer on tiny configs: learning, exact resume, latent statistics, files, the CLI and its mistakes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from inkwash.cli import main
from inkwash.errors import UserError
from inkwash.eval.vae_eval import evaluate_vae
from inkwash.formats.checkpoint import load_model_file, load_state, read_meta
from inkwash.models.registry import get_preset
from inkwash.train import vae_trainer as V
from inkwash.train.trainer import TrainingDiverged
from inkwash.train.vae_trainer import VAETrainConfig, VAETrainer, load_vae, save_vae, train_vae

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py

# f = 2, 4 latent channels, ~20k parameters
TINY_VAE = {"channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_groups": 4}


def tiny(tmp_path, **kw) -> VAETrainConfig:
    args = dict(
        model=TINY_VAE, image_size=32, batch_size=4, steps=4, lr=3e-3, warmup_steps=2, lr_decay="none",
        output_dir=str(tmp_path / "run"), log_every=1, stats_images=8, device="cpu",
    )  # fmt: skip
    return VAETrainConfig(**{**args, **kw})


def state(run_dir) -> dict[str, torch.Tensor]:
    _, groups = load_state(run_dir / "state.safetensors")
    return {f"{g}.{k}": v for g, sd in groups.items() if g != "rng" for k, v in sd.items()}


def test_loss_decreases_on_a_tiny_vae(tmp_path):
    train_vae(tiny(tmp_path, steps=40, log_every=10, lr_decay="cosine", lr_final=0.1), progress=False)
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30, 40]
    assert {"loss", "l1", "kl", "psnr", "lr", "images_per_s", "grad_norm"} <= set(lines[0])
    assert lines[-1]["l1"] < 0.6 * lines[0]["l1"] and lines[-1]["psnr"] > lines[0]["psnr"] + 2


def test_resume_after_a_kill_is_bit_identical(tmp_path, monkeypatch):
    kw = dict(ema_decay=0.9, adversarial_weight=0.5, adversarial_start=1, perceptual_weight=0.1, steps=5)
    train_vae(tiny(tmp_path / "a", **kw), progress=False)

    resumed = tiny(tmp_path / "b", checkpoint_every=2, **kw)
    real_step = VAETrainer.train_step

    def killed(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(VAETrainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train_vae(resumed, progress=False)
    monkeypatch.setattr(VAETrainer, "train_step", real_step)
    assert load_state(tmp_path / "b" / "run" / "state.safetensors")[0]["step"] == 2
    train_vae(resumed, resume=True, progress=False)

    a, b = state(tmp_path / "a" / "run"), state(tmp_path / "b" / "run")
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) and any(k.startswith("disc.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    (ma, ta), (mb, tb) = (load_model_file(tmp_path / r / "run" / "model.safetensors") for r in "ab")
    assert ma["latent_stats"] == mb["latent_stats"] and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_refuses_nothing_or_a_different_run(tmp_path):
    with pytest.raises(UserError, match="Nothing to resume"):
        train_vae(tiny(tmp_path, steps=1), resume=True, progress=False)
    train_vae(tiny(tmp_path, steps=1), progress=False)
    with pytest.raises(UserError, match="differ from the saved run: \\['kl_weight'\\]"):
        train_vae(tiny(tmp_path, steps=2, kl_weight=1e-3), resume=True, progress=False)
    train_vae(tiny(tmp_path, steps=2, log_every=5), resume=True, progress=False)


def test_latent_stats_give_unit_variance_latents(tmp_path):
    path = train_vae(tiny(tmp_path, steps=3, stats_images=12), progress=False)
    meta = read_meta(path)
    stats = meta["latent_stats"]
    assert meta["kind"] == "vae" and stats["images"] == 12 and meta["image_size"] == 32
    assert meta["vae"]["shift_factor"] == pytest.approx(stats["mean"])
    assert meta["vae"]["scaling_factor"] == pytest.approx(1 / stats["std"])
    vae = load_vae(path)
    images, _, _ = V.build_dataset("shapes", 32, 0).batch(range(12))  # the training data's first images
    with torch.no_grad():
        lat = vae.encode_latent(images).double()
    assert abs(float(lat.mean())) < 1e-4 and float(lat.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_load_vae_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    vae = V.VAE(V.vae_config(TINY_VAE))
    path = save_vae(tmp_path / "v.safetensors", vae, image_size=32, latent_stats={"mean": 0, "std": 1, "images": 1})
    back = load_vae(path)
    assert back.cfg == vae.cfg
    from inkwash.pipeline import load_vae as pipeline_load_vae  # what latent pipelines read

    assert pipeline_load_vae(path).cfg == vae.cfg
    for k, v in vae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(x).mode()), back.decode(back.encode(x).mode()))
    with pytest.raises(UserError, match="does not exist"):
        load_vae(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(UserError):
        load_vae(tmp_path / "foreign.safetensors")


def test_a_diffusion_model_file_is_not_a_vae(model_file):
    with pytest.raises(UserError, match="not an autoencoder"):
        load_vae(model_file)


def test_perceptual_and_adversarial_terms_change_the_gradient(tmp_path):
    def grads(**kw):
        tr = VAETrainer(tiny(tmp_path, **kw))
        tr.train_step()  # the discriminator starts at step 0
        return torch.cat([p.grad.flatten() for p in tr.net.parameters() if p.grad is not None]), tr

    plain, _ = grads()
    perc, tr_p = grads(perceptual_weight=1.0)
    adv, tr_a = grads(adversarial_weight=1.0, adaptive_weight=False)
    assert not torch.allclose(plain, perc) and not torch.allclose(plain, adv)
    assert tr_a.disc is not None and all(p.grad is not None for p in tr_a.disc.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = tr_p.perceptual(x, x.flip(0))
    assert d.shape == (2,) and (d > 0).all() and torch.allclose(tr_p.perceptual(x, x), torch.zeros(2))
    _, tr = grads(adversarial_weight=0.5, adaptive_weight=True)  # the adaptive weight runs
    assert tr.disc is not None


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    from inkwash.models.vae import DiagonalGaussian

    real_kl = DiagonalGaussian.kl
    monkeypatch.setattr(DiagonalGaussian, "kl", lambda self: real_kl(self) * float("nan"))
    with pytest.raises(TrainingDiverged, match="step 1"):
        train_vae(tiny(tmp_path, steps=2), progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_eval_vae_reports_the_keys(tmp_path):
    path = train_vae(tiny(tmp_path, steps=2), progress=False)
    r = evaluate_vae(path, images=6, batch_size=4)
    keys = {"psnr_mean", "psnr_p5", "judge_accuracy_originals", "judge_accuracy_reconstructions", "judge_ratio",
            "encode_ms_per_image", "decode_ms_per_image", "seed", "images"}  # fmt: skip
    assert keys <= set(r) and r["images"] == 6 and r["seed"] != 0 and r["size"] == 32
    assert r["judge_accuracy_originals"] > 0.5  # the judge reads clean renders


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_vae_then_eval_vae(tmp_path, capsys):
    cfg = tmp_path / "vae.json"
    cfg.write_text(json.dumps(tiny(tmp_path).to_dict()))
    code, out, err = run(capsys, "train-vae", "--config", str(cfg), "--steps", "2", "--set", "log_every=2",
                         "--output-dir", str(tmp_path / "cli"))  # fmt: skip
    assert code == 0, err
    path = out.strip().splitlines()[-1]
    assert path.endswith("model.safetensors") and read_meta(path)["train_args"]["steps"] == 2
    code, out, err = run(capsys, "eval-vae", path, "--images", "4", "-o", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "PSNR" in out and "judge accuracy" in out and "ms/image" in out
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 4


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train-vae", "--config", "MISSING/vae.json"], "does not exist"),
        (["train-vae", "--config", "JSON:{not json"], "is not valid JSON"),
        (["train-vae", "--set", "batch_size"], "--set takes key=value"),
        (["train-vae", "--set", "batch_size=0"], "batch_size must be a positive integer"),
        (["train-vae", "--set", "lr_decay=wiggly"], "unknown lr_decay"),
        (["train-vae", "--set", "model=unet-tiny"], "not an autoencoder"),
        (["train-vae", "--set", "model=nope"], "unknown model preset"),
        (["train-vae", "--set", "colour=red"], "colour"),
        (["train-vae", "--set", "crop=6"], "crop 6 is not a multiple"),
        (["train-vae", "--set", "crop=128"], "larger than image_size"),
        (["train-vae", "--set", "output_dir=OUT", "--resume"], "nothing to resume"),
        (["eval-vae", "MISSING/v.safetensors"], "does not exist"),
        (["eval-vae", "FOREIGN"], "inkwash"),
        (["eval-vae", "DIFFUSION"], "not an autoencoder"),
        (["eval-vae", "VAE", "--images", "0"], "--images must be a positive"),
        (["eval-vae", "VAE", "--size", "33"], "not a multiple"),
        (["eval-vae", "VAE", "--seed", "0"], "training seed"),
    ],
)
def test_vae_cli_mistakes_get_one_sentence_and_exit_2(argv, needle, model_file, tmp_path, capsys):
    def subst(a):
        if a.startswith("JSON:"):
            (tmp_path / "c.json").write_text(a[5:])
            return str(tmp_path / "c.json")
        if a == "VAE":
            return str(save_vae(tmp_path / "v.safetensors", V.VAE(V.vae_config(TINY_VAE)), image_size=32,
                                train_args={"seed": 0, "dataset": "shapes"}))  # fmt: skip
        if a == "FOREIGN":
            save_file({"w": torch.zeros(2)}, str(tmp_path / "f.safetensors"))
            return str(tmp_path / "f.safetensors")
        return {"DIFFUSION": str(model_file)}.get(a, a.replace("OUT", str(tmp_path / "out")))

    code, out, err = run(capsys, *[subst(a) for a in argv])
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle.lower() in err.lower(), err


def test_the_recipe_and_preset_agree():
    cfg = VAETrainConfig.from_dict(json.loads(open("recipes/vae-shapes-f4.json").read()))
    assert cfg.model == "vae-shapes-f4" and get_preset(cfg.model).downsample == 4 and cfg.image_size == 64


def test_crops_are_on_the_latent_grid_and_cut_from_the_full_images(tmp_path):
    full = VAETrainer(tiny(tmp_path)).batch()  # [4, 3, 32, 32]
    tr = VAETrainer(tiny(tmp_path, crop=8))
    crops = tr.batch()
    assert crops.shape == (4, 3, 8, 8)
    corners = set()
    for im, crop in zip(full, crops):  # each crop is a window of its own image starting on the f = 2 grid
        grid = [(t, lf) for t in range(0, 25, 2) for lf in range(0, 25, 2)]
        hits = [(t, lf) for t, lf in grid if torch.equal(im[:, t : t + 8, lf : lf + 8], crop)]
        assert hits, "a crop is not a grid-aligned window of its image"
        corners.add(hits[0])
    assert len(corners) > 1  # drawn per image, not one window for the batch
    path = train_vae(tiny(tmp_path, crop=16, steps=2), progress=False)  # trained on crops, used on whole images
    assert V.read_vae_meta(path)["image_size"] == 32
    assert load_vae(path).encode_latent(full).shape == (4, 4, 16, 16)


def test_mse_term_changes_the_gradient(tmp_path):
    def grad(**kw):
        tr = VAETrainer(tiny(tmp_path, **kw))
        tr.train_step()
        return torch.cat([p.grad.flatten() for p in tr.net.parameters()])

    assert not torch.allclose(grad(), grad(mse_weight=1.0))


def test_the_bundled_shapes_vae_meets_its_targets_on_held_out_scenes():
    """The shipped f = 4 autoencoder (recipes/vae-shapes-f4.json): PSNR >= 32 dB and the judge reads its
    reconstructions as well as the originals (issue targets; measured on 2,000 scenes in docs/results.md,
    here on 60 held-out ones so the test stays quick)."""
    from inkwash.pipeline import load_vae

    path = "inkwash/assets/shapes-vae-f4.safetensors"
    vae = load_vae(path)
    assert (vae.cfg.downsample, vae.cfg.latent_channels) == (4, 4)
    meta = V.read_vae_meta(path)
    assert meta["train_args"]["crop"] == 32 and meta["train_args"]["steps"] == 10000
    assert vae.cfg.scaling_factor != 1.0  # measured from data, not left at the default
    r = evaluate_vae(vae, images=60, batch_size=30)
    assert r["psnr_mean"] >= 32.0 and r["psnr_p5"] >= 28.0, r
    assert r["judge_accuracy_reconstructions"] >= 0.95 * r["judge_accuracy_originals"], r
