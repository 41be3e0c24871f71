"""prompt -> text encoder -> sampler(guided denoiser) -> images + metadata.

The one place that turns a model file (or preset) into images; the CLI, the trainer's sample grids
and the Python API (`inkwash.load`) all call it. Knows no file layouts: `formats.checkpoint` reads inkwash files,
`formats.single_file` everything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from .accel.cache import check_cache, with_step_cache
from .accel.offload import cast_storage, check_offload, check_storage, offload
from .data.base import to_uint8_hwc
from .diffusion import Denoiser, Flow, Process, process_from_dict
from .errors import UserError
from .formats import single_file
from .formats.checkpoint import load_exact, load_model_file, strip_prefix
from .formats.single_file import is_inkwash_file
from .models.registry import build_model, config_from_dict, config_to_dict, get_preset
from .sampling import SAMPLERS, Guided, get_sampler, make_times
from .text import TextEncoderConfig, build_text_encoder
from .text.base import TextEmbedding, TextEncoder

ASSETS = Path(__file__).resolve().parent / "assets"
# The default: an LCM student of the bundled Shapes U-Net (recipes/distill-lcm.json), 4 steps, no CFG pass.
BUNDLED = ASSETS / "shapes-unet-lcm.safetensors"
BUNDLED_TEACHER = ASSETS / "shapes-unet.safetensors"  # its teacher (recipes/bundled.json): 20 steps with CFG
MAX_PROMPT_CHARS = 1000
ONNX_MANIFEST = "inkwash-onnx.json"  # marks a folder `inkwash export-onnx` wrote (accel.onnx.MANIFEST)


def default_model_path() -> Path:
    """The Shapes model that ships inside the package: the few-step student of `BUNDLED_TEACHER`."""
    if not BUNDLED.exists():
        raise UserError(f"the bundled model {BUNDLED} is missing; reinstall inkwash or pass --model")
    return BUNDLED


@dataclass
class Sampling:
    """How to sample: defaults come from the model file, callers override any field."""

    sampler: str = "euler"
    steps: int = 20
    guidance: float = 4.0
    schedule: str | None = None
    rescale: float = 0.0
    cache: str | None = None  # a step cache: "fbcache:0.08", "deepcache:3" (inkwash.accel.cache)

    @classmethod
    def from_dict(cls, d: dict) -> Sampling:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRECISIONS = ("fp32", "bf16")  # compute: bf16 runs the network under autocast, whatever its weights are stored in
DEFAULT_VAE_TILE = 64  # latent positions per tile side: 512 px at f = 8, diffusers' tile for SD 1.x


def check_precisions(dtype: str, precision: str) -> None:
    """Weight storage (`dtype`) and compute (`precision`) must agree: fp16 weights cannot run under bf16 autocast."""
    check_storage(dtype)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if dtype == "fp16" and precision == "bf16":
        raise UserError("fp16 weights compute in fp16: use --precision fp32 with --dtype fp16, or --dtype bf16")


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this PyTorch can put a tensor on it; one sentence otherwise."""
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device} was asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"device {device} is not available here ({str(e).splitlines()[0]}); use --device cpu") from None
    return device


def autocast_for(precision: str, device: torch.device):
    """A context factory: bf16 autocast where the device does bf16, fp32 otherwise (announced, not silent)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "bf16":
        return contextlib.nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print(f"inkwash: {torch.cuda.get_device_name(device)} has no bf16; running in fp32.", file=sys.stderr)
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def text_cond(emb, model_cfg) -> dict[str, torch.Tensor]:
    """Network keyword arguments from a text embedding, for the inputs the network config has."""
    cond = {}
    if getattr(model_cfg, "context_dim", 0):
        cond["context"], cond["context_mask"] = emb.tokens, emb.mask
    if getattr(model_cfg, "y_dim", 0):
        cond["y"] = emb.pooled
    return cond


MICRO_CONDITIONS = ("original height", "original width", "crop top", "crop left", "target height", "target width")
REFINER_CONDITIONS = ("original height", "original width", "crop top", "crop left", "aesthetic score")
AESTHETIC_SCORE = (6.0, 2.5)  # SDXL refiner: the score asked of the conditional and the unconditional half (diffusers)


def micro_conditions(model_cfg, b: int, size: int, original: int, crop: tuple[int, int], device=None,
                     negative: bool = False) -> torch.Tensor:  # fmt: skip
    """SDXL's micro-conditions per image in pixels: the base's six, [b, 6] = (original h, w, crop top, left,
    target h, w), or the refiner's five, [b, 5] = (original h, w, crop top, left, aesthetic score), the score
    6 for the conditional half and 2.5 for the unconditional (`negative`) one, as diffusers asks."""
    n = getattr(model_cfg, "micro_conditions", 0)
    if n == len(MICRO_CONDITIONS):
        row = [original, original, crop[0], crop[1], size, size]
    elif n == len(REFINER_CONDITIONS):
        row = [original, original, crop[0], crop[1], AESTHETIC_SCORE[1 if negative else 0]]
    else:
        raise UserError(f"this network takes {n} micro-conditions; inkwash supplies SDXL's "
                        f"{len(MICRO_CONDITIONS)} ({', '.join(MICRO_CONDITIONS)}) or its refiner's "
                        f"{len(REFINER_CONDITIONS)} ({', '.join(REFINER_CONDITIONS)})")  # fmt: skip
    return torch.tensor([row] * b, dtype=torch.float32, device=device)


def size_condition(model_cfg, b: int, size: int, device=None) -> torch.Tensor | None:
    """PixArt-α 1024's size conditions per image, [b, 3] = (height, width, aspect ratio) in pixels; None for
    networks without them."""
    if not getattr(model_cfg, "size_conditioning", False):
        return None
    return torch.tensor([[size, size, 1.0]] * b, dtype=torch.float32, device=device)


def class_labels(model_cfg, labels: list[int], device=None) -> torch.Tensor:
    """Class labels [B] for a class-conditional network, checked against its classes (the last is the null class)."""
    n = getattr(model_cfg, "num_classes", 0)
    bad = [c for c in labels if not isinstance(c, int) or not 0 <= c < n]
    if bad:
        raise UserError(f"class label {bad[0]!r} is not one of this model's classes 0..{n - 1}")
    return torch.tensor(labels, dtype=torch.long, device=device)


def example_inputs(model_cfg, side: int, context_tokens: int = 8, device="meta") -> dict[str, torch.Tensor]:
    """Batch-of-one network inputs for every condition the config takes (for counting MACs on the meta device)."""
    kw = {"x": torch.zeros(1, model_cfg.in_channels, side, side, device=device), "t": torch.zeros(1, device=device)}
    if getattr(model_cfg, "context_dim", 0):
        kw["context"] = torch.zeros(1, context_tokens, model_cfg.context_dim, device=device)
    if getattr(model_cfg, "y_dim", 0):
        kw["y"] = torch.zeros(1, model_cfg.y_dim, device=device)
    if getattr(model_cfg, "num_classes", 0):
        kw["y"] = torch.zeros(1, dtype=torch.long, device=device)
    if getattr(model_cfg, "guidance_embed", False):
        kw["guidance"] = torch.zeros(1, device=device)
    micro = getattr(model_cfg, "micro_conditions", 0) or (3 if getattr(model_cfg, "size_conditioning", False) else 0)
    if micro:
        kw["micro"] = torch.zeros(1, micro, device=device)
    return kw


def fit_to_encoder(model_cfg, encoder: TextEncoder):
    """The network config with its cross-attention and pooled-vector widths set to the encoder's."""
    widths = (("context_dim", encoder.dim), ("y_dim", encoder.pooled_dim))
    return dataclasses.replace(model_cfg, **{k: v for k, v in widths if getattr(model_cfg, k, 0)})


def png_parameters(
    prompt: str,
    negative: str,
    s: Sampling,
    seed: int,
    size: int,
    model: str,
    distilled: bool = False,
    extra: dict[str, str] | None = None,
) -> str:
    """A1111-style `parameters` text, so settings can be read back from the PNG. A guidance-distilled model's
    scale is written as Forge writes FLUX dev's: CFG scale 1 (no CFG) and a `Distilled CFG Scale`. `extra`: more
    `Key: value` pairs at the end (a pipeline's acceleration, e.g. Quantize: int8)."""
    neg = f"\nNegative prompt: {negative}" if negative else ""
    sched = f", Schedule type: {s.schedule}" if s.schedule else ""
    rescale = f", Guidance rescale: {s.rescale}" if s.rescale else ""
    rescale += f", Cache: {s.cache}" if s.cache else ""
    cfg = f"CFG scale: 1, Distilled CFG Scale: {s.guidance}" if distilled else f"CFG scale: {s.guidance}"
    more = "".join(f", {k}: {v}" for k, v in (extra or {}).items())
    return (
        f"{prompt}{neg}\nSteps: {s.steps}, Sampler: {s.sampler}{sched}, {cfg}{rescale}, "
        f"Seed: {seed}, Size: {size}x{size}, Model: {model}{more}"
    )


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG keeping its `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    for k, v in image.info.items():
        if isinstance(v, str):
            info.add_text(k, v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL images."""
    return [Image.fromarray(a) for a in to_uint8_hwc(x)]


def handoff_index(process: Process, times: torch.Tensor, handoff: float) -> int:
    """Grid index where a base model hands over to a refiner: the first time at or below normalised time
    1 - handoff (0 = the refiner does everything, len(times) - 1 = the base does everything)."""
    if not 0.0 <= handoff <= 1.0:
        raise UserError(f"handoff is the fraction of denoising the base model does, in [0, 1]; got {handoff}")
    u = process.normalized_time(times[:-1])
    return int((u > 1.0 - handoff + 1e-9).sum())


@dataclass
class SamplingRun:
    """One prepared sampling call: the guided model, starting noise, time grid and settings."""

    model: Guided
    x: torch.Tensor
    times: torch.Tensor
    settings: Sampling
    seeds: list[int]
    process: Process
    vae: Any = None  # latent models: the autoencoder that turns the sampled latents into images
    vae_tile: int | None = None  # decode in tiles of this many latent positions a side (None: in one piece)

    def __call__(self, callback: Callable | None = None, refiner: SamplingRun | None = None,
                 handoff: float = 0.8) -> torch.Tensor:  # fmt: skip
        """Run the sampler; later noise of stochastic samplers comes from a generator seeded by the first seed.
        Images [N, 3, H, W] in [-1, 1] (decoded from latents for a latent model).

        With a `refiner` (another model's run, prepared for the same prompts), SDXL's ensemble of expert
        denoisers: this model takes the grid while the normalised time is above 1 - handoff (the first
        `handoff` of the denoising), the refiner the rest, from the same noisy latent and generator."""
        gen = torch.Generator().manual_seed(self.seeds[0])
        sampler = SAMPLERS[self.settings.sampler]
        if refiner is None:
            out = sampler(self.model, self.x, self.times, process=self.process, generator=gen, callback=callback)
            return self.to_images(out)
        k = handoff_index(self.process, self.times, handoff)
        n = len(self.times) - 1

        def shifted(offset: int):  # step numbers across both parts
            return None if callback is None else (lambda i, _, x, x0: callback(i + offset, n, x, x0))

        x = self.x
        if k > 0:
            x = sampler(self.model, x, self.times[: k + 1], process=self.process, generator=gen, callback=shifted(0))
        if k < n:
            x = sampler(refiner.model, x, self.times[k:], process=self.process, generator=gen, callback=shifted(k))
        return self.to_images(x)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's space -> images in [-1, 1]: a decode for latent models, the identity for pixel ones."""
        if self.vae is not None:
            x = self.vae.decode_latent(x.to(next(self.vae.parameters()).dtype), tile=self.vae_tile).float()
        return x.clamp(-1, 1)


@dataclass
class Pipeline:
    net: torch.nn.Module
    model_cfg: Any
    process: Process
    prediction: str
    encoder: TextEncoder
    image_size: int
    channels: int = 3
    sampling: Sampling = field(default_factory=Sampling)
    name: str = "model"
    meta: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: str = ""  # the file it was loaded from
    vae: Any = None  # latent models: the autoencoder; `channels` are then its latent channels
    zero_empty_negative: bool = False  # SDXL base: no negative prompt -> zero text features (diffusers' default)
    dtype: str = "fp32"  # weight storage (see `set_memory`)
    vae_tile: int | None = None  # tiled VAE decode: latent positions per tile side (None: untiled)
    placement: Any = None  # an offload placement (accel.offload), None when every weight is on `device`
    accel: dict[str, str] = field(default_factory=dict)  # acceleration applied (inkwash.accel), for PNG parameters

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu", *,
                  tokenizer: str | os.PathLike | None = None, prediction: str | None = None,
                  text_encoders: str | os.PathLike | None = None) -> Pipeline:  # fmt: skip
        """An inkwash model file, or a checkpoint made elsewhere (a Stable Diffusion / SDXL single file, a diffusers
        folder: see `formats.single_file`). `tokenizer` (a folder with vocab.json and merges.txt) and `prediction`
        are for single files, which carry neither; `text_encoders` (FLUX, SD3) is the folder their text encoders
        come from (see `formats.mmdit_files`)."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"model file {path} does not exist")
        if path.is_dir() or not is_inkwash_file(path):
            options = single_file.Options(tokenizer, prediction, text_encoders=text_encoders)
            return cls.from_loaded(single_file.load(path, options), path, device)
        meta, tensors = load_model_file(path)
        try:
            model_cfg = config_from_dict(meta["model"])
            process = process_from_dict(meta["process"])
            text_cfg = TextEncoderConfig.from_dict(meta["text_encoder"])
            size, prediction = int(meta["image_size"]), meta["prediction"]
        except KeyError as e:
            raise UserError(f"model file {path} lacks the {e.args[0]!r} entry in its inkwash metadata") from None
        net = build_model(model_cfg)
        _load_strict(net, strip_prefix(tensors, "model"), path, "network")
        encoder = build_text_encoder(text_cfg)
        if getattr(encoder, "trainable", False):
            _load_strict(encoder, strip_prefix(tensors, "text_encoder"), path, "text encoder")
        vae = _vae_from(meta, tensors, path) if "vae" in meta else None  # a latent model carries its autoencoder
        return cls(
            net.eval(), model_cfg, process, prediction, encoder.eval(), size, int(meta.get("channels", 3)),
            Sampling.from_dict(meta.get("sampling", {})), path.stem, meta, source=str(path), vae=vae,
        ).to(device)  # fmt: skip

    @classmethod
    def from_loaded(cls, c: single_file.Loaded, path: Path, device: str | torch.device = "cpu") -> Pipeline:
        """A Pipeline around the parts of a checkpoint made elsewhere."""
        return cls(
            c.net.eval(), c.model_cfg, c.process, c.prediction, c.encoder.eval(), c.image_size,
            c.vae.cfg.latent_channels if c.vae is not None else c.model_cfg.in_channels, Sampling.from_dict(c.sampling),
            path.stem if path.is_file() else path.name, c.meta, source=str(path), vae=c.vae,
            zero_empty_negative=c.zero_empty_negative,
        ).to(device)  # fmt: skip

    @classmethod
    def from_preset(cls, name: str, text_encoder: str = "minilm", size: int = 32) -> Pipeline:
        """An untrained model of a named architecture (for benchmarks; `preset_info` counts one without weights)."""
        encoder = build_text_encoder(text_encoder)
        cfg = fit_to_encoder(get_preset(name), encoder)
        return cls(
            build_model(cfg).eval(), cfg, process_from_dict({"kind": "vp"}), "eps", encoder.eval(), size,
            channels=cfg.in_channels, name=name,
        )  # fmt: skip

    def add_lora(self, path: str | os.PathLike, scale: float = 1.0):
        """Merge a LoRA file (kohya or diffusers / PEFT) into the network and the text encoders, times `scale`;
        returns it (`.report()` says what it modified, `.unmerge()` takes it out again)."""
        from inkwash.formats.lora import load_lora

        if self.dtype == "fp8" or self.placement is not None:
            raise UserError("merge LoRAs before storing the weights in fp8 or offloading them (add_lora, then "
                            "set_memory)")  # fmt: skip
        encoder = self.encoder  # two or more combined (SDXL, FLUX, SD3): text_encoder, text_encoder_2, ...
        encoders = getattr(encoder, "towers", None) or getattr(encoder, "encoders", [encoder])
        hf = [getattr(e, "model", None) for e in encoders]
        parts = {f"text_encoder{'' if i == 0 else f'_{i + 1}'}": m for i, m in enumerate(hf) if m is not None}
        return load_lora(path, {"net": self.net, **parts}).merge(scale)

    def to(self, device: str | torch.device) -> Pipeline:
        self.device = torch.device(device)
        if self.placement is not None:  # offloaded: weights stay on the CPU, copies go to the device when used
            self.placement.device = self.device
            return self
        self.net.to(self.device)
        self.encoder.to(self.device)
        if self.vae is not None:
            self.vae.to(self.device)
        return self

    def components(self) -> dict[str, torch.nn.Module]:
        """The modules generating uses, in order: text encoder, denoiser, and the VAE of a latent model."""
        parts = {"text_encoder": self.encoder, "denoiser": self.net}
        return parts if self.vae is None else {**parts, "vae": self.vae}

    def set_memory(self, *, dtype: str | None = None, offload_mode: str = "none", vae_tile: int | None = None,
                   device: str | torch.device | None = None) -> Pipeline:  # fmt: skip
        """Trade speed for memory. `dtype`: weight storage, "fp32", "bf16", "fp16" (the network then computes in
        it) or "fp8" (the text encoder's and denoiser's Linear and Conv2d weights in float8_e4m3fn with a scale per
        output channel, upcast layer by layer at use; the VAE keeps its precision). `offload_mode`: "model" (each
        component on `device` only while used), "sequential" (each submodule's weights only for its forward) or
        "none". `vae_tile`: decode latents in overlapping tiles of this side (None: untiled). Each call sets the
        offload and the tiling anew; the storage dtype is set once per pipeline (None keeps it)."""
        device = check_device(device) if device is not None else self.device
        check_offload(offload_mode)
        if vae_tile is not None and (not isinstance(vae_tile, int) or vae_tile < 1):
            raise UserError(f"the VAE tile is a side in latent positions, a positive whole number; got {vae_tile}")
        if vae_tile is not None and self.vae is None:
            raise UserError(f"{self.name} samples pixels and has no autoencoder, so there is no VAE decode to tile")
        if dtype is not None and check_storage(dtype) != self.dtype:
            if self.dtype != "fp32":
                raise UserError(f"the weights are already stored in {self.dtype}; load the model again for {dtype}")
            if self.placement is not None:
                raise UserError("set the weight dtype before offloading")
            parts = self.components()
            for name, module in parts.items():
                if dtype != "fp8" or name != "vae":
                    cast_storage(module, dtype)
            self.dtype = dtype
        if self.placement is not None:
            self.placement.remove()
            self.placement = None
        self.vae_tile = vae_tile
        self.device = device
        self.placement = offload(offload_mode, self.components(), device)
        return self if self.placement is not None else self.to(device)

    # --- sampling -------------------------------------------------------------------------------

    @property
    def latent_factor(self) -> int:
        """Image pixels per sampled position along a side: the autoencoder's f, or 1 in pixel space."""
        return self.vae.cfg.downsample if self.vae is not None else 1

    @property
    def size_multiple(self) -> int:
        return (
            self.latent_factor * self.model_cfg.size_multiple
        )  # every denoiser config says what its side must divide by

    def check_size(self, size: int) -> int:
        m = self.size_multiple
        if not isinstance(size, int) or size < m or size % m or size > 2048:
            raise UserError(f"size {size} is not one this model can take: use a multiple of {m} up to 2048 "
                            f"(it was trained at {self.image_size})")  # fmt: skip
        return size

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional network (DiT's ImageNet models), 0 for text-conditioned ones."""
        return getattr(self.model_cfg, "num_classes", 0)

    @property
    def guidance_distilled(self) -> bool:
        """FLUX dev: the guidance scale is a network input, so sampling runs no classifier-free guidance."""
        return bool(getattr(self.model_cfg, "guidance_embed", False))

    def settings(self, **overrides) -> Sampling:
        """The model's sampling defaults with the given (non-None) overrides, validated."""
        s = dataclasses.replace(self.sampling, **{k: v for k, v in overrides.items() if v is not None})
        get_sampler(s.sampler)
        if not isinstance(s.steps, int) or s.steps <= 0:
            raise UserError(f"steps must be a positive whole number, got {s.steps}")
        self.times(s, self.image_size)  # validates the schedule for this process
        if s.guidance < 0:
            raise UserError(f"guidance must be >= 0, got {s.guidance}")
        if s.rescale and self.guidance_distilled:
            raise UserError("guidance rescale needs classifier-free guidance, which a guidance-distilled model "
                            "does not run")  # fmt: skip
        if s.cache is not None:
            s.cache = None if (spec := check_cache(self.net, s.cache)) is None else str(spec)
        return s

    def times(self, s: Sampling, size: int) -> torch.Tensor:
        """The time grid; a flow model with `dynamic_shift` (FLUX) shifts it by the image's token count."""
        opts = {}
        if isinstance(self.process, Flow) and self.process.dynamic_shift and (s.schedule or "shift") == "shift":
            side = size // self.latent_factor // getattr(self.model_cfg, "patch_size", 1)
            opts["seq_len"] = side * side
        return make_times(self.process, s.steps, s.schedule, **opts)

    def conditions(self, prompts: list[str], negative_prompt: str, labels: list[int] | None, s: Sampling,
                   size: int) -> tuple[dict, dict | None]:  # fmt: skip
        """Network keyword arguments (cond, uncond) for a batch: text, or class labels with the null class as
        the unconditional input; uncond is None without classifier-free guidance (scale 1, guidance-distilled)."""
        b = len(prompts)
        cfg_guided = s.guidance != 1 and not self.guidance_distilled
        if labels is not None:
            cond = {"y": class_labels(self.model_cfg, labels, self.device)}
            uncond = {"y": torch.full((b,), self.num_classes, dtype=torch.long, device=self.device)}  # null class
        else:
            emb = self.encoder(prompts)
            cond = text_cond(emb, self.model_cfg)
            uncond = None
            if cfg_guided and self.zero_empty_negative and not negative_prompt:  # SDXL: zeros, not the encoded ""
                uncond = text_cond(TextEmbedding(emb.tokens * 0, emb.mask, emb.pooled * 0), self.model_cfg)
            elif cfg_guided:
                uncond = text_cond(self.encoder([negative_prompt] * b), self.model_cfg)
        extra = {}  # conditions shared by both halves of the guided batch
        micro = size_condition(self.model_cfg, b, size, self.device)
        if micro is not None:
            extra["micro"] = micro
        if self.guidance_distilled:  # FLUX dev: one forward per step, the scale told to the network
            extra["guidance"] = torch.full((b,), float(s.guidance), device=self.device)
        cond.update(extra)
        if not cfg_guided:
            return cond, None
        uncond.update(extra)
        return cond, uncond

    def check_conditioning(self, prompts: list[str], negative_prompt: str, class_label) -> list[int] | None:
        """The class labels for a class-conditional model (one per prompt slot); UserError for a prompt given to a
        class model, a class label given to a text model, or a negative prompt where nothing can use it."""
        if self.num_classes:
            if any(p for p in prompts) or negative_prompt:
                raise UserError(f"this model is class-conditional ({self.num_classes} classes) and takes no "
                                "prompt: give a class label instead (--class-label N)")  # fmt: skip
            if class_label is None:
                raise UserError(f"this model is class-conditional: give a class label 0..{self.num_classes - 1} "
                                "(--class-label N)")  # fmt: skip
            labels = [class_label] if isinstance(class_label, int) else list(class_label)
            if not labels:
                raise UserError("no class labels given")
            return labels
        if class_label is not None:
            raise UserError("this model is text-conditioned and has no class labels: give a prompt instead")
        if negative_prompt and self.guidance_distilled:
            raise UserError("this model is guidance-distilled (FLUX dev): it takes the guidance scale as an input "
                            "and runs no classifier-free guidance, so it cannot use a negative prompt")  # fmt: skip
        return None

    def prepare(
        self,
        prompt: str | list[str] | None,
        *,
        negative_prompt: str = "",
        n: int = 1,
        seed: int | list[int] = 0,
        size: int | None = None,
        net: Callable | None = None,
        original_size: int | None = None,
        crop: tuple[int, int] = (0, 0),
        class_label: int | list[int] | None = None,
        **overrides,
    ) -> SamplingRun:
        """Validate, encode the text (or take the class labels) and draw the starting noise: everything `generate`
        samples with. `net` replaces the network (the server's engine passes a stand-in that batches across
        requests and runs the request's step cache itself). A class-conditional model takes `class_label` (one,
        or one per image) and no prompt."""
        prompts = _prompt_list(prompt)
        labels = self.check_conditioning(prompts, negative_prompt, class_label)
        if labels is not None:
            prompts = [""] * len(labels)
        if not prompts:
            raise UserError("no prompts given")
        if any(len(p) > MAX_PROMPT_CHARS for p in prompts) or len(negative_prompt) > MAX_PROMPT_CHARS:
            raise UserError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        if n < 1:
            raise UserError(f"n must be at least 1, got {n}")
        s = self.settings(**overrides)
        size = self.check_size(self.image_size if size is None else size)
        prompts = [p for p in prompts for _ in range(n)]
        labels = None if labels is None else [c for c in labels for _ in range(n)]
        b = len(prompts)
        seeds = [seed + i for i in range(b)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != b:
            raise UserError(f"{len(seeds)} seeds given for {b} images")
        cond, uncond = self.conditions(prompts, negative_prompt, labels, s, size)
        if getattr(self.model_cfg, "micro_conditions", 0):  # SDXL: ask for a full-size, uncropped original
            args = (self.model_cfg, b, size, original_size or size, crop, self.device)
            cond["micro"] = micro_conditions(*args)
            if uncond is not None:
                uncond["micro"] = micro_conditions(*args, negative=True)
        learn_sigma = getattr(self.model_cfg, "learn_sigma", False)
        denoiser = Denoiser(self.net if net is None else net, self.process, self.prediction, learn_sigma)
        if net is None:
            denoiser = with_step_cache(denoiser, s.cache)  # a fresh cache per run
        times = self.times(s, size)
        side = size // self.latent_factor
        shape = (1, self.channels, side, side)
        x = torch.cat([self.process.init_noise(shape, torch.Generator().manual_seed(s), times[0]) for s in seeds])
        model = Guided(denoiser, cond, uncond, s.guidance, s.rescale)
        return SamplingRun(model, x.to(self.device), times, s, seeds, self.process, self.vae, self.vae_tile)

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None,
        *,
        negative_prompt: str = "",
        n: int = 1,
        seed: int | list[int] = 0,
        size: int | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        precision: str = "fp32",
        refiner: Pipeline | None = None,
        handoff: float = 0.8,
        class_label: int | list[int] | None = None,
        **overrides,
    ) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1]; "" is the unconditional prompt. Image i starts from noise seeded
        `seed + i` (or `seed[i]` for a list) on the CPU, so it does not depend on the device or on the rest of
        the batch; stochastic samplers draw their later noise from one generator seeded by the first seed.
        `precision="bf16"` runs the network under bf16 autocast (whatever `set_memory` stored the weights in);
        the sampler's state stays float32.
        `refiner`: a second model that does the last 1 - `handoff` of the denoising (SDXL base + refiner).
        A class-conditional model (DiT on ImageNet) takes `class_label` instead of a prompt."""
        check_precisions(self.dtype, precision)
        kw = dict(negative_prompt=negative_prompt, n=n, seed=seed, size=size, class_label=class_label, **overrides)
        try:
            run = self.prepare(prompt, **kw)
            second = None
            if refiner is not None:
                self.check_refiner(refiner)
                second = refiner.prepare(prompt, **kw)
            with autocast_for(precision, self.device)():
                return run(callback, second, handoff)
        finally:  # offloaded: nothing stays on the device between calls
            for p in (self, refiner):
                if p is not None and p.placement is not None:
                    p.placement.release()

    def check_refiner(self, refiner: Pipeline) -> None:
        """A refiner must continue in the same space: the same process, channels and autoencoder."""
        a, b = self.vae, refiner.vae
        same_vae = (a is None and b is None) or (
            a is not None and b is not None and a.cfg == b.cfg
            and all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
        )  # fmt: skip
        if self.process.to_dict() != refiner.process.to_dict() or self.channels != refiner.channels or not same_vae:
            raise UserError(f"{refiner.name} cannot refine {self.name}: a refiner needs the same noise process, "
                            "channels and autoencoder as the base model")  # fmt: skip

    def __call__(self, prompt: str | list[str] | None = None, *, negative_prompt: str = "", n: int = 1,
                 seed: int = 0, size: int | None = None, callback=None, precision: str = "fp32",
                 refiner: Pipeline | None = None, handoff: float = 0.8, class_label: int | list[int] | None = None,
                 **overrides) -> list[Image.Image]:  # fmt: skip
        """PIL images carrying A1111-style `parameters` text (a class model's carry "class N" as the prompt)."""
        prompts = _prompt_list(prompt)
        if not self.num_classes and (not prompts or any(not p.strip() for p in prompts)):
            raise UserError('the prompt is empty; say what to draw, e.g. "a red circle"')
        x = self.generate(prompt, negative_prompt=negative_prompt, n=n, seed=seed, size=size, callback=callback,
                          precision=precision, refiner=refiner, handoff=handoff, class_label=class_label,
                          **overrides)  # fmt: skip
        s, size = self.settings(**overrides), x.shape[-1]
        if class_label is not None:
            prompts = [f"class {c}" for c in ([class_label] if isinstance(class_label, int) else class_label)]
        model = self.name if refiner is None else f"{self.name}, Refiner: {refiner.name}, Refiner switch at: {handoff}"
        images = to_pil(x)
        for i, img in enumerate(images):
            img.info["parameters"] = png_parameters(
                prompts[i // n], negative_prompt, s, seed + i, size, model, self.guidance_distilled, self.accel
            )
        return images

    # --- facts ----------------------------------------------------------------------------------

    def info(self) -> dict:
        from .models.flops import count_flops

        size = self.image_size // self.latent_factor
        meta_net = build_model_on_meta(self.model_cfg)
        return {
            "name": self.name,
            "model": config_to_dict(self.model_cfg),
            "parameters": sum(p.numel() for p in meta_net.parameters()),  # the architecture's, quantized or not
            "text_encoder": type(self.encoder).__name__,
            "conditioning": conditioning_kind(self.model_cfg),
            "process": self.process.to_dict(),
            "prediction": self.prediction,
            "image_size": self.image_size,
            "latent": None
            if self.vae is None
            else {**config_to_dict(self.vae.cfg), "shape": [self.channels, size, size]},
            "sampling": dataclasses.asdict(self.sampling),
            "macs_per_step": count_flops(meta_net, example_inputs(self.model_cfg, size)),
        }


def preset_info(name: str, side: int | None = None) -> dict:
    """Facts about a named architecture as registered (no text encoder fitted), built on the meta device so
    that FLUX's 12B parameters cost nothing: parameters and MACs of one forward at `side` x `side` network
    inputs (latent positions for a latent preset; default: the positions it is laid out for, else 32)."""
    from .models.flops import count_flops

    cfg = get_preset(name)
    if not hasattr(cfg, "in_channels") or not hasattr(cfg, "size_multiple"):
        raise UserError(f"{name!r} is not a denoising network preset (an autoencoder?); give a model file")
    side = side or getattr(cfg, "sample_size", 0) or 32
    if side % cfg.size_multiple:
        raise UserError(f"size {side} is not a multiple of {cfg.size_multiple}, as {name} needs")
    net = build_model_on_meta(cfg)
    return {
        "name": name,
        "model": config_to_dict(cfg),
        "parameters": sum(p.numel() for p in net.parameters()),
        "input_shape": [cfg.in_channels, side, side],
        "conditioning": conditioning_kind(cfg),
        "macs_per_step": count_flops(net, example_inputs(cfg, side)),
        "macs_note": "one forward pass, 8 text tokens where text is taken; classifier-free guidance doubles it "
        "(not for a guidance-distilled model)",
    }


def conditioning_kind(cfg) -> str:
    """What a network is conditioned on, in words."""
    if getattr(cfg, "num_classes", 0):
        return f"class label (0..{cfg.num_classes - 1}; {cfg.num_classes} is the null class)"
    parts = []
    if getattr(cfg, "context_dim", 0):
        parts.append(f"text tokens ({cfg.context_dim} wide)")
    if getattr(cfg, "y_dim", 0):
        parts.append(f"pooled text ({cfg.y_dim} wide)")
    if getattr(cfg, "guidance_embed", False):
        parts.append("guidance scale (guidance-distilled)")
    return ", ".join(parts) or "none"


def _prompt_list(prompt: str | list[str] | None) -> list[str]:
    """The prompts as a list (None: none, as a class-conditional call leaves it out)."""
    if prompt is None:
        return []
    return [prompt] if isinstance(prompt, str) else list(prompt)


def build_model_on_meta(cfg) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(cfg)


def _load_strict(module: torch.nn.Module, sd: dict, path: Path, what: str) -> None:
    load_exact(module, sd, f"the {what} weights in model file {path}")


def load_vae(path: str | os.PathLike) -> torch.nn.Module:
    """An autoencoder file as `inkwash train-vae` writes it (weights under `vae.`, config in `meta["vae"]`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"autoencoder file {path} does not exist")
    meta, tensors = load_model_file(path)
    if "vae" not in meta:
        raise UserError(f"{path} is not an autoencoder file (its inkwash metadata has no 'vae' entry)")
    return _vae_from(meta, tensors, path)


def _vae_from(meta: dict, tensors: dict, path: Path) -> torch.nn.Module:
    vae = build_model(config_from_dict(meta["vae"]))
    _load_strict(vae, strip_prefix(tensors, "vae"), path, "autoencoder")
    return vae.eval().requires_grad_(False)


def load(path_or_preset: str | os.PathLike | None = None, device: str | torch.device = "cpu", *,
         tokenizer: str | os.PathLike | None = None, prediction: str | None = None,
         text_encoders: str | os.PathLike | None = None, dtype: str = "fp32", offload: str = "none",
         vae_tile: int | None = None) -> Pipeline:  # fmt: skip
    """`inkwash.load()`: the bundled model; a path: an inkwash model file, a Stable Diffusion / SDXL single file or
    a diffusers folder (`tokenizer`, `prediction`: see `Pipeline.from_file`), or a folder `inkwash export-onnx`
    wrote (run through onnxruntime); a preset name: untrained weights. `dtype`, `offload` and `vae_tile` trade
    speed for memory (see `Pipeline.set_memory`)."""
    check_storage(dtype)
    check_offload(offload)
    if path_or_preset is not None and (Path(path_or_preset) / ONNX_MANIFEST).is_file():
        if dtype != "fp32" or offload != "none" or vae_tile:
            raise UserError("an ONNX export runs in float32 through onnxruntime; dtype, offload and VAE tiling do not "
                            "apply to it")  # fmt: skip
        return load_onnx(path_or_preset, device)
    if path_or_preset is None:
        pipe = Pipeline.from_file(default_model_path())
    else:
        p = Path(path_or_preset)
        if p.exists() or p.suffix == ".safetensors" or os.sep in str(path_or_preset):
            pipe = Pipeline.from_file(p, tokenizer=tokenizer, prediction=prediction, text_encoders=text_encoders)
        else:
            pipe = Pipeline.from_preset(str(path_or_preset))
    return pipe.set_memory(dtype=dtype, offload_mode=offload, vae_tile=vae_tile, device=device)


def load_onnx(folder: str | os.PathLike, device: str | torch.device = "cpu") -> Pipeline:
    """A folder `inkwash export-onnx` wrote: a Pipeline whose network, text encoder and autoencoder run in
    onnxruntime (`accel.onnx`), sampled by the same samplers."""
    from .accel.onnx import onnx_parts

    parts = onnx_parts(folder)
    return Pipeline(**parts, sampling=Sampling.from_dict(parts["meta"].get("sampling", {}))).to(device)
