"""Latent diffusion: training in an autoencoder's latent space (encoding on the fly or from a latent cache),
model files that carry their autoencoder, and a pipeline that samples latents and decodes them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from test_trainer import TINY_NET, TINY_TEXT  # tests/ is on sys.path under pytest

from inkwash.data.base import to_uint8_hwc
from inkwash.data.shapes import ShapesDataset
from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_model_file, save_model
from inkwash.models.registry import build_model, config_to_dict
from inkwash.models.vae import VAEConfig
from inkwash.pipeline import Pipeline, load_vae
from inkwash.serve.app import ServeConfig, create_app
from inkwash.train.latents import build_latent_cache
from inkwash.train.trainer import TrainConfig, Trainer, generator_for, load_batch, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VAE = VAEConfig(channels=(8, 16), layers_per_block=1, latent_channels=4, norm_groups=4, scaling_factor=0.7,
                     shift_factor=0.1)  # fmt: skip


def vae_file(path, seed=0, cfg=TINY_VAE):
    torch.manual_seed(seed)
    vae = build_model(cfg)
    return save_model(path, {"vae": vae.state_dict()}, {"kind": "vae", "vae": config_to_dict(cfg)})


def latent_cfg(tmp_path, vae_path, **kw) -> TrainConfig:
    args = dict(model=TINY_NET, text_encoder=TINY_TEXT, image_size=32, batch_size=2, steps=3, lr=1e-3,
                output_dir=str(tmp_path / "run"), log_every=1, sample_prompts=(), vae=vae_path and str(vae_path),
                sampling={"sampler": "euler", "steps": 2, "guidance": 2.0, "schedule": None})  # fmt: skip
    return TrainConfig(**{**args, **kw})


def test_latent_training_writes_a_model_that_samples_images(tmp_path):
    vae = vae_file(tmp_path / "vae.safetensors")
    path = train(latent_cfg(tmp_path, vae))
    meta, tensors = load_model_file(path)
    assert meta["channels"] == 4 and meta["model"]["in_channels"] == 4 and meta["model"]["out_channels"] == 4
    assert meta["vae"]["scaling_factor"] == 0.7 and any(k.startswith("vae.") for k in tensors)
    pipe = Pipeline.from_file(path)
    assert pipe.latent_factor == 2 and pipe.size_multiple == 4
    images = pipe.generate(["a red circle", "a blue square"], seed=3)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    # the images are the autoencoder's decoding of the sampled latents
    run = pipe.prepare(["a red circle", "a blue square"], seed=3)
    assert run.x.shape == (2, 4, 16, 16)
    want = load_vae(vae).decode_latent(torch.zeros(1, 4, 16, 16)).clamp(-1, 1)
    assert torch.allclose(run.to_images(torch.zeros(1, 4, 16, 16)), want, atol=1e-6)
    assert pipe.info()["latent"]["shape"] == [4, 16, 16]
    with pytest.raises(UserError, match="multiple of 4"):
        pipe.generate("a circle", size=34)


def test_the_latent_is_a_seeded_posterior_sample_scaled_by_the_config(tmp_path):
    vae_path = vae_file(tmp_path / "vae.safetensors")
    tr = Trainer(latent_cfg(tmp_path, vae_path))
    images, _ = tr._chunk(0)
    z = tr._latents(images, 0)
    posterior = tr.vae.encode(images)
    want = (posterior.sample(generator_for(0, "latent", 0, 0)) - 0.1) * 0.7
    assert torch.allclose(z, want, atol=1e-6)
    assert not torch.allclose(tr._latents(images, 1), z)  # another chunk, another sample


def test_cached_latents_are_the_posterior_samples_of_encoding_on_the_fly(tmp_path):
    vae = vae_file(tmp_path / "vae.safetensors")
    cache = build_latent_cache(vae, tmp_path / "cache", image_size=32, items=12, batch_size=5, progress=False)
    assert len(cache) == 12 and cache.moments.shape == (12, 8, 16, 16)
    tr = Trainer(latent_cfg(tmp_path, vae, latent_cache=str(tmp_path / "cache")))
    shapes = ShapesDataset(32, seed=0)
    for step in range(8):  # 8 steps x 2 images: the 12 cached items, reshuffled each epoch
        tr.step = step
        moments, captions = tr._chunk(0)
        idx = tr.order.indices(step * 2, 2)
        images, want_captions = load_batch(shapes, idx)
        assert captions == want_captions
        live = tr.vae.to_latent(tr.vae.encode(images).sample(generator_for(0, "latent", step, 0)))
        assert torch.allclose(tr._latents(moments, 0), live, atol=1e-5)  # encoded in batches of 5 vs 2


def test_a_stale_or_unfinished_cache_is_refused_with_a_sentence(tmp_path):
    vae = vae_file(tmp_path / "vae.safetensors")
    other = vae_file(tmp_path / "other.safetensors", seed=1)
    build_latent_cache(vae, tmp_path / "cache", image_size=32, items=4, progress=False)
    with pytest.raises(UserError, match="made with another autoencoder"):
        Trainer(latent_cfg(tmp_path, other, latent_cache=str(tmp_path / "cache")))
    with pytest.raises(UserError, match="holds 32 px images, not 64 px"):
        Trainer(latent_cfg(tmp_path, vae, latent_cache=str(tmp_path / "cache"), image_size=64))
    (tmp_path / "cache" / "meta.json").unlink()
    with pytest.raises(UserError, match="not a finished latent cache"):
        Trainer(latent_cfg(tmp_path, vae, latent_cache=str(tmp_path / "cache")))
    with pytest.raises(UserError, match="latent_cache needs `vae` too"):
        Trainer(latent_cfg(tmp_path, None, latent_cache=str(tmp_path / "cache")))
    with pytest.raises(UserError, match="not a multiple of the autoencoder's factor 2"):
        Trainer(latent_cfg(tmp_path, vae, image_size=15))
    with pytest.raises(UserError, match="is not an autoencoder file"):
        load_vae(save_model(tmp_path / "x.safetensors", {"model": {"w": torch.zeros(1)}}, {"kind": "other"}))


def test_the_server_batches_latent_models_and_previews_decoded_images(tmp_path):
    path = train(latent_cfg(tmp_path, vae_file(tmp_path / "vae.safetensors"), steps=1))
    app = create_app(ServeConfig(models=[path], data_dir=tmp_path / "serve"))
    with TestClient(app) as c:
        job = c.post("/v1/jobs", json={"prompt": "a red circle", "n": 2, "seed": 5, "steps": 30}).json()
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            text = r.read().decode()
        previews = [
            json.loads(line[6:]).get("preview") for line in text.splitlines() if line.startswith('data: {"step')
        ]
        assert previews and all(p is None or p.startswith("data:image/png;base64,") for p in previews)
        out = c.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 5, "steps": 3}).json()
    want = to_uint8_hwc(Pipeline.from_file(path).generate("a red circle", n=2, seed=5, steps=3))
    for i, d in enumerate(out["data"]):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))), dtype=int)
        assert got.shape == (32, 32, 3) and np.abs(got - want[i].astype(int)).max() <= 2


# --- SDXL's base + refiner --------------------------------------------------------------------------------


def test_refiner_training_draws_only_low_noise_times():
    from inkwash.diffusion import TimeSampler

    u = TimeSampler(high=0.2).draw_u(10_000, torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() <= 0.2 and abs(u.mean().item() - 0.1) < 0.005
    with pytest.raises(UserError, match="0 <= low < high <= 1"):
        TimeSampler(low=0.5, high=0.2)


def test_base_and_refiner_split_the_grid_at_the_handoff(tmp_path, lively_model_file):
    from inkwash.pipeline import handoff_index

    base, refiner = Pipeline.from_file(lively_model_file), Pipeline.from_file(lively_model_file)
    with torch.no_grad():
        for p in refiner.net.parameters():
            p.mul_(1.1)
    times = base.prepare("a circle", steps=10, sampler="euler").times
    assert handoff_index(base.process, times, 0.8) == 8 and handoff_index(base.process, times, 0.0) == 0
    kw = {"seed": 3, "steps": 10, "sampler": "euler"}
    alone = base.generate("a red circle", **kw)
    assert torch.equal(base.generate("a red circle", refiner=refiner, handoff=1.0, **kw), alone)
    assert torch.allclose(base.generate("a red circle", refiner=refiner, handoff=0.0, **kw),
                          refiner.generate("a red circle", **kw), atol=1e-6)  # fmt: skip
    mixed = base.generate("a red circle", refiner=refiner, handoff=0.8, **kw)
    assert (mixed - alone).abs().max() > 1e-3
    # by hand: the base's sampler to the hand-off, the refiner's from there, one generator throughout
    from inkwash.sampling import SAMPLERS

    run, second = base.prepare("a red circle", **kw), refiner.prepare("a red circle", **kw)
    x = SAMPLERS["euler"](run.model, run.x, run.times[:9], process=base.process)
    x = SAMPLERS["euler"](second.model, x, run.times[8:], process=base.process)
    assert torch.allclose(mixed, x.clamp(-1, 1), atol=1e-6)
    steps = []
    base.generate("a red circle", refiner=refiner, callback=lambda i, n, x, x0: steps.append((i, n)), **kw)
    assert steps == [(i, 10) for i in range(10)]


def test_a_refiner_from_another_space_is_refused(tmp_path, lively_model_file):
    latent = Pipeline.from_file(train(latent_cfg(tmp_path, vae_file(tmp_path / "vae.safetensors"), steps=1)))
    with pytest.raises(UserError, match="cannot refine"):
        Pipeline.from_file(lively_model_file).generate("a circle", refiner=latent)
    with pytest.raises(UserError, match="handoff is the fraction"):
        latent.generate("a circle", refiner=latent, handoff=1.5)


def test_cli_caches_latents_trains_on_them_and_generates_with_a_refiner(tmp_path, capsys):
    from PIL import Image as PILImage

    from inkwash.cli import main

    vae = vae_file(tmp_path / "vae.safetensors")
    assert main(["cache-latents", "--vae", str(vae), "-o", str(tmp_path / "cache"), "--image-size", "32",
                 "--items", "6"]) == 0  # fmt: skip
    assert "6 items, moments (8, 16, 16) each" in capsys.readouterr().out
    base = train(latent_cfg(tmp_path, vae, steps=1, latent_cache=str(tmp_path / "cache")))
    refiner = train(latent_cfg(tmp_path, vae, steps=1, output_dir=str(tmp_path / "refiner"),
                               time_sampling_args={"high": 0.2}))  # fmt: skip
    out = tmp_path / "x.png"
    code = main(["generate", "a red circle", "--model", str(base), "--refiner", str(refiner), "--handoff", "0.6",
                 "-o", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    params = PILImage.open(out).text["parameters"]
    assert "Refiner: model, Refiner switch at: 0.6" in params and PILImage.open(out).size == (32, 32)
    assert main(["cache-latents", "--vae", str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "c2")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- SDXL micro-conditioning ------------------------------------------------------------------------------

MICRO_NET = {**TINY_NET, "micro_conditions": 6, "micro_embed_dim": 8}


def test_micro_augment_renders_lowres_originals_and_zoomed_crops_and_says_so(tmp_path):
    cfg = TrainConfig(model=MICRO_NET, text_encoder=TINY_TEXT, image_size=32, batch_size=8, steps=1,
                      output_dir=str(tmp_path / "run"), sample_prompts=(),
                      micro_augment={"lowres": 0.4, "min_side": 8, "zoom": 0.4, "max_zoom": 1.5})  # fmt: skip
    tr = Trainer(cfg)
    images, _ = tr._chunk(0)
    out, micro = tr._augment_micro(images, 0)
    assert micro.shape == (8, 6) and (micro[:, 4:] == 32).all()
    kinds = set()
    for img, src, (oh, ow, top, left, _, _) in zip(out, images, micro.tolist()):
        if oh < 32:  # a low-resolution original, upsampled
            kinds.add("lowres")
            assert 8 <= oh == ow and top == left == 0
            small = torch.nn.functional.interpolate(src[None], size=(int(oh), int(oh)), mode="area")
            want = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)[0]
            assert torch.allclose(img, want, atol=1e-6)
        elif top or left:  # a crop of a zoomed image
            kinds.add("zoom")
            assert oh == ow == 32 and 0 <= top <= 16 and 0 <= left <= 16
        else:
            assert torch.equal(img, src)
    assert kinds == {"lowres", "zoom"}
    again, micro2 = tr._augment_micro(images, 0)  # seeded by (seed, step, chunk)
    assert torch.equal(again, out) and torch.equal(micro2, micro)
    path = train(cfg)
    pipe = Pipeline.from_file(path)
    run = pipe.prepare("a circle", n=2, original_size=16, crop=(3, 4))
    assert run.model.cond["micro"].tolist() == [[16, 16, 3, 4, 32, 32]] * 2
    assert pipe.prepare("a circle").model.cond["micro"].tolist() == [[32, 32, 0, 0, 32, 32]]
    assert pipe.generate("a circle", steps=2).shape == (1, 3, 32, 32)
    with pytest.raises(UserError, match="micro_augment options"):
        TrainConfig(micro_augment={"blur": 0.5})
