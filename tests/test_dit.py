"""DiT and PixArt-α: parity with diffusers (fp32, 1e-5), the paper's size and cost, shapes, init, training, sampling."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import inkwash
from inkwash.errors import UserError
from inkwash.formats import diffusers_dit as conv
from inkwash.models import PRESETS, DiT, PixArt, build_model, config_from_dict, config_to_dict, count_flops, get_preset
from inkwash.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py

TINY_TEXT = {"name": "small", "dim": 16, "layers": 1, "heads": 2, "max_length": 24}


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight drawn at random (the zero-initialised gates and outputs included), so every path matters."""
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return module.eval()


def _net(name: str, **changes):
    return _randomize(build_model(dataclasses.replace(get_preset(name), **changes)))


# ---------------------------------------------------------------------------- parity with diffusers

diffusers = pytest.importorskip("diffusers")


def _diffusers_dit():
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        num_embeds_ada_norm=10,
    )  # fmt: skip
    _randomize(theirs)
    sd = theirs.state_dict()  # diffusers keeps a copy of the time and class embedders per block: tie them
    with torch.no_grad():
        for k, v in sd.items():
            if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                v.copy_(sd["transformer_blocks.0." + k.split(".", 2)[2]])
    return theirs


@pytest.mark.parametrize("side", [8, 12])  # the configured size, and another (positions interpolated)
def test_dit_matches_diffusers(side):
    theirs = _diffusers_dit()
    ours = conv.dit_from_diffusers(dict(theirs.config), theirs.state_dict()).eval()
    assert ours.cfg.learn_sigma and ours.cfg.out_channels == 4 and ours.cfg.num_classes == 10
    g = torch.Generator().manual_seed(1)
    x, t, labels = torch.randn(2, 4, side, side, generator=g), torch.tensor([3.5, 871.0]), torch.tensor([3, 10])
    with torch.no_grad():
        ref = theirs(x, t, class_labels=labels).sample
        out = ours(x, t, y=labels)
    assert out.shape == (2, 8, side, side) and ref.abs().max() > 1e-1  # the comparison means something
    diff = (out - ref).abs().max().item()
    print(f"DiT {side}x{side}: max |ours - diffusers| = {diff:.2e}")
    assert diff < 1e-5


PIXART_LAYOUTS = {
    "512-like": dict(sample_size=8, use_additional_conditions=False),
    "1024-like": dict(sample_size=8, use_additional_conditions=True, interpolation_scale=2),  # size conditions
}


def _diffusers_pixart(layout: str):
    theirs = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, caption_channels=20, **PIXART_LAYOUTS[layout],
    )  # fmt: skip
    return _randomize(theirs)


@pytest.mark.parametrize("layout", sorted(PIXART_LAYOUTS))
@pytest.mark.parametrize("masked", [False, True])
def test_pixart_matches_diffusers(layout, masked):
    theirs = _diffusers_pixart(layout)
    ours = conv.pixart_from_diffusers(dict(theirs.config), theirs.state_dict()).eval()
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([3.5, 871.0]), torch.randn(2, 5, 20, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool) if masked else None
    micro = torch.tensor([[64.0, 96.0, 1.5], [128.0, 128.0, 1.0]]) if ours.cfg.size_conditioning else None
    added = {"resolution": None, "aspect_ratio": None}
    if micro is not None:
        added = {"resolution": micro[:, :2], "aspect_ratio": micro[:, 2:]}
    with torch.no_grad():
        ref = theirs(x, ctx, t, added_cond_kwargs=added, encoder_attention_mask=mask).sample
        out = ours(x, t, context=ctx, context_mask=mask, micro=micro)
    assert out.shape == (2, 8, 8, 12) and ref.abs().max() > 1e-1
    diff = (out - ref).abs().max().item()
    print(f"PixArt {layout} masked={masked}: max |ours - diffusers| = {diff:.2e}")
    assert diff < 1e-5


def test_export_to_diffusers_round_trips():
    for theirs, to_cfg, to_sd, from_diffusers, cls in [
        (_diffusers_dit(), conv.dit_config_to_diffusers, conv.dit_state_dict_to_diffusers, conv.dit_from_diffusers,
         diffusers.DiTTransformer2DModel),
        (_diffusers_pixart("1024-like"), conv.pixart_config_to_diffusers, conv.pixart_state_dict_to_diffusers,
         conv.pixart_from_diffusers, diffusers.PixArtTransformer2DModel),
    ]:  # fmt: skip
        ours = from_diffusers(dict(theirs.config), theirs.state_dict())
        again = cls(**to_cfg(ours.cfg))
        again.load_state_dict(to_sd(ours.state_dict(), ours.cfg))  # strict
        for k, v in theirs.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k


def test_untied_per_block_embedders_are_refused():
    theirs = _diffusers_dit()
    sd = dict(theirs.state_dict())
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    sd[key] = sd[key] + 1
    with pytest.raises(UserError, match=r"embedders differ.*transformer_blocks\.1\.norm1\.emb\.class_embedder"):
        conv.dit_state_dict_from_diffusers(sd, conv.dit_config_from_diffusers(theirs.config))


def test_unmatched_and_missing_keys_are_listed():
    theirs = _diffusers_pixart("512-like")
    sd = dict(theirs.state_dict())
    sd["mystery.weight"] = torch.zeros(1)
    del sd["transformer_blocks.1.attn2.to_k.bias"]
    with pytest.raises(UserError, match=r"unmatched keys \['mystery\.weight'\].*attn2\.to_k\.bias"):
        conv.pixart_from_diffusers(dict(theirs.config), sd)


def test_unsupported_settings_are_refused():
    with pytest.raises(UserError, match="activation_fn"):
        conv.dit_config_from_diffusers({"activation_fn": "geglu"})
    with pytest.raises(UserError, match="caption_channels"):
        conv.pixart_config_from_diffusers({"caption_channels": None})
    with pytest.raises(UserError, match="class-conditional"):
        conv.dit_config_to_diffusers(get_preset("dit-shapes"))


# ---------------------------------------------------------------------------- size and cost


def test_dit_xl2_parameters_and_macs_match_the_paper():
    with torch.device("meta"):
        net = build_model(get_preset("dit-xl2"))
        macs = count_flops(net, dict(x=torch.empty(1, 4, 32, 32), t=torch.empty(1), y=torch.zeros(1, dtype=torch.long)))
    # The paper's 675M also counts the original's fixed position table (256 x 1152), stored as a parameter.
    assert sum(p.numel() for p in net.parameters()) == 674_834_720 == 675_129_632 - 256 * 1152
    assert macs == 118_621_421_568 and abs(macs / 118.6e9 - 1) < 0.01  # the paper's "118.6 Gflops" are MACs


def test_pixart_alpha_parameter_count_matches_diffusers():
    with torch.device("meta"):
        ours = build_model(get_preset("pixart-alpha-xl2"))
        theirs = diffusers.PixArtTransformer2DModel(caption_channels=4096)  # PixArt-XL-2-1024-MS's config
    assert conv.pixart_config_from_diffusers(theirs.config) == get_preset("pixart-alpha-xl2")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 611_349_152


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith(("dit", "pixart"))))
def test_config_dict_round_trip(name):
    d = json.loads(json.dumps(config_to_dict(PRESETS[name])))
    assert d["arch"] == name.split("-")[0] and config_from_dict(d) == PRESETS[name]


# ---------------------------------------------------------------------------- contract


def _cond(net, B: int = 2) -> dict:
    cfg = net.cfg
    if isinstance(net, PixArt):
        return {"context": torch.randn(B, 5, cfg.context_dim)}
    return {"y": torch.randn(B, cfg.y_dim)} if cfg.y_dim else {"y": torch.arange(B) % (cfg.num_classes + 1)}


@pytest.mark.parametrize("name", ["dit-tiny", "pixart-tiny"])
def test_fresh_model_predicts_zero_and_any_multiple_of_the_patch_works(name):
    net = build_model(get_preset(name))
    assert net.cfg.size_multiple == 2
    x, t = torch.randn(2, 3, 16, 24), torch.tensor(500.0)
    out = net(x, t, **_cond(net))
    assert out.shape == x.shape and out.abs().max() == 0
    lively = _randomize(net)
    out = lively(x, t, **_cond(net))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0
    with pytest.raises(ValueError, match=r"15x24 is not a multiple of the patch size 2"):
        lively(x[:, :, :15], t, **_cond(net))


def test_pixart_mask_hides_padding_and_context_is_required():
    net = _net("pixart-tiny")
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 700.0]), torch.randn(2, 5, 32)
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    out = net(x, t, context=ctx, context_mask=mask)
    ctx2 = torch.cat([ctx[:, :2], torch.randn(2, 3, 32)], dim=1)
    torch.testing.assert_close(net(x, t, context=ctx2, context_mask=mask), out)
    torch.testing.assert_close(net(x, t, context=ctx[:, :2]), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs text tokens"):
        net(x, t)


def test_dit_conditioning_errors():
    x, t = torch.randn(1, 3, 8, 8), torch.tensor(5.0)
    with pytest.raises(ValueError, match=r"needs y \[B, 32\]"):
        _net("dit-tiny")(x, t)
    with pytest.raises(ValueError, match="integer class labels"):
        _net("dit-tiny", y_dim=0, num_classes=3)(x, t, y=torch.randn(1, 3))
    with pytest.raises(ValueError, match="context_dim must be 0"):
        dataclasses.replace(get_preset("dit-tiny"), context_dim=8)
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(get_preset("dit-tiny"), num_classes=10)


def test_backward_reaches_every_parameter():
    for net in (_net("dit-tiny"), _net("pixart-tiny", size_conditioning=True, hidden_size=48)):
        x = torch.randn(2, 3, 8, 8)
        micro = torch.tensor([[8.0, 8, 1], [8, 8, 1]]) if isinstance(net, PixArt) else None
        net.train()(x, torch.tensor([3.0, 9.0]), micro=micro, **_cond(net)).square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ---------------------------------------------------------------------------- training and sampling


@pytest.mark.parametrize("name", ["dit-tiny", "pixart-tiny"])
def test_trains_and_samples_through_the_pipeline(tmp_path, name):
    cfg = TrainConfig(
        model=config_to_dict(get_preset(name)), text_encoder=TINY_TEXT, image_size=32, batch_size=2, steps=3,
        lr=2e-3, warmup_steps=1, ema_decay=0.0, output_dir=str(tmp_path / "run"), log_every=1, sample_prompts=(),
    )  # fmt: skip
    path = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in lines)
    pipe = inkwash.load(path)
    assert isinstance(pipe.net, DiT if name.startswith("dit") else PixArt)
    images = pipe("a red circle", steps=2, seed=0, size=24)  # not the trained size: positions interpolate
    assert images[0].size == (24, 24)
