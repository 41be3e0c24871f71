"""What is this file or folder, and how is it loaded: the one entry point for checkpoints made by others.

`FORMATS` is an ordered list of `Format(name, detect, load)`: `detect(shapes)` looks at a safetensors file's key
names and shapes only (no tensor is read), and the first that says yes loads it. Others append entries with
`register_format` (SD3, FLUX). A diffusers folder (model_index.json) goes to `formats.diffusers_folder`. An
inkwash model file is not handled here (see `is_inkwash_file`); anything unrecognised gets one UserError.

Loading builds every network on the meta device and assigns the file's tensors (`load_state_dict(assign=True)`),
so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inkwash.diffusion import VP, Process
from inkwash.errors import UserError
from inkwash.formats import ldm
from inkwash.formats.checkpoint import META_KEY, load_exact
from inkwash.models.unet import UNet
from inkwash.models.vae import VAE
from inkwash.text.base import TextEncoder

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


@dataclass
class Options:
    """What a file cannot say about itself: where the CLIP tokenizer is, and (SD 2.x) the prediction kind."""

    tokenizer: str | os.PathLike | None = None  # folder with vocab.json + merges.txt
    prediction: str | None = None  # "eps" or "v": overrides the family's default (SD 2.x 512-base is eps)
    dtype: torch.dtype | None = None  # store the weights in this dtype (None: as the file has them)
    text_encoders: str | os.PathLike | None = None  # FLUX / SD3: a folder in the diffusers repo layout (mmdit_files)


@dataclass
class Loaded:
    """A checkpoint turned into inkwash parts: what `Pipeline` is built from."""

    net: torch.nn.Module
    model_cfg: Any
    vae: VAE | None
    encoder: TextEncoder
    process: Process
    prediction: str
    image_size: int
    sampling: dict
    family: str  # the Format's name
    zero_empty_negative: bool = False  # SDXL base: an empty negative prompt is zeros, not the encoded ""
    meta: dict = field(default_factory=dict)


@dataclass
class Format:
    name: str
    detect: Callable[[ldm.Shapes], bool]
    load: Callable[[Path, ldm.Shapes, Options], Loaded]
    label: str = ""  # in words, for errors and docs


FORMATS: list[Format] = []


def register_format(fmt: Format, before: str | None = None) -> None:
    """Add a format to the detection list (at the end, or before the entry named `before`)."""
    names = [f.name for f in FORMATS]
    if fmt.name in names:
        raise ValueError(f"format {fmt.name!r} is already registered")
    FORMATS.insert(names.index(before) if before else len(FORMATS), fmt)


# --------------------------------------------------------------------------------------------------- reading


def is_inkwash_file(path: Path) -> bool:
    """A safetensors file carrying inkwash's metadata (our own model files)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return META_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - anything unreadable is decided (and reported) by `read_shapes`
        return False


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, without reading a tensor; UserError for pickles and unreadable files."""
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path} is a pickle checkpoint ({path.suffix}); inkwash never unpickles files (they can run "
                        "code): use the model's .safetensors release")  # fmt: skip
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt or not a safetensors file ({e})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt: its tensors cannot be read ({e})") from None


def detect(path: str | os.PathLike) -> str:
    """The name of the format a file or folder is in ("inkwash", "diffusers", or a FORMATS entry)."""
    path = Path(path)
    if path.is_dir():
        return "diffusers"
    if is_inkwash_file(path):
        return "inkwash"
    return _format_of(path, read_shapes(path)).name


def _format_of(path: Path, shapes: ldm.Shapes) -> Format:
    for fmt in FORMATS:
        if fmt.detect(shapes):
            return fmt
    known = ", ".join(f.label or f.name for f in FORMATS)
    sample = sorted(shapes)[:3]
    raise UserError(f"{path} is not a checkpoint inkwash recognises (keys such as {sample}); it reads inkwash model "
                    f"files, diffusers folders and single files of: {known}")  # fmt: skip


def load(path: str | os.PathLike, options: Options | None = None) -> Loaded:
    """Detect what `path` is (a single safetensors file or a diffusers folder) and load it."""
    path, options = Path(path), options or Options()
    if not path.exists():
        raise UserError(f"model file {path} does not exist")
    if path.is_dir():
        from inkwash.formats.diffusers_folder import load_folder

        return load_folder(path, options)
    shapes = read_shapes(path)
    return _format_of(path, shapes).load(path, shapes, options)


def assign(module: torch.nn.Module, sd: dict, what: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load converted weights into a meta-device module by assignment (each key must fit exactly)."""
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return load_exact(module, sd, what, assign=True).eval().requires_grad_(False)


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return build()


# --------------------------------------------------------------------------------------------------- SD families


@dataclass(frozen=True)
class Family:
    """Published facts about a Stable Diffusion family that its file's shapes do not say."""

    name: str
    label: str
    heads: dict  # UNetConfig heads: {"num_heads": 8} (SD 1.x) or {"head_dim": 64}
    vae_scale: float  # the autoencoder's latent scaling factor (its diffusers config)
    image_size: int
    prediction: str
    sampling: dict
    micro_conditions: int = 0
    texts: tuple = ()  # (prefix, kind, Reading) per text tower, in order
    zero_empty_negative: bool = False


def _texts():
    from inkwash.text.clip import Reading

    return Reading


def _sd_families() -> dict[str, Family]:
    Reading = _texts()
    # Sampling defaults: diffusers' pipelines call 50 steps; guidance 7.5 (SD 1.x/2.x), 5.0 (SDXL). Stable
    # Diffusion 1.x/2.x ship with PNDM / DDIM schedulers (inkwash has DDIM), SDXL with Euler; all "leading"
    # timestep spacing with steps_offset 1 (their scheduler_config.json files).
    sd_sampling = {"sampler": "ddim", "steps": 50, "guidance": 7.5, "schedule": "leading"}
    return {
        "sd1": Family(
            "sd1",
            "Stable Diffusion 1.x",
            {"num_heads": 8},
            0.18215,
            512,
            "eps",
            sd_sampling,
            texts=(("cond_stage_model.transformer.", "clip-l", Reading()),),
        ),
        # SD 2.x 768-v (2.0-v, 2.1) predicts v; 2.x-base (512 px) predicts eps: pass prediction="eps" for those.
        "sd2": Family(
            "sd2",
            "Stable Diffusion 2.x",
            {"head_dim": 64},
            0.18215,
            768,
            "v",
            sd_sampling,
            texts=(("cond_stage_model.model.", "open-clip-h", Reading(layer="penultimate", pad_id=0)),),
        ),
        "sdxl-base": Family(
            "sdxl-base",
            "SDXL base",
            {"head_dim": 64},
            0.13025,
            1024,
            "eps",
            {"sampler": "euler", "steps": 50, "guidance": 5.0, "schedule": "leading"},
            micro_conditions=6,
            texts=(
                ("conditioner.embedders.0.transformer.", "clip-l", Reading(layer="penultimate", final_norm=False)),
                (
                    "conditioner.embedders.1.model.",
                    "open-clip-bigg",
                    Reading(layer="penultimate", final_norm=False, projection=True, pad_id=0),
                ),
            ),
            zero_empty_negative=True,
        ),  # fmt: skip
        # The refiner conditions on original size, crop and an aesthetic score (5 scalars), with bigG alone.
        "sdxl-refiner": Family(
            "sdxl-refiner",
            "SDXL refiner",
            {"head_dim": 64},
            0.13025,
            1024,
            "eps",
            {"sampler": "euler", "steps": 50, "guidance": 5.0, "schedule": "leading"},
            micro_conditions=5,
            texts=(
                (
                    "conditioner.embedders.0.model.",
                    "open-clip-bigg",
                    Reading(layer="penultimate", final_norm=False, projection=True, pad_id=0),
                ),
            ),
        ),  # fmt: skip
    }


def _has(shapes: ldm.Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _text_encoder(family: Family, sd: dict, shapes: ldm.Shapes, path: Path, options: Options) -> TextEncoder:
    """The family's text tower(s) from the file's tensors, read by transformers, with the local tokenizer."""
    from inkwash.text.clip import (
        TOWERS,
        CLIPTextEncoder,
        build_text_model,
        fill_buffers,
        find_tokenizer,
        hf_text_keys,
        load_tokenizer,
        text_config,
    )

    tokenizer = load_tokenizer(find_tokenizer(options.tokenizer, path))
    encoders = []
    for prefix, tower, reading in family.texts:
        part = ldm.under(sd, prefix)
        part_shapes = ldm.under(shapes, prefix)
        if not part:
            raise UserError(f"{path} holds no {tower} text encoder (no keys under {prefix}); inkwash needs the text "
                            "encoder inside the file")  # fmt: skip
        for k in part:
            del sd[prefix + k]
        if tower == "clip-l":
            overrides, hf = ldm.clip_shapes(part_shapes), ldm.clip_from_ldm(part)
        else:
            overrides = ldm.open_clip_shapes(part_shapes)
            hf = ldm.open_clip_from_ldm(part, projection=reading.projection)
        overrides.update(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        model = build_text_model(text_config(TOWERS[tower], **overrides), projection=reading.projection)
        assign(model, hf_text_keys(model, hf), f"the {tower} text encoder weights in {path}", options.dtype)
        fill_buffers(model)
        encoders.append(CLIPTextEncoder(model, tokenizer, reading))
    if len(encoders) == 1:
        return encoders[0]
    from inkwash.text.dual import DualTextEncoder

    return DualTextEncoder(encoders, combine="features", pooled="last")  # SDXL: 768 + 1280 features, bigG pooled


def load_sd(family: Family, path: Path, shapes: ldm.Shapes, options: Options) -> Loaded:
    """A CompVis/Stability single file: U-Net, autoencoder and text encoder(s), every key accounted for."""
    unet_shapes = ldm.under(shapes, ldm.UNET)
    cfg = ldm.unet_config_from_ldm(unet_shapes, micro_conditions=family.micro_conditions, **family.heads)
    vae_cfg = ldm.vae_config_from_ldm(ldm.under(shapes, ldm.VAE), family.vae_scale)
    if not _has(shapes, ldm.VAE):
        raise UserError(f"{path} holds no autoencoder (no first_stage_model.* keys); inkwash needs it in the file")
    sd = read_tensors(path)
    process = VP()  # SD's scaled-linear betas 0.00085..0.012, 1000 steps (every family here)
    ldm.check_schedule(sd, process.betas)
    for k in [k for k in sd if k in ldm.SCHEDULE_BUFFERS]:
        del sd[k]
    unet_sd, vae_sd = ldm.under(sd, ldm.UNET), ldm.under(sd, ldm.VAE)
    for k in [k for k in sd if k.startswith((ldm.UNET, ldm.VAE))]:
        del sd[k]
    net = assign(on_meta(lambda: UNet(cfg)), ldm.unet_from_ldm(unet_sd, cfg), f"the U-Net weights in {path}",
                 options.dtype)  # fmt: skip
    del unet_sd
    vae = assign(on_meta(lambda: VAE(vae_cfg)), ldm.vae_from_ldm(vae_sd, vae_cfg),
                 f"the autoencoder weights in {path}", options.dtype)  # fmt: skip
    del vae_sd
    encoder = _text_encoder(family, sd, shapes, path, options)
    ldm.report(f"{path} ({family.label})", list(sd), [])  # whatever no part took
    if cfg.context_dim and cfg.context_dim != encoder.dim:
        raise UserError(f"{path}: the U-Net reads {cfg.context_dim}-wide text but the text encoder gives {encoder.dim}")
    prediction = options.prediction or family.prediction
    if prediction not in ("eps", "v"):
        raise UserError(f"prediction must be 'eps' or 'v' for Stable Diffusion, got {prediction!r}")
    return Loaded(net, cfg, vae, encoder, process, prediction, family.image_size, dict(family.sampling), family.name,
                  family.zero_empty_negative, {"format": family.name, "label": family.label})  # fmt: skip


def _register_sd() -> None:
    fams = _sd_families()

    def loader(name):
        return lambda path, shapes, options: load_sd(fams[name], path, shapes, options)

    unet = ldm.UNET + "input_blocks.0.0.weight"
    register_format(Format(
        "sd1", lambda s: unet in s and _has(s, "cond_stage_model.transformer."), loader("sd1"), fams["sd1"].label,
    ))  # fmt: skip
    register_format(Format(
        "sd2", lambda s: unet in s and _has(s, "cond_stage_model.model."), loader("sd2"), fams["sd2"].label,
    ))  # fmt: skip
    register_format(Format(
        "sdxl-base", lambda s: unet in s and _has(s, "conditioner.embedders.1.model."), loader("sdxl-base"),
        fams["sdxl-base"].label,
    ))  # fmt: skip
    register_format(Format(
        "sdxl-refiner", lambda s: unet in s and _has(s, "conditioner.embedders.0.model.")
        and not _has(s, "conditioner.embedders.1."), loader("sdxl-refiner"), fams["sdxl-refiner"].label,
    ))  # fmt: skip


def families() -> dict[str, Family]:
    return _sd_families()


def _unet_alone(path: Path, shapes: ldm.Shapes, options: Options) -> Loaded:
    raise UserError(f"{path} holds a Stable Diffusion U-Net without its text encoder and autoencoder (a U-Net-only "
                    "extract); inkwash loads whole single files (U-Net, VAE and text encoders in one file) or a "
                    "diffusers folder")  # fmt: skip


_register_sd()

# Last: an SD U-Net that no entry above took (no text encoder in the file) gets a reason, not "unrecognised".
register_format(Format(
    "sd-unet-only", lambda s: ldm.UNET + "input_blocks.0.0.weight" in s or "input_blocks.0.0.weight" in s,
    _unet_alone, "Stable Diffusion U-Net alone (refused: it needs its text encoder and VAE)",
))  # fmt: skip


def read_json(path: Path) -> Mapping:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None


from inkwash.formats import mmdit_files  # noqa: E402, F401 - appends FLUX.1 and SD3 single files to FORMATS
