"""diffusers `DiTTransformer2DModel` / `PixArtTransformer2DModel` <-> inkwash `DiT` / `PixArt`: configs and weights.

Owns every diffusers transformer key name. Unsupported settings, unmatched keys and missing keys raise `UserError`
listing them; nothing is silently dropped.

diffusers' DiT gives every block its own copy of the time and class embedders (`norm1.emb`; the final layer uses
block 0's). The original DiT, and inkwash, have one shared embedder, so the copies must be identical (as they are in
every checkpoint converted from the original): differing copies are refused, naming them, never averaged or
dropped. Exporting writes the shared embedder into every block.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_exact
from inkwash.models.dit import DiT, DiTConfig
from inkwash.models.pixart import PixArt, PixArtConfig

# Settings we do not implement, with the only value we accept (diffusers' defaults for both models).
_FIXED = {
    "dropout": 0.0,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "upcast_attention": False,
    "norm_elementwise_affine": False,
    "attention_type": "default",
}
DIFFUSERS_DIT_FREQ_SHIFT = 1.0  # diffusers' DiT embeds time with downscale_freq_shift=1 (the original DiT: 0)

# One entry per inkwash tensor: (our key, diffusers keys, how they combine). "cat": ours is their tensors
# concatenated along dim 0 (fused QKV); "tied": every one of theirs is a copy of ours.
KeyMap = list[tuple[str, tuple[str, ...], str]]


def _check(config: Mapping, norm_type: str, what: str) -> tuple[int, int, int]:
    """Refuse what we cannot express; -> (hidden size, in channels, diffusers out channels)."""
    bad = [f"{k}={config[k]!r}" for k, v in _FIXED.items() if k in config and config[k] != v]
    if config.get("norm_type", norm_type) != norm_type:
        bad.append(f"norm_type={config['norm_type']!r}")
    if bad:
        raise UserError(f"diffusers {what} settings not supported: " + ", ".join(bad))
    hidden = config.get("num_attention_heads", 16) * config.get("attention_head_dim", 72)
    in_ch = config.get("in_channels", 4)
    return hidden, in_ch, config.get("out_channels") or in_ch


def _out_channels(in_ch: int, out_ch: int) -> dict:
    """diffusers counts the learned-variance channels in out_channels; we say learn_sigma."""
    return {"out_channels": in_ch, "learn_sigma": True} if out_ch == 2 * in_ch else {"out_channels": out_ch}


def dit_config_from_diffusers(config: Mapping) -> DiTConfig:
    """A diffusers DiTTransformer2DModel config dict -> DiTConfig (UserError on what we cannot express)."""
    hidden, in_ch, out_ch = _check(config, "ada_norm_zero", "DiT")
    return DiTConfig(
        in_channels=in_ch,
        **_out_channels(in_ch, out_ch),
        patch_size=config.get("patch_size", 2),
        hidden_size=hidden,
        depth=config.get("num_layers", 28),
        num_heads=config.get("num_attention_heads", 16),
        num_classes=config.get("num_embeds_ada_norm") or 1000,
        sample_size=config.get("sample_size", 32),
        freq_shift=DIFFUSERS_DIT_FREQ_SHIFT,
        norm_eps=1e-6,  # AdaLayerNormZero's own norm
        mlp_norm_eps=config.get("norm_eps", 1e-5),
    )


def dit_config_to_diffusers(cfg: DiTConfig) -> dict:
    """DiTConfig -> DiTTransformer2DModel keyword arguments for the same network (class-conditional DiTs only)."""
    checks = {
        "y_dim (diffusers' DiT is class-conditional)": cfg.y_dim != 0,
        "num_classes=0 (diffusers' DiT is class-conditional)": cfg.num_classes == 0,
        f"mlp_ratio={cfg.mlp_ratio}": cfg.mlp_ratio != 4,
        f"freq_shift={cfg.freq_shift} (diffusers: {DIFFUSERS_DIT_FREQ_SHIFT})": cfg.freq_shift
        != DIFFUSERS_DIT_FREQ_SHIFT,
        f"norm_eps={cfg.norm_eps} (diffusers: 1e-6)": cfg.norm_eps != 1e-6,
        f"interpolation_scale={cfg.interpolation_scale}": cfg.interpolation_scale != 1,
    }
    bad = [what for what, fails in checks.items() if fails]
    if bad:
        raise UserError("this DiT has no diffusers equivalent: " + ", ".join(bad))
    return dict(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.output_channels,
        num_layers=cfg.depth,
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes,
        norm_eps=cfg.mlp_norm_eps,
    )


def pixart_config_from_diffusers(config: Mapping) -> PixArtConfig:
    """A diffusers PixArtTransformer2DModel config dict -> PixArtConfig (UserError on what we cannot express)."""
    hidden, in_ch, out_ch = _check(config, "ada_norm_single", "PixArt")
    sample = config.get("sample_size", 128)
    caption, cross = config.get("caption_channels"), config.get("cross_attention_dim", 1152)
    bad = [] if caption else ["caption_channels=None (no caption projection)"]
    bad += [] if cross == hidden else [f"cross_attention_dim={cross} (not the model width {hidden})"]
    if bad:
        raise UserError("diffusers PixArt settings not supported: " + ", ".join(bad))
    size_cond = config.get("use_additional_conditions")
    return PixArtConfig(
        in_channels=in_ch,
        **_out_channels(in_ch, out_ch),
        patch_size=config.get("patch_size", 2),
        hidden_size=hidden,
        depth=config.get("num_layers", 28),
        num_heads=config.get("num_attention_heads", 16),
        context_dim=caption,
        sample_size=sample,
        interpolation_scale=float(config.get("interpolation_scale") or max(sample // 64, 1)),
        size_conditioning=sample == 128 if size_cond is None else bool(size_cond),  # diffusers' rule
        norm_eps=config.get("norm_eps", 1e-6),
    )


def pixart_config_to_diffusers(cfg: PixArtConfig) -> dict:
    """PixArtConfig -> PixArtTransformer2DModel keyword arguments for the same network."""
    if cfg.mlp_ratio != 4:
        raise UserError(f"this PixArt has no diffusers equivalent: mlp_ratio={cfg.mlp_ratio}")
    return dict(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.output_channels,
        num_layers=cfg.depth,
        cross_attention_dim=cfg.hidden_size,
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        norm_eps=cfg.norm_eps,
        interpolation_scale=cfg.interpolation_scale,
        use_additional_conditions=cfg.size_conditioning,
        caption_channels=cfg.context_dim,
    )


def _linear(ours: str, theirs: str) -> KeyMap:
    return [(f"{ours}.{p}", (f"{theirs}.{p}",), "cat") for p in ("weight", "bias")]


def _attention(ours: str, theirs: str, fused: dict[str, tuple[str, ...]]) -> KeyMap:
    """Our fused projections (name -> their parts) and the output projection of one attention module."""
    out = _linear(f"{ours}.out", f"{theirs}.to_out.0")
    for name, parts in fused.items():
        out += [(f"{ours}.{name}.{p}", tuple(f"{theirs}.{s}.{p}" for s in parts), "cat") for p in ("weight", "bias")]
    return out


def _block_common(i: int) -> KeyMap:
    b, d = f"blocks.{i}", f"transformer_blocks.{i}"
    m = _attention(f"{b}.attn", f"{d}.attn1", {"qkv": ("to_q", "to_k", "to_v")})
    return m + _linear(f"{b}.mlp.fc1", f"{d}.ff.net.0.proj") + _linear(f"{b}.mlp.fc2", f"{d}.ff.net.2")


def _dit_mapping(cfg: DiTConfig) -> KeyMap:
    m = _linear("patch_embed.proj", "pos_embed.proj")
    emb = [f"transformer_blocks.{i}.norm1.emb" for i in range(cfg.depth)]
    for j in (1, 2):
        for p in ("weight", "bias"):
            m.append((f"t_embed.fc{j}.{p}", tuple(f"{e}.timestep_embedder.linear_{j}.{p}" for e in emb), "tied"))
    m.append(("class_embed.weight", tuple(f"{e}.class_embedder.embedding_table.weight" for e in emb), "tied"))
    for i in range(cfg.depth):
        m += _linear(f"blocks.{i}.adaLN", f"transformer_blocks.{i}.norm1.linear") + _block_common(i)
    return m + _linear("final.adaLN", "proj_out_1") + _linear("final.linear", "proj_out_2")


def _pixart_mapping(cfg: PixArtConfig) -> KeyMap:
    e = "adaln_single.emb"
    m = _linear("patch_embed.proj", "pos_embed.proj") + _linear("t_block", "adaln_single.linear")
    m += [("scale_shift_table", ("scale_shift_table",), "cat")]
    embedders = {"t_embed": "timestep_embedder"}
    if cfg.size_conditioning:
        embedders |= {
            "size_embed.resolution": "resolution_embedder",
            "size_embed.aspect_ratio": "aspect_ratio_embedder",
        }
    for ours, theirs in embedders.items():
        m += _linear(f"{ours}.fc1", f"{e}.{theirs}.linear_1") + _linear(f"{ours}.fc2", f"{e}.{theirs}.linear_2")
    m += _linear("caption_proj.fc1", "caption_projection.linear_1")
    m += _linear("caption_proj.fc2", "caption_projection.linear_2")
    for i in range(cfg.depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        m += [(f"{b}.scale_shift_table", (f"{d}.scale_shift_table",), "cat")] + _block_common(i)
        m += _attention(f"{b}.cross_attn", f"{d}.attn2", {"q": ("to_q",), "kv": ("to_k", "to_v")})
    return m + _linear("linear_out", "proj_out")


def _from_diffusers(sd: Mapping[str, torch.Tensor], mapping: KeyMap, what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    missing, untied = [], []
    for ours, theirs, how in mapping:
        absent = [k for k in theirs if k not in sd]
        missing += absent
        if absent:
            continue
        if how == "tied":
            untied += [k for k in theirs[1:] if not torch.equal(sd[k], sd[theirs[0]])]
            out[ours] = sd[theirs[0]]
        else:
            out[ours] = sd[theirs[0]] if len(theirs) == 1 else torch.cat([sd[k] for k in theirs], dim=0)
    unmatched = sorted(sd.keys() - {k for _, theirs, _ in mapping for k in theirs})
    if unmatched or missing:
        raise UserError(f"{what} state dict: unmatched keys {unmatched}, missing keys {sorted(missing)}")
    if untied:
        raise UserError(
            f"{what} state dict: the per-block time/class embedders differ from block 0's ({untied[:4]}); "
            "inkwash's DiT has one shared embedder, as the original DiT does"
        )
    return out


def _to_diffusers(sd: Mapping[str, torch.Tensor], mapping: KeyMap, what: str) -> dict[str, torch.Tensor]:
    missing = [ours for ours, _, _ in mapping if ours not in sd]
    unmatched = sorted(sd.keys() - {ours for ours, _, _ in mapping})
    if unmatched or missing:
        raise UserError(f"inkwash {what} state dict: unmatched keys {unmatched}, missing keys {missing}")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in mapping:
        parts = [sd[ours]] * len(theirs) if how == "tied" else sd[ours].chunk(len(theirs), dim=0)
        out.update(zip(theirs, (p.clone() for p in parts)))
    return out


def dit_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """A diffusers DiTTransformer2DModel state dict -> ours (QKV fused, the per-block embedder copies as one)."""
    return _from_diffusers(sd, _dit_mapping(cfg), "diffusers DiT")


def dit_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Our DiT state dict -> diffusers' (QKV split, the shared embedder copied into every block)."""
    return _to_diffusers(sd, _dit_mapping(cfg), "DiT")


def pixart_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: PixArtConfig) -> dict[str, torch.Tensor]:
    """A diffusers PixArtTransformer2DModel state dict -> ours (self-attention QKV and cross-attention KV fused)."""
    return _from_diffusers(sd, _pixart_mapping(cfg), "diffusers PixArt")


def pixart_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: PixArtConfig) -> dict[str, torch.Tensor]:
    """Our PixArt state dict -> diffusers'."""
    return _to_diffusers(sd, _pixart_mapping(cfg), "PixArt")


def dit_from_diffusers(config: Mapping, sd: Mapping[str, torch.Tensor]) -> DiT:
    """Build an inkwash DiT from a diffusers config and state dict; every key on both sides must match."""
    cfg = dit_config_from_diffusers(config)
    with torch.device("meta"):
        model = DiT(cfg)
    return load_exact(model, dit_state_dict_from_diffusers(sd, cfg), "diffusers DiT weights", assign=True)


def pixart_from_diffusers(config: Mapping, sd: Mapping[str, torch.Tensor]) -> PixArt:
    """Build an inkwash PixArt from a diffusers config and state dict; every key on both sides must match."""
    cfg = pixart_config_from_diffusers(config)
    with torch.device("meta"):
        model = PixArt(cfg)
    return load_exact(model, pixart_state_dict_from_diffusers(sd, cfg), "diffusers PixArt weights", assign=True)
