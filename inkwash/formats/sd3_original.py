"""Stability AI's original SD3 / SD3.5 single-file layout (`sd3_medium.safetensors`, `sd3.5_large.safetensors`)
<-> inkwash `MMDiT`, and the split of such a file into its parts.

Owns every Stability MMDiT key name (`joint_blocks.N.x_block.attn.qkv`, `context_block.adaLN_modulation.1`,
`x_embedder.proj`, `pos_embed`, `t_embedder.mlp.0`, `y_embedder`, `context_embedder`, `final_layer`) and the
prefixes of a whole SD3 file: the network under `model.diffusion_model.`, the autoencoder under
`first_stage_model.` (original LDM names), the text encoders under `text_encoders.clip_l.transformer.`,
`text_encoders.clip_g.transformer.` and `text_encoders.t5xxl.transformer.` (already in transformers' names).
Besides renames: the patch conv becomes a linear, the position table loses its batch dim, and the output rows are
reordered from SD3's (ph, pw, c) to inkwash's (c, ph, pw). Adaptive-norm chunks keep SD3's (shift, scale) order,
which is inkwash's. SD3.5 Medium's second image attention (`attn2`) is not supported: its keys are reported as
unmatched. Nothing is silently dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_exact
from inkwash.formats.flux_original import (
    COMFY_PREFIX,
    Renames,
    Transforms,
    convert_from,
    convert_to,
    key_table,
    strip_comfy_prefix,
)
from inkwash.models.mmdit import MMDiT, MMDiTConfig

SD3_HEAD_DIM = 64  # SD3 and SD3.5 use 64-wide heads (heads = depth); QK-norm scales say it where present

# The parts of a whole SD3 file: name -> key prefix.
SD3_PARTS = {
    "transformer": COMFY_PREFIX,
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}

_SD3_RENAMES: Renames = [
    (r"^img_in\.", "x_embedder.proj."),
    (r"^txt_in\.", "context_embedder."),
    (r"^time_in\.fc1\.", "t_embedder.mlp.0."),
    (r"^time_in\.fc2\.", "t_embedder.mlp.2."),
    (r"^vector_in\.fc1\.", "y_embedder.mlp.0."),
    (r"^vector_in\.fc2\.", "y_embedder.mlp.2."),
    (r"^double_blocks\.(\d+)\.img_", r"joint_blocks.\1.x_block."),
    (r"^double_blocks\.(\d+)\.txt_", r"joint_blocks.\1.context_block."),
    (r"_block\.mod\.", "_block.adaLN_modulation.1."),
    (r"_block\.attn\.q_norm\.weight$", "_block.attn.ln_q.weight"),
    (r"_block\.attn\.k_norm\.weight$", "_block.attn.ln_k.weight"),
    (r"^final_layer\.mod\.", "final_layer.adaLN_modulation.1."),
]


def _permute_rows(x: torch.Tensor, shape: tuple[int, int, int], perm: tuple[int, int, int]) -> torch.Tensor:
    """Rows of x viewed as `shape`, reordered by `perm` (the other dims untouched)."""
    return x.unflatten(0, shape).permute(*perm, *range(3, x.dim() + 2)).flatten(0, 2).contiguous()


def _transforms(cfg: MMDiTConfig) -> Transforms:
    """our key -> (from original, to original), for tensors that are more than renamed."""
    p, c, C = cfg.patch_size, cfg.out_channels, cfg.hidden_size
    rows = (  # SD3 unpatchifies rows (ph, pw, c); ours are (c, ph, pw) like the input
        lambda w: _permute_rows(w, (p, p, c), (2, 0, 1)),
        lambda w: _permute_rows(w, (c, p, p), (1, 2, 0)),
    )
    return {
        "img_in.weight": (lambda w: w.flatten(1), lambda w: w.view(C, cfg.in_channels, p, p)),  # conv <-> linear
        "pos_embed": (lambda t: t[0], lambda t: t[None]),  # [1, S, C] <-> [S, C]
        "final_layer.linear.weight": rows,
        "final_layer.linear.bias": rows,
    }


def is_sd3_original(keys) -> bool:
    """Does a set of keys look like Stability's SD3 MMDiT (with or without `model.diffusion_model.`)?"""
    keys = set(keys)
    return any(f"{p}joint_blocks.0.x_block.attn.qkv.weight" in keys for p in ("", COMFY_PREFIX))


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise UserError(f"not an SD3 transformer state dict: it has no {key!r}")
    return sd[key]


def sd3_config_from_original(sd: Mapping[str, torch.Tensor], num_heads: int | None = None) -> MMDiTConfig:
    """Read an MMDiTConfig off an SD3 state dict's shapes (prefix already stripped). The head count is read from
    the QK-norm scales where there are some (SD3.5), else 64-wide heads are assumed unless `num_heads` is given."""
    conv = _need(sd, "x_embedder.proj.weight")  # [C, c_in, p, p]
    hidden, c_in, p, _ = conv.shape
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
    if num_heads is None:
        head_dim = sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk_norm else SD3_HEAD_DIM
        if hidden % head_dim:
            raise UserError(f"SD3 transformer {hidden} wide does not split into {head_dim}-wide heads: give num_heads")
        num_heads = hidden // head_dim
    table = _need(sd, "pos_embed").shape[1]
    side = math.isqrt(table)
    if side * side != table:
        raise UserError(f"SD3 position table of {table} entries is not square")
    depth = 1 + max((int(m[1]) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k))), default=-1)
    try:
        return MMDiTConfig(
            in_channels=c_in,
            out_channels=_need(sd, "final_layer.linear.weight").shape[0] // (p * p),
            patch_size=p,
            hidden_size=hidden,
            num_heads=num_heads,
            depth=depth,
            depth_single=0,
            mlp_ratio=_need(sd, "joint_blocks.0.x_block.mlp.fc1.weight").shape[0] / hidden,
            context_dim=_need(sd, "context_embedder.weight").shape[1],
            y_dim=_need(sd, "y_embedder.mlp.0.weight").shape[1],
            axes_dim=(),
            pos_embed_max_size=side,
            qk_norm=qk_norm,
        )
    except ValueError as e:
        raise UserError(f"SD3 transformer weights are inconsistent: {e}") from None


def sd3_state_dict_from_original(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """An SD3 MMDiT state dict (prefix stripped) -> ours; UserError listing unmatched and missing keys."""
    return convert_from(sd, key_table(cfg, _SD3_RENAMES), _transforms(cfg), "SD3 transformer state dict")


def sd3_state_dict_to_original(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Our MMDiT state dict -> Stability's SD3 keys (without the `model.diffusion_model.` prefix)."""
    return convert_to(sd, key_table(cfg, _SD3_RENAMES), _transforms(cfg))


def sd3_from_original(sd: Mapping[str, torch.Tensor], num_heads: int | None = None) -> MMDiT:
    """Build an inkwash MMDiT from an SD3 transformer state dict (bare or under `model.diffusion_model.`)."""
    sd = strip_comfy_prefix(sd)
    cfg = sd3_config_from_original(sd, num_heads)
    converted = sd3_state_dict_from_original(sd, cfg)
    with torch.device("meta"):
        model = MMDiT(cfg)
    return load_exact(model, converted, "SD3 transformer weights", assign=True)


def split_sd3_file(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A whole SD3 file -> {part: state dict without its prefix} for the parts present (`SD3_PARTS`); a key under
    no known prefix is a UserError, and so is a file without a transformer."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, value in sd.items():
        for name, prefix in SD3_PARTS.items():
            if key.startswith(prefix):
                parts.setdefault(name, {})[key[len(prefix) :]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise UserError(f"SD3 file: keys under no known prefix {sorted(unmatched)[:20]} ({len(unmatched)} in all)")
    if "transformer" not in parts:
        raise UserError(f"SD3 file without a transformer (no keys under {COMFY_PREFIX!r})")
    return parts
