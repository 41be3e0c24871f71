"""Train the bundled Shapes feature network (inkwash/eval/shapes_features.py) and write its asset file.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/train_shapes_features.py [--steps 2400] [--out PATH]
(about 11 minutes on one CPU thread; deterministic given --seed on one CPU thread).

Data: fresh Shapes renders of seed 271828 (12345 is reserved for FID reference sets, 0 trains the diffusion
models), sizes mixed 32/64/128 px, each resized to 64 px as at feature time, then degraded at random: slight
blur, JPEG at quality 60-95, Gaussian noise, mostly mild (sigma <= 0.03 on the [-1, 1] scale) but sometimes
up to 0.5. Content heads on the last conv's global average: (shape, colour) presence, count per shape,
background, 4x4 position grids per shape / colour / size; a training-only dense head on the last 4x4 map
(per-cell occupancy) teaches local shape and colour quickly. Content heads skip the images noisier than
mild. The quality head on the fourth conv's global average grades the noise, blur and JPEG of every image.
AdamW, warmup then cosine decay. After training, the output features are standardised on real renders (seed
271830); held-out scenes (seed 271829) are scored on the float16 weights that are written, clean and
degraded, and the FID of 200 renders to 200 others under growing noise is printed.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from inkwash.data.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapesDataset
from inkwash.data.shapes import SIZES as SIZE_NAMES
from inkwash.eval.shapes_features import (
    ASSET,
    KIND,
    MAX_COUNT,
    QUALITY,
    QUALITY_SCALE,
    FeatureNetConfig,
    ShapesNet,
    file_key,
    preprocess,
    scene_targets,
)
from inkwash.formats.checkpoint import save_model

SIZES = (32, 64, 128)
SIGMOID_HEADS = ("presence", "grid_shape", "grid_colour", "grid_size")
_nS, _nC = len(SHAPES), len(COLOURS)
DENSE_GROUPS = {  # channels of the dense head's target (see scene_targets)
    "pair": slice(0, _nS * _nC),
    "shape": slice(_nS * _nC, _nS * _nC + _nS),
    "colour": slice(_nS * _nC + _nS, _nS * _nC + _nS + _nC),
    "size": slice(_nS * _nC + _nS + _nC, None),
}
MILD_NOISE = 0.03  # the most Gaussian noise (sigma on the [-1, 1] scale) content heads are trained to ignore
# Shape is the slow feature to learn: colour and background are easy and, weighted alike, starve it.
LOSS_WEIGHTS = {
    "quality": 1.0,
    "presence": 1.0,
    "count": 1.0,
    "background": 1.0,
    "grid_shape": 0.5,
    "grid_colour": 0.5,
    "grid_size": 0.5,
    "dense_pair": 0.5,
    "dense_shape": 5.0,
    "dense_colour": 0.5,
    "dense_size": 0.5,
}


# ---------------------------------------------------------------------------------------------- data


def augment(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """Degrade at the image's own resolution; -> (image, quality targets: QUALITY in units of QUALITY_SCALE).

    Blur (p 0.3, radius 0.2-0.7 px at 64 px), Gaussian noise (p 0.45: two in three mild, sigma uniform up to
    MILD_NOISE on the [-1, 1] scale; one in three strong, up to 0.5, for the quality head to grade: content heads
    skip those images), JPEG q 60-95 (p 0.4).
    """
    S = img.shape[0]
    blur = sigma = 0.0
    quality = 95
    if rng.random() < 0.3:
        blur = rng.uniform(0.2, 0.7)
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur * S / 64)))
    if rng.random() < 0.45:
        u = rng.random()
        sigma = MILD_NOISE * u * 1.5 if u < 2 / 3 else MILD_NOISE + (0.5 - MILD_NOISE) * (3 * u - 2) ** 2
        img = np.clip(np.rint(img + rng.normal(0.0, sigma * 127.5, img.shape)), 0, 255).astype(np.uint8)
    if rng.random() < 0.4:
        quality = int(rng.integers(60, 96))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        img = np.asarray(Image.open(buf).convert("RGB"))
    seen = sigma * min(1.0, 64 / S)  # the noise left once resized to 64 px (shrinking averages it away)
    return img, [v / k for v, k in zip((seen, blur, 95 - quality), QUALITY_SCALE)]


def render(seed: int, indices: list[int], sizes: list[int]) -> tuple[list[np.ndarray], list[dict]]:
    """uint8 [S, S, 3] images and scenes of `indices`, each at its own size."""
    images: list[np.ndarray | None] = [None] * len(indices)
    scenes: list[dict | None] = [None] * len(indices)
    for S in sorted(set(sizes)):
        ks = [k for k, s in enumerate(sizes) if s == S]
        x, _, sc = ShapesDataset(S, seed=seed).batch([indices[k] for k in ks])
        u8 = torch.round((x + 1) * 127.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j, k in enumerate(ks):
            images[k], scenes[k] = u8[j], sc[j]
    return images, scenes


def make_batch(seed, indices, sizes, rng: np.random.Generator | None, input_size: int):
    """(x [B, 3, 64, 64], targets): scene targets, "quality" [B, 3] and "mild" [B] (noise at most MILD_NOISE)."""
    images, scenes = render(seed, indices, sizes)
    quality = [[0.0] * len(QUALITY)] * len(images)
    if rng is not None:
        images, quality = zip(*[augment(im, rng) for im in images])
    t = scene_targets(scenes)
    t["quality"] = torch.tensor(quality, dtype=torch.float32)
    t["mild"] = torch.tensor([q[0] * QUALITY_SCALE[0] <= MILD_NOISE + 1e-9 for q in quality], dtype=torch.float32)
    return preprocess(list(images), input_size), t


# ---------------------------------------------------------------------------------------------- loss, metrics


def losses(logits: dict, t: dict) -> dict[str, torch.Tensor]:
    """Weighted per-image sums over each head's outputs (count: over the shapes' softmaxes), batch-averaged.

    Content heads learn from mildly degraded images only (noise sigma <= MILD_NOISE); the quality head from all.
    """
    bce = partial(F.binary_cross_entropy_with_logits, reduction="none")
    B = t["background"].shape[0]
    per_image = {
        "presence": bce(logits["presence"], t["presence"]).sum(1),
        "count": F.cross_entropy(logits["count"].reshape(-1, MAX_COUNT + 1), t["count"].reshape(-1), reduction="none")
        .reshape(B, -1)
        .sum(1),
        "background": F.cross_entropy(logits["background"], t["background"], reduction="none"),
        "grid_shape": bce(logits["grid_shape"], t["grid_shape"]).sum(1),
        "grid_colour": bce(logits["grid_colour"], t["grid_colour"]).sum(1),
        "grid_size": bce(logits["grid_size"], t["grid_size"]).sum(1),
    }
    if "dense" in logits:
        for name, sl in DENSE_GROUPS.items():
            per_image[f"dense_{name}"] = bce(logits["dense"][:, sl], t["dense"][:, sl]).sum((1, 2, 3))
    out = {k: (v * t["mild"]).sum() * (LOSS_WEIGHTS[k] / B) for k, v in per_image.items()}
    out["quality"] = F.mse_loss(logits["quality"], t["quality"], reduction="sum") * (LOSS_WEIGHTS["quality"] / B)
    return out


def f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    tp = (pred & true).sum().item()
    return 2 * tp / max(1, pred.sum().item() + true.sum().item())


@torch.no_grad()
def evaluate(net: ShapesNet, batches) -> dict[str, float]:
    """Content metrics on the mildly degraded images; the quality head's noise error on all of them."""
    was_training = net.training
    net.eval()
    zs, ts = [], []
    for x, t in batches:
        zs.append(net(x)[1])
        ts.append(t)
    z = {k: torch.cat([b[k] for b in zs]) for k in zs[0] if k != "dense"}
    t = {k: torch.cat([b[k] for b in ts]) for k in ts[0] if k != "dense"}
    mild = t["mild"] > 0
    noise_err = (z["quality"][:, 0] - t["quality"][:, 0]).abs() * QUALITY_SCALE[0]
    z, t = {k: v[mild] for k, v in z.items()}, {k: v[mild] for k, v in t.items()}
    N = t["background"].shape[0]
    pres_p, pres_t = z["presence"] > 0, t["presence"] > 0.5
    count_p = z["count"].reshape(N, len(SHAPES), MAX_COUNT + 1).argmax(-1)
    m = {
        "presence_f1": f1(pres_p, pres_t),
        "presence_exact": (pres_p == pres_t).all(1).float().mean().item(),
        "count_acc": (count_p == t["count"]).float().mean().item(),
        "count_exact": (count_p == t["count"]).all(1).float().mean().item(),
        "background_acc": (z["background"].argmax(1) == t["background"]).float().mean().item(),
    }
    for h in ("grid_shape", "grid_colour", "grid_size"):
        m[f"{h}_f1"] = f1(z[h] > 0, t[h] > 0.5)
    m["noise_sigma_mae"] = noise_err.mean().item()
    net.train(was_training)
    return m


def heldout(seed: int, n: int, input_size: int, augmented: bool, batch: int = 128):
    """n held-out images, a third at each size, clean or augmented (fixed augmentation draws)."""
    rng = np.random.default_rng(seed) if augmented else None
    sizes = [SIZES[i % len(SIZES)] for i in range(n)]
    return [
        make_batch(seed, list(range(i, min(n, i + batch))), sizes[i : i + batch], rng, input_size)
        for i in range(0, n, batch)
    ]


def half_round_trip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as it reads back from the float16 file."""
    return {k: v.detach().to(torch.float16).float() if v.is_floating_point() else v for k, v in sd.items()}


@torch.no_grad()
def set_feature_stats(net: ShapesNet, seed: int, n: int, input_size: int) -> None:
    """Standardise the output features on `n` clean real renders (a third each at 32, 64, 128 px): each
    dimension gets mean 0 and standard deviation 1 on them (a floor of 5% of the median spread for
    near-constant dimensions)."""
    pooled = torch.cat([net.pooled(x) for x, _ in heldout(seed, n, input_size, augmented=False)])
    std = pooled.std(0)
    net.feature_mean.copy_(pooled.mean(0))
    net.feature_std.copy_(std.clamp_min(0.05 * std.median()))


@torch.no_grad()
def noise_fids(net: ShapesNet, input_size: int, n: int = 200) -> dict[str, float]:
    """FID of n renders (seed 777) to n others (seed 778) under Gaussian noise (sigma on the [-1, 1] scale)."""
    from inkwash.eval.fid import feature_stats, frechet_distance, to_uint8_hwc

    net.eval()

    def feats(images: torch.Tensor) -> np.ndarray:
        x = preprocess(to_uint8_hwc(images), input_size)
        return ((net.pooled(x) - net.feature_mean) / net.feature_std).double().numpy()

    ref = feature_stats(feats(ShapesDataset(64, seed=777).batch(range(n))[0]))
    base = ShapesDataset(64, seed=778).batch(range(n))[0]
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(base.shape).astype(np.float32))
    return {
        f"sigma {s}": round(frechet_distance(*ref, *feature_stats(feats((base + s * noise).clamp(-1, 1)))), 2)
        for s in (0.0, 0.05, 0.1, 0.2, 0.4)
    }


def fmt(m: dict) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in m.items())


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=271828, help="training scenes' Shapes seed (never 12345)")
    p.add_argument("--heldout-seed", type=int, default=271829)
    p.add_argument("--heldout", type=int, default=768, help="held-out images (a third each at 32, 64, 128 px)")
    p.add_argument("--stats-seed", type=int, default=271830, help="real renders that standardise the features")
    p.add_argument("--stats", type=int, default=1536, help="how many (a third each at 32, 64, 128 px)")
    p.add_argument("--eval-every", type=int, default=600)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ASSET)
    a = p.parse_args()
    if 12345 in (a.seed, a.heldout_seed):
        raise SystemExit("Shapes seed 12345 is reserved for FID reference sets; train on another.")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(a.seed)
    cfg = FeatureNetConfig()
    net = ShapesNet(cfg)
    with torch.no_grad():  # sigmoid heads start at a ~2% prior, so the first steps are not all negatives
        start = 0
        for name, k in cfg.heads:
            if name in SIGMOID_HEADS:
                net.head.bias[start : start + k] = -4.0
            start += k
        if net.dense is not None:
            net.dense.bias.fill_(-4.0)
    net = net.to(memory_format=torch.channels_last).train()
    decay = [q for n, q in net.named_parameters() if q.ndim > 1]
    no_decay = [q for n, q in net.named_parameters() if q.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=a.lr
    )

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        return a.lr * 0.5 * (1 + math.cos(math.pi * (step - a.warmup) / max(1, a.steps - a.warmup)))

    n_params = sum(q.numel() for q in net.parameters())
    print(f"ShapesNet: {n_params / 1e3:.0f}k parameters, {a.steps} steps of batch {a.batch}, threads {a.threads}")
    val = heldout(a.heldout_seed, a.heldout, cfg.input_size, augmented=False)
    t0 = time.time()
    run: dict[str, float] = {}
    for step in range(a.steps):
        indices = list(range(step * a.batch, (step + 1) * a.batch))
        sizes = [int(s) for s in rng.choice(SIZES, size=a.batch)]
        x, t = make_batch(a.seed, indices, sizes, rng, cfg.input_size)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        _, z = net(x.contiguous(memory_format=torch.channels_last))
        parts = losses(z, t)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in parts.items():
            run[k] = run.get(k, 0.0) + v.item()
        if (step + 1) % a.log_every == 0:
            n = a.log_every
            msg = "  ".join(f"{k} {v / n:.3f}" for k, v in run.items())
            total = sum(run.values()) / n
            print(f"step {step + 1:5d}  {time.time() - t0:4.0f}s  lr {lr_at(step):.1e}  loss {total:.3f}  {msg}")
            run = {}
        if (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
            print(f"  held-out  {fmt(evaluate(net, val))}", flush=True)
    train_s = time.time() - t0

    # What is written is float16; standardise and score exactly that.
    final = ShapesNet(cfg)
    final.load_state_dict(half_round_trip(net.state_dict()))
    final.eval()
    set_feature_stats(final, a.stats_seed, a.stats, cfg.input_size)
    sd = half_round_trip(final.state_dict())
    final.load_state_dict(sd)
    clean = evaluate(final, val)
    aug = evaluate(final, heldout(a.heldout_seed, a.heldout, cfg.input_size, augmented=True))
    fids = noise_fids(final, cfg.input_size)
    final.eval()
    meta = {
        "kind": KIND,
        "arch": cfg.to_dict(),
        "vocab": {
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "backgrounds": list(BACKGROUNDS),
            "sizes": list(SIZE_NAMES),
        },
        "train_args": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "sizes": SIZES},
        "heldout": {
            "clean": {k: round(v, 4) for k, v in clean.items()},
            "augmented": {k: round(v, 4) for k, v in aug.items()},
            "fid_noise": fids,
        },
    }
    save_model(a.out, {"model": {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()}}, meta)
    print(f"trained {a.steps} steps in {train_s:.0f}s")
    print(f"held-out clean      {fmt(clean)}")
    print(f"held-out augmented  {fmt(aug)}")
    print(f"FID of 200 renders (seed 777) to 200 others (seed 778) + noise sigma: {fmt(fids)}")
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB, sha256 {file_key(a.out)})")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
