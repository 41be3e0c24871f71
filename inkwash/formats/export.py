"""inkwash model files -> diffusers folders, so a diffusers user can load what inkwash trained.

Owns the diffusers folder layout: one subfolder per component (`unet/` or `transformer/`, `vae/`, `scheduler/`)
with its `config.json` (`_class_name`, `_diffusers_version`) and `diffusion_pytorch_model.safetensors`, and a
`model_index.json` naming the matching diffusers pipeline. Weights and configs go through the converters in
`formats.diffusers_*`; what diffusers cannot express raises their `UserError`. inkwash's text encoders (MiniLM,
the small trainable one) have no diffusers counterpart: model_index.json lists `text_encoder` / `tokenizer` as
null, to be passed to the pipeline by the user. The scheduler is written for the processes diffusers' schedulers
implement (VP with linear or scaled-linear betas, rectified flow).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_model_file, strip_prefix
from inkwash.models.registry import config_from_dict

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release the exported folders are tested against
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_PIPELINES = {"DiTTransformer2DModel": "DiTPipeline", "PixArtTransformer2DModel": "PixArtAlphaPipeline",
              "FluxTransformer2DModel": "FluxPipeline",
              "SD3Transformer2DModel": "StableDiffusion3Pipeline"}  # fmt: skip


def network_to_diffusers(cfg, sd: dict[str, torch.Tensor], latent_side: int) -> tuple[str, str, dict, dict]:
    """(component folder, diffusers class, config kwargs, state dict) for an inkwash network config + weights."""
    from inkwash.formats import diffusers_dit, diffusers_flux, diffusers_unet, diffusers_vae
    from inkwash.models.dit import DiTConfig
    from inkwash.models.mmdit import MMDiTConfig
    from inkwash.models.pixart import PixArtConfig
    from inkwash.models.unet import UNetConfig
    from inkwash.models.vae import VAEConfig

    if isinstance(cfg, UNetConfig):
        config = {**diffusers_unet.unet_config_to_diffusers(cfg), "sample_size": latent_side}
        return "unet", "UNet2DConditionModel", config, diffusers_unet.unet_state_dict_to_diffusers(sd, cfg)
    if isinstance(cfg, PixArtConfig):
        config, weights = diffusers_dit.pixart_config_to_diffusers(cfg), diffusers_dit.pixart_state_dict_to_diffusers
        return "transformer", "PixArtTransformer2DModel", config, weights(sd, cfg)
    if isinstance(cfg, DiTConfig):
        config, weights = diffusers_dit.dit_config_to_diffusers(cfg), diffusers_dit.dit_state_dict_to_diffusers
        return "transformer", "DiTTransformer2DModel", config, weights(sd, cfg)
    if isinstance(cfg, MMDiTConfig) and cfg.axes_dim:
        config = diffusers_flux.flux_config_to_diffusers(cfg)
        return "transformer", "FluxTransformer2DModel", config, diffusers_flux.flux_state_dict_to_diffusers(sd, cfg)
    if isinstance(cfg, MMDiTConfig):
        config = diffusers_flux.sd3_config_to_diffusers(cfg, sample_size=latent_side)
        return "transformer", "SD3Transformer2DModel", config, diffusers_flux.sd3_state_dict_to_diffusers(sd, cfg)
    if isinstance(cfg, VAEConfig):
        return "vae", "AutoencoderKL", diffusers_vae.config_to_diffusers_vae(cfg), diffusers_vae.to_diffusers_vae(sd)
    raise UserError(f"no diffusers export for a {type(cfg).__name__}")


def scheduler_config(process: dict, prediction: str) -> dict | None:
    """A diffusers scheduler config for an inkwash process and prediction, or None where diffusers has none."""
    kind = process.get("kind")
    if kind == "vp" and process.get("schedule") in ("linear", "scaled_linear") and prediction in _PREDICTION:
        return {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": process.get("n", 1000),
                "beta_start": process["beta_start"], "beta_end": process["beta_end"],
                "beta_schedule": process["schedule"], "prediction_type": _PREDICTION[prediction],
                "timestep_spacing": "leading", "steps_offset": 1}  # fmt: skip
    if kind == "flow" and prediction == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                "shift": process.get("shift", 1.0), "use_dynamic_shifting": process.get("dynamic_shift", False),
                "base_shift": process.get("base_shift", 0.5), "max_shift": process.get("max_shift", 1.15),
                "base_image_seq_len": process.get("base_seq_len", 256),
                "max_image_seq_len": process.get("max_seq_len", 4096)}  # fmt: skip
    return None


def _pipeline_class(network_class: str, cfg, latent: bool) -> str:
    if not latent:
        return "DiffusionPipeline"  # pixel-space text-to-image: no diffusers pipeline; load the parts one by one
    if network_class == "UNet2DConditionModel":
        return "StableDiffusionXLPipeline" if cfg.micro_conditions else "StableDiffusionPipeline"
    return _PIPELINES[network_class]


def _write_component(folder: Path, name: str, cls: str, config: dict, sd: dict | None) -> None:
    sub = folder / name
    sub.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **config}
    (sub / "config.json" if sd is not None else sub / "scheduler_config.json").write_text(
        json.dumps(config, indent=2, default=list) + "\n"
    )
    if sd is not None:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(sub / WEIGHTS_NAME), metadata={"format": "pt"})


def export_diffusers(model_path: str | os.PathLike, folder: str | os.PathLike) -> dict:
    """Write an inkwash model file as a diffusers folder and return the model_index it wrote. A diffusion model
    becomes a pipeline folder (network, autoencoder if latent, scheduler, model_index.json); an autoencoder file
    becomes an AutoencoderKL folder (config.json and weights at the top)."""
    meta, tensors = load_model_file(model_path)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"export folder {folder} exists and is not an empty folder")
    vae_cfg = config_from_dict(meta["vae"]) if "vae" in meta else None
    vae = network_to_diffusers(vae_cfg, strip_prefix(tensors, "vae"), 0) if vae_cfg is not None else None
    if "model" not in meta:  # an autoencoder file
        _write_component(folder, ".", vae[1], vae[2], vae[3])
        return {"_class_name": vae[1]}
    cfg = config_from_dict(meta["model"])
    side = int(meta.get("image_size", 64)) // (vae_cfg.downsample if vae_cfg is not None else 1)
    name, cls, config, sd = network_to_diffusers(cfg, strip_prefix(tensors, "model"), side)
    parts = [(name, cls, config, sd)] + ([vae] if vae is not None else [])
    sched = scheduler_config(meta.get("process", {}), meta.get("prediction", ""))
    if sched is not None:
        parts.append(("scheduler", sched.pop("_class_name"), sched, None))
    index: dict = {"_class_name": _pipeline_class(cls, cfg, vae is not None), "_diffusers_version": DIFFUSERS_VERSION}
    if getattr(cfg, "context_dim", 0):  # inkwash's text encoders have no diffusers class: the user passes one
        index |= {"text_encoder": [None, None], "tokenizer": [None, None]}
    for name, cls, config, sd in parts:
        _write_component(folder, name, cls, config, sd)
        index[name] = ["diffusers", cls]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
