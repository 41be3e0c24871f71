"""diffusers `FluxTransformer2DModel` <-> inkwash `MMDiT`: config and state-dict conversion, both ways.

Owns every diffusers FLUX key name. diffusers works on latents already packed 2x2 into 4C features
(`patch_size=1`, `in_channels=64`); inkwash packs inside the network (`patch_size=2`, `in_channels=16`), with
the same (c, ph, pw) feature order, so the weights carry over unchanged. Unsupported settings, unmatched keys
and missing keys raise `UserError` listing them; nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_exact
from inkwash.models.mmdit import MMDiT, MMDiTConfig

_PACK = 2  # the diffusers Flux pipeline packs latents 2x2 (`_pack_latents`); its transformer sees tokens


def flux_config_from_diffusers(config: Mapping) -> MMDiTConfig:
    """A diffusers FluxTransformer2DModel config dict -> MMDiTConfig (UserError on what we cannot express)."""
    c_in = config.get("in_channels", 64)
    c_out = config.get("out_channels") or c_in
    bad = [] if config.get("patch_size", 1) == 1 else [f"patch_size={config['patch_size']}"]
    bad += [f"{k}={v} (not a multiple of {_PACK * _PACK})" for k, v in [("in_channels", c_in), ("out_channels", c_out)]
            if v % (_PACK * _PACK)]  # fmt: skip
    if bad:
        raise UserError("diffusers FLUX transformer settings not supported: " + ", ".join(bad))
    heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
    try:
        return MMDiTConfig(
            in_channels=c_in // _PACK**2,
            out_channels=c_out // _PACK**2,
            patch_size=_PACK,
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=config.get("num_layers", 19),
            depth_single=config.get("num_single_layers", 38),
            context_dim=config.get("joint_attention_dim", 4096),
            y_dim=config.get("pooled_projection_dim", 768),
            guidance_embed=bool(config.get("guidance_embeds", False)),
            axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
        )
    except ValueError as e:
        raise UserError(f"diffusers FLUX transformer config is inconsistent: {e}") from None


def flux_config_to_diffusers(cfg: MMDiTConfig) -> dict:
    """MMDiTConfig -> the FluxTransformer2DModel keyword arguments that build the same network."""
    fixed = MMDiTConfig()
    bad = [f"{k}={getattr(cfg, k)!r}" for k in ("patch_size", "mlp_ratio", "guidance_factor", "theta", "qkv_bias",
                                                "time_embed_dim") if getattr(cfg, k) != getattr(fixed, k)]  # fmt: skip
    bad += [] if cfg.y_dim else ["y_dim=0"]
    if bad:
        raise UserError("MMDiT settings diffusers' FLUX transformer cannot express: " + ", ".join(bad))
    return dict(
        patch_size=1,
        in_channels=cfg.in_channels * _PACK**2,
        out_channels=cfg.out_channels * _PACK**2,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        pooled_projection_dim=cfg.y_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.axes_dim,
    )


def _table(cfg: MMDiTConfig) -> list[tuple[str, list[tuple[str, int]]]]:
    """(our parameter, [(diffusers parameter, rows)]): ours is the diffusers parts concatenated along dim 0."""
    C, M = cfg.hidden_size, cfg.mlp_hidden
    linears: list[tuple[str, list[tuple[str, int]]]] = [
        ("img_in", [("x_embedder", C)]),
        ("txt_in", [("context_embedder", C)]),
        ("time_in.fc1", [("time_text_embed.timestep_embedder.linear_1", C)]),
        ("time_in.fc2", [("time_text_embed.timestep_embedder.linear_2", C)]),
        ("vector_in.fc1", [("time_text_embed.text_embedder.linear_1", C)]),
        ("vector_in.fc2", [("time_text_embed.text_embedder.linear_2", C)]),
        ("final_layer.mod", [("norm_out.linear", 2 * C)]),  # halves swapped: see _SWAPPED
        ("final_layer.linear", [("proj_out", cfg.out_channels * cfg.patch_size**2)]),
    ]
    if cfg.guidance_embed:
        linears += [(f"guidance_in.fc{i}", [(f"time_text_embed.guidance_embedder.linear_{i}", C)]) for i in (1, 2)]
    norms: list[tuple[str, list[tuple[str, int]]]] = []
    for i in range(cfg.depth):
        ours, theirs = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for s, mod, qkv, out, ff, qk in [
            ("img", "norm1", ("to_q", "to_k", "to_v"), "to_out.0", "ff", ("norm_q", "norm_k")),
            ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context",
             ("norm_added_q", "norm_added_k")),
        ]:  # fmt: skip
            linears += [
                (f"{ours}.{s}_mod", [(f"{theirs}.{mod}.linear", 6 * C)]),
                (f"{ours}.{s}_attn.qkv", [(f"{theirs}.attn.{n}", C) for n in qkv]),
                (f"{ours}.{s}_attn.proj", [(f"{theirs}.attn.{out}", C)]),
                (f"{ours}.{s}_mlp.0", [(f"{theirs}.{ff}.net.0.proj", M)]),
                (f"{ours}.{s}_mlp.2", [(f"{theirs}.{ff}.net.2", C)]),
            ]
            norms += [(f"{ours}.{s}_attn.{a}_norm", [(f"{theirs}.attn.{n}", cfg.head_dim)]) for a, n in zip("qk", qk)]
    for i in range(cfg.depth_single):
        ours, theirs = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linears += [
            (f"{ours}.mod", [(f"{theirs}.norm.linear", 3 * C)]),
            (f"{ours}.linear1", [(f"{theirs}.attn.to_{n}", C) for n in "qkv"] + [(f"{theirs}.proj_mlp", M)]),
            (f"{ours}.linear2", [(f"{theirs}.proj_out", C)]),
        ]
        norms += [(f"{ours}.{a}_norm", [(f"{theirs}.attn.norm_{a}", cfg.head_dim)]) for a in "qk"]
    if cfg.y_dim == 0:
        linears = [e for e in linears if not e[0].startswith("vector_in.")]
    table = [(f"{o}.{p}", [(f"{n}.{p}", r) for n, r in parts]) for o, parts in linears for p in ("weight", "bias")]
    return table + [(f"{o}.weight", [(f"{n}.weight", r) for n, r in parts]) for o, parts in norms]


# FLUX's final adaLN gives (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift). Swapping is an involution.
_SWAPPED = ("final_layer.mod.weight", "final_layer.mod.bias")


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def flux_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict -> ours (QKV and single-block input projections fused)."""
    table = _table(cfg)
    expected = {name for _, parts in table for name, _ in parts}
    missing, unmatched = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unmatched:
        raise UserError(f"diffusers FLUX transformer state dict: unmatched keys {unmatched}, missing keys {missing}")
    out = {}
    for ours, parts in table:
        out[ours] = sd[parts[0][0]] if len(parts) == 1 else torch.cat([sd[name] for name, _ in parts], dim=0)
    for k in _SWAPPED:
        out[k] = _swap_halves(out[k])
    return out


def flux_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Inverse of flux_state_dict_from_diffusers: our MMDiT state dict -> diffusers FluxTransformer2DModel keys."""
    table = _table(cfg)
    expected = {ours for ours, _ in table}
    missing, unmatched = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unmatched:
        raise UserError(f"MMDiT state dict does not fit its config: unmatched keys {unmatched}, missing keys {missing}")
    out = {}
    for ours, parts in table:
        value = _swap_halves(sd[ours]) if ours in _SWAPPED else sd[ours]
        if value.shape[0] != sum(r for _, r in parts):
            raise UserError(
                f"MMDiT weight {ours} has {value.shape[0]} rows; the config expects {sum(r for _, r in parts)}"
            )
        for (name, _), piece in zip(parts, value.split([r for _, r in parts], dim=0)):
            out[name] = piece.contiguous() if len(parts) > 1 else piece
    return out


def flux_from_diffusers(config: Mapping, sd: Mapping[str, torch.Tensor]) -> MMDiT:
    """Build an inkwash MMDiT from a diffusers config and state dict; every key on both sides must match.

    Unfused tensors are assigned, not copied: the model shares their storage with `sd`.
    """
    cfg = flux_config_from_diffusers(config)
    with torch.device("meta"):
        model = MMDiT(cfg)
    return load_exact(model, flux_state_dict_from_diffusers(sd, cfg), "diffusers FLUX transformer weights", assign=True)
