"""MMDiT (FLUX, SD3): parity with diffusers' FluxTransformer2DModel and SD3Transformer2DModel (fp32, 1e-5),
conversion both ways, presets' sizes, packing, masks and init."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inkwash.errors import UserError
from inkwash.formats.diffusers_flux import (
    flux_config_from_diffusers,
    flux_config_to_diffusers,
    flux_from_diffusers,
    flux_state_dict_from_diffusers,
    flux_state_dict_to_diffusers,
    sd3_config_from_diffusers,
    sd3_config_to_diffusers,
    sd3_from_diffusers,
    sd3_state_dict_to_diffusers,
)
from inkwash.models.mmdit import PRESETS, MMDiT

TINY = PRESETS["mmdit-tiny"]  # 4 latent channels (16 packed), 2 heads of 16, context 24, pooled 12, axes (4, 6, 6)


def _is_qk_norm(name: str) -> bool:  # RMSNorm scales: perturbed around 1
    return name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight"))


def _diffusers_pair(guidance: bool):
    diffusers = pytest.importorskip("diffusers")
    cfg = dataclasses.replace(TINY, depth=2, depth_single=2, guidance_embed=guidance)
    torch.manual_seed(0)
    theirs = diffusers.FluxTransformer2DModel(**flux_config_to_diffusers(cfg)).eval()
    for name, p in theirs.named_parameters():  # perturb everything, zero-initialised or not, so every weight matters
        torch.nn.init.normal_(p, mean=1.0 if _is_qk_norm(name) else 0.0, std=0.1)
    ours = flux_from_diffusers(dict(theirs.config), theirs.state_dict()).eval()
    assert ours.cfg == cfg
    return ours, theirs


def _pack(x: torch.Tensor) -> torch.Tensor:  # diffusers' FluxPipeline._pack_latents
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def _unpack(x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # FluxPipeline._unpack_latents, in latent units
    B, _, C4 = x.shape
    return x.view(B, H // 2, W // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, H, W)


def _image_ids(h: int, w: int) -> torch.Tensor:  # FluxPipeline._prepare_latent_image_ids on the packed grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _inputs(cfg, H=8, W=12, L=5, B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    ctx, y = torch.randn(B, L, cfg.context_dim, generator=g), torch.randn(B, cfg.y_dim, generator=g)
    return x, ctx, y


@pytest.mark.parametrize("guidance", [False, True])
def test_outputs_match_diffusers(guidance):
    ours, theirs = _diffusers_pair(guidance)
    x, ctx, y = _inputs(ours.cfg)
    H, W = x.shape[-2:]
    # inkwash hands the net flow time x 1000; diffusers multiplies its timestep by 1000 itself. Dyadic t keeps
    # t / 1000 * 1000 exact in float32. Both embed the guidance scale x 1000.
    t, g = torch.tensor([125.0, 875.0]), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        ref = theirs(
            _pack(x), ctx, y, t / 1000, img_ids=_image_ids(H // 2, W // 2), txt_ids=torch.zeros(ctx.shape[1], 3),
            guidance=g if guidance else None,
        ).sample  # fmt: skip
        ref = _unpack(ref, H, W)
        out = ours(x, t, context=ctx, y=y, guidance=g if guidance else None)
        out_masked = ours(x, t, context=ctx, context_mask=torch.ones(2, ctx.shape[1], dtype=torch.bool), y=y,
                          guidance=g if guidance else None)  # fmt: skip
    assert ref.abs().max() > 1e-2  # the comparison means something
    diff = (out - ref).abs().max().item()
    print(f"guidance={guidance}: max abs diff {diff:.3g}, all-ones mask {(out_masked - ref).abs().max().item():.3g}")
    assert diff < 1e-5 and (out_masked - ref).abs().max() < 1e-5


def test_round_trip_to_diffusers():
    ours, theirs = _diffusers_pair(True)
    back = flux_state_dict_to_diffusers(ours.state_dict(), ours.cfg)
    ref = theirs.state_dict()
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    assert flux_config_from_diffusers(flux_config_to_diffusers(ours.cfg)) == ours.cfg


def test_unmatched_and_missing_keys_are_listed():
    _, theirs = _diffusers_pair(False)
    sd = dict(theirs.state_dict())
    sd["mystery.weight"] = torch.zeros(1)
    del sd["transformer_blocks.0.attn.add_k_proj.bias"]
    with pytest.raises(UserError, match=r"mystery\.weight.*add_k_proj\.bias"):
        flux_state_dict_from_diffusers(sd, flux_config_from_diffusers(dict(theirs.config)))


@pytest.mark.parametrize("name,guidance", [("flux-dev", True), ("flux-schnell", False)])
def test_full_size_parameter_count_matches_diffusers(name, guidance):
    diffusers = pytest.importorskip("diffusers")
    cfg = PRESETS[name]
    assert cfg.guidance_embed is guidance
    with torch.device("meta"):
        ours = MMDiT(cfg)
        theirs = diffusers.FluxTransformer2DModel(**flux_config_to_diffusers(cfg))
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    if name == "flux-dev":
        assert n == 11_901_408_320  # published


def test_non_square_shape_and_zero_output_at_init():
    torch.manual_seed(0)
    model = MMDiT(TINY)
    x, ctx, y = _inputs(TINY, H=8, W=12)
    out = model(x, torch.tensor(500.0), context=ctx, y=y)
    assert out.shape == x.shape and out.abs().max() == 0
    out.sum().backward()  # gradients reach the zero-initialised output layer
    assert model.final_layer.linear.weight.grad.abs().max() > 0


def test_size_not_multiple_of_patch_is_a_user_error():
    x, ctx, y = _inputs(TINY, H=8, W=7)
    with pytest.raises(UserError, match="8x7 is not a multiple of the MMDiT patch size 2"):
        MMDiT(TINY)(x, torch.tensor(1.0), context=ctx, y=y)


def test_context_mask_hides_padding():
    ours, _ = _diffusers_pair(False)
    x, ctx, y = _inputs(ours.cfg, L=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    other = torch.where(mask[..., None], ctx, torch.randn_like(ctx) * 5)  # new values in the padding only
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        a = ours(x, t, context=ctx, context_mask=mask, y=y)
        b = ours(x, t, context=other, context_mask=mask, y=y)
        c = ours(x, t, context=other, y=y)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3  # without the mask the padding does matter


def test_guidance_distilled_model_needs_guidance():
    x, ctx, y = _inputs(TINY)
    with pytest.raises(ValueError, match="guidance"):
        MMDiT(dataclasses.replace(TINY, guidance_embed=True))(x, torch.tensor(1.0), context=ctx, y=y)


# ---------------------------------------------------------------------------- SD3 (no single blocks, fixed table)

SD3_TINY = dataclasses.replace(TINY, depth=3, depth_single=0, axes_dim=(), pos_embed_max_size=8, qk_norm=False)


def _sd3_pair(qk_norm: bool):
    diffusers = pytest.importorskip("diffusers")
    cfg = dataclasses.replace(SD3_TINY, qk_norm=qk_norm)
    torch.manual_seed(0)
    theirs = diffusers.SD3Transformer2DModel(**sd3_config_to_diffusers(cfg, sample_size=8)).eval()
    for name, p in [*theirs.named_parameters(), *theirs.named_buffers()]:  # the position table too
        torch.nn.init.normal_(p, mean=1.0 if _is_qk_norm(name) else 0.0, std=0.1)
    ours = sd3_from_diffusers(dict(theirs.config), theirs.state_dict()).eval()
    assert ours.cfg == cfg
    return ours, theirs


@pytest.mark.parametrize("qk_norm", [False, True])
def test_sd3_outputs_match_diffusers(qk_norm):
    ours, theirs = _sd3_pair(qk_norm)
    x, ctx, y = _inputs(ours.cfg, H=8, W=12)  # tokens 4 x 6: rows 2-5, columns 1-6 of the 8 x 8 table
    t = torch.tensor([3.5, 871.0])  # SD3 embeds the timestep as given, like inkwash
    with torch.no_grad():
        ref = theirs(x, ctx, y, t).sample
        out = ours(x, t, context=ctx, y=y)
    assert ref.abs().max() > 1e-2
    diff = (out - ref).abs().max().item()
    print(f"SD3 qk_norm={qk_norm}: max abs diff {diff:.3g}")
    assert diff < 1e-5
    back = sd3_state_dict_to_diffusers(ours.state_dict(), ours.cfg)
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
    assert sd3_config_from_diffusers(sd3_config_to_diffusers(ours.cfg)) == ours.cfg


def test_sd3_position_table_matches_diffusers_init_and_refuses_large_inputs():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    model = MMDiT(SD3_TINY)
    ref = embeddings.get_2d_sincos_pos_embed(32, 8, base_size=8, output_type="pt")
    torch.testing.assert_close(model.pos_embed, ref.float(), atol=1e-6, rtol=0)
    x, ctx, y = _inputs(SD3_TINY, H=18, W=8)
    with pytest.raises(UserError, match="9x4 tokens exceed"):
        model(x, torch.tensor(1.0), context=ctx, y=y)


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-large"])
def test_sd3_parameter_count_matches_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = MMDiT(PRESETS[name])
        theirs = diffusers.SD3Transformer2DModel(**sd3_config_to_diffusers(PRESETS[name]))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert ours.pos_embed.shape == theirs.pos_embed.pos_embed.shape[1:]


def test_unsupported_settings_are_refused():
    with pytest.raises(UserError, match="dual_attention_layers"):
        sd3_config_from_diffusers(dict(sd3_config_to_diffusers(SD3_TINY), dual_attention_layers=(0,)))
    with pytest.raises(UserError, match="patch_size=2"):
        flux_config_from_diffusers(dict(flux_config_to_diffusers(TINY), patch_size=2))
    with pytest.raises(UserError, match="pos_embed_max_size=8.*axes_dim"):
        flux_config_to_diffusers(SD3_TINY)  # an SD3-style config has no FLUX layout
