"""The KL autoencoder: parity with diffusers' AutoencoderKL (fp32, 1e-5), key conversion both ways, configs and
preset sizes, the diagonal Gaussian posterior, the latent scale/shift, and tiled encode/decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inkwash.errors import UserError
from inkwash.formats.diffusers_vae import (
    config_from_diffusers_vae,
    config_to_diffusers_vae,
    from_diffusers_vae,
    to_diffusers_vae,
    vae_from_diffusers,
)
from inkwash.models.registry import PRESETS, build_model
from inkwash.models.vae import VAE, DiagonalGaussian, VAEConfig, tiled

diffusers = pytest.importorskip("diffusers")


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _diffusers_kwargs(channels, layers=1, latent=4, quant=True, attn=True, groups=4, **extra) -> dict:
    n = len(channels)
    return dict(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels), layers_per_block=layers, latent_channels=latent, norm_num_groups=groups,
        use_quant_conv=quant, use_post_quant_conv=quant, mid_block_add_attention=attn, **extra,
    )  # fmt: skip


LAYOUTS = {
    "f2-l1-z4-quant": dict(channels=(8, 16), layers=1, latent=4, quant=True),
    "f2-l2-z16-no-mid-attn": dict(channels=(8, 16), layers=2, latent=16, quant=False, attn=False),
    "f8-l2-z16": dict(channels=(8, 16, 16, 32), layers=2, latent=16, quant=False),
    "f8-l1-z4-quant": dict(channels=(8, 16, 16, 32), layers=1, latent=4, quant=True),
}


def _theirs(layout: str):
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**_diffusers_kwargs(**LAYOUTS[layout])).eval()
    with torch.no_grad():  # small noise on top of diffusers' init: no parameter is trivially zero or one
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return theirs


def _pair(layout: str):
    theirs = _theirs(layout)
    return vae_from_diffusers(dict(theirs.config), theirs.state_dict()).eval(), theirs


# --- parity ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_encode_decode_reconstruct_match_diffusers(layout):
    ours, theirs = _pair(layout)
    f, zc = ours.cfg.downsample, ours.cfg.latent_channels
    g = torch.Generator().manual_seed(1)
    for h, w in [(16, 16), (24, 32)]:
        x = torch.randn(2, 3, h, w, generator=g)
        z = torch.randn(2, zc, h // f, w // f, generator=g)
        with torch.no_grad():
            post_ref, post = theirs.encode(x).latent_dist, ours.encode(x)
            pairs = [
                (post.mean, post_ref.mean),
                (post.logvar, post_ref.logvar),
                (ours.decode(z), theirs.decode(z).sample),
                (ours.decode(post.mode()), theirs(x, sample_posterior=False).sample),
            ]
        assert post.mean.shape == (2, zc, h // f, w // f)
        for out, ref in pairs:
            assert ref.abs().max() > 1e-2  # the comparison means something
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_conversion_round_trips_exactly(layout):
    theirs = _theirs(layout)
    sd = theirs.state_dict()
    ours = from_diffusers_vae(sd)
    assert set(ours) == set(VAE(config_from_diffusers_vae(dict(theirs.config))).state_dict())
    back = to_diffusers_vae(ours)
    assert list(back) and set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    again = from_diffusers_vae(back)
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)
    theirs.load_state_dict(back, strict=True)  # diffusers accepts what we write


def test_fused_qkv_is_q_k_v_concatenated():
    sd = _theirs("f2-l1-z4-quant").state_dict()
    ours = from_diffusers_vae(sd)
    for side in ("encoder", "decoder"):
        for param in ("weight", "bias"):
            parts = [sd[f"{side}.mid_block.attentions.0.to_{n}.{param}"] for n in "qkv"]
            assert torch.equal(ours[f"{side}.mid.attn.qkv.{param}"], torch.cat(parts))


def test_legacy_attention_names_are_accepted():
    sd = dict(_theirs("f2-l1-z4-quant").state_dict())
    expected = from_diffusers_vae(sd)
    legacy = {}
    for k, v in sd.items():
        for new, old in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")]:
            if f".attentions.0.{new}." in k:
                k, v = k.replace(new, old), (v[:, :, None, None] if v.dim() == 2 else v)  # 1x1-conv shaped
        legacy[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    converted = from_diffusers_vae(legacy)
    assert set(converted) == set(expected) and all(torch.equal(converted[k], expected[k]) for k in expected)


def test_unmatched_and_missing_keys_are_listed():
    sd = dict(_theirs("f2-l1-z4-quant").state_dict())
    sd["encoder.mystery.weight"] = torch.zeros(1)
    del sd["decoder.mid_block.attentions.0.to_k.weight"]
    with pytest.raises(UserError, match=r"encoder\.mystery\.weight.*decoder\.mid_block\.attentions\.0\.to_k\.weight"):
        from_diffusers_vae(sd)
    ours = from_diffusers_vae(_theirs("f2-l1-z4-quant").state_dict())
    with pytest.raises(UserError, match=r"decoder\.up\.0\.extra\.bias"):
        to_diffusers_vae({**ours, "decoder.up.0.extra.bias": torch.zeros(1)})


def test_weights_that_do_not_fit_the_config_are_listed():
    theirs = _theirs("f2-l1-z4-quant")
    sd = dict(theirs.state_dict())
    del sd["decoder.conv_out.bias"]
    with pytest.raises(UserError, match=r"missing \['decoder\.conv_out\.bias'\]"):
        vae_from_diffusers(dict(theirs.config), sd)
    no_quant = {**dict(theirs.config), "use_quant_conv": False, "use_post_quant_conv": False}
    with pytest.raises(UserError, match=r"unexpected \['post_quant_conv\.bias'"):
        vae_from_diffusers(no_quant, theirs.state_dict())


# --- configs and presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_config_from_diffusers_builds_the_same_size(layout):
    kw = _diffusers_kwargs(**LAYOUTS[layout], scaling_factor=0.7, shift_factor=None)
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**kw)
        cfg = config_from_diffusers_vae(dict(theirs.config))
        assert _n_params(VAE(cfg)) == _n_params(theirs)
    spec = LAYOUTS[layout]
    assert cfg.channels == spec["channels"] and cfg.layers_per_block == spec["layers"]
    assert cfg.latent_channels == spec["latent"] and cfg.use_quant_conv == spec["quant"] and cfg.norm_groups == 4
    assert cfg.mid_attention == spec.get("attn", True)
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.7, 0.0)


SD_CHANNELS = (128, 256, 512, 512)
PRESET_DIFFUSERS = {  # the published models' diffusers configs, as far as the architecture and latent space go
    "vae-sd": _diffusers_kwargs(SD_CHANNELS, layers=2, groups=32, scaling_factor=0.18215),
    "vae-sdxl": _diffusers_kwargs(SD_CHANNELS, layers=2, groups=32, scaling_factor=0.13025),
    "vae-sd3": _diffusers_kwargs(
        SD_CHANNELS, layers=2, latent=16, quant=False, groups=32, scaling_factor=1.5305, shift_factor=0.0609
    ),
    "vae-flux": _diffusers_kwargs(
        SD_CHANNELS, layers=2, latent=16, quant=False, groups=32, scaling_factor=0.3611, shift_factor=0.1159
    ),
}


@pytest.mark.parametrize("name", sorted(PRESET_DIFFUSERS))
def test_presets_match_diffusers(name):
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**PRESET_DIFFUSERS[name])
        ours = build_model(PRESETS[name])
    assert _n_params(ours) == _n_params(theirs)
    if name == "vae-sd":
        assert _n_params(ours) == 83_653_863
    assert config_from_diffusers_vae(dict(theirs.config)) == PRESETS[name]


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if isinstance(c, VAEConfig)))
def test_config_round_trip(name):
    assert config_from_diffusers_vae(config_to_diffusers_vae(PRESETS[name])) == PRESETS[name]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_post_quant_conv": False}, "use_post_quant_conv=False"),
        ({"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}, "AttnDownEncoderBlock2D"),
        ({"act_fn": "gelu"}, "act_fn='gelu'"),
        ({"latents_mean": [0.1] * 4}, "latents_mean"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(UserError, match=message):
        config_from_diffusers_vae({**_diffusers_kwargs((8, 16)), **change})


# --- the posterior ---------------------------------------------------------------------------------------------


def test_kl_matches_torch_distributions():
    moments = torch.randn(3, 8, 5, 7, generator=torch.Generator().manual_seed(0)) * 2
    d = DiagonalGaussian(moments)
    normal = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(normal(d.mean, d.std), normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert d.kl().shape == (3,) and ref.min() > 0.1
    torch.testing.assert_close(d.kl(), ref, atol=1e-5, rtol=1e-5)


def test_mode_is_mean_and_logvar_is_clamped():
    moments = torch.randn(2, 8, 4, 4)
    moments[:, 4:, 0, 0] = 50.0
    moments[:, 4:, 0, 1] = -50.0
    d = DiagonalGaussian(moments)
    assert torch.equal(d.mode(), moments[:, :4]) and torch.equal(d.mean, moments[:, :4])
    assert (d.logvar[:, :, 0, 0] == 20).all() and (d.logvar[:, :, 0, 1] == -30).all()
    torch.testing.assert_close(d.std, torch.exp(0.5 * d.logvar))


def test_sample_has_the_posterior_statistics():
    means = torch.tensor([-1.5, 0.0, 0.5, 3.0])
    stds = torch.tensor([0.5, 1.0, 2.0, 0.1])
    moments = torch.cat([means, (stds**2).log()]).view(1, 8, 1, 1).expand(4, 8, 128, 128)  # 65,536 per channel
    d = DiagonalGaussian(moments)
    s = d.sample(torch.Generator().manual_seed(0))
    assert s.shape == (4, 4, 128, 128)
    torch.testing.assert_close(s.mean(dim=(0, 2, 3)), means, atol=4 * 2.0 / 256, rtol=0)  # 4 standard errors
    torch.testing.assert_close(s.std(dim=(0, 2, 3)), stds, atol=0, rtol=0.02)
    assert torch.equal(s, d.sample(torch.Generator().manual_seed(0)))
    assert not torch.equal(s, d.sample(torch.Generator().manual_seed(1)))


# --- latent scale and shift ------------------------------------------------------------------------------------

TINY = VAEConfig(channels=(8, 16), layers_per_block=1, latent_channels=4, norm_groups=4)


def _tiny(**changes) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(**{**TINY.__dict__, **changes})).eval()


def test_to_and_from_latent_use_scale_and_shift():
    vae = _tiny(scaling_factor=0.5, shift_factor=0.25)
    z = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(vae.to_latent(z), (z - 0.25) * 0.5, atol=0, rtol=0)
    torch.testing.assert_close(vae.from_latent(vae.to_latent(z)), z, atol=1e-6, rtol=0)
    torch.testing.assert_close(vae.to_latent(vae.from_latent(z)), z, atol=1e-6, rtol=0)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(vae.encode_latent(x), vae.to_latent(vae.encode(x).mean))
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(vae.encode_latent(x, generator=g1), vae.to_latent(vae.encode(x).sample(g2)))
        assert torch.equal(vae.decode_latent(z), vae.decode(z / 0.5 + 0.25))


# --- tiling ----------------------------------------------------------------------------------------------------


def _pointwise(seed: int = 0):
    """A nonlinear per-pixel function mixing channels (a 1x1 conv and tanh): tiling must not change it at all."""
    w = torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(seed))
    return lambda t: torch.tanh(F.conv2d(t, w))


def _upsampling(fn, k: int):
    return lambda t: fn(t).repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def test_tile_covering_the_input_is_untiled():
    vae = _tiny()
    z, x = torch.randn(2, 4, 10, 12), torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        assert torch.equal(vae.decode_latent(z, tile=12), vae.decode_latent(z))
        assert torch.equal(vae.decode_latent(z, tile=40), vae.decode_latent(z))
        assert torch.equal(vae.encode_latent(x, tile=24), vae.encode_latent(x))


@pytest.mark.parametrize("hw, tile", [((20, 28), 8), ((9, 31), 6), ((16, 16), 8), ((13, 5), 12), ((40, 3), 7)])
@pytest.mark.parametrize("k", [1, 4])
def test_tiling_a_pointwise_function_changes_nothing(hw, tile, k):
    x = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(0))
    fn = _upsampling(_pointwise(), k)
    out = tiled(fn, x, tile, 1 / k)
    assert out.shape == (2, 3, hw[0] * k, hw[1] * k)
    torch.testing.assert_close(out, fn(x), atol=1e-6, rtol=1e-6)


def test_tiles_blend_with_linear_ramps():
    calls = []

    def tile_index(t):  # each tile outputs its own index, everywhere
        calls.append(t.shape[-1])
        return torch.full_like(t, float(len(calls) - 1))

    out = tiled(tile_index, torch.zeros(1, 1, 1, 20), 8, 1.0)  # overlap 2, tiles at 0, 6, 12
    expected = [0.0] * 6 + [0.25, 0.75] + [1.0] * 4 + [1.25, 1.75] + [2.0] * 6
    assert calls == [8, 8, 8]
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw, tile", [((20, 28), 8), ((9, 9), 8), ((8, 8), 8), ((3, 50), 4), ((33, 17), 10)])
@pytest.mark.parametrize("k", [1, 4])
def test_every_pixel_is_covered(hw, tile, k):
    # out = sum(w * y) / sum(w): with y = 1 any pixel of zero weight would be 0 / 0 = NaN
    out = tiled(_upsampling(torch.ones_like, k), torch.zeros(1, 2, *hw), tile, 1 / k)
    assert out.shape == (1, 2, hw[0] * k, hw[1] * k)
    assert torch.equal(out, torch.ones_like(out))


def test_tiled_shapes_for_sizes_not_multiples_of_the_tile():
    vae = _tiny()  # f = 2
    z, x = torch.randn(1, 4, 20, 28), torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        dec, enc = vae.decode_latent(z, tile=8), vae.encode_latent(x, tile=16)
    assert dec.shape == (1, 3, 40, 56) and dec.isfinite().all()
    assert enc.shape == (1, 4, 20, 28) and enc.isfinite().all()


def test_tiled_downsampling_with_aligned_tiles_is_exact():
    x = torch.randn(1, 2, 40, 44)
    fn = lambda t: F.avg_pool2d(t, 4)  # noqa: E731  block-local: exact when tiles start on multiples of 4
    torch.testing.assert_close(tiled(fn, x, 16, 4), fn(x), atol=1e-6, rtol=1e-6)


def test_tiled_downsampling_with_unaligned_stride():
    x = torch.randn(1, 2, 40, 40)
    fn = lambda t: F.avg_pool2d(t, 4)  # noqa: E731
    torch.testing.assert_close(tiled(fn, x, 12, 4), fn(x), atol=1e-6, rtol=1e-6)  # overlap 3, stride 9
