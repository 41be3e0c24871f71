"""FID/KID statistics against direct computations, the FID Inception layout and loading, and the clean-fid resize."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from inkwash.data.shapes import ShapesDataset
from inkwash.errors import UserError
from inkwash.eval import fid
from inkwash.eval.fid import feature_stats, features, fid_kid, frechet_distance, get_extractor, kid
from inkwash.eval.inception import FIDInceptionV3, InceptionFeatures, clean_resize

FIXTURES = Path(__file__).parent / "fixtures"


def _random_features(rng, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features [n, d]."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + shift + rng.standard_normal(d) * 0.1


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    """FID the way pytorch-fid computes it, with scipy's matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------------------------------------ statistics


def test_feature_stats_match_numpy_cov():
    x = _random_features(np.random.default_rng(0), 40, 6).astype(np.float32)
    mu, sigma = feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


@pytest.mark.parametrize("d,n1,n2", [(2, 50, 60), (8, 200, 150), (32, 500, 400), (24, 10, 300), (40, 12, 15)])
def test_frechet_distance_matches_scipy_sqrtm(d, n1, n2):
    rng = np.random.default_rng(d + n1)
    s_a = feature_stats(_random_features(rng, n1, d))  # n < d: rank-deficient covariance
    s_b = feature_stats(_random_features(rng, n2, d, shift=0.3))
    ours = frechet_distance(*s_a, *s_b)
    ref = _scipy_fid(*s_a, *s_b)
    scale = np.trace(s_a[1]) + np.trace(s_b[1])
    assert abs(ours - ref) <= 1e-6 * scale, (ours, ref)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    for n, d in [(300, 16), (20, 64)]:
        mu, sigma = feature_stats(_random_features(rng, n, d))
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_frechet_distance_of_shifted_gaussians_is_the_mean_shift():
    sigma = np.diag([1.0, 2.0, 3.0])
    assert frechet_distance(np.zeros(3), sigma, np.array([1.0, 2.0, 0.0]), sigma) == pytest.approx(5.0, abs=1e-12)
    # Tr(sqrt(S1 S2)) for commuting diagonals: sum sqrt(a_i b_i)
    s2 = np.diag([4.0, 8.0, 12.0])
    expected = 1 + 2 + 3 + 4 + 8 + 12 - 2 * (2 + 4 + 6)
    assert frechet_distance(np.zeros(3), sigma, np.zeros(3), s2) == pytest.approx(expected, abs=1e-12)


def test_statistics_reject_bad_shapes():
    with pytest.raises(UserError, match="at least 2 samples"):
        feature_stats(np.zeros((1, 4)))
    with pytest.raises(UserError, match="one dimension"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="one dimension"):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))


def _kernel(a, b):
    return (a @ b / len(a) + 1.0) ** 3


def _mmd2_double_loop(x, y) -> float:
    """Unbiased MMD^2 written out term by term."""
    m = len(x)
    kxx = sum(_kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(_kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(_kernel(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_equals_direct_unbiased_mmd_on_one_full_subset():
    rng = np.random.default_rng(2)
    x, y = _random_features(rng, 25, 7), _random_features(rng, 25, 7, shift=0.5)
    mean, std = kid(x, y, subsets=1, subset_size=1000)  # capped at 25: one subset holding every point
    assert mean == pytest.approx(_mmd2_double_loop(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_is_deterministic_and_near_zero_for_one_distribution():
    rng = np.random.default_rng(3)
    both = _random_features(rng, 600, 8)
    x, y, z = both[:300], both[300:], both[300:] + 0.5
    assert kid(x, z, subsets=20, subset_size=100, seed=5) == kid(x, z, subsets=20, subset_size=100, seed=5)
    assert kid(x, z, subsets=20, subset_size=100, seed=5) != kid(x, z, subsets=20, subset_size=100, seed=6)
    same, _ = kid(x, y, subsets=20, subset_size=100)
    far, _ = kid(x, z, subsets=20, subset_size=100)
    assert abs(same) < 0.05 * far


def test_fid_kid_report():
    rng = np.random.default_rng(4)
    out = fid_kid(_random_features(rng, 60, 5), _random_features(rng, 80, 5), kid_subsets=5, kid_subset_size=50)
    assert set(out) == {"fid", "kid", "kid_std", "n_gen", "n_ref"}
    assert (out["n_gen"], out["n_ref"]) == (60, 80) and out["fid"] > 0


# ------------------------------------------------------------------------------------------------ extractors


class PixelStats:
    """Deterministic test extractor: per-channel mean, std, and mean |dx| and |dy| (sensitive to noise)."""

    name = "pixelstats"
    dim = 12

    def __init__(self):
        self.calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        x = images.astype(np.float64) / 255.0
        dx, dy = np.abs(np.diff(x, axis=2)).mean((1, 2)), np.abs(np.diff(x, axis=1)).mean((1, 2))
        return np.concatenate([x.mean((1, 2)), x.std((1, 2)), dx, dy], axis=1)


def test_fid_grows_with_noise_on_shapes():
    extractor = PixelStats()
    ref = features(extractor, fid.to_uint8_hwc(ShapesDataset(size=32, seed=1).batch(range(200))[0]))
    base = ShapesDataset(size=32, seed=2).batch(range(200))[0].numpy()
    noise = np.random.default_rng(0).standard_normal(base.shape).astype(np.float32)
    scores = []
    for sigma in (0.0, 0.05, 0.1, 0.2, 0.4):
        gen = features(extractor, fid.to_uint8_hwc(np.clip(base + sigma * noise, -1, 1)), batch_size=64)
        scores.append(fid_kid(gen, ref, kid_subsets=10, kid_subset_size=100))
    fids = [s["fid"] for s in scores]
    kids = [s["kid"] for s in scores]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids


def test_features_batches_and_checks_shapes():
    extractor = PixelStats()
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 12, 3), dtype=np.uint8)
    out = features(extractor, images, batch_size=4)
    assert extractor.calls == 3 and out.shape == (10, extractor.dim) and out.dtype == np.float64
    np.testing.assert_allclose(out, extractor(images))
    with pytest.raises(UserError, match="uint8"):
        features(extractor, images.astype(np.float32))


def test_get_extractor_rejects_unknown_specs():
    with pytest.raises(UserError, match="shapes"):
        get_extractor("clip")
    with pytest.raises(UserError, match="weights file"):
        get_extractor("inception")
    with pytest.raises(UserError, match="does not exist"):
        get_extractor("inception:/no/such/pt_inception.pth")


def test_shapes_reference_features_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INKWASH_CACHE", str(tmp_path))
    extractor = PixelStats()
    a = fid.shapes_reference_features(extractor, size=32, n=6, batch_size=4)
    assert extractor.calls == 2 and a.shape == (6, extractor.dim)
    assert len(list((tmp_path / "fid").glob("shapes-pixelstats-s32-n6-seed12345.npy"))) == 1
    b = fid.shapes_reference_features(extractor, size=32, n=6, batch_size=4)
    assert extractor.calls == 2  # served from the cache
    np.testing.assert_array_equal(a, b)
    # The features are of the seed-12345 renders, converted exactly to uint8 HWC.
    dataset = ShapesDataset(size=32, seed=12345)
    renders = np.stack([dataset.render(dataset.scene(i)[0]) for i in range(6)])
    np.testing.assert_allclose(a, extractor(renders))


# ------------------------------------------------------------------------------------------------ Inception


def _random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random (so a round trip cannot pass by accident), scaled so activations stay O(1)."""
    torch.manual_seed(seed)
    state = FIDInceptionV3().state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):  # He init
            value.copy_(torch.randn_like(value) * (2.0 / value[0].numel()) ** 0.5)
        elif key.endswith(("bn.weight", "running_var")):
            value.copy_(torch.rand_like(value) + 0.5)
        else:
            value.copy_(torch.randn_like(value) * 0.05)
    return state


@pytest.fixture(scope="module")
def inception_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_random_inception_state(), path)
    return path


def test_inception_layout_matches_published_weights():
    published = json.loads((FIXTURES / "pt_inception_keys.json").read_text())["keys"]
    ours = [[k, list(v.shape)] for k, v in FIDInceptionV3().state_dict().items()]
    assert len(published) == 472
    assert ours == published


def test_inception_loads_pth_and_safetensors(inception_pth, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(inception_pth, weights_only=True)
    net = InceptionFeatures.from_file(inception_pth, device="cpu")
    assert net.name == "inception" and net.dim == 2048 and len(net.cache_key) == 12
    for key, value in net.net.state_dict().items():
        assert torch.equal(value, state[key]), key
    st_path = tmp_path / "weights.safetensors"
    save_file(state, str(st_path))
    net2 = InceptionFeatures.from_file(st_path, device="cpu")
    for key, value in net2.net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert net2.cache_key != net.cache_key
    # A torchvision-style copy with BatchNorm step counters loads too.
    counters = {k.replace("running_var", "num_batches_tracked"): torch.tensor(0) for k in state if "running_var" in k}
    tv_path = tmp_path / "torchvision_style.pth"
    torch.save({**state, **counters}, tv_path)
    InceptionFeatures.from_file(tv_path, device="cpu")


def test_inception_bad_files_are_user_errors(inception_pth, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="Could not read"):
        InceptionFeatures.from_file(garbage)
    with pytest.raises(UserError, match="does not exist"):
        InceptionFeatures.from_file(tmp_path / "missing.pth")
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="Could not read"):
        InceptionFeatures.from_file(bad_st)
    state = torch.load(inception_pth, weights_only=True)
    state.pop("fc.bias")
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save(state, wrong_keys)
    with pytest.raises(UserError, match=r"missing keys \['fc.bias'\].*unexpected keys \['AuxLogits.fc.weight'\]"):
        InceptionFeatures.from_file(wrong_keys)
    state = torch.load(inception_pth, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save(state, wrong_shape)
    with pytest.raises(UserError, match="wrong shape"):
        InceptionFeatures.from_file(wrong_shape)
    pickled = tmp_path / "pickled.pth"
    torch.save({"net": PixelStats()}, pickled)
    with pytest.raises(UserError, match="Could not read"):  # weights_only refuses arbitrary objects
        InceptionFeatures.from_file(pickled)
    not_tensors = tmp_path / "not_tensors.pth"
    torch.save({"step": 3}, not_tensors)
    with pytest.raises(UserError, match="plain state dict"):
        InceptionFeatures.from_file(not_tensors)


def test_inception_forward_any_size(inception_pth):
    extractor = InceptionFeatures.from_file(inception_pth, device="cpu")
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (48, 64)]:
        out = extractor(rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8))
        assert out.shape == (2, 2048) and np.isfinite(out).all()
        assert np.abs(out[0] - out[1]).max() > 0


def test_clean_resize_matches_per_channel_pil():
    images = np.random.default_rng(0).integers(0, 256, (2, 17, 23, 3), dtype=np.uint8)
    ours = clean_resize(images)
    assert ours.shape == (2, 299, 299, 3) and ours.dtype == np.float32
    for i in range(2):
        for c in range(3):
            channel = Image.fromarray(images[i, :, :, c].astype(np.float32), mode="F")
            direct = np.asarray(channel.resize((299, 299), resample=Image.BICUBIC)).clip(0, 255)
            np.testing.assert_array_equal(ours[i, :, :, c], direct)
    unclipped = np.asarray(Image.fromarray(images[0, :, :, 0].astype(np.float32), mode="F").resize((299, 299), 3))
    assert unclipped.min() < 0 or unclipped.max() > 255  # bicubic overshoots: the clip matters
    assert ours.min() >= 0 and ours.max() <= 255
