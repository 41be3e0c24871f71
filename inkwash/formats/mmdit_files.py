"""FLUX.1 and SD3 single files as `formats.single_file` entries: detection, the family defaults, and the parts such
files do not carry (text encoders, and FLUX's autoencoder) from a local folder in diffusers' repository layout; and
diffusers FluxPipeline / StableDiffusion3Pipeline folders (`formats.diffusers_folder` entries; their scheduler's
time shift is used).

A FLUX.1 file (`flux1-schnell.safetensors`) holds the transformer only; an SD3 file holds the transformer and
the autoencoder (`sd3_medium.safetensors`), and may hold CLIP-L, CLIP-G and T5-XXL too (`..._incl_clips...`). The
rest comes from `Options.text_encoders`, a folder laid out as the diffusers repository of the model
(black-forest-labs/FLUX.1-schnell, stabilityai/stable-diffusion-3-medium-diffusers): `text_encoder*/` and
`tokenizer*/`, and `vae/` for FLUX (or BFL's `ae.safetensors` beside the model file). Text towers found in the file
are built from the folder's config.json and take the file's weights (every one used); the others load from the
folder. Family defaults come from the reference code and diffusers' pipelines: FLUX schnell 4 steps, no guidance,
no time shift; FLUX dev 28 steps, guidance 3.5 as an input, resolution-dependent shift; SD3 28 steps, CFG 7, shift 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from inkwash.diffusion import Flow
from inkwash.errors import UserError
from inkwash.formats import diffusers_folder as _folders
from inkwash.formats import flux_original, ldm, sd3_original
from inkwash.formats.single_file import Format, Loaded, Options, assign, read_tensors, register_format
from inkwash.models.mmdit import MMDiT
from inkwash.models.vae import VAE

TEXT_ENCODERS_ENV = "INKWASH_TEXT_ENCODERS"


@dataclass(frozen=True)
class MMDiTFamily:
    name: str
    label: str
    process: Flow
    sampling: dict
    towers: tuple  # (subfolder, tokenizer subfolder, kind, in-file prefix or "") in the diffusers repo's order
    t5_length: int
    vae_scale: tuple[float, float]  # the autoencoder's (scaling, shift) factors
    repo: str  # the diffusers repository whose layout the folder follows


_FLUX_TOWERS = (("text_encoder", "tokenizer", "clip-l", ""), ("text_encoder_2", "tokenizer_2", "t5", ""))
FAMILIES = {
    "flux-schnell": MMDiTFamily("flux-schnell", "FLUX.1 schnell", Flow(shift=1.0),
                                {"sampler": "euler", "steps": 4, "guidance": 1.0}, _FLUX_TOWERS, 256,
                                (0.3611, 0.1159), "black-forest-labs/FLUX.1-schnell"),
    "flux-dev": MMDiTFamily("flux-dev", "FLUX.1 dev", Flow(dynamic_shift=True),
                            {"sampler": "euler", "steps": 28, "guidance": 3.5}, _FLUX_TOWERS, 512,
                            (0.3611, 0.1159), "black-forest-labs/FLUX.1-dev"),
    "sd3": MMDiTFamily("sd3", "Stable Diffusion 3", Flow(shift=3.0),
                       {"sampler": "euler", "steps": 28, "guidance": 7.0, "schedule": "sd3"},
                       (("text_encoder", "tokenizer", "clip-l", "clip_l"),
                        ("text_encoder_2", "tokenizer_2", "clip-g", "clip_g"),
                        ("text_encoder_3", "tokenizer_3", "t5", "t5xxl")), 256,
                       (1.5305, 0.0609), "stabilityai/stable-diffusion-3-medium-diffusers"),
}  # fmt: skip


def parts_folder(options: Options, path: Path, family: MMDiTFamily) -> Path:
    """The folder the text encoders (and FLUX's autoencoder) come from; UserError saying what is needed."""
    import os

    explicit = getattr(options, "text_encoders", None) or os.environ.get(TEXT_ENCODERS_ENV)
    folder = Path(explicit) if explicit else path.parent
    needed = [f"{sub}/ and {tok}/ ({kind})" for sub, tok, kind, prefix in family.towers]
    absent = [sub for sub, tok, _, _ in family.towers if not (folder / sub / "config.json").is_file()
              or not (folder / tok).is_dir()]  # fmt: skip
    if absent:
        raise UserError(
            f"{family.label} needs its text encoders from a local folder laid out like {family.repo}: "
            f"{', '.join(needed)}; {folder} lacks {', '.join(absent)}: pass --text-encoders FOLDER "
            f"(or set {TEXT_ENCODERS_ENV})"
        )
    return folder


def _clip(folder: Path, sub: str, tok: str, kind: str, weights: dict | None, dtype, sd3: bool) -> torch.nn.Module:
    """A CLIP text tower read as FLUX reads CLIP-L (last layer, pooled output) or as SD3 reads CLIP-L and CLIP-G
    (penultimate layer without the final norm, projected pooled vector; CLIP-G pads with token 0)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from inkwash.text.clip import CLIPTextEncoder, Reading, fill_buffers, hf_text_keys, load_tokenizer

    tokenizer = load_tokenizer(folder / tok)
    config = CLIPTextConfig.from_pretrained(folder / sub, local_files_only=True)
    config.eos_token_id = tokenizer.eos_token_id  # old configs say 2 (meaning: argmax); the same token either way
    reading = Reading()
    if sd3:
        pad = 0 if kind == "clip-g" else None
        reading = Reading(layer="penultimate", final_norm=False, projection=True, pad_id=pad)
    cls = CLIPTextModelWithProjection if sd3 else CLIPTextModel
    if weights is None:
        dtype = dtype or torch.float32
        model = cls.from_pretrained(folder / sub, config=config, local_files_only=True, torch_dtype=dtype)
    else:
        with torch.device("meta"):
            model = cls(config)
        weights = hf_text_keys(model, {k: v for k, v in weights.items() if not k.endswith("position_ids")})
        fill_buffers(assign(model, weights, f"the {kind} text encoder weights in the file", dtype))
    return CLIPTextEncoder(model, tokenizer, reading)


def _t5(folder: Path, sub: str, tok: str, weights: dict | None, length: int, dtype):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from inkwash.text.t5 import T5TextEncoder

    tokenizer = AutoTokenizer.from_pretrained(folder / tok, local_files_only=True)
    if weights is None:
        model = T5EncoderModel.from_pretrained(folder / sub, local_files_only=True, torch_dtype=dtype or torch.float32)
    else:
        with torch.device("meta"):
            model = T5EncoderModel(T5Config.from_pretrained(folder / sub, local_files_only=True))
        own = model.state_dict().keys()
        tied = {k: weights["shared.weight"] for k in own if k.endswith("embed_tokens.weight") and k not in weights}
        assign(model, {**weights, **tied}, "the T5 text encoder weights in the file", dtype)
    return T5TextEncoder(model, tokenizer, length)


def text_encoder(family: MMDiTFamily, folder: Path, in_file: dict, dtype=None):
    """FLUX's or SD3's text conditioning from the folder (and the file's text weights, popped from `in_file`)."""
    from inkwash.text.t5 import FluxTextEncoder, SD3TextEncoder

    towers = []
    for sub, tok, kind, prefix in family.towers:
        weights = in_file.pop(prefix, None) if prefix else None
        if kind == "t5":
            towers.append(_t5(folder, sub, tok, weights, family.t5_length, dtype))
        else:
            towers.append(_clip(folder, sub, tok, kind, weights, dtype, sd3=family.name == "sd3"))
    return FluxTextEncoder(*towers) if family.name.startswith("flux") else SD3TextEncoder(*towers)


def _vae_from_folder(folder: Path, near: Path, family: MMDiTFamily, dtype) -> VAE:
    from inkwash.formats.diffusers_vae import vae_from_diffusers
    from inkwash.formats.single_file import read_json

    if (folder / "vae" / "config.json").is_file():
        config = read_json(folder / "vae" / "config.json")
        weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise UserError(f"{weights} does not exist (inkwash reads safetensors only)")
        vae = vae_from_diffusers(config, read_tensors(weights))
        return vae.to(dtype).eval().requires_grad_(False) if dtype else vae.eval().requires_grad_(False)
    ae = near.parent / "ae.safetensors"  # BFL's autoencoder file, LDM key names
    if ae.is_file():
        return _vae_from_ldm(read_tensors(ae), family, dtype, str(ae))
    raise UserError(f"{family.label} needs its autoencoder: a vae/ folder in {folder} (diffusers' AutoencoderKL) or "
                    f"BFL's ae.safetensors beside {near}")  # fmt: skip


def _vae_from_ldm(sd: dict, family: MMDiTFamily, dtype, where: str) -> VAE:
    cfg = ldm.vae_config_from_ldm({k: tuple(v.shape) for k, v in sd.items()}, *family.vae_scale)
    with torch.device("meta"):
        vae = VAE(cfg)
    return assign(vae, ldm.vae_from_ldm(sd, cfg), f"the autoencoder weights in {where}", dtype)


def load_flux(path: Path, shapes, options: Options) -> Loaded:
    sd = read_tensors(path)
    net = flux_original.flux_from_original(sd)
    family = FAMILIES["flux-dev" if net.cfg.guidance_embed else "flux-schnell"]
    return _loaded(family, net, path, options, {})


def load_sd3(path: Path, shapes, options: Options) -> Loaded:
    parts = sd3_original.split_sd3_file(read_tensors(path))
    net = sd3_original.sd3_from_original(parts.pop("transformer"))
    return _loaded(FAMILIES["sd3"], net, path, options, parts)


def _loaded(family: MMDiTFamily, net: MMDiT, path: Path, options: Options, parts: dict, folder: Path | None = None,
            size: int = 1024) -> Loaded:  # fmt: skip
    dtype = getattr(options, "dtype", None)
    if dtype is not None:
        net = net.to(dtype)
    folder = parts_folder(options, path, family) if folder is None else folder
    vae_sd = parts.pop("vae", None)
    vae = _vae_from_ldm(vae_sd, family, dtype, str(path)) if vae_sd else _vae_from_folder(folder, path, family, dtype)
    encoder = text_encoder(family, folder, parts, dtype)
    if encoder.dim != net.cfg.context_dim or encoder.pooled_dim != net.cfg.y_dim:
        raise UserError(f"the text encoders in {folder} give {encoder.dim}-wide tokens and a {encoder.pooled_dim}-wide "
                        f"pooled vector; the {family.label} transformer reads {net.cfg.context_dim} and "
                        f"{net.cfg.y_dim}")  # fmt: skip
    net = net.eval().requires_grad_(False)
    return Loaded(net, net.cfg, vae, encoder, family.process, "flow", size, dict(family.sampling), family.name,
                  meta={"format": family.name, "label": family.label})  # fmt: skip


def load_folder(folder: Path, index: dict, options: Options) -> Loaded:
    """A diffusers FluxPipeline or StableDiffusion3Pipeline folder: transformer/ through the diffusers converters,
    vae/, the text towers and tokenizers as for a single file (this folder is their folder); family defaults."""
    from inkwash.formats import diffusers_flux
    from inkwash.formats.diffusers_folder import weights
    from inkwash.formats.single_file import read_json

    part = folder / "transformer"
    if not (part / "config.json").is_file():
        raise UserError(f"{folder} lacks its transformer/ folder")
    config = dict(read_json(part / "config.json"))
    if index["_class_name"] == "FluxPipeline":
        net = diffusers_flux.flux_from_diffusers(config, weights(part))
        family, size = FAMILIES["flux-dev" if net.cfg.guidance_embed else "flux-schnell"], 1024
    else:
        net = diffusers_flux.sd3_from_diffusers(config, weights(part))
        family, size = FAMILIES["sd3"], int(config.get("sample_size", 128)) * 8
    parts_folder(Options(text_encoders=folder), folder, family)  # one error naming every missing part
    loaded = _loaded(family, net, folder, options, {}, folder=folder, size=size)
    if family.name == "sd3":  # the VAE's factor: sample_size is in latent positions
        loaded.image_size = int(config.get("sample_size", 128)) * loaded.vae.cfg.downsample
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():  # the folder's time shift (FlowMatchEulerDiscreteScheduler) over the family's
        c = read_json(sched)
        loaded.process = Flow(
            shift=c.get("shift", 1.0), dynamic_shift=bool(c.get("use_dynamic_shifting", False)),
            base_seq_len=c.get("base_image_seq_len", 256), max_seq_len=c.get("max_image_seq_len", 4096),
            base_shift=c.get("base_shift", 0.5), max_shift=c.get("max_shift", 1.15),
        )  # fmt: skip
    loaded.meta = {"format": "diffusers", "pipeline": index["_class_name"], "label": family.label}
    return loaded


register_format(Format("flux", flux_original.is_flux_original, load_flux, "FLUX.1 (Black Forest Labs)"))
register_format(Format("sd3", sd3_original.is_sd3_original, load_sd3, "Stable Diffusion 3 (Stability)"))
_folders.register_pipeline("FluxPipeline", load_folder)
_folders.register_pipeline("StableDiffusion3Pipeline", load_folder)
