"""Parity: diffusers UNet2DConditionModel converted to inkwash's UNet gives the same outputs (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from inkwash.errors import UserError
from inkwash.formats.diffusers_unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_state_dict_from_diffusers,
)
from inkwash.models.registry import PRESETS
from inkwash.models.unet import UNetConfig

diffusers = pytest.importorskip("diffusers")

BASE = dict(sample_size=16, in_channels=3, out_channels=3, norm_num_groups=8, cross_attention_dim=24)
LAYOUTS = {
    "sd-like+y": dict(
        block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        class_embed_type="projection", projection_class_embeddings_input_dim=12,
    ),
    "sd2-like": dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=(2, 4, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, resnet_time_scale_shift="scale_shift", flip_sin_to_cos=False, freq_shift=1,
    ),
    "sdxl-like": dict(  # SDXL's micro-conditioning: pooled text + Fourier features of 6 scalars, one MLP
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), transformer_layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=12 + 6 * 8,
    ),
    "lcm-like": dict(  # an LCM student: guidance-scale Fourier features through time_embedding.cond_proj
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, time_cond_proj_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "deep-no-mid-attn": dict(
        block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=2, transformer_layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2D",
    ),
}  # fmt: skip


def _pair(layout: str):
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**BASE, **LAYOUTS[layout]).eval()
    for p in theirs.parameters():  # non-trivial weights everywhere (diffusers zero-inits nothing we rely on)
        torch.nn.init.normal_(p, std=0.05)
    return unet_from_diffusers(dict(theirs.config), theirs.state_dict()).eval(), theirs


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("masked", [False, True])
def test_outputs_match_diffusers(layout, masked):
    ours, theirs = _pair(layout)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = (
        torch.randn(2, 3, 16, 16, generator=g),
        torch.tensor([3.5, 871.0]),
        torch.randn(2, 5, 24, generator=g),
    )
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool) if masked else None
    y = torch.randn(2, 12, generator=g) if ours.cfg.y_dim else None
    micro = torch.tensor([[64.0, 48, 0, 8, 32, 32], [1024, 1024, 16, 0, 32, 32]]) if ours.cfg.micro_conditions else None
    extra = {"added_cond_kwargs": {"text_embeds": y, "time_ids": micro}} if micro is not None else {"class_labels": y}
    w, ours_extra = torch.tensor([1.0, 7.5]), {}
    if ours.cfg.guidance_embed_dim:  # LCM pipelines pass get_guidance_scale_embedding(w - 1) as timestep_cond
        lcm = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding
        extra["timestep_cond"] = lcm(None, w - 1, embedding_dim=ours.cfg.guidance_embed_dim)
        ours_extra["guidance"] = w
    with torch.no_grad():
        ref = theirs(x, t, ctx, encoder_attention_mask=mask, **extra).sample
        out = ours(x, t, context=ctx, context_mask=mask, y=y, micro=micro, **ours_extra)
    assert ref.abs().max() > 1e-2  # the comparison means something
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if isinstance(c, UNetConfig)))
def test_config_round_trip(name):
    cfg = PRESETS[name]
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg), cfg.micro_conditions or 6) == cfg


def test_lcm_student_round_trips_through_diffusers_config():
    ours, theirs = _pair("lcm-like")
    assert ours.cfg.guidance_embed_dim == 16 and ours.guidance_in.weight.abs().max() > 0
    assert unet_config_to_diffusers(ours.cfg)["time_cond_proj_dim"] == 16
    with torch.no_grad():  # the guidance scale reaches the output through cond_proj
        x, t, ctx = torch.randn(1, 3, 16, 16), torch.tensor([500.0]), torch.randn(1, 5, 24)
        a, b = (ours(x, t, context=ctx, guidance=torch.tensor([w])) for w in (2.0, 8.0))
    assert (a - b).abs().max() > 1e-3


def test_micro_conditions_change_the_output():
    ours, _ = _pair("sdxl-like")
    x, t, ctx, y = torch.randn(1, 3, 16, 16), torch.tensor([500.0]), torch.randn(1, 5, 24), torch.randn(1, 12)
    with torch.no_grad():
        a = ours(x, t, context=ctx, y=y, micro=torch.tensor([[32.0, 32, 0, 0, 32, 32]]))
        b = ours(x, t, context=ctx, y=y, micro=torch.tensor([[16.0, 16, 0, 0, 32, 32]]))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs micro"):
        ours(x, t, context=ctx, y=y)


def test_unmatched_and_missing_keys_are_listed():
    _, theirs = _pair("sd-like+y")
    sd = dict(theirs.state_dict())
    sd["mystery.weight"] = torch.zeros(1)
    del sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"]
    with pytest.raises(UserError, match=r"mystery\.weight.*attn1\.to_k\.weight"):
        unet_state_dict_from_diffusers(sd)


def test_weights_that_do_not_fit_config_are_listed():
    _, theirs = _pair("sd-like+y")
    sd = {k: v for k, v in theirs.state_dict().items() if not k.startswith("conv_out.")}
    with pytest.raises(UserError, match=r"missing \['conv_out\.bias', 'conv_out\.weight'\]"):
        unet_from_diffusers(dict(theirs.config), sd)


def test_unsupported_settings_are_refused():
    cfg = dict(
        unet_config_to_diffusers(PRESETS["unet-tiny"]),
        addition_embed_type="text_time",
        dual_cross_attention=True,
    )
    with pytest.raises(UserError, match="addition_embed_type.*dual_cross_attention|dual_cross_attention"):
        unet_config_from_diffusers(cfg)
