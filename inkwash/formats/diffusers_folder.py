"""A diffusers pipeline folder (model_index.json; unet/, vae/, text_encoder*/, tokenizer*/, scheduler/) -> parts.

`PIPELINES` maps model_index.json's `_class_name` to a loader; Stable Diffusion 1.x/2.x (StableDiffusionPipeline),
SDXL base (StableDiffusionXLPipeline) and refiner (StableDiffusionXLImg2ImgPipeline) are here, others join with
`register_pipeline`. Weights are read from safetensors only (a folder that has only pickled .bin weights is refused),
networks are built on the meta device and assign-loaded. Every weight of a loaded component must fit (the
converters list unmatched and missing keys); components inkwash does not run (a safety checker, an image feature
extractor) are named on stderr, not silently dropped.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from inkwash.diffusion import VP
from inkwash.errors import UserError
from inkwash.formats.diffusers_unet import unet_from_diffusers
from inkwash.formats.diffusers_vae import vae_from_diffusers
from inkwash.formats.single_file import Loaded, Options, assign, read_json, read_tensors
from inkwash.text.base import TextEncoder

PIPELINES: dict[str, Callable[[Path, dict, Options], Loaded]] = {}
SD_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
USED = SD_PARTS + ("transformer", "text_encoder_3", "tokenizer_3")  # FLUX and SD3 (formats.mmdit_files)


def register_pipeline(class_name: str, loader: Callable[[Path, dict, Options], Loaded]) -> None:
    PIPELINES[class_name] = loader


def load_folder(folder: Path, options: Options) -> Loaded:
    """Load a diffusers pipeline folder by its model_index.json class."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{folder} is a folder without model_index.json: not a diffusers model folder")
    index = dict(read_json(index_path))
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise UserError(f"{folder} is a diffusers {name} folder; inkwash loads {', '.join(sorted(PIPELINES))}")
    unused = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] and k not in USED]
    if unused:
        print(f"inkwash: {folder.name}: not used: {', '.join(unused)}", file=sys.stderr)
    return PIPELINES[name](folder, index, options)


def weights(part: Path) -> dict[str, torch.Tensor]:
    """A component's safetensors weights: one file, an fp16 variant, or shards listed in an index."""
    for stem in ("diffusion_pytorch_model", "model"):
        for variant in ("", ".fp16"):
            one = part / f"{stem}{variant}.safetensors"
            if one.is_file():
                return read_tensors(one)
            index = part / f"{stem}.safetensors.index{variant}.json"
            if index.is_file():
                files = sorted(set(read_json(index)["weight_map"].values()))
                out: dict[str, torch.Tensor] = {}
                for f in files:
                    out.update(read_tensors(part / f))
                return out
    if any(part.glob("*.bin")):
        raise UserError(f"{part} has only pickled .bin weights; inkwash never unpickles files: use a safetensors copy")
    raise UserError(f"{part} has no safetensors weights")


def _component(folder: Path, index: dict, name: str) -> Path | None:
    entry = index.get(name)
    if not entry or not isinstance(entry, list) or entry[0] is None:
        return None
    part = folder / name
    if not (part / "config.json").is_file() and name not in ("tokenizer", "tokenizer_2", "scheduler"):
        raise UserError(f"{folder} lists {name} in model_index.json but {part}/config.json is missing")
    return part


def text_encoder(part: Path, tok: Path, reading, dtype=None) -> TextEncoder:
    """transformers' CLIPTextModel(WithProjection) from a text_encoder folder, with its tokenizer folder."""
    from transformers import CLIPTextConfig

    from inkwash.text.clip import CLIPTextEncoder, build_text_model, fill_buffers, hf_text_keys, load_tokenizer

    config = CLIPTextConfig.from_json_file(str(part / "config.json"))
    arch = (config.architectures or ["CLIPTextModel"])[0]
    if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise UserError(f"{part}: text encoder {arch} is not a CLIP text model")
    projection = arch == "CLIPTextModelWithProjection"
    if reading.projection and not projection:
        raise UserError(f"{part}: this pipeline needs a CLIPTextModelWithProjection (a projected pooled vector)")
    sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
          for k, v in weights(part).items()}  # fmt: skip
    sd.pop("text_model.embeddings.position_ids", None)  # a constant buffer some transformers versions saved
    model = build_text_model(config, projection=projection)
    assign(model, hf_text_keys(model, sd), f"the text encoder weights in {part}", dtype)
    tokenizer = load_tokenizer(tok)
    pad = _pad_token(tok)
    vocab = tokenizer.get_vocab()
    if pad is not None and pad not in vocab:
        raise UserError(f"{tok}: its pad token {pad!r} is not in vocab.json")
    reading = dataclasses.replace(reading, pad_id=vocab[pad] if pad is not None else None)
    return CLIPTextEncoder(fill_buffers(model), tokenizer, reading)


def _pad_token(tok: Path) -> str | None:
    """The tokenizer's pad token as its tokenizer_config.json / special_tokens_map.json name it."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = tok / name
        if f.is_file():
            pad = read_json(f).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad is not None:
                return pad
    return None


SAMPLERS = {"DDIMScheduler": "ddim", "PNDMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
            "EulerAncestralDiscreteScheduler": "euler_ancestral", "DPMSolverMultistepScheduler": "dpmpp_2m",
            "HeunDiscreteScheduler": "heun", "DDPMScheduler": "ddpm", "LCMScheduler": "lcm"}  # fmt: skip
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def scheduler(folder: Path, index: dict) -> tuple[VP, str, dict]:
    """(process, prediction, sampling defaults) from scheduler/scheduler_config.json (PNDM, which inkwash does not
    have, becomes DDIM with the same spacing)."""
    part = _component(folder, index, "scheduler")
    cfg = dict(read_json(part / "scheduler_config.json")) if part and (part / "scheduler_config.json").is_file() else {}
    schedule = cfg.get("beta_schedule", "scaled_linear")
    if schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise UserError(f"{folder}: beta_schedule {schedule!r} is not one inkwash has")
    process = VP(
        schedule="cosine" if schedule == "squaredcos_cap_v2" else schedule, n=cfg.get("num_train_timesteps", 1000),
        beta_start=cfg.get("beta_start", 0.00085), beta_end=cfg.get("beta_end", 0.012),
    )  # fmt: skip
    prediction = PREDICTIONS.get(cfg.get("prediction_type", "epsilon"))
    if prediction is None:
        raise UserError(f"{folder}: prediction_type {cfg.get('prediction_type')!r} is not one inkwash has")
    spacing = cfg.get("timestep_spacing", "leading")
    sampling = {"sampler": SAMPLERS.get(cfg.get("_class_name"), "ddim"), "steps": 50,
                "schedule": spacing if spacing in ("leading", "trailing", "linspace") else "leading"}  # fmt: skip
    return process, prediction, sampling


def _unet_vae(folder: Path, index: dict, options: Options, micro: int = 6):
    unet_part, vae_part = _component(folder, index, "unet"), _component(folder, index, "vae")
    if unet_part is None or vae_part is None:
        raise UserError(f"{folder} lacks its unet/ or vae/ folder")
    unet_cfg = dict(read_json(unet_part / "config.json"))
    net = unet_from_diffusers(unet_cfg, weights(unet_part), micro_conditions=micro).eval().requires_grad_(False)
    vae = vae_from_diffusers(dict(read_json(vae_part / "config.json")), weights(vae_part)).eval().requires_grad_(False)
    if options.dtype is not None:
        net, vae = net.to(options.dtype), vae.to(options.dtype)
    size = int(unet_cfg.get("sample_size", 64)) * vae.cfg.downsample
    return net, vae, size


def _tokenizer(folder: Path, index: dict, name: str, options: Options) -> Path:
    part = _component(folder, index, name)
    return part if part is not None else Path(options.tokenizer or folder / name)


def load_sd(folder: Path, index: dict, options: Options) -> Loaded:
    """StableDiffusionPipeline: SD 1.x (CLIP ViT-L, last layer) or 2.x (OpenCLIP ViT-H as diffusers keeps it: 23
    layers, so its last hidden state is SD 2's penultimate; pads with 0)."""
    from inkwash.text.clip import Reading

    net, vae, size = _unet_vae(folder, index, options)
    te = _component(folder, index, "text_encoder")
    if te is None:
        raise UserError(f"{folder} has no text_encoder/")
    encoder = text_encoder(te, _tokenizer(folder, index, "tokenizer", options), Reading(), options.dtype)
    process, prediction, sampling = scheduler(folder, index)
    meta = {"format": "diffusers", "pipeline": index["_class_name"]}
    return Loaded(net, net.cfg, vae, encoder, process, options.prediction or prediction, size,
                  {**sampling, "guidance": 7.5}, "diffusers-sd", meta=meta)  # fmt: skip


def load_sdxl(folder: Path, index: dict, options: Options) -> Loaded:
    """StableDiffusionXLPipeline (base: CLIP ViT-L + bigG) or StableDiffusionXLImg2ImgPipeline (refiner: bigG only,
    aesthetic score): penultimate hidden states without the final LayerNorm, bigG's projected pooled vector."""
    from inkwash.text.clip import Reading
    from inkwash.text.dual import DualTextEncoder

    reading = Reading(layer="penultimate", final_norm=False)
    parts = []
    for te, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        part = _component(folder, index, te)
        if part is not None:
            pooled = te == "text_encoder_2"
            r = Reading(layer="penultimate", final_norm=False, projection=pooled) if pooled else reading
            parts.append(text_encoder(part, _tokenizer(folder, index, tok, options), r, options.dtype))
    if not parts or not parts[-1].reading.projection:
        raise UserError(f"{folder} has no text_encoder_2/ (SDXL's OpenCLIP bigG)")
    encoder = parts[0] if len(parts) == 1 else DualTextEncoder(parts, combine="features", pooled="last")
    micro = 5 if index.get("requires_aesthetics_score", False) else 6
    net, vae, size = _unet_vae(folder, index, options, micro)
    process, prediction, sampling = scheduler(folder, index)
    zeros = bool(index.get("force_zeros_for_empty_prompt", True))
    return Loaded(net, net.cfg, vae, encoder, process, options.prediction or prediction, size,
                  {**sampling, "guidance": 5.0}, "diffusers-sdxl", zeros,
                  {"format": "diffusers", "pipeline": index["_class_name"]})  # fmt: skip


register_pipeline("StableDiffusionPipeline", load_sd)
register_pipeline("StableDiffusionXLPipeline", load_sdxl)
register_pipeline("StableDiffusionXLImg2ImgPipeline", load_sdxl)
