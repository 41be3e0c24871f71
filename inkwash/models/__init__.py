"""inkwash.models: networks (U-Net, DiT, PixArt-α, ...), shared layers, presets, FLOP counts. Knows nothing of noise."""

from inkwash.models.dit import DiT, DiTConfig
from inkwash.models.flops import count_flops
from inkwash.models.pixart import PixArt, PixArtConfig
from inkwash.models.registry import (
    PRESETS,
    build_model,
    config_from_dict,
    config_to_dict,
    get_preset,
    register,
    register_arch,
)
from inkwash.models.unet import UNet, UNetConfig

__all__ = [
    "PRESETS",
    "DiT",
    "DiTConfig",
    "PixArt",
    "PixArtConfig",
    "UNet",
    "UNetConfig",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "count_flops",
    "get_preset",
    "register",
    "register_arch",
]
