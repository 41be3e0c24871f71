"""diffusers `AutoencoderKL` <-> inkwash `VAE`: config and state-dict conversion, both directions.

Owns every diffusers autoencoder key name. The mid attention's q/k/v projections are fused into one `qkv`
(concatenated along the output dim). Older checkpoint files' attention names (query/key/value/proj_attn,
possibly 1x1-conv shaped) are accepted on the way in. Unsupported settings, unmatched keys and missing keys
raise `UserError` listing them; nothing is silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_exact
from inkwash.models.vae import VAE, VAEConfig

# diffusers settings we do not implement, with the only value we accept.
_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}

# (diffusers module, inkwash module); `{i}` / `{j}` stand for block and layer indices.
_RES_PARTS = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"), ("conv_shortcut", "skip")]
_RES_BLOCKS = [
    ("encoder.down_blocks.{i}.resnets.{j}", "encoder.down.{i}.res.{j}"),
    ("decoder.up_blocks.{i}.resnets.{j}", "decoder.up.{i}.res.{j}"),
]
_MODULES = [
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
    ("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down.{i}.resample.conv"),
    ("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder.up.{i}.resample.conv"),
]
for _side in ("encoder", "decoder"):
    _RES_BLOCKS += [
        (f"{_side}.mid_block.resnets.0", f"{_side}.mid.res1"),
        (f"{_side}.mid_block.resnets.1", f"{_side}.mid.res2"),
    ]
    _MODULES += [
        (f"{_side}.conv_in", f"{_side}.conv_in"),
        (f"{_side}.conv_norm_out", f"{_side}.norm_out"),
        (f"{_side}.conv_out", f"{_side}.conv_out"),
        (f"{_side}.mid_block.attentions.0.group_norm", f"{_side}.mid.attn.norm"),
        (f"{_side}.mid_block.attentions.0.to_out.0", f"{_side}.mid.attn.out"),
    ]
_MODULES += [(f"{d}.{dp}", f"{o}.{op}") for d, o in _RES_BLOCKS for dp, op in _RES_PARTS]
_QKV = ("to_q", "to_k", "to_v")  # fused, in this order, into `{side}.mid.attn.qkv`
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(pattern + r"\.(?P<param>weight|bias)")


_FORWARD = [(_regex(d), o) for d, o in _MODULES]
_BACKWARD = [(_regex(o), d) for d, o in _MODULES]
_ATTN = re.compile(
    r"(?P<side>encoder|decoder)\.mid_block\.attentions\.0\.(?P<name>\w+(?:\.0)?)\.(?P<param>weight|bias)"
)
_FUSED = re.compile(r"(?P<side>encoder|decoder)\.mid\.attn\.qkv\.(?P<param>weight|bias)")


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(key)
        if m:
            groups = m.groupdict()
            return template.format(**{k: v for k, v in groups.items() if k != "param"}) + "." + groups["param"]
    return None


def _problems(what: str, unmatched: list[str], missing: list[str]) -> None:
    if unmatched or missing:
        raise UserError(f"{what}: unmatched keys {sorted(unmatched)}, missing keys {sorted(missing)}")


def from_diffusers_vae(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> ours (mid-attention q/k/v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (side, param) -> {to_q: tensor, ...}
    for key, value in sd.items():
        m = _ATTN.fullmatch(key)
        if m and m["name"] in _LEGACY:  # older files: 1x1-conv shaped linear weights under the old names
            key = f"{m['side']}.mid_block.attentions.0.{_LEGACY[m['name']]}.{m['param']}"
            value = value.flatten(1) if value.dim() == 4 else value
            m = _ATTN.fullmatch(key)
        if m and m["name"] in _QKV:
            parts = qkv.setdefault((m["side"], m["param"]), {})
            if m["name"] in parts:
                unmatched.append(key + " (given twice, under the old and the new name)")
            parts[m["name"]] = value
            continue
        new = _rename(key, _FORWARD)
        if new is None:
            unmatched.append(key)
        elif new in out:
            unmatched.append(key + " (given twice, under the old and the new name)")
        else:
            out[new] = value
    missing = []
    for (side, param), parts in qkv.items():
        missing += [f"{side}.mid_block.attentions.0.{n}.{param}" for n in _QKV if n not in parts]
        out[f"{side}.mid.attn.qkv.{param}"] = torch.cat([parts[n] for n in _QKV if n in parts], dim=0)
    _problems("diffusers VAE state dict", unmatched, missing)
    return out


def to_diffusers_vae(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our VAE state dict -> diffusers AutoencoderKL's (qkv split back into to_q, to_k, to_v)."""
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in sd.items():
        m = _FUSED.fullmatch(key)
        if m:
            if value.shape[0] % 3:
                unmatched.append(f"{key} (first dim {value.shape[0]} is not 3 x channels)")
                continue
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{m['side']}.mid_block.attentions.0.{name}.{m['param']}"] = part
            continue
        new = _rename(key, _BACKWARD)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    _problems("inkwash VAE state dict", unmatched, [])
    return out


def config_from_diffusers_vae(config: Mapping) -> VAEConfig:
    """A diffusers AutoencoderKL config dict -> VAEConfig (UserError on what we cannot express)."""
    bad = [f"{k}={config[k]!r}" for k, v in _FIXED.items() if k in config and config[k] != v]
    boc = tuple(config.get("block_out_channels", (64,)))
    downs = list(config.get("down_block_types", ["DownEncoderBlock2D"] * len(boc)))
    ups = list(config.get("up_block_types", ["UpDecoderBlock2D"] * len(boc)))
    if downs != ["DownEncoderBlock2D"] * len(boc):
        bad.append(f"down_block_types={downs}")
    if ups != ["UpDecoderBlock2D"] * len(boc):
        bad.append(f"up_block_types={ups}")
    quant, post_quant = config.get("use_quant_conv", True), config.get("use_post_quant_conv", True)
    if quant != post_quant:
        bad.append(f"use_quant_conv={quant!r} with use_post_quant_conv={post_quant!r} (must agree)")
    if bad:
        raise UserError("diffusers VAE settings not supported: " + ", ".join(bad))
    shift = config.get("shift_factor")
    return VAEConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        channels=boc,
        layers_per_block=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", 4),
        norm_groups=config.get("norm_num_groups", 32),
        mid_attention=config.get("mid_block_add_attention", True),
        use_quant_conv=quant,
        scaling_factor=config.get("scaling_factor", 0.18215),
        shift_factor=0.0 if shift is None else shift,
    )


def config_to_diffusers_vae(cfg: VAEConfig) -> dict:
    """VAEConfig -> the AutoencoderKL keyword arguments that build the same network."""
    if cfg.norm_eps != 1e-6:
        raise UserError(f"diffusers' AutoencoderKL has norm_eps 1e-6 built in; this config has {cfg.norm_eps}")
    n = len(cfg.channels)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        mid_block_add_attention=cfg.mid_attention,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_quant_conv,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor or None,
    )


def vae_from_diffusers(config: Mapping, sd: Mapping[str, torch.Tensor]) -> VAE:
    """Build an inkwash VAE from a diffusers config and state dict; every key on both sides must match.

    Unfused tensors are assigned, not copied: the model shares their storage with `sd`.
    """
    cfg = config_from_diffusers_vae(config)
    with torch.device("meta"):
        model = VAE(cfg)
    converted = from_diffusers_vae(sd)
    return load_exact(model, converted, "diffusers VAE weights", assign=True)
