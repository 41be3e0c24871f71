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
from inkwash.models.dit import DiT, DiTConfig
from inkwash.models.mmdit import PRESETS as MMDIT_PRESETS
from inkwash.models.mmdit import MMDiT, MMDiTConfig
from inkwash.models.pixart import PixArt, PixArtConfig
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
# Stable Diffusion 2.1 (768-v and base): OpenCLIP ViT-H context, 64-wide heads (diffusers' attention_head_dim
# [5, 10, 20, 20]); 865,910,724 parameters.
register("sd21", UNetConfig(num_heads=5, head_dim=64, context_dim=1024))  # num_heads: diffusers' first entry
# SDXL base 1.0 (Stability-AI/generative-models configs/inference/sd_xl_base.yaml): three levels, attention on the
# lower two with 2 and 10 transformer blocks, CLIP-L + bigG context 2048, pooled bigG (1280) + 6 micro-conditions
# (adm_in_channels 2816); 2,567,463,684 parameters.
register(
    "sdxl-base",
    UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), num_heads=5, head_dim=64, transformer_depth=(1, 2, 10),
               context_dim=2048, y_dim=1280, micro_conditions=6),
)  # fmt: skip
# SDXL refiner 1.0 (sd_xl_refiner.yaml): 384 channels, 4 blocks per transformer, bigG context 1280, pooled bigG +
# 5 micro-conditions (original size, crop, aesthetic score; adm_in_channels 2560); 2,259,526,660 parameters.
register(
    "sdxl-refiner",
    UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(1, 2), num_heads=6, head_dim=64,
               transformer_depth=4, context_dim=1280, y_dim=1280, micro_conditions=5),
)  # fmt: skip

# Autoencoders (Stable Diffusion's KL layout). Published latent scale and shift, from the models' own configs.
register("vae-sd", VAEConfig(scaling_factor=0.18215))  # SD 1.x / 2.x: f = 8, 4 channels, 83,653,863 parameters
register("vae-sdxl", VAEConfig(scaling_factor=0.13025))
register("vae-sd3", VAEConfig(latent_channels=16, use_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609))
register("vae-flux", VAEConfig(latent_channels=16, use_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159))
register(  # Shapes at 64 px: f = 4, 4 channels; its scale and shift are computed from data when trained
    "vae-shapes-f4",
    VAEConfig(channels=(32, 64, 128), layers_per_block=1, latent_channels=4, norm_groups=8),
)

# Transformers. The paper presets are DiT's ImageNet 256 models (latent 32x32x4, 1000 classes, learned sigma);
# DiT-XL/2: 674,834,720 parameters (the paper's 675M also counts the fixed 256 x 1152 position table the original
# stores as a parameter) and 118,621,421,568 multiply-adds per 256 px forward pass (the paper: 118.6 Gflops).
register_arch("dit", DiTConfig, DiT)
register_arch("pixart", PixArtConfig, PixArt)
for _name, (_hidden, _depth, _heads) in {
    "dit-s2": (384, 12, 6), "dit-b2": (768, 12, 12), "dit-l2": (1024, 24, 16), "dit-xl2": (1152, 28, 16)
}.items():  # fmt: skip
    register(_name, DiTConfig(hidden_size=_hidden, depth=_depth, num_heads=_heads, num_classes=1000, learn_sigma=True))
register(
    "dit-tiny", DiTConfig(in_channels=3, out_channels=3, hidden_size=32, depth=2, num_heads=2, y_dim=32, sample_size=16)
)
register(  # Shapes latents (vae-shapes-f4 at 64 px: 16x16x4), pooled MiniLM text: 9.9M parameters
    "dit-shapes", DiTConfig(hidden_size=256, depth=8, num_heads=4, y_dim=384, sample_size=16)
)
# PixArt-α 1024 px (PixArt-XL-2-1024-MS): T5-XXL tokens, learned sigma, resolution and aspect-ratio conditions.
register(
    "pixart-alpha-xl2",
    PixArtConfig(learn_sigma=True, sample_size=128, interpolation_scale=2.0, size_conditioning=True),
)
register(
    "pixart-tiny",
    PixArtConfig(in_channels=3, out_channels=3, hidden_size=32, depth=2, num_heads=2, context_dim=32, sample_size=16),
)
register(  # Shapes latents with MiniLM tokens: 9.1M parameters
    "pixart-shapes", PixArtConfig(hidden_size=256, depth=8, num_heads=4, context_dim=384, sample_size=16)
)

# FLUX-style MMDiT (double- and single-stream blocks) and SD3's variant; the presets live beside the network.
register_arch("mmdit", MMDiTConfig, MMDiT)
for _name, _cfg in MMDIT_PRESETS.items():
    register(_name, _cfg)
