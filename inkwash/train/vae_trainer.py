"""Training the KL autoencoder of latent diffusion: `train_vae(VAETrainConfig)`, `load_vae`, `save_vae`.

Loss (per image, averaged over the batch), with Stable Diffusion's relative weights (taming-transformers'
LPIPSWithDiscriminator, logvar fixed at 0): L1 summed over pixels + kl_weight * KL summed over latent
elements (+ perceptual_weight * a perceptual distance + adversarial terms). Everything is divided by the
pixels of an image, so the logged `l1` is the mean absolute error per pixel in [-1, 1] units and the KL
weight means what SD's 1e-6 means.

Perceptual term: NOT LPIPS. It is an LPIPS-like distance (channel-normalised activations, squared
difference, spatial mean, summed over layers, no learned layer weights) on the intermediate activations of
inkwash's own small Shapes feature network (`inkwash/eval/shapes_features.py`, trained on Shapes renders).
It knows Shapes only; it is frozen.

Adversarial term: a small PatchGAN discriminator (taming-transformers' NLayerDiscriminator: conv-LeakyReLU
stacks with BatchNorm, stride 2) with hinge loss, switched on at `adversarial_start`; its generator weight is
adaptive (the ratio of the reconstruction and GAN gradient norms at the decoder's last layer, as in taming)
unless `adaptive_weight` is false.

The posterior's log-variance starts at `logvar_init` (-6 by default: nearly deterministic), not at the
layer's default of about 0, where the posterior noise is as large as the latents and learning detail waits
for the encoder to push it down.

Data order and noise follow the diffusion trainer: step s reads positions s*B ... of the data set's seeded
order, and its posterior-sample noise comes from a generator seeded by (seed, "vae-noise", s), so a resumed
run needs no RNG replay and is bit-identical to a straight one.

At the end (and at every checkpoint) the latent statistics are measured: the mean and standard deviation of
posterior means over the first `stats_images` training images (every element, one scalar each). The saved
config gets shift_factor = mean and scaling_factor = 1 / std, so `VAE.to_latent` gives unit-variance latents.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from inkwash.config import dataclass_from_dict
from inkwash.errors import UserError
from inkwash.formats import checkpoint as ckpt
from inkwash.formats.checkpoint import (
    flatten_optimizer_state,
    load_state,
    save_state,
    unflatten_optimizer_state,
)
from inkwash.models.vae import VAE, VAEConfig
from inkwash.pipeline import load_vae  # noqa: F401 - re-exported; the one reader of autoencoder files
from inkwash.train.ema import EMA
from inkwash.train.trainer import (
    LR_DECAYS,
    DataOrder,
    TrainingDiverged,
    build_dataset,
    check_finite_weights,
    generator_for,
    load_batch,
    lr_at,
    pick_device,
    seed_for,
)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
METRICS_FILE = "metrics.jsonl"
KIND = "vae"

# Options that may change between a run and its resumption without changing its numbers.
RESUMABLE_CHANGES = frozenset({"steps", "output_dir", "checkpoint_every", "log_every", "device"})


@dataclass
class VAETrainConfig:
    """Everything a VAE training run needs; saved as `train_args` in its files."""

    model: str | dict = "vae-shapes-f4"  # preset name, or a config dict as written by config_to_dict
    dataset: str = "shapes"  # "shapes" or an image folder
    dataset_args: dict = field(default_factory=dict)
    image_size: int = 64
    crop: int = 0  # train on random crops of this side (a multiple of the VAE's factor); 0 = whole images
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 0  # linear warm-up from 0 to lr, then constant or lr_decay
    lr_decay: str = "cosine"  # none | cosine | linear: to lr * lr_final at the last step
    lr_final: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm of the autoencoder (on the per-pixel loss); 0 = off
    kl_weight: float = 1e-6  # Stable Diffusion's
    mse_weight: float = 0.0  # an L2 term beside L1 (per pixel, on [-1, 1]); PSNR is an L2 measure
    perceptual_weight: float = 0.0  # our Shapes feature network's LPIPS-like distance (not LPIPS); 0 = off
    adversarial_weight: float = 0.0  # PatchGAN hinge loss; 0 = off
    adversarial_start: int = 0  # the step the discriminator (and its generator term) starts
    adaptive_weight: bool = True  # scale the GAN term by taming's gradient-norm ratio
    disc_channels: int = 32
    disc_layers: int = 2
    disc_lr: float | None = None  # None = lr
    ema_decay: float = 0.0  # 0 = off; the model file then holds the raw weights
    logvar_init: float | None = -6.0  # initial bias of the posterior's log-variance; None = the layer's default
    steps: int = 1000
    seed: int = 0
    output_dir: str = "runs/vae"
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    log_every: int = 10
    stats_images: int = 1024  # training images the latent mean / std are measured on
    device: str = "auto"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.dataset_args = dict(self.dataset_args)
        for name in ("image_size", "batch_size", "steps", "log_every", "stats_images", "disc_channels"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise UserError(f"VAE training option {name} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "checkpoint_every", "adversarial_start", "disc_layers", "crop"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise UserError(f"VAE training option {name} must be an integer >= 0, got {value!r}.")
        for name in ("kl_weight", "mse_weight", "perceptual_weight", "adversarial_weight", "grad_clip", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"VAE training option {name} must be a number >= 0, got {value!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise UserError(f"Learning rate must be positive, got {self.lr!r}.")
        if self.disc_lr is not None and not self.disc_lr > 0:
            raise UserError(f"disc_lr must be positive (or null for lr), got {self.disc_lr!r}.")
        if self.lr_decay not in LR_DECAYS:
            raise UserError(f"Unknown lr_decay {self.lr_decay!r}; valid: {', '.join(LR_DECAYS)}.")
        if not (0.0 <= self.lr_final <= 1.0):
            raise UserError(f"lr_final is a fraction of lr in [0, 1], got {self.lr_final}.")
        if not (0.0 <= self.ema_decay < 1.0):
            raise UserError(f"EMA decay must be in [0, 1) (0 = off), got {self.ema_decay}.")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAETrainConfig:
        return dataclass_from_dict(cls, d, "VAE training")


# ---------------------------------------------------------------------------- model files


def vae_config(spec: str | dict) -> VAEConfig:
    """A VAE preset name or config dict -> VAEConfig; UserError when it names something else."""
    from inkwash.models.registry import config_from_dict, get_preset

    cfg = get_preset(spec) if isinstance(spec, str) else config_from_dict({"arch": "vae", **dict(spec)})
    if not isinstance(cfg, VAEConfig):
        raise UserError(f"Model {spec!r} is not an autoencoder (VAE) config; use e.g. 'vae-shapes-f4'.")
    return cfg


def save_vae(path: str | Path, vae: VAE, *, image_size: int, train_args: dict | None = None,
             latent_stats: dict | None = None, state_dict: dict | None = None) -> Path:  # fmt: skip
    """Write an inkwash VAE file: tensors under `vae.`, meta {"kind": "vae", "vae": config dict, ...}.

    `state_dict` overrides the module's own (e.g. EMA weights); the config written is `vae.cfg`."""
    from inkwash.models.registry import config_to_dict

    meta = {
        "kind": KIND,
        "vae": config_to_dict(vae.cfg),
        "image_size": int(image_size),
        "train_args": train_args or {},
        "latent_stats": latent_stats,
    }
    sd = {k: v.detach().float().cpu().contiguous() for k, v in (state_dict or vae.state_dict()).items()}
    return ckpt.save_model(path, {"vae": sd}, meta)


def read_vae_meta(path: str | Path) -> dict:
    meta = ckpt.read_meta(path)
    if meta.get("kind") != KIND:
        raise UserError(f"{path} is an inkwash model file but not an autoencoder (kind {meta.get('kind')!r}).")
    return meta


# ---------------------------------------------------------------------------- loss parts


class PerceptualDistance(nn.Module):
    """An LPIPS-like distance on inkwash's bundled Shapes feature network (our own features, NOT LPIPS):
    for every conv block, channel-unit-normalise the activations of both images, take the squared
    difference summed over channels, average over positions; sum over blocks. Frozen; [B] per image."""

    def __init__(self, path: str | None = None):
        super().__init__()
        from inkwash.eval.shapes_features import _coords, load_shapes_features

        self.net = load_shapes_features(path).net.eval().requires_grad_(False)
        self._coords = _coords

    def train(self, mode: bool = True):  # stays in eval mode (BatchNorm statistics frozen)
        return super().train(False)

    def _acts(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        acts = []
        for i, block in enumerate(self.net.blocks):
            x = block(self._coords(x) if i in self.net.cfg.coords else x)
            acts.append(x)
        return acts

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = x.new_zeros(x.shape[0])
        for a, b in zip(self._acts(x), self._acts(y)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + (a - b).pow(2).sum(1).mean((1, 2))
        return d


class PatchDiscriminator(nn.Module):
    """taming-transformers' NLayerDiscriminator (PatchGAN, pix2pix): a logit per patch, [B, 1, h, w]."""

    def __init__(self, channels: int = 32, layers: int = 2, in_channels: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                     nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]  # fmt: skip
        mods.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*mods)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (the reconstruction clamped), on the [0, 1] scale: [B]."""
    mse = ((x.float().clamp(-1, 1) - y.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


# ---------------------------------------------------------------------------- the run


class VAETrainer:
    def __init__(self, cfg: VAETrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.out = Path(cfg.output_dir)
        self.model_cfg = vae_config(cfg.model)
        if self.model_cfg.in_channels != 3 or self.model_cfg.out_channels != 3:
            raise UserError("The VAE trainer trains on RGB images: the model needs 3 input and output channels.")
        for name in ("image_size", "crop"):
            side = getattr(cfg, name)
            if side % self.model_cfg.downsample:
                raise UserError(
                    f"{name} {side} is not a multiple of the VAE's downsampling factor {self.model_cfg.downsample}."
                )
        if cfg.crop > cfg.image_size:
            raise UserError(f"crop {cfg.crop} is larger than image_size {cfg.image_size}.")
        torch.manual_seed(seed_for(cfg.seed, "vae-init"))
        self.net = VAE(self.model_cfg).to(self.device)
        if cfg.logvar_init is not None:
            # Start nearly deterministic (posterior std e^-3 = 0.05): from the default bias of ~0 (std ~1, as
            # large as the latents themselves) the encoder spends thousands of steps pushing the noise down
            # before the decoder can learn detail. The KL term is free to move it afterwards.
            z = self.model_cfg.latent_channels
            last = self.net.quant_conv if self.model_cfg.use_quant_conv else self.net.encoder.conv_out
            with torch.no_grad():
                last.bias[z:] = cfg.logvar_init
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay, eps=1e-8)  # fmt: skip
        self.ema = EMA(self.net, cfg.ema_decay) if cfg.ema_decay else None
        self.perceptual = PerceptualDistance().to(self.device) if cfg.perceptual_weight else None
        self.disc = self.disc_opt = None
        if cfg.adversarial_weight:
            self.disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(self.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.5, 0.9),
                                              weight_decay=0.0, eps=1e-8)  # fmt: skip
        self.dataset = build_dataset(cfg.dataset, cfg.image_size, cfg.seed, **cfg.dataset_args)
        self.order = DataOrder(len(self.dataset), cfg.seed)
        self.step = 0

    # -- one step

    def batch(self) -> torch.Tensor:
        b = self.cfg.batch_size
        images, _ = load_batch(self.dataset, self.order.indices(self.step * b, b))
        c, f = self.cfg.crop, self.model_cfg.downsample
        if c and c < self.cfg.image_size:  # one random crop per image, on the latent grid
            g = generator_for(self.cfg.seed, "vae-crop", self.step)
            corners = torch.randint(0, (self.cfg.image_size - c) // f + 1, (b, 2), generator=g) * f
            images = torch.stack(
                [im[:, top : top + c, left : left + c] for im, (top, left) in zip(images, corners.tolist())]
            )
        return images.to(self.device, torch.float32)

    def _diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"VAE training diverged at step {self.step + 1}: {what}; the last checkpoint in {self.out} is intact "
            "(try a lower learning rate, more warm-up or gradient clipping)."
        )

    def _adaptive_weight(self, rec: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        last = self.net.decoder.conv_out.weight
        rg = torch.autograd.grad(rec, last, retain_graph=True)[0]
        gg = torch.autograd.grad(g, last, retain_graph=True)[0]
        return (rg.norm() / (gg.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x = self.batch()
        pixels = x[0].numel()
        recon, posterior = self.net(x, generator=generator_for(cfg.seed, "vae-noise", self.step))
        l1 = (recon - x).abs().flatten(1).sum(1)  # [B]
        kl = posterior.kl()
        rec = l1
        if cfg.mse_weight:
            rec = rec + cfg.mse_weight * (recon - x).pow(2).flatten(1).sum(1)
        parts: dict[str, float] = {}
        if self.perceptual is not None:
            p = self.perceptual(recon, x)
            rec = rec + cfg.perceptual_weight * pixels * p  # a per-pixel weight, as LPIPS in taming
            parts["perceptual"] = float(p.detach().mean())
        rec_loss = rec.mean() / pixels
        loss = rec_loss + cfg.kl_weight * kl.mean() / pixels
        gan_on = self.disc is not None and self.step >= cfg.adversarial_start
        if gan_on:
            g = -self.disc(recon).mean()
            w = self._adaptive_weight(rec_loss, g) if cfg.adaptive_weight else torch.tensor(1.0)
            loss = loss + cfg.adversarial_weight * w * g
            parts.update(g_loss=float(g.detach()), d_weight=float(w))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip or float("inf"))
        if not math.isfinite(float(loss.detach())):
            raise self._diverged(f"the loss is {float(loss.detach())}")
        if not math.isfinite(float(norm)):
            raise self._diverged("the gradient norm is inf/nan")
        self.opt.step()
        if gan_on:
            for group in self.disc_opt.param_groups:
                group["lr"] = (cfg.disc_lr or cfg.lr) * lr / cfg.lr
            d = hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            self.disc_opt.zero_grad(set_to_none=True)
            d.backward()
            if not math.isfinite(float(d.detach())):
                raise self._diverged(f"the discriminator loss is {float(d.detach())}")
            self.disc_opt.step()
            parts["d_loss"] = float(d.detach())
        if self.ema is not None:
            self.ema.update(self.net)
        self.step += 1
        return {
            "loss": float(loss.detach()), "l1": float(l1.detach().mean()) / pixels, "kl": float(kl.detach().mean()),
            "psnr": float(psnr(recon.detach(), x).mean()), "grad_norm": float(norm), "lr": lr, **parts,
        }  # fmt: skip

    # -- files

    def weights(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict(self.net) if self.ema is not None else self.net.state_dict()

    @torch.no_grad()
    def latent_stats(self, vae: VAE, batch: int = 64) -> dict[str, float]:
        """Mean and std of posterior means over the first `stats_images` training images (one scalar each)."""
        n = self.cfg.stats_images
        total = total_sq = count = 0.0
        was = vae.training
        vae.eval()
        for start in range(0, n, batch):
            images, _ = load_batch(self.dataset, list(range(start, min(n, start + batch))))
            z = vae.encode(images.to(self.device, torch.float32)).mean.double()
            total += float(z.sum())
            total_sq += float(z.pow(2).sum())
            count += z.numel()
        vae.train(was)
        mean = total / count
        std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
        if not (math.isfinite(mean) and std > 0):
            raise self._diverged(f"the latent statistics are degenerate (mean {mean}, std {std})")
        return {"mean": mean, "std": std, "images": n}

    def save(self) -> Path:
        """The model file (with latent statistics measured now) and the state file."""
        check_finite_weights(self.net, self.step, self.out, "VAE training")
        self.out.mkdir(parents=True, exist_ok=True)
        vae = VAE(self.model_cfg).to(self.device)
        vae.load_state_dict(self.weights())
        stats = self.latent_stats(vae)
        vae.cfg = replace(self.model_cfg, shift_factor=stats["mean"], scaling_factor=1.0 / stats["std"])
        train_args = {**self.cfg.to_dict(), "step": self.step}
        path = save_vae(self.out / MODEL_FILE, vae, image_size=self.cfg.image_size, train_args=train_args,
                        latent_stats=stats)  # fmt: skip
        optim, optim_meta = flatten_optimizer_state(self.opt.state_dict())
        state = {"model": self.net.state_dict(), "optim": optim, "rng": {"torch": torch.get_rng_state()}}
        meta: dict[str, Any] = {"step": self.step, "optim": optim_meta, "train_args": self.cfg.to_dict(),
                                "ema_updates": self.ema.num_updates if self.ema is not None else 0}  # fmt: skip
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.disc is not None:
            state["disc"] = self.disc.state_dict()
            state["disc_optim"], meta["disc_optim"] = flatten_optimizer_state(self.disc_opt.state_dict())
        save_state(self.out / STATE_FILE, state, meta)
        return path

    def resume(self) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            raise UserError(f"Nothing to resume: {path} does not exist (train without --resume to start).")
        meta, groups = load_state(path)
        if "train_args" not in meta or "model" not in groups:
            raise UserError(f"Cannot resume from {path}: it is not a VAE training state.")
        saved, now = meta["train_args"], self.cfg.to_dict()
        defaults = VAETrainConfig().to_dict()
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != now[k])
        if changed:
            raise UserError(f"Cannot resume from {path}: these options differ from the saved run: {changed}.")
        self.net.load_state_dict(groups["model"])
        self.opt.load_state_dict(unflatten_optimizer_state(groups.get("optim", {}), meta["optim"]))
        if self.ema is not None:
            self.ema.load_state_dict(groups["ema"], meta["ema_updates"])
        if self.disc is not None:
            self.disc.load_state_dict(groups["disc"])
            self.disc_opt.load_state_dict(unflatten_optimizer_state(groups.get("disc_optim", {}), meta["disc_optim"]))
        torch.set_rng_state(groups["rng"]["torch"])
        self.step = int(meta["step"])

    def truncate_metrics(self) -> None:
        path = self.out / METRICS_FILE
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, sums: dict[str, float], n: int, seconds: float) -> dict[str, Any]:
        rec = {"step": self.step, **{k: v / n for k, v in sums.items() if k != "lr"}}
        rec["lr"] = self.opt.param_groups[0]["lr"]
        rec["images_per_s"] = n * self.cfg.batch_size / max(seconds, 1e-9)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec


def train_vae(cfg: VAETrainConfig, *, resume: bool = False, max_steps: int | None = None,
              progress: bool = True) -> Path:  # fmt: skip
    """Train per `cfg` and return the model file's path. `resume` continues the run in `cfg.output_dir`
    exactly; `max_steps` stops (with a checkpoint) after that many steps in total."""
    tr = VAETrainer(cfg)
    if resume:
        tr.resume()
    tr.truncate_metrics()
    end = min(cfg.steps, max_steps) if max_steps is not None else cfg.steps
    tr.net.train()
    sums: dict[str, float] = {}
    n, t0 = 0, time.perf_counter()
    bar = tqdm(total=end, initial=tr.step, desc="train-vae", disable=not progress, dynamic_ncols=True)
    try:
        while tr.step < end:
            for k, v in tr.train_step().items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            bar.update(1)
            if tr.step % cfg.log_every == 0 or tr.step == end:
                rec = tr.log(sums, n, time.perf_counter() - t0)
                bar.set_postfix(l1=f"{rec['l1']:.4f}", psnr=f"{rec['psnr']:.1f}", lr=f"{rec['lr']:.1e}")
                sums, n, t0 = {}, 0, time.perf_counter()
            if cfg.checkpoint_every and tr.step % cfg.checkpoint_every == 0 and tr.step < end:
                tr.save()
    finally:
        bar.close()
    return tr.save()
