"""diffusers `UNet2DConditionModel` -> inkwash `UNet`: config and state-dict conversion.

Owns every diffusers U-Net key name. Unsupported settings, unmatched keys and missing keys raise
`UserError` listing them; nothing is silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_exact
from inkwash.models.unet import UNet, UNetConfig

# diffusers settings we do not implement, with the only value we accept.
_FIXED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "encoder_hid_dim": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "reverse_transformer_layers_per_block": None,
}


def _uniform(value, name: str):
    """An int, or a list whose entries all agree -> that one value."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise UserError(f"diffusers U-Net: per-block {name}={list(value)} is not supported")
        return value[0]
    return value


def _depths(value, levels: int) -> int | tuple[int, ...]:
    """transformer_layers_per_block: an int, or one int per level (SDXL: 1, 2, 10) -> ours."""
    if not isinstance(value, list | tuple):
        return value
    if len(value) != levels or not all(isinstance(v, int) for v in value):
        raise UserError(f"diffusers U-Net: transformer_layers_per_block={list(value)} is not one int per level")
    return value[0] if len(set(value)) == 1 else tuple(value)


def unet_config_from_diffusers(config: Mapping, micro_conditions: int = 6) -> UNetConfig:
    """A diffusers UNet2DConditionModel config dict -> UNetConfig (UserError on what we cannot express).
    SDXL's `text_time` addition embeds `micro_conditions` scalars (6 for SDXL base: original size, crop,
    target size; 5 for its refiner: original size, crop, aesthetic score): the config does not say which."""
    bad = [f"{k}={config[k]!r}" for k, v in _FIXED.items() if k in config and config[k] != v]
    addition = config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        bad.append(f"addition_embed_type={addition!r}")
    boc = list(config["block_out_channels"])
    downs, ups = list(config["down_block_types"]), list(config["up_block_types"])
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in downs):
        bad.append(f"down_block_types={downs}")
    mirrored = [t.replace("Down", "Up") for t in reversed(downs)]
    if ups != mirrored:
        bad.append(f"up_block_types={ups} (expected {mirrored})")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        bad.append(f"mid_block_type={mid!r}")
    if any(c % boc[0] for c in boc):
        bad.append(f"block_out_channels={boc} (not multiples of the first)")
    class_embed = config.get("class_embed_type")
    if class_embed not in (None, "projection"):
        bad.append(f"class_embed_type={class_embed!r}")
    if class_embed and addition:
        bad.append("class_embed_type together with addition_embed_type")
    micro_dim = config.get("addition_time_embed_dim") or 256
    y_dim = (config.get("projection_class_embeddings_input_dim") or 0) if (class_embed or addition) else 0
    if addition:
        y_dim -= micro_conditions * micro_dim
        if y_dim < 0:
            bad.append(f"projection_class_embeddings_input_dim too small for {micro_conditions} micro-conditions")
    if bad:
        raise UserError("diffusers U-Net settings not supported: " + ", ".join(bad))

    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    num_heads, head_dim = heads, 0
    if isinstance(heads, list | tuple):  # SD 2.x style: heads per level, constant head width
        num_heads, head_dim = heads[0], _uniform([c // h for c, h in zip(boc, heads)], "head width")
    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=_uniform(config.get("layers_per_block", 2), "layers_per_block"),
        attention_levels=tuple(i for i, t in enumerate(downs) if t.startswith("CrossAttn")),
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=_depths(config.get("transformer_layers_per_block", 1), len(boc)),
        context_dim=_uniform(config.get("cross_attention_dim", 1280), "cross_attention_dim"),
        y_dim=y_dim,
        micro_conditions=micro_conditions if addition else 0,
        micro_embed_dim=micro_dim,
        mid_attention=mid == "UNetMidBlock2DCrossAttn",
        norm_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        scale_shift=config.get("resnet_time_scale_shift", "default") == "scale_shift",
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        guidance_embed_dim=config.get("time_cond_proj_dim") or 0,  # LCM's guidance-scale embedding
    )


# (diffusers pattern, inkwash replacement), applied to the whole key with re.fullmatch.
_RENAMES = [
    (r"time_embedding\.linear_(\d)\.(\w+)", r"time_embed.fc\1.\2"),
    (r"time_embedding\.cond_proj\.weight", r"guidance_in.weight"),  # LCM: time_cond_proj_dim
    (r"class_embedding\.linear_(\d)\.(\w+)", r"y_embed.fc\1.\2"),
    (r"add_embedding\.linear_(\d)\.(\w+)", r"y_embed.fc\1.\2"),
    (r"conv_in\.(\w+)", r"conv_in.\1"),
    (r"conv_norm_out\.(\w+)", r"norm_out.\1"),
    (r"conv_out\.(\w+)", r"conv_out.\1"),
    (r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", r"\1.\2.res.\3.\4"),
    (r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", r"\1.\2.attn.\3.\4"),
    (r"(down|up)_blocks\.(\d+)\.(?:downsamplers|upsamplers)\.0\.conv\.(\w+)", r"\1.\2.resample.conv.\3"),
    (r"mid_block\.resnets\.(\d)\.(.+)", r"mid.res.\1.\2"),
    (r"mid_block\.attentions\.0\.(.+)", r"mid_attn.\1"),
]
# Renames inside a ResBlock or a spatial transformer (the part after `res.j.` / `attn.j.`).
_INNER = [
    (r"(res\.\d+)\.time_emb_proj\.", r"\1.emb_proj."),
    (r"(res\.\d+)\.conv_shortcut\.", r"\1.skip."),
    (r"\.transformer_blocks\.", r".blocks."),
    (r"\.attn(\d)\.to_out\.0\.", r".attn\1.out."),
    (r"\.ff\.net\.0\.proj\.", r".ff.proj."),
    (r"\.ff\.net\.2\.", r".ff.out."),
]
# Projections we fuse: (inkwash name, diffusers parts concatenated along the output dim).
_FUSED = [
    ("attn1.qkv.weight", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    ("attn2.q.weight", ("attn2.to_q",)),
]
_FUSED += [("attn2.kv.weight", ("attn2.to_k", "attn2.to_v"))]


def _rename(key: str) -> str | None:
    for pattern, repl in _RENAMES:
        if re.fullmatch(pattern, key):
            new = re.sub(pattern, repl, key)
            for p, r in _INNER:
                new = re.sub(p, r, new)
            return new
    return None


def unet_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict -> ours (QKV fused, 1x1 convs as linear)."""
    out: dict[str, torch.Tensor] = {}
    unmatched, missing = [], []
    fused_parts: dict[str, dict[str, torch.Tensor]] = {}  # prefix -> {diffusers part: weight}
    for key, value in sd.items():
        new = _rename(key)
        m = re.fullmatch(r"(.+\.blocks\.\d+\.)(attn\d\.to_[qkv])\.weight", new or "")
        if m:
            fused_parts.setdefault(m[1], {})[m[2]] = value
        elif new is None or re.search(r"\.to_[qkv]\.", new):  # q/k/v biases are not part of SD's layout
            unmatched.append(key)
        elif re.search(r"\.proj_(in|out)\.weight$", new) and value.dim() == 4:  # conv 1x1 -> linear
            out[new] = value[:, :, 0, 0]
        else:
            out[new] = value
    for prefix, parts in fused_parts.items():
        for name, sources in _FUSED:
            absent = [s for s in sources if s not in parts]
            if len(absent) == len(sources):
                continue
            missing += [f"{prefix}{s}.weight" for s in absent]
            out[prefix + name] = torch.cat([parts[s] for s in sources if s in parts], dim=0)
    if unmatched or missing:
        raise UserError(
            f"diffusers U-Net state dict: unmatched keys {sorted(unmatched)}, missing keys {sorted(missing)}"
        )
    return out


def unet_from_diffusers(config: Mapping, sd: Mapping[str, torch.Tensor], micro_conditions: int = 6) -> UNet:
    """Build an inkwash UNet from a diffusers config and state dict; every key on both sides must match.
    `micro_conditions`: see unet_config_from_diffusers (SDXL base 6, refiner 5).

    Unfused tensors are assigned, not copied: the model shares their storage with `sd`.
    """
    cfg = unet_config_from_diffusers(config, micro_conditions)
    with torch.device("meta"):
        model = UNet(cfg)
    converted = unet_state_dict_from_diffusers(sd)
    return load_exact(model, converted, "diffusers U-Net weights", assign=True)


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """UNetConfig -> the UNet2DConditionModel keyword arguments that build the same network (for parity and bench)."""
    n = len(cfg.channel_mult)
    attn = [i in cfg.attention_levels for i in range(n)]
    boc = cfg.level_channels
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(boc),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.mid_attention else "UNetMidBlock2D",
        layers_per_block=cfg.num_res_blocks,
        attention_head_dim=tuple(cfg.heads(c) for c in boc) if cfg.head_dim else cfg.num_heads,
        transformer_layers_per_block=cfg.transformer_depth,
        cross_attention_dim=cfg.context_dim,
        class_embed_type="projection" if cfg.y_dim and not cfg.micro_conditions else None,
        addition_embed_type="text_time" if cfg.micro_conditions else None,
        addition_time_embed_dim=cfg.micro_embed_dim if cfg.micro_conditions else None,
        projection_class_embeddings_input_dim=(cfg.y_dim + cfg.micro_conditions * cfg.micro_embed_dim) or None,
        norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift else "default",
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
        time_cond_proj_dim=cfg.guidance_embed_dim or None,
        use_linear_projection=True,
    )


# (inkwash pattern, diffusers replacement) for the way out; fused projections are split separately.
_BACK = [
    (r"^time_embed\.fc(\d)\.", r"time_embedding.linear_\1."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"^(down|up)\.(\d+)\.res\.(\d+)\.", r"\1_blocks.\2.resnets.\3."),
    (r"^(down|up)\.(\d+)\.attn\.(\d+)\.", r"\1_blocks.\2.attentions.\3."),
    (r"^down\.(\d+)\.resample\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"^up\.(\d+)\.resample\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"^mid\.res\.(\d)\.", r"mid_block.resnets.\1."),
    (r"^mid_attn\.", "mid_block.attentions.0."),
    (r"^guidance_in\.", "time_embedding.cond_proj."),  # LCM: time_cond_proj_dim
    (r"(resnets\.\d+)\.emb_proj\.", r"\1.time_emb_proj."),
    (r"(resnets\.\d+)\.skip\.", r"\1.conv_shortcut."),
    (r"\.blocks\.(\d+)\.", r".transformer_blocks.\1."),
    (r"\.attn(\d)\.out\.", r".attn\1.to_out.0."),
    (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."),
]


def unet_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Inverse of unet_state_dict_from_diffusers: our UNet state dict -> UNet2DConditionModel keys for the config
    `unet_config_to_diffusers(cfg)` gives (linear projections in the spatial transformers)."""
    y_embed = "add_embedding" if cfg.micro_conditions else "class_embedding"
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = re.sub(r"^y_embed\.fc(\d)\.", rf"{y_embed}.linear_\1.", key)
        for pattern, repl in _BACK:
            new = re.sub(pattern, repl, new)
        fused = re.fullmatch(r"(.+\.)(attn\d)\.(qkv|q|kv)\.weight", new)
        if fused:  # "qkv" -> to_q, to_k, to_v; "kv" -> to_k, to_v
            for n, piece in zip(fused[3], value.chunk(len(fused[3]), dim=0)):
                out[f"{fused[1]}{fused[2]}.to_{n}.weight"] = piece.contiguous()
        else:
            out[new] = value
    return out
