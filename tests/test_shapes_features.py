"""The bundled Shapes feature network: loading, determinism, scale consistency, FID behaviour, its heads."""

import hashlib

import numpy as np
import pytest
import torch

from inkwash.data.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapesDataset
from inkwash.errors import UserError
from inkwash.eval.fid import feature_stats, frechet_distance, get_extractor, to_uint8_hwc
from inkwash.eval.shapes_features import (
    ASSET,
    FeatureNetConfig,
    ShapesFeatures,
    load_shapes_features,
    preprocess,
    scene_targets,
)
from inkwash.formats.checkpoint import read_meta, save_model


@pytest.fixture(scope="module")
def net() -> ShapesFeatures:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_shapes_features()


def renders(size: int, seed: int, n: int, start: int = 0) -> tuple[np.ndarray, list[dict]]:
    images, _, scenes = ShapesDataset(size, seed=seed).batch(range(start, start + n))
    return to_uint8_hwc(images), scenes


def fid(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def test_bundled_file_loads_with_its_config(net):
    assert net.name == "shapes" and net.dim == 256 and net.input_size == 64
    assert net.cache_key == hashlib.sha256(ASSET.read_bytes()).hexdigest()[:16]
    assert ASSET.stat().st_size < 3_000_000
    meta = read_meta(ASSET)
    assert FeatureNetConfig.from_dict(meta["arch"]) == net.net.cfg
    assert meta["vocab"] == {
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "backgrounds": list(BACKGROUNDS),
        "sizes": ["small", "large"],
    }
    assert not net.net.training
    extractor = get_extractor("shapes")  # what `inkwash eval --features shapes` uses
    assert isinstance(extractor, ShapesFeatures) and extractor.cache_key == net.cache_key


def test_features_are_finite_deterministic_and_batch_independent(net):
    images, _ = renders(64, 777, 12)
    f = net(images)
    assert f.shape == (12, net.dim) and f.dtype == np.float32 and np.isfinite(f).all()
    np.testing.assert_array_equal(f, net(images))
    np.testing.assert_allclose(net(images, batch_size=5), f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(net(images[3:4]), f[3:4], rtol=1e-4, atol=1e-4)
    big, _ = renders(256, 777, 2)  # any size is resized to 64 px; lists of images work too
    assert net(big).shape == (2, net.dim) and net(list(big)).shape == (2, net.dim)
    assert net(images[:0]).shape == (0, net.dim)


def test_preprocess_is_bicubic_to_64_in_minus_one_one():
    images, _ = renders(128, 5, 3)
    x = preprocess(images)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    same, _ = renders(64, 5, 3)
    np.testing.assert_allclose(preprocess(same).numpy(), same.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)


def test_bad_images_are_user_errors(net):
    with pytest.raises(UserError, match="uint8"):
        net(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(UserError, match=r"\[N, H, W, 3\]"):
        net(np.zeros((2, 32, 32), np.uint8))


def test_missing_or_corrupt_file_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="missing"):
        load_shapes_features(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError):
        load_shapes_features(bad)
    other = tmp_path / "other.safetensors"
    save_model(other, {"model": {"w": torch.zeros(2)}}, {"kind": "unet"})
    with pytest.raises(UserError, match="not a Shapes feature network"):
        load_shapes_features(other)
    meta = read_meta(ASSET)
    broken = tmp_path / "broken.safetensors"
    save_model(broken, {"model": {"w": torch.zeros(2)}}, {k: meta[k] for k in ("kind", "arch")})
    with pytest.raises(UserError, match="corrupt"):
        load_shapes_features(broken)


def test_same_scene_at_other_sizes_is_closer_than_other_scenes(net):
    n = 48
    feats, scenes = {}, {}
    for size in (32, 64, 128):
        images, scenes[size] = renders(size, 4242, n)
        feats[size] = net(images)
    # The sampler draws one scene at every size; placement retries may differ, so compare like with like.
    same = [
        i
        for i in range(n)
        if all(
            [(o["shape"], o["colour"]) for o in scenes[s][i]["objects"]]
            == [(o["shape"], o["colour"]) for o in scenes[64][i]["objects"]]
            for s in (32, 128)
        )
    ]
    assert len(same) >= n * 0.8
    for a, b in ((32, 64), (64, 128), (32, 128)):
        d = np.linalg.norm(feats[a][same][:, None] - feats[b][same][None], axis=-1)  # [scene at a, scene at b]
        own = np.diag(d)
        others = np.where(np.eye(len(same), dtype=bool), np.inf, d).min(1)
        assert (own < others).mean() >= 0.95, (a, b, (own < others).mean())
        assert own.mean() < 0.35 * d[~np.eye(len(same), dtype=bool)].mean(), (a, b)


def test_fid_is_small_between_real_sets_and_grows_with_noise(net):
    ref = net(renders(64, 777, 200)[0])
    base = ShapesDataset(64, seed=778).batch(range(200))[0].numpy()
    noise = np.random.default_rng(0).standard_normal(base.shape).astype(np.float32)
    sigmas = (0.0, 0.05, 0.1, 0.2, 0.4)  # on the [-1, 1] scale of the dataset's images
    fids = [fid(ref, net(to_uint8_hwc(np.clip(base + s * noise, -1, 1)))) for s in sigmas]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[0] < fids[2] / 3, fids  # two real sets differ far less than real and noisy ones


def test_features_are_standardised_on_real_renders(net):
    f = np.concatenate([net(renders(size, 4243, 100)[0]) for size in (32, 64, 128)])
    assert np.abs(f.mean(0)).mean() < 0.25
    assert 0.8 < np.median(f.std(0)) < 1.2


def test_quality_head_grades_noise(net):
    base = ShapesDataset(64, seed=556).batch(range(64))[0].numpy()
    noise = np.random.default_rng(1).standard_normal(base.shape).astype(np.float32)
    sigmas = (0.0, 0.05, 0.1, 0.2, 0.4)
    est = [net.predict(to_uint8_hwc(np.clip(base + s * noise, -1, 1)))["quality"][:, 0].mean() * 0.1 for s in sigmas]
    assert all(a < b for a, b in zip(est, est[1:])), est
    assert abs(est[0]) < 0.02 and abs(est[2] - 0.1) < 0.03, est


def test_heads_read_held_out_scenes(net):
    images, scenes = renders(64, 555, 128)
    p = net.predict(images)
    t = scene_targets(scenes)
    assert (p["background"] == t["background"].numpy()).mean() >= 0.97
    assert (p["count"] == t["count"].numpy()).mean() >= 0.98
    pred, true = p["presence"].reshape(128, -1) > 0.5, t["presence"].numpy() > 0.5
    assert 2 * (pred & true).sum() / (pred.sum() + true.sum()) >= 0.85
