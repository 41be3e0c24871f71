"""Named model presets, and building / (de)serialising model configs by architecture.

Owns the preset table and the arch name <-> config type mapping. Other architectures join with
`register_arch`; presets with `register`. Knows nothing of noise, text encoders or file formats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from inkwash.config import dataclass_from_dict
from inkwash.errors import UserError
from inkwash.models.unet import UNet, UNetConfig
from inkwash.models.vae import VAE, VAEConfig

ModelConfig = Any  # one typed dataclass per architecture (UNetConfig, ...); see ARCHS

# arch name -> (config type, builder)
ARCHS: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {"unet": (UNetConfig, UNet), "vae": (VAEConfig, VAE)}


def register_arch(name: str, config_type: type, builder: Callable[[Any], nn.Module]) -> None:
    """Make a new architecture known to build_model / config_to_dict / config_from_dict."""
    ARCHS[name] = (config_type, builder)


def _arch_of(cfg: ModelConfig) -> str:
    for name, (config_type, _) in ARCHS.items():
        if type(cfg) is config_type:
            return name
    raise UserError(f"unknown model config type {type(cfg).__name__}; known: {sorted(ARCHS)}")


PRESETS: dict[str, ModelConfig] = {}


def register(name: str, cfg: ModelConfig) -> None:
    """Add a named preset (its config type must belong to a registered architecture)."""
    _arch_of(cfg)
    PRESETS[name] = cfg


def get_preset(name: str) -> ModelConfig:
    """The config registered under `name`; UserError listing the valid names otherwise."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the network a config describes (use `with torch.device('meta'):` to skip allocation)."""
    return ARCHS[_arch_of(cfg)][1](cfg)


def config_to_dict(cfg: ModelConfig) -> dict:
    """A JSON-ready dict of the config plus its `"arch"` name."""
    return {"arch": _arch_of(cfg), **dataclasses.asdict(cfg)}


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of config_to_dict; unknown arch or fields raise UserError."""
    d = dict(d)
    arch = d.pop("arch", None)
    if arch not in ARCHS:
        raise UserError(f"unknown model arch {arch!r}; known: {sorted(ARCHS)}")
    return dataclass_from_dict(ARCHS[arch][0], d, f"{arch} config")


# Pixel-space presets take 3 channels; context_dim 384 matches the default MiniLM text encoder.
register(
    "unet-tiny",  # tests: ~1M params
    UNetConfig(
        in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_levels=(1,), num_heads=4, context_dim=32, norm_groups=8,
    ),
)  # fmt: skip
register(
    "unet-xs",  # the bundled Shapes model: 32 px, ~4.7M params, about 38 training images/s on a 2-core CPU
    UNetConfig(
        in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
        attention_levels=(1, 2), num_heads=4, context_dim=384, y_dim=384, norm_groups=16,
    ),
)  # fmt: skip
register(
    "unet-s",  # small text-conditioned pixel model for 32-64 px
    UNetConfig(
        in_channels=3, out_channels=3, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
        attention_levels=(1,), num_heads=4, context_dim=384,
    ),
)  # fmt: skip
register(
    "unet-b",  # base text-conditioned pixel model for 64-128 px
    UNetConfig(
        in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
        attention_levels=(1, 2, 3), num_heads=8, context_dim=384,
    ),
)  # fmt: skip
# Stable Diffusion 1.5's U-Net exactly (latent space, CLIP ViT-L/14 context): 859,520,964 parameters.
register("sd15", UNetConfig())

# Autoencoders (Stable Diffusion's KL layout). Published latent scale and shift, from the models' own configs.
register("vae-sd", VAEConfig(scaling_factor=0.18215))  # SD 1.x / 2.x: f = 8, 4 channels, 83,653,863 parameters
register("vae-sdxl", VAEConfig(scaling_factor=0.13025))
register("vae-sd3", VAEConfig(latent_channels=16, use_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609))
register("vae-flux", VAEConfig(latent_channels=16, use_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159))
register(  # Shapes at 64 px: f = 4, 4 channels; its scale and shift are computed from data when trained
    "vae-shapes-f4",
    VAEConfig(channels=(32, 64, 128), layers_per_block=1, latent_channels=4, norm_groups=8),
)
