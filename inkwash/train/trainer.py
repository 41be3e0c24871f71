"""The one training loop: every network, process and prediction kind; one process or many (torchrun).

Owns the loop (AdamW, linear warm-up, gradient accumulation and clipping, EMA, caption dropout,
mixed precision), deterministic data order and noise, metrics, sample grids and checkpoints with exact
resume. Builds networks, encoders and data through their registries; knows no architecture.

Batches. `batch_size` is the images per forward pass on one process; the global batch of an optimizer
step is batch_size * grad_accum * world_size, cut into that many chunks of `batch_size`. Chunk k of
step s holds samples s * G + k * batch_size ... of a seeded permutation of the data set, and its noise,
times and caption dropout come from a generator seeded by (seed, s, k). Process r runs chunks
r, r + W, r + 2W, ...; so a run's numbers depend only on the global batch and `batch_size`, not on
how chunks are spread over processes or accumulation steps, and resume needs no RNG replay.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from inkwash.config import dataclass_from_dict
from inkwash.data.latent_cache import LatentCache
from inkwash.diffusion import Denoiser, TimeSampler, diffusion_loss, process_from_dict
from inkwash.errors import UserError
from inkwash.formats.checkpoint import (
    file_sha256,
    flatten_optimizer_state,
    load_state,
    save_model,
    save_state,
    unflatten_optimizer_state,
)
from inkwash.models.vae import DiagonalGaussian
from inkwash.pipeline import Pipeline, Sampling, autocast_for, fit_to_encoder, load_vae, size_condition, text_cond
from inkwash.text import CachedTextEncoder, TextEncoder, TextEncoderConfig, build_text_encoder
from inkwash.train.ema import EMA

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
LOSS_BINS = 10  # loss reported per tenth of normalized time (0 clean .. 1 pure noise)
LR_DECAYS = ("none", "cosine", "linear")

# TrainConfig fields that may change between a run and its resumption without changing its numbers.
RESUMABLE_CHANGES = frozenset(
    {"steps", "output_dir", "sample_every", "checkpoint_every", "log_every", "sample_prompts", "sampling"}
    | {"device", "eval_every", "eval_prompts", "data_workers", "text_cache_entries"}
)


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as `train_args` in every checkpoint."""

    model: str | dict = "unet-tiny"  # preset name, or a config dict as written by config_to_dict
    process: str | dict = "vp"  # process kind ("vp", "flow", "edm") or a dict as written by to_dict
    prediction: str = "eps"  # eps | v | x0 | flow
    text_encoder: str | dict = "minilm"  # encoder name or a TextEncoderConfig dict
    dataset: str = "shapes"  # "shapes" or a folder path
    vae: str | None = None  # an autoencoder file (inkwash train-vae): the model then learns in its latent space
    init_from: str | None = None  # an inkwash model file to start from (fine-tuning): same network, fresh optimizer
    latent_cache: str | None = None  # a folder from `inkwash cache-latents` (made with `vae`) instead of encoding
    micro_augment: dict = field(default_factory=dict)  # SDXL micro-conditioning: {"lowres": p, "min_side": px,
    #   "zoom": p, "max_zoom": z}: low-resolution originals and zoomed crops, told to the network as micro-conditions
    dataset_args: dict = field(default_factory=dict)  # data set options, e.g. Shapes' {"omit_colour": 0.3}
    data_workers: int = 0  # processes that load / render batches ahead of the loop; 0 = in the loop
    image_size: int = 32
    batch_size: int = 4  # images per forward pass on one process
    grad_accum: int = 1  # forward passes per optimizer step on one process
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps, then constant (or lr_decay)
    lr_decay: str = "none"  # none | cosine | linear: from lr after warm-up to lr * lr_final at `steps`
    lr_final: float = 0.0  # the decayed learning rate at the last step, as a fraction of lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.0  # 0 = off; the model file then holds the raw weights
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    caption_dropout: float = 0.1  # probability of training on "" (for classifier-free guidance)
    time_sampling: str = "uniform"  # uniform | logit_normal | shifted
    time_sampling_args: dict = field(default_factory=dict)  # TimeSampler's mean / std / shift
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    steps: int = 1000
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    output_dir: str = "runs/default"
    sample_every: int = 0  # steps between sample grids; 0 = only at the end of the run
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end of the run
    log_every: int = 10
    eval_every: int = 0  # steps between quick ShapesEval runs (logged to eval.jsonl); 0 = never
    eval_prompts: int = 4  # prompts per task in a quick evaluation (one image each)
    sample_prompts: tuple[str, ...] = ("a red circle", "a blue square", "a green triangle", "")
    sampling: dict = field(default_factory=lambda: {"sampler": "euler", "steps": 20, "guidance": 4.0, "schedule": None})
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    text_cache_entries: int | None = (
        None  # frozen encoders: captions kept encoded (oldest go first); None = all, 0 = no cache
    )

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.sample_prompts = tuple(self.sample_prompts)
        positive = ("image_size", "batch_size", "grad_accum", "steps", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise UserError(f"Training option {name} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "sample_every", "checkpoint_every", "eval_every", "data_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"Training option {name} must be >= 0, got {getattr(self, name)!r}.")
        if not self.lr > 0:
            raise UserError(f"Learning rate must be positive, got {self.lr}.")
        if not (0.0 <= self.ema_decay < 1.0):
            raise UserError(f"EMA decay must be in [0, 1) (0 = off), got {self.ema_decay}.")
        if not (0.0 <= self.caption_dropout <= 1.0):
            raise UserError(f"Caption dropout must be a probability in [0, 1], got {self.caption_dropout}.")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"Unknown precision {self.precision!r}; valid: fp32, bf16.")
        if self.grad_clip < 0:
            raise UserError(f"Gradient clip must be >= 0 (0 = off), got {self.grad_clip}.")
        if self.lr_decay not in LR_DECAYS:
            raise UserError(f"Unknown lr_decay {self.lr_decay!r}; valid: {', '.join(LR_DECAYS)}.")
        if not (0.0 <= self.lr_final <= 1.0):
            raise UserError(f"lr_final is a fraction of lr in [0, 1], got {self.lr_final}.")
        if self.text_cache_entries is not None and self.text_cache_entries < 0:
            raise UserError(f"text_cache_entries must be >= 0 (or null for no bound), got {self.text_cache_entries}.")
        self.dataset_args = dict(self.dataset_args)
        self.micro_augment = dict(self.micro_augment)
        unknown = set(self.micro_augment) - {"lowres", "min_side", "zoom", "max_zoom"}
        if unknown:
            raise UserError(
                f"Unknown micro_augment options {sorted(unknown)}; valid: lowres, min_side, zoom, max_zoom."
            )
        if self.micro_augment.get("lowres", 0) + self.micro_augment.get("zoom", 0) > 1:
            raise UserError("micro_augment's lowres and zoom are probabilities of one image; their sum must be <= 1.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d, "training")


class TrainingDiverged(UserError):
    """The loss or gradients became NaN/inf; nothing was written after the last good checkpoint."""


# ---------------------------------------------------------------------------- building blocks


def check_finite_weights(net: nn.Module, step: int, out: Path, what: str = "Training") -> None:
    """Refuse to save non-finite weights: TrainingDiverged naming them (the last checkpoint stays intact)."""
    bad = [n for n, p in net.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
    if bad:
        raise TrainingDiverged(
            f"{what} diverged at step {step}: weights {bad[:3]} are not finite; "
            f"the last checkpoint in {out} is intact (try a lower learning rate)."
        )


def seed_for(*parts: int | str) -> int:
    """A 63-bit generator seed from (seed, purpose, step, ...): independent streams, stable across runs."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator_for(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*parts))


class DataOrder:
    """Sample position -> data set index: epoch e is a permutation seeded by (seed, e).

    Unbounded procedural data sets (len above SHUFFLE_LIMIT, e.g. Shapes) are read in index order:
    their items are already independent draws, and a permutation of 2**31 items would not fit.
    """

    SHUFFLE_LIMIT = 2**24

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise UserError("The training data set is empty.")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, start: int, count: int) -> list[int]:
        if self.n > self.SHUFFLE_LIMIT:
            return [p % self.n for p in range(start, start + count)]
        out = []
        for p in range(start, start + count):
            epoch = p // self.n
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = torch.randperm(self.n, generator=generator_for(self.seed, "data", epoch))
            out.append(int(self._perm[p % self.n]))
        return out


def build_dataset(spec: str, size: int, seed: int, **options):
    """The training data set (a module-level hook so tests and tools can substitute their own)."""
    from inkwash.data import build_dataset as build

    return build(spec, size, seed, **options)


def load_batch(ds, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
    """(images [B, 3, H, W] in [-1, 1], captions) for data set indices; uses `ds.batch` when there is one."""
    if hasattr(ds, "batch"):
        images, captions, _ = ds.batch(indices)
        return images, list(captions)
    items = [ds[i] for i in indices]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


class _Chunks(torch.utils.data.Dataset):
    """Item i = the images and captions of the i-th (step, chunk) key, loaded in a worker process."""

    def __init__(self, dataset, order: DataOrder, keys: list[tuple[int, int]], global_batch: int, batch: int):
        self.dataset, self.order, self.keys, self.G, self.b = dataset, order, keys, global_batch, batch

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        step, k = self.keys[i]
        images, captions = load_batch(self.dataset, self.order.indices(step * self.G + k * self.b, self.b))
        return images, captions


class Prefetcher:
    """Loads the chunks of the coming steps in `workers` processes (a DataLoader), in the loop's order.

    The chunks are the ones the loop would load itself (same data indices), so a run's numbers do not
    depend on `data_workers`. `get(key)` returns the next chunk and checks that it is the one asked for.
    """

    def __init__(self, tr: Trainer, end: int, workers: int):
        W, r = tr.dist.world, tr.dist.rank
        self.keys = [(s, a * W + r) for s in range(tr.step, end) for a in range(tr.cfg.grad_accum)]
        source = _Chunks(tr.dataset, tr.order, self.keys, tr.global_batch, tr.cfg.batch_size)
        self.loader = torch.utils.data.DataLoader(
            source, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=4,
            pin_memory=tr.device.type == "cuda", persistent_workers=False,
        )  # fmt: skip
        self.it = iter(self.loader)
        self.pos = 0

    def get(self, key: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
        if self.pos >= len(self.keys) or self.keys[self.pos] != key:
            raise RuntimeError(f"data prefetch out of order: asked for {key}, next is {self.keys[self.pos :][:1]}")
        self.pos += 1
        images, captions = next(self.it)
        return images, list(captions)

    def close(self) -> None:
        self.it = None  # shuts the worker processes down


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps` optimizer steps (step counts from 0), then constant, or with
    `lr_decay` a cosine or linear decay from lr to lr * lr_final at the last step (steps - 1)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "none":
        return cfg.lr
    span = cfg.steps - 1 - cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / span) if span > 0 else 1.0
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_decay == "cosine" else 1.0 - frac
    return cfg.lr * (cfg.lr_final + (1.0 - cfg.lr_final) * shape)


def _text_config(spec: str | dict) -> TextEncoderConfig:
    return TextEncoderConfig(name=spec) if isinstance(spec, str) else TextEncoderConfig.from_dict(dict(spec))


def _process(spec: str | dict):
    return process_from_dict({"kind": spec} if isinstance(spec, str) else spec)


def _model_config(cfg: TrainConfig, encoder: TextEncoder, channels: int):
    """The network config: the preset (or dict), its cross-attention / pooled widths set to the encoder's,
    and its input / output channels set to the data's (3 for RGB pixels, the autoencoder's latent channels)."""
    from inkwash.models.registry import config_from_dict, get_preset

    mcfg = get_preset(cfg.model) if isinstance(cfg.model, str) else config_from_dict(dict(cfg.model))
    mcfg = fit_to_encoder(mcfg, encoder)
    if not hasattr(mcfg, "in_channels"):
        raise UserError(f"Model {cfg.model!r} is not a denoising network (it has no input channels).")
    if getattr(mcfg, "num_classes", 0):
        raise UserError(f"Model {cfg.model!r} is class-conditional, and the training data has captions, not class "
                        "labels; use a text-conditioned config (dit-shapes, or num_classes 0 with y_dim).")  # fmt: skip
    if getattr(mcfg, "guidance_embed", False):
        raise UserError(f"Model {cfg.model!r} is guidance-distilled (guidance_embed), which is learnt from a "
                        "teacher, not from data; train with guidance_embed false.")  # fmt: skip
    return dataclasses.replace(mcfg, in_channels=channels, out_channels=channels)


def macs_per_training_image(cfg: TrainConfig) -> int:
    """Forward multiply-adds of this run's network for one training image (counted on the meta device, with an
    8-token caption); a training step costs about 3x this per image (forward + backward)."""
    from inkwash.models.flops import count_flops
    from inkwash.models.registry import build_model
    from inkwash.train.vae_trainer import read_vae_meta

    side, channels = cfg.image_size, 3
    if cfg.vae:
        vcfg = read_vae_meta(cfg.vae)["vae"]
        side //= 2 ** (len(vcfg["channels"]) - 1)
        channels = vcfg["latent_channels"]
    mcfg = _model_config(cfg, build_text_encoder(_text_config(cfg.text_encoder)), channels)
    with torch.device("meta"):
        net = build_model(mcfg)
        kw = {"x": torch.zeros(1, channels, side, side), "t": torch.zeros(1)}
        if getattr(mcfg, "context_dim", 0):
            kw |= {"context": torch.zeros(1, 8, mcfg.context_dim), "context_mask": torch.ones(1, 8, dtype=torch.bool)}
        if getattr(mcfg, "y_dim", 0):
            kw["y"] = torch.zeros(1, mcfg.y_dim)
        if getattr(mcfg, "micro_conditions", 0):
            kw["micro"] = torch.zeros(1, mcfg.micro_conditions)
        return count_flops(net, kw)


# ---------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # we initialised the process group, so we tear it down
    device: torch.device = torch.device("cpu")  # where collectives run (nccl needs CUDA tensors)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over processes, in place (a small CPU tensor of statistics)."""
        if self.world > 1:
            on_device = t.to(self.device)
            dist.all_reduce(on_device)
            t.copy_(on_device)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: torch.device) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl for CUDA devices, gloo otherwise)."""
    owns = False
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return Dist()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), owns_group=owns, device=comm)


def pick_device(spec: str) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ---------------------------------------------------------------------------- the run


class Trainer:
    """One training run. `train(cfg)` is the public entry point; this class holds the run's state."""

    def __init__(self, cfg: TrainConfig):
        from inkwash.models.registry import build_model

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dist = setup_distributed(self.device)
        self.out = Path(cfg.output_dir)
        self._macs_per_image: int | None = None
        self.process = _process(cfg.process)
        self.time_sampler = TimeSampler(cfg.time_sampling, **cfg.time_sampling_args)
        self.text_cfg = _text_config(cfg.text_encoder)

        torch.manual_seed(seed_for(cfg.seed, "init"))  # identical initial weights on every process
        encoder = build_text_encoder(self.text_cfg)
        self.trainable_text = bool(encoder.trainable)
        if self.trainable_text or cfg.text_cache_entries == 0:  # 0: encode every batch afresh (no cache)
            self.encoder: TextEncoder = encoder if self.trainable_text else encoder.eval()
        else:
            self.encoder = CachedTextEncoder(encoder.eval(), max_entries=cfg.text_cache_entries)
        self.encoder.requires_grad_(self.trainable_text)
        self.vae, self.vae_sha256 = self._load_vae()
        self.channels = self.vae.cfg.latent_channels if self.vae is not None else 3
        self.model_cfg = self.model_config(encoder)
        self.net: nn.Module = build_model(self.model_cfg)
        if cfg.init_from:
            self._init_from(cfg.init_from)
        self.net.to(self.device)
        self.encoder.to(self.device)
        self.ema = EMA(self.net, cfg.ema_decay) if cfg.ema_decay else None

        params = list(self.net.parameters())
        if self.trainable_text:
            params += list(self.encoder.parameters())
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8)
        self.ddp_net, self.ddp_encoder = self._wrap_ddp()
        # learn_sigma: the loss is on the prediction half only (DiT's L_simple); the variance half is not trained
        learn_sigma = getattr(self.model_cfg, "learn_sigma", False)
        self.denoiser = Denoiser(self.ddp_net, self.process, cfg.prediction, learn_sigma)
        self.autocast = autocast_for(cfg.precision, self.device)

        if cfg.latent_cache:
            self.dataset = LatentCache(cfg.latent_cache, self.vae_sha256, cfg.image_size)
        else:
            self.dataset = build_dataset(cfg.dataset, cfg.image_size, cfg.seed, **cfg.dataset_args)
        self.order = DataOrder(len(self.dataset), cfg.seed)
        self.step = 0
        self.prefetch: Prefetcher | None = None  # set by the loop when data_workers > 0

    # -- set-up helpers (`model_config` and `loss` are the hooks distillation overrides)

    def model_config(self, encoder: TextEncoder):
        """The network config of this run (a subclass may build the network it distils into)."""
        return _model_config(self.cfg, encoder, self.channels)

    def _load_vae(self):
        """(the frozen autoencoder, its file hash) for latent training; (None, None) in pixel space."""
        cfg = self.cfg
        if cfg.latent_cache and not cfg.vae:
            raise UserError(
                "latent_cache needs `vae` too: the autoencoder the cache was made with (to decode samples)."
            )
        if not cfg.vae:
            return None, None
        vae = load_vae(cfg.vae).to(self.device)
        if cfg.image_size % vae.cfg.downsample:
            raise UserError(f"image_size {cfg.image_size} is not a multiple of the autoencoder's factor "
                            f"{vae.cfg.downsample}.")  # fmt: skip
        return vae, file_sha256(cfg.vae)

    @torch.no_grad()
    def _init_from(self, path: str) -> None:
        """Start from another run's weights: the same network (config) in the same space (autoencoder)."""
        from inkwash.formats.checkpoint import load_exact, load_model_file, strip_prefix
        from inkwash.models.registry import config_from_dict

        if not Path(path).is_file():
            raise UserError(f"init_from file {path} does not exist.")
        meta, tensors = load_model_file(path)
        if config_from_dict(meta.get("model", {})) != self.model_cfg:
            raise UserError(f"init_from {path} holds a different network than this run's model; they must match.")
        if meta.get("vae_sha256") != self.vae_sha256:
            raise UserError(f"init_from {path} was trained with a different autoencoder (or space) than this run.")
        if meta.get("text_encoder") != self.text_cfg.to_dict():
            raise UserError(f"init_from {path} was trained with a different text encoder than this run's.")
        load_exact(self.net, strip_prefix(tensors, "model"), f"the weights in {path}")
        if self.trainable_text:
            load_exact(self.encoder, strip_prefix(tensors, "text_encoder"), f"the text encoder weights in {path}")

    def _augment_micro(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's micro-conditioning (Podell et al. 2023, 2.2) on our data: with probability `lowres` an image
        is rendered from a smaller original (area-downsampled to r px, upsampled back; original size r), with
        probability `zoom` it is a crop of an upsampled image (crop top/left told). Returns the images and
        their conditions [B, 6] = (original h, w, crop top, left, target h, w). Cached latents: no change."""
        size, a = self.cfg.image_size, self.cfg.micro_augment
        rows = [[size, size, 0, 0, size, size] for _ in range(x.shape[0])]
        if a and not self.cfg.latent_cache:
            g = generator_for(self.cfg.seed, "micro", self.step, k)
            out = []
            for i, row in enumerate(rows):
                img, u = x[i : i + 1], torch.rand(4, generator=g, dtype=torch.float64).tolist()
                if u[0] < a.get("lowres", 0.0):
                    lo = a.get("min_side", max(4, size // 4))
                    r = lo + int(u[1] * (size - lo))
                    img = F.interpolate(F.interpolate(img, size=(r, r), mode="area"), size=(size, size),
                                        mode="bilinear", align_corners=False)  # fmt: skip
                    row[0] = row[1] = r
                elif u[0] < a.get("lowres", 0.0) + a.get("zoom", 0.0):
                    side = round(size * (1 + u[1] * (a.get("max_zoom", 1.5) - 1)))
                    top, left = int(u[2] * (side - size + 1)), int(u[3] * (side - size + 1))
                    img = F.interpolate(img, size=(side, side), mode="bilinear", align_corners=False)
                    img = img[..., top : top + size, left : left + size]
                    row[2], row[3] = top, left
                out.append(img)
            x = torch.cat(out)
        return x, torch.tensor(rows, dtype=torch.float32, device=x.device)

    @torch.no_grad()
    def _latents(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Images (or cached posterior moments) of chunk k -> diffusion latents: a posterior sample, seeded by
        (seed, step, chunk), scaled by the autoencoder's latent scale and shift."""
        posterior = DiagonalGaussian(x) if self.cfg.latent_cache else self.vae.encode(x)
        return self.vae.to_latent(posterior.sample(generator_for(self.cfg.seed, "latent", self.step, k)))

    def _wrap_ddp(self):
        if self.dist.world == 1:
            return self.net, self.encoder
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        net = DDP(self.net, device_ids=ids)
        enc = DDP(self.encoder, device_ids=ids) if self.trainable_text else self.encoder
        return net, enc

    @property
    def chunks_per_step(self) -> int:
        return self.cfg.grad_accum * self.dist.world

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.chunks_per_step

    # -- one optimizer step

    def _chunk(self, k: int) -> tuple[torch.Tensor, list[str]]:
        """Images and captions of chunk k of the current step (caption dropout applied)."""
        b = self.cfg.batch_size
        start = self.step * self.global_batch + k * b  # position in the sample stream
        if self.prefetch is not None:
            images, captions = self.prefetch.get((self.step, k))
        else:
            images, captions = load_batch(self.dataset, self.order.indices(start, b))
        if self.cfg.caption_dropout:
            drop = torch.rand(b, generator=generator_for(self.cfg.seed, "caption", self.step, k))
            captions = ["" if d < self.cfg.caption_dropout else c for c, d in zip(captions, drop.tolist())]
        return images.to(self.device, torch.float32, non_blocking=True), captions

    def _micro(self, k: int, bins: torch.Tensor) -> torch.Tensor:
        """Forward + backward of chunk k; returns the summed (unscaled) loss, adds to the time bins."""
        images, captions = self._chunk(k)
        micro = self._augment_micro(images, k) if getattr(self.model_cfg, "micro_conditions", 0) else None
        if micro is not None:
            images, micro = micro
        if self.vae is not None:
            images = self._latents(images, k)
        # Frozen encoders run outside autocast so their cached embeddings stay float32.
        with self.autocast() if self.trainable_text else nullcontext():
            cond = text_cond(self.ddp_encoder(captions), self.model_cfg)
        if micro is not None:
            cond["micro"] = micro
        size_micro = size_condition(self.model_cfg, len(captions), self.cfg.image_size, self.device)
        if size_micro is not None:  # PixArt-α 1024's (height, width, aspect ratio): every image is square, full size
            cond["micro"] = size_micro
        with self.autocast():
            loss, t = self.loss(images, cond, k, captions)
        loss = loss.float()
        # Mean over the global batch: DDP averages gradients over processes, we sum over accumulation.
        (loss.sum() / (self.cfg.batch_size * self.cfg.grad_accum)).backward()
        idx = (self.process.normalized_time(t).clamp(0, 1) * LOSS_BINS).long().clamp(max=LOSS_BINS - 1)
        detached = loss.detach().to("cpu", torch.float64)
        bins[0].index_add_(0, idx, detached)
        bins[1].index_add_(0, idx, torch.ones_like(detached))
        return detached.sum()

    def loss(self, x0: torch.Tensor, cond: dict, k: int, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss [B], times [B]) of chunk k: the diffusion objective; distillation overrides this.
        `captions` (after caption dropout) are what `cond` encodes, for a teacher with its own encoder."""
        return diffusion_loss(
            self.denoiser,
            x0,
            cond,
            generator=generator_for(self.cfg.seed, "noise", self.step, k),
            time_sampler=self.time_sampler,
            min_snr_gamma=self.cfg.min_snr_gamma,
            offset_noise=self.cfg.offset_noise,
            seq_len=x0.shape[-2] * x0.shape[-1] // self.model_cfg.size_multiple**2,
        )

    def train_step(self, bins: torch.Tensor) -> float:
        """One optimizer step over the global batch; returns its mean loss. Raises on non-finite numbers."""
        cfg, W = self.cfg, self.dist.world
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for a in range(cfg.grad_accum):
            sync = a == cfg.grad_accum - 1 or W == 1
            ctx = nullcontext() if sync else self._no_sync()
            with ctx:
                total += self._micro(a * W + self.dist.rank, bins)
        params = self.params
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        stats = self.dist.all_sum(torch.stack([total, norm.detach().to("cpu", torch.float64)]).clone())
        loss, norm_sum = (float(v) for v in stats)
        if not (math.isfinite(loss) and math.isfinite(norm_sum)):
            mean = loss / self.global_batch
            what = "gradient norm is inf/nan" if math.isfinite(loss) else f"loss is {mean}"
            raise TrainingDiverged(
                f"Training diverged at step {self.step + 1}: the {what}; the last checkpoint in {self.out} "
                "is intact (try a lower learning rate, more warm-up or gradient clipping)."
            )
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.net)
        self.step += 1
        return loss / self.global_batch

    def _no_sync(self):
        """Skip DDP's gradient all-reduce for all but the last accumulation pass."""
        stack = ExitStack()
        for m in (self.ddp_net, self.ddp_encoder):
            if hasattr(m, "no_sync"):
                stack.enter_context(m.no_sync())
        return stack

    # -- files

    def model_meta(self) -> dict[str, Any]:
        from inkwash.models.registry import config_to_dict

        return {
            "model": config_to_dict(self.model_cfg),
            "process": self.process.to_dict(),
            "prediction": self.cfg.prediction,
            "text_encoder": self.text_cfg.to_dict(),
            "image_size": self.cfg.image_size,
            "channels": self.channels,
            **({"vae": config_to_dict(self.vae.cfg), "vae_sha256": self.vae_sha256} if self.vae is not None else {}),
            "sampling": dict(self.cfg.sampling),
            "train_args": {**self.cfg.to_dict(), "step": self.step, "world_size": self.dist.world},
        }

    def _text_state(self) -> dict[str, torch.Tensor]:
        return self.encoder.state_dict() if self.trainable_text else {}

    def save(self) -> Path:
        """Model file + state file (rank 0 only); every process waits for the write."""
        check_finite_weights(self.net, self.step, self.out)
        path = self.out / MODEL_FILE
        if self.dist.main:
            weights = self.ema.state_dict(self.net) if self.ema is not None else self.net.state_dict()
            dicts = {"model": weights}
            if self.trainable_text:
                dicts["text_encoder"] = self._text_state()
            if self.vae is not None:  # a latent model file carries its autoencoder
                dicts["vae"] = self.vae.state_dict()
            save_model(path, dicts, self.model_meta())
            optim, optim_meta = flatten_optimizer_state(self.opt.state_dict())
            rng = {"torch": torch.get_rng_state()}  # network-internal randomness (dropout)
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            state = {"model": self.net.state_dict(), "optim": optim, "rng": rng}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            if self.trainable_text:
                state["text_encoder"] = self._text_state()
            meta = {
                "step": self.step,
                "data_position": self.step * self.global_batch,
                "ema_updates": self.ema.num_updates if self.ema is not None else 0,
                "optim": optim_meta,
                "train_args": self.cfg.to_dict(),
                "world_size": self.dist.world,
            }
            save_state(self.out / STATE_FILE, state, meta)
        self.dist.barrier()
        return path

    def resume(self) -> None:
        """Load the state file in the output folder; UserError if absent or from a different run."""
        path = self.out / STATE_FILE
        if not path.is_file():
            raise UserError(f"Nothing to resume: {path} does not exist (train without resume to start).")
        meta, groups = load_state(path)
        saved, now = meta["train_args"], self.cfg.to_dict()
        defaults = TrainConfig().to_dict()  # an option newer than the saved run was at its default there
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != now[k])
        if meta["world_size"] * saved["grad_accum"] != self.dist.world * self.cfg.grad_accum:
            changed.append("global batch (world size x grad_accum)")
        if changed:
            raise UserError(f"Cannot resume from {path}: these options differ from the saved run: {changed}.")
        self.net.load_state_dict(groups["model"])
        if self.trainable_text:
            self.encoder.load_state_dict(groups["text_encoder"])
        if self.ema is not None:
            self.ema.load_state_dict(groups["ema"], meta["ema_updates"])
        self.opt.load_state_dict(unflatten_optimizer_state(groups.get("optim", {}), meta["optim"]))
        torch.set_rng_state(groups["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in groups["rng"]:
            torch.cuda.set_rng_state(groups["rng"]["cuda"], self.device)
        self.step = int(meta["step"])

    def truncate_metrics(self) -> None:
        """Drop metric lines after the current step: a killed run's, or all of them on a fresh start."""
        for path in (self.out / METRICS_FILE, self.out / EVAL_FILE):
            if path.is_file():
                keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
                path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, loss_sum: float, n_steps: int, bins: torch.Tensor, seconds: float) -> dict[str, Any]:
        bins = self.dist.all_sum(bins.clone())
        per_bin = [None if c == 0 else s / c for s, c in zip(bins[0].tolist(), bins[1].tolist())]
        rec = {
            "step": self.step,
            "loss": loss_sum / n_steps,
            "loss_by_t": per_bin,
            "lr": self.opt.param_groups[0]["lr"],
            "images_per_s": n_steps * self.global_batch / max(seconds, 1e-9),
        }
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    @contextlib.contextmanager
    def inference_pipeline(self):
        """A Pipeline over the current (EMA) weights in eval mode; training modes come back afterwards."""
        net = self.net
        if self.ema is not None:
            net = copy.deepcopy(self.net)
            self.ema.copy_to(net)
        was_training = (net.training, self.encoder.training)
        net.eval()
        self.encoder.eval()
        try:
            yield Pipeline(net, self.model_cfg, self.process, self.cfg.prediction, self.encoder, self.cfg.image_size,
                           channels=self.channels, sampling=Sampling.from_dict(self.cfg.sampling), device=self.device,
                           name=self.out.name, vae=self.vae)  # fmt: skip
        finally:
            net.train(was_training[0])
            self.encoder.train(was_training[1])

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """A PNG grid of the sample prompts with the current (EMA) weights; rank 0 only."""
        if not self.dist.main or not self.cfg.sample_prompts:
            return None
        path = self.out / f"samples_{self.step:07d}.png"
        with self.inference_pipeline() as pipe:
            images = pipe.generate(list(self.cfg.sample_prompts), seed=self.cfg.seed)
        save_grid(images, path)
        return path

    @torch.no_grad()
    def quick_eval(self) -> dict | None:
        """A quick ShapesEval (eval_prompts per task, one image each, no FID) logged to eval.jsonl with the
        training compute so far, so that score-versus-compute curves exist; rank 0 only."""
        if not self.dist.main:
            return None
        from inkwash.eval.runner import EvalConfig, evaluate

        cfg = EvalConfig(per_prompt=1, limit=self.cfg.eval_prompts, fid_images=0, seed=self.cfg.seed)
        with self.inference_pipeline() as pipe:
            if self._macs_per_image is None:
                self._macs_per_image = pipe.info()["macs_per_step"]
            t = time.perf_counter()
            result = evaluate(pipe, self.out / "eval" / f"step_{self.step:07d}", cfg, progress=False, report=False)
        images = self.step * self.global_batch
        rec = {
            "step": self.step, "images_seen": images, "train_macs": 3 * self._macs_per_image * images,
            "scores": {k: v["mean"] for k, v in result["scores"].items()}, "eval_seconds": time.perf_counter() - t,
        }  # fmt: skip
        with open(self.out / EVAL_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec


def save_grid(images: torch.Tensor, path: Path, cols: int | None = None) -> None:
    """Write images [N, 3, H, W] in [-1, 1] as one PNG, `cols` per row (atomically)."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(3, rows * h, cols * w)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i].float().cpu()
    arr = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def train(cfg: TrainConfig, *, resume: bool = False, max_steps: int | None = None) -> Path:
    """Train per `cfg` (under torchrun too) and return the model checkpoint path.

    `resume` continues the run in `cfg.output_dir` exactly; `max_steps` stops (with a checkpoint)
    after that many optimizer steps in total, as if the run had been interrupted there.
    """
    tr = Trainer(cfg)
    try:
        return _run(tr, resume=resume, max_steps=max_steps)
    finally:
        if tr.dist.owns_group:
            dist.destroy_process_group()


def _run(tr: Trainer, *, resume: bool, max_steps: int | None) -> Path:
    cfg = tr.cfg
    if resume:
        tr.resume()
    if tr.dist.main:
        tr.truncate_metrics()
    end = min(cfg.steps, max_steps) if max_steps is not None else cfg.steps
    tr.net.train()
    tr.encoder.train(tr.trainable_text)
    bins = torch.zeros(2, LOSS_BINS, dtype=torch.float64)
    loss_sum, n, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(total=end, initial=tr.step, desc="train", disable=not tr.dist.main, dynamic_ncols=True)
    if cfg.data_workers and tr.step < end:
        tr.prefetch = Prefetcher(tr, end, cfg.data_workers)
    try:
        while tr.step < end:
            loss_sum += tr.train_step(bins)
            n += 1
            bar.update(1)
            if tr.step % cfg.log_every == 0 or tr.step == end:
                rec = tr.log(loss_sum, n, bins, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                bins.zero_()
                loss_sum, n, t0 = 0.0, 0, time.perf_counter()
            if cfg.checkpoint_every and tr.step % cfg.checkpoint_every == 0 and tr.step < end:
                tr.save()
            if cfg.sample_every and tr.step % cfg.sample_every == 0 and tr.step < end:
                tr.sample_grid()
            if cfg.eval_every and tr.step % cfg.eval_every == 0:
                rec = tr.quick_eval()
                if rec:
                    bar.write(f"step {tr.step}: ShapesEval (quick) overall {100 * rec['scores']['overall']:.1f}")
    finally:
        bar.close()
        if tr.prefetch is not None:
            tr.prefetch.close()
            tr.prefetch = None
    path = tr.save()
    if tr.step == cfg.steps:
        tr.sample_grid()
    return path
