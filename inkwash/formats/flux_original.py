"""Black Forest Labs' original FLUX.1 single-file layout (`flux1-dev.safetensors`, `flux1-schnell.safetensors`)
<-> inkwash `MMDiT`.

Owns every BFL key name (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `time_in.in_layer`,
`final_layer.adaLN_modulation.1`, ...). inkwash's MMDiT was written after the BFL reference, so most tensors
carry over under a new name and none is reshaped: fused QKV, the single blocks' fused input projection and the
final (shift, scale) modulation order are the same on both sides. ComfyUI-style files that put the transformer
under `model.diffusion_model.` are accepted too. The shape is read from the tensors; the RoPE split of a head
(`axes_dim`) is not stored in the file: FLUX.1's (16, 56, 56) is assumed for 128-wide heads, anything else must
be given. Unmatched and missing keys raise one `UserError` listing them; nothing is silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_exact
from inkwash.models.mmdit import MMDiT, MMDiTConfig

COMFY_PREFIX = "model.diffusion_model."  # ComfyUI / Stability single files nest the network under this
FLUX_AXES_DIM = (16, 56, 56)  # FLUX.1's RoPE split of a 128-wide head (t, h, w)

Renames = list[tuple[str, str]]
Transforms = dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]]

# (inkwash pattern, original replacement), applied in order with re.sub to each inkwash key.
_FLUX_RENAMES: Renames = [
    (r"^(time_in|vector_in|guidance_in)\.fc1\.", r"\1.in_layer."),
    (r"^(time_in|vector_in|guidance_in)\.fc2\.", r"\1.out_layer."),
    (r"^(double_blocks\.\d+)\.(img|txt)_mod\.", r"\1.\2_mod.lin."),
    (r"_attn\.q_norm\.weight$", r"_attn.norm.query_norm.scale"),
    (r"_attn\.k_norm\.weight$", r"_attn.norm.key_norm.scale"),
    (r"_mlp\.fc1\.", r"_mlp.0."),
    (r"_mlp\.fc2\.", r"_mlp.2."),
    (r"^(single_blocks\.\d+)\.mod\.", r"\1.modulation.lin."),
    (r"^(single_blocks\.\d+)\.q_norm\.weight$", r"\1.norm.query_norm.scale"),
    (r"^(single_blocks\.\d+)\.k_norm\.weight$", r"\1.norm.key_norm.scale"),
    (r"^final_layer\.mod\.", r"final_layer.adaLN_modulation.1."),
]


def rename(key: str, renames: Renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def key_table(cfg: MMDiTConfig, renames: Renames) -> dict[str, str]:
    """{original key: inkwash key} for every tensor of an MMDiT of this shape (built on the meta device)."""
    with torch.device("meta"):
        ours = MMDiT(cfg).state_dict().keys()
    return {rename(k, renames): k for k in ours}


def convert_from(sd: Mapping[str, torch.Tensor], table: dict[str, str], transforms: Transforms, what: str) -> dict:
    """Rename (and transform) an original state dict to ours; every key on both sides must match."""
    missing, unmatched = sorted(table.keys() - sd.keys()), sorted(sd.keys() - table.keys())
    if missing or unmatched:
        raise UserError(f"{what}: unmatched keys {unmatched}, missing keys {missing}")
    out = {table[k]: v for k, v in sd.items()}
    for key, (forward, _) in transforms.items():
        out[key] = forward(out[key])
    return out


def convert_to(sd: Mapping[str, torch.Tensor], table: dict[str, str], transforms: Transforms) -> dict:
    """Inverse of convert_from: our state dict -> original keys."""
    back = {ours: orig for orig, ours in table.items()}
    missing, unmatched = sorted(back.keys() - sd.keys()), sorted(sd.keys() - back.keys())
    if missing or unmatched:
        raise UserError(f"MMDiT state dict does not fit its config: unmatched keys {unmatched}, missing keys {missing}")
    return {back[k]: (transforms[k][1](v) if k in transforms else v) for k, v in sd.items()}


def strip_comfy_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `model.diffusion_model.` when every key has it (ComfyUI / Stability files); otherwise leave the keys."""
    if sd and all(k.startswith(COMFY_PREFIX) for k in sd):
        return {k[len(COMFY_PREFIX) :]: v for k, v in sd.items()}
    return dict(sd)


def _need(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise UserError(f"not a {what} state dict: it has no {key!r}")
    return sd[key]


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m[1]) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def is_flux_original(keys) -> bool:
    """Does a set of keys look like BFL's FLUX transformer (with or without `model.diffusion_model.`)?"""
    keys = set(keys)
    return any(f"{p}double_blocks.0.img_attn.qkv.weight" in keys for p in ("", COMFY_PREFIX)) and any(
        f"{p}single_blocks.0.linear1.weight" in keys for p in ("", COMFY_PREFIX)
    )


def flux_config_from_original(sd: Mapping[str, torch.Tensor], axes_dim: tuple[int, ...] | None = None) -> MMDiTConfig:
    """Read an MMDiTConfig off a BFL FLUX state dict's shapes (prefix already stripped)."""
    what = "FLUX transformer"
    img_in = _need(sd, "img_in.weight", what)
    hidden, packed_in = img_in.shape
    head_dim = _need(sd, "double_blocks.0.img_attn.norm.query_norm.scale", what).shape[0]
    if axes_dim is None:
        if head_dim != sum(FLUX_AXES_DIM):
            raise UserError(f"FLUX transformer with {head_dim}-wide heads: give axes_dim (its RoPE split)")
        axes_dim = FLUX_AXES_DIM
    try:
        return MMDiTConfig(
            in_channels=packed_in // 4,
            out_channels=_need(sd, "final_layer.linear.weight", what).shape[0] // 4,
            patch_size=2,
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=_count(sd, "double_blocks"),
            depth_single=_count(sd, "single_blocks"),
            mlp_ratio=_need(sd, "double_blocks.0.img_mlp.0.weight", what).shape[0] / hidden,
            context_dim=_need(sd, "txt_in.weight", what).shape[1],
            y_dim=_need(sd, "vector_in.in_layer.weight", what).shape[1],
            guidance_embed="guidance_in.in_layer.weight" in sd,
            axes_dim=tuple(axes_dim),
        )
    except ValueError as e:
        raise UserError(f"FLUX transformer weights are inconsistent: {e}") from None


def flux_state_dict_from_original(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """A BFL FLUX state dict (prefix stripped) -> ours; UserError listing unmatched and missing keys."""
    return convert_from(sd, key_table(cfg, _FLUX_RENAMES), {}, "FLUX transformer state dict")


def flux_state_dict_to_original(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Our MMDiT state dict -> BFL FLUX keys."""
    return convert_to(sd, key_table(cfg, _FLUX_RENAMES), {})


def flux_from_original(sd: Mapping[str, torch.Tensor], axes_dim: tuple[int, ...] | None = None) -> MMDiT:
    """Build an inkwash MMDiT from a BFL FLUX state dict (bare or under `model.diffusion_model.`); the model shares
    the tensors' storage (built on the meta device, assign-loaded)."""
    sd = strip_comfy_prefix(sd)
    cfg = flux_config_from_original(sd, axes_dim)
    converted = flux_state_dict_from_original(sd, cfg)
    with torch.device("meta"):
        model = MMDiT(cfg)
    return load_exact(model, converted, "FLUX transformer weights", assign=True)
