"""diffusers `FluxTransformer2DModel` and `SD3Transformer2DModel` <-> inkwash `MMDiT`: config and state-dict
conversion, both ways.

Owns every diffusers FLUX and SD3 transformer key name. diffusers' FLUX works on latents already packed 2x2 into
4C features (`patch_size=1`, `in_channels=64`); inkwash packs inside the network (`patch_size=2`,
`in_channels=16`) with the same (c, ph, pw) feature order, so those weights carry over unchanged. SD3 patchifies
with a strided conv (the same order) but unpatchifies from (ph, pw, c): its output rows are permuted here.
Unsupported settings, unmatched keys and missing keys raise `UserError` listing them; nothing is silently dropped.
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
    fixed_keys = ("patch_size", "mlp_ratio", "guidance_factor", "theta", "qkv_bias", "qk_norm", "pos_embed_max_size")
    bad = [f"{k}={getattr(cfg, k)!r}" for k in fixed_keys if getattr(cfg, k) != getattr(fixed, k)]
    bad += [] if cfg.y_dim else ["y_dim=0"]
    bad += [] if cfg.axes_dim else ["axes_dim=() (no RoPE)"]
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


def sd3_config_from_diffusers(config: Mapping) -> MMDiTConfig:
    """A diffusers SD3Transformer2DModel config dict -> MMDiTConfig (UserError on what we cannot express)."""
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    qk_norm = config.get("qk_norm")
    bad = [] if qk_norm in (None, "rms_norm") else [f"qk_norm={qk_norm!r}"]
    if config.get("dual_attention_layers"):
        bad.append(f"dual_attention_layers={list(config['dual_attention_layers'])} (SD3.5 Medium's extra attention)")
    if config.get("caption_projection_dim", 1152) != heads * head_dim:
        bad.append(
            f"caption_projection_dim={config.get('caption_projection_dim', 1152)} (not the width {heads * head_dim})"
        )
    if not config.get("pos_embed_max_size", 96):
        bad.append("pos_embed_max_size=None")
    if bad:
        raise UserError("diffusers SD3 transformer settings not supported: " + ", ".join(bad))
    try:
        return MMDiTConfig(
            in_channels=config.get("in_channels", 16),
            out_channels=config.get("out_channels") or config.get("in_channels", 16),
            patch_size=config.get("patch_size", 2),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=config.get("num_layers", 18),
            depth_single=0,
            context_dim=config.get("joint_attention_dim", 4096),
            y_dim=config.get("pooled_projection_dim", 2048),
            axes_dim=(),
            pos_embed_max_size=config.get("pos_embed_max_size", 96),
            qk_norm=qk_norm == "rms_norm",
        )
    except ValueError as e:
        raise UserError(f"diffusers SD3 transformer config is inconsistent: {e}") from None


def sd3_config_to_diffusers(cfg: MMDiTConfig, sample_size: int = 128) -> dict:
    """MMDiTConfig -> the SD3Transformer2DModel keyword arguments that build the same network. `sample_size` (the
    latent side diffusers' pipeline defaults to) does not change the weights."""
    fixed = MMDiTConfig()
    bad = [f"{k}={getattr(cfg, k)!r}" for k in ("mlp_ratio", "qkv_bias")
           if getattr(cfg, k) != getattr(fixed, k)]  # fmt: skip
    bad += [f"{k}={getattr(cfg, k)!r}" for k in ("depth_single", "guidance_embed", "axes_dim") if getattr(cfg, k)]
    bad += [] if cfg.y_dim else ["y_dim=0"]
    bad += [] if cfg.pos_embed_max_size else ["pos_embed_max_size=0"]
    if bad:
        raise UserError("MMDiT settings diffusers' SD3 transformer cannot express: " + ", ".join(bad))
    return dict(
        sample_size=sample_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.y_dim,
        pos_embed_max_size=cfg.pos_embed_max_size,
        qk_norm="rms_norm" if cfg.qk_norm else None,
    )


Table = list[tuple[str, list[tuple[str, int]]]]


def _table(cfg: MMDiTConfig, sd3: bool) -> Table:
    """(our parameter, [(diffusers parameter, rows)]): ours is the diffusers parts concatenated along dim 0."""
    C, M = cfg.hidden_size, cfg.mlp_hidden
    linears: Table = [
        ("img_in", [("pos_embed.proj" if sd3 else "x_embedder", C)]),
        ("txt_in", [("context_embedder", C)]),
        ("time_in.fc1", [("time_text_embed.timestep_embedder.linear_1", C)]),
        ("time_in.fc2", [("time_text_embed.timestep_embedder.linear_2", C)]),
        ("vector_in.fc1", [("time_text_embed.text_embedder.linear_1", C)]),
        ("vector_in.fc2", [("time_text_embed.text_embedder.linear_2", C)]),
        ("final_layer.mod", [("norm_out.linear", 2 * C)]),  # halves swapped: see _transforms
        ("final_layer.linear", [("proj_out", cfg.out_channels * cfg.patch_size**2)]),
    ]
    if cfg.guidance_embed:
        linears += [(f"guidance_in.fc{i}", [(f"time_text_embed.guidance_embedder.linear_{i}", C)]) for i in (1, 2)]
    norms: Table = []
    for i in range(cfg.depth):
        ours, theirs = f"double_blocks.{i}", f"transformer_blocks.{i}"
        text_out = cfg.depth_single > 0 or i < cfg.depth - 1
        for s, mod, qkv, out, ff, qk in [
            ("img", "norm1", ("to_q", "to_k", "to_v"), "to_out.0", "ff", ("norm_q", "norm_k")),
            ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context",
             ("norm_added_q", "norm_added_k")),
        ]:  # fmt: skip
            linears += [
                (f"{ours}.{s}_mod", [(f"{theirs}.{mod}.linear", (6 if s == "img" or text_out else 2) * C)]),
                (f"{ours}.{s}_attn.qkv", [(f"{theirs}.attn.{n}", C) for n in qkv]),
            ]
            if s == "img" or text_out:
                linears += [
                    (f"{ours}.{s}_attn.proj", [(f"{theirs}.attn.{out}", C)]),
                    (f"{ours}.{s}_mlp.fc1", [(f"{theirs}.{ff}.net.0.proj", M)]),
                    (f"{ours}.{s}_mlp.fc2", [(f"{theirs}.{ff}.net.2", C)]),
                ]
            if cfg.qk_norm:
                norms += [
                    (f"{ours}.{s}_attn.{a}_norm", [(f"{theirs}.attn.{n}", cfg.head_dim)]) for a, n in zip("qk", qk)
                ]
    for i in range(cfg.depth_single):
        ours, theirs = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linears += [
            (f"{ours}.mod", [(f"{theirs}.norm.linear", 3 * C)]),
            (f"{ours}.linear1", [(f"{theirs}.attn.to_{n}", C) for n in "qkv"] + [(f"{theirs}.proj_mlp", M)]),
            (f"{ours}.linear2", [(f"{theirs}.proj_out", C)]),
        ]
        if cfg.qk_norm:
            norms += [(f"{ours}.{a}_norm", [(f"{theirs}.attn.norm_{a}", cfg.head_dim)]) for a in "qk"]
    if cfg.y_dim == 0:
        linears = [e for e in linears if not e[0].startswith("vector_in.")]
    table = [(f"{o}.{p}", [(f"{n}.{p}", r) for n, r in parts]) for o, parts in linears for p in ("weight", "bias")]
    table += [(f"{o}.weight", [(f"{n}.weight", r) for n, r in parts]) for o, parts in norms]
    if cfg.pos_embed_max_size:
        table.append(("pos_embed", [("pos_embed.pos_embed", 1)]))
    return table


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _permute_rows(x: torch.Tensor, shape: tuple[int, int, int], perm: tuple[int, int, int]) -> torch.Tensor:
    """Rows of x viewed as `shape`, reordered by `perm` (the other dims untouched)."""
    return x.unflatten(0, shape).permute(*perm, *range(3, x.dim() + 2)).flatten(0, 2)


def _transforms(cfg: MMDiTConfig, sd3: bool) -> dict[str, tuple]:
    """our key -> (from diffusers, to diffusers), for tensors that are more than renamed."""
    swap = (_swap_halves, _swap_halves)  # adaLN-continuous: FLUX and SD3 originals give (shift, scale), diffusers
    out = {f"final_layer.mod.{p}": swap for p in ("weight", "bias")}  # stores (scale, shift)
    if not sd3:
        return out
    p, c, C = cfg.patch_size, cfg.out_channels, cfg.hidden_size
    last = f"double_blocks.{cfg.depth - 1}.txt_mod"
    out |= {f"{last}.{k}": swap for k in ("weight", "bias")}
    out["img_in.weight"] = (lambda w: w.flatten(1), lambda w: w.view(C, cfg.in_channels, p, p))  # conv <-> linear
    out["pos_embed"] = (lambda t: t[0], lambda t: t[None])  # [1, S, C] <-> [S, C]
    rows = (  # SD3 unpatchifies rows (ph, pw, c); ours are (c, ph, pw) like the input
        lambda w: _permute_rows(w, (p, p, c), (2, 0, 1)),
        lambda w: _permute_rows(w, (c, p, p), (1, 2, 0)),
    )
    out |= {f"final_layer.linear.{k}": rows for k in ("weight", "bias")}
    return out


def _from_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig, sd3: bool) -> dict[str, torch.Tensor]:
    table, what = _table(cfg, sd3), "SD3" if sd3 else "FLUX"
    expected = {name for _, parts in table for name, _ in parts}
    missing, unmatched = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unmatched:
        raise UserError(f"diffusers {what} transformer state dict: unmatched keys {unmatched}, missing keys {missing}")
    out = {}
    for ours, parts in table:
        out[ours] = sd[parts[0][0]] if len(parts) == 1 else torch.cat([sd[name] for name, _ in parts], dim=0)
    for key, (forward, _) in _transforms(cfg, sd3).items():
        out[key] = forward(out[key])
    return out


def _to_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig, sd3: bool) -> dict[str, torch.Tensor]:
    table, transforms = _table(cfg, sd3), _transforms(cfg, sd3)
    expected = {ours for ours, _ in table}
    missing, unmatched = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unmatched:
        raise UserError(f"MMDiT state dict does not fit its config: unmatched keys {unmatched}, missing keys {missing}")
    out = {}
    for ours, parts in table:
        value = transforms[ours][1](sd[ours]) if ours in transforms else sd[ours]
        if len(parts) == 1:
            out[parts[0][0]] = value
            continue
        sizes = [r for _, r in parts]
        if value.shape[0] != sum(sizes):
            raise UserError(f"MMDiT weight {ours} has {value.shape[0]} rows; the config expects {sum(sizes)}")
        out |= {name: piece.contiguous() for (name, _), piece in zip(parts, value.split(sizes, dim=0))}
    return out


def flux_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict -> ours (QKV and single-block input projections fused)."""
    return _from_diffusers(sd, cfg, sd3=False)


def flux_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Inverse of flux_state_dict_from_diffusers: our MMDiT state dict -> diffusers FluxTransformer2DModel keys."""
    return _to_diffusers(sd, cfg, sd3=False)


def sd3_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict -> ours (QKV fused, patch conv as linear, output rows reordered)."""
    return _from_diffusers(sd, cfg, sd3=True)


def sd3_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Inverse of sd3_state_dict_from_diffusers: our MMDiT state dict -> diffusers SD3Transformer2DModel keys."""
    return _to_diffusers(sd, cfg, sd3=True)


def _build(cfg: MMDiTConfig, sd: dict[str, torch.Tensor], what: str) -> MMDiT:
    with torch.device("meta"):
        model = MMDiT(cfg)
    return load_exact(model, sd, what, assign=True)


def flux_from_diffusers(config: Mapping, sd: Mapping[str, torch.Tensor]) -> MMDiT:
    """Build an inkwash MMDiT from a diffusers FLUX config and state dict; every key on both sides must match.

    Unfused tensors are assigned, not copied: the model shares their storage with `sd`.
    """
    cfg = flux_config_from_diffusers(config)
    return _build(cfg, flux_state_dict_from_diffusers(sd, cfg), "diffusers FLUX transformer weights")


def sd3_from_diffusers(config: Mapping, sd: Mapping[str, torch.Tensor]) -> MMDiT:
    """Build an inkwash MMDiT from a diffusers SD3 config and state dict; every key on both sides must match."""
    cfg = sd3_config_from_diffusers(config)
    return _build(cfg, sd3_state_dict_from_diffusers(sd, cfg), "diffusers SD3 transformer weights")
