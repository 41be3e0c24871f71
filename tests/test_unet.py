"""UNet contract tests on tiny configs, the preset registry, and FLOP counting."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from inkwash.errors import UserError
from inkwash.models import (
    PRESETS,
    UNet,
    build_model,
    config_from_dict,
    config_to_dict,
    count_flops,
    get_preset,
)
from inkwash.models.registry import ARCHS

TINY = get_preset("unet-tiny")


def _net(seed: int = 0, **changes) -> UNet:
    """A tiny U-Net with random (not zero-initialised) weights, so every path matters."""
    torch.manual_seed(seed)
    net = UNet(dataclasses.replace(TINY, **changes))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


def _inputs(B: int = 2, L: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, 16, 16, generator=g), torch.tensor([0.5, 999.0])[:B], torch.randn(B, L, 32, generator=g)


def test_shapes_and_fractional_times():
    net = _net()
    x, t, ctx = _inputs()
    out = net(x, t, context=ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(net(x, t + 0.25, context=ctx), out)  # fractional time changes the output
    torch.testing.assert_close(net(x, torch.tensor(7.0), context=ctx), net(x, torch.full((2,), 7.0), context=ctx))


def test_fresh_model_predicts_zero():
    x, t, ctx = _inputs()
    assert UNet(TINY)(x, t, context=ctx).abs().max() == 0


def test_context_mask_hides_padding():
    net = _net()
    x, t, ctx = _inputs()
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    out = net(x, t, context=ctx, context_mask=mask)
    ctx2 = ctx.clone()
    ctx2[:, 2:] = torch.randn_like(ctx2[:, 2:])
    torch.testing.assert_close(net(x, t, context=ctx2, context_mask=mask), out)
    torch.testing.assert_close(net(x, t, context=ctx[:, :2]), out, atol=1e-5, rtol=1e-5)


def test_unconditional_and_context_free_configs():
    x, t, ctx = _inputs()
    assert _net()(x, t).shape == x.shape  # context=None skips cross-attention
    net = _net(context_dim=0)
    assert not any("attn2" in k for k in net.state_dict())
    assert net(x, t).shape == x.shape


def test_y_conditioning():
    net = _net(y_dim=6, scale_shift=True)
    x, t, ctx = _inputs()
    y = torch.randn(2, 6)
    out = net(x, t, context=ctx, y=y)
    assert not torch.allclose(net(x, t, context=ctx, y=y + 1), out)
    with pytest.raises(ValueError, match="needs y"):
        net(x, t, context=ctx)
    with pytest.raises(ValueError, match="y_dim=0"):
        _net()(x, t, context=ctx, y=y)


def test_backward_reaches_every_parameter():
    net = _net(y_dim=4).train()
    x, t, ctx = _inputs()
    net(
        x, t, context=ctx, context_mask=torch.ones(2, 5, dtype=torch.bool), y=torch.randn(2, 4)
    ).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="attention_levels"):
        dataclasses.replace(TINY, attention_levels=(5,))
    with pytest.raises(ValueError, match="heads"):
        dataclasses.replace(TINY, num_heads=3)


def test_sd15_parameter_count_matches_diffusers():
    with torch.device("meta"):
        ours = build_model(get_preset("sd15"))
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(cross_attention_dim=768)  # SD 1.5's config
    assert sum(p.numel() for p in theirs.parameters()) == 859_520_964


@pytest.mark.parametrize(("name", "low", "high"), [("unet-tiny", 0, 1e6), ("unet-s", 5e6, 10e6)])
def test_preset_sizes(name, low, high):
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(get_preset(name)).parameters())
    assert low < n < high


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_dict_round_trip(name):
    d = json.loads(json.dumps(config_to_dict(PRESETS[name])))
    assert type(PRESETS[name]) is ARCHS[d["arch"]][0]
    assert config_from_dict(d) == PRESETS[name]


def test_registry_errors():
    with pytest.raises(UserError, match="sd15.*unet-s|unet-s.*sd15"):
        get_preset("nope")
    with pytest.raises(UserError, match="colour"):
        config_from_dict({**config_to_dict(TINY), "colour": "red"})
    with pytest.raises(UserError, match="arch"):
        config_from_dict({"model_channels": 4})


def test_count_flops_on_meta_matches_cpu():
    x, t, ctx = _inputs()
    macs = count_flops(_net(), (x, t, ctx))
    with torch.device("meta"):
        net = UNet(TINY)
        meta = count_flops(net, dict(x=torch.empty(2, 3, 16, 16), t=torch.empty(2), context=torch.empty(2, 5, 32)))
    assert macs == meta
    conv_in = 2 * 16 * 16 * 32 * 3 * 9  # B * H * W * Cout * Cin * k*k
    assert macs > 10 * conv_in
