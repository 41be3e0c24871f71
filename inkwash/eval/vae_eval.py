"""How good an autoencoder is on Shapes: `evaluate_vae(path_or_vae, images=N) -> dict`.

On N held-out Shapes scenes (a Shapes seed distinct from the training one): reconstruction PSNR (on the
[0, 1] scale, reconstructions from the posterior mean, clamped to [-1, 1]; mean, 5th percentile, minimum),
the ShapesEval judge's exact-scene accuracy (`judge.scene_matches`) on the originals and on the
reconstructions and their ratio, and encode / decode milliseconds per image on this machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from inkwash.errors import UserError

HELD_OUT_OFFSET = 1_000_003  # default held-out Shapes seed = training seed + this


@torch.no_grad()
def evaluate_vae(
    model, images: int = 500, size: int | None = None, seed: int | None = None, batch_size: int = 50
) -> dict:
    """`model`: a VAE file path or a VAE module. Returns a JSON-able dict (see the module docstring)."""
    from inkwash.data.shapes import ShapesDataset
    from inkwash.eval.judge import Judge, scene_matches
    from inkwash.models.vae import VAE
    from inkwash.train.vae_trainer import load_vae, read_vae_meta

    meta: dict = {}
    if isinstance(model, VAE):
        vae, name = model.eval(), "module"
    else:
        path = Path(model)
        vae, name = load_vae(path), str(path)
        meta = read_vae_meta(path)
    train_args = meta.get("train_args") or {}
    train_seed = int(train_args.get("seed", 0))
    size = size if size is not None else int(meta.get("image_size", 64))
    seed = seed if seed is not None else train_seed + HELD_OUT_OFFSET
    if not (isinstance(images, int) and images > 0):
        raise UserError(f"--images must be a positive number of scenes, got {images}.")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise UserError(f"--batch-size must be a positive integer, got {batch_size}.")
    if train_args.get("dataset", "shapes").startswith("shapes") and seed == train_seed:
        raise UserError(f"The held-out seed {seed} is the VAE's training seed; pick another with --seed.")
    f = vae.cfg.downsample
    if size % f:
        raise UserError(f"--size {size} is not a multiple of the VAE's downsampling factor {f}.")
    ds = ShapesDataset(size=size, seed=seed)  # UserError for sizes Shapes cannot render
    judge = Judge()
    device = next(vae.parameters()).device
    psnrs, ok_orig, ok_rec = [], 0, 0
    enc_s = dec_s = 0.0
    for start in range(0, images, batch_size):
        x, _, scenes = ds.batch(range(start, min(images, start + batch_size)))
        x = x.to(device)
        t = time.perf_counter()
        z = vae.encode(x).mode()
        enc_s += time.perf_counter() - t
        t = time.perf_counter()
        y = vae.decode(z).float().clamp(-1, 1)
        dec_s += time.perf_counter() - t
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
        psnrs.append((10 * torch.log10(1.0 / mse)).cpu())
        ok_orig += sum(scene_matches(s, r) for s, r in zip(scenes, judge(x.cpu())))
        ok_rec += sum(scene_matches(s, r) for s, r in zip(scenes, judge(y.cpu())))
    p = torch.cat(psnrs).double().numpy()
    acc_o, acc_r = ok_orig / images, ok_rec / images
    return {
        "model": name,
        "images": images,
        "size": size,
        "seed": seed,
        "downsample": f,
        "latent_channels": vae.cfg.latent_channels,
        "psnr_mean": float(p.mean()),
        "psnr_p5": float(np.percentile(p, 5)),
        "psnr_min": float(p.min()),
        "judge_accuracy_originals": acc_o,
        "judge_accuracy_reconstructions": acc_r,
        "judge_ratio": acc_r / acc_o if acc_o else None,
        "encode_ms_per_image": 1000 * enc_s / images,
        "decode_ms_per_image": 1000 * dec_s / images,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def format_result(r: dict) -> str:
    ratio = "n/a" if r["judge_ratio"] is None else f"{100 * r['judge_ratio']:.1f}%"
    return "\n".join([
        f"{r['model']}: f = {r['downsample']}, {r['latent_channels']} latent channels, "
        f"{r['images']} held-out Shapes scenes at {r['size']} px (seed {r['seed']})",
        f"PSNR           {r['psnr_mean']:.2f} dB mean, {r['psnr_p5']:.2f} dB 5th percentile, "
        f"{r['psnr_min']:.2f} dB min",
        f"judge accuracy {100 * r['judge_accuracy_originals']:.1f}% originals, "
        f"{100 * r['judge_accuracy_reconstructions']:.1f}% reconstructions ({ratio} of the originals')",
        f"speed          encode {r['encode_ms_per_image']:.2f} ms/image, "
        f"decode {r['decode_ms_per_image']:.2f} ms/image "
        f"(batch {r['batch_size']}, {r['threads']} threads, {r['device']})",
    ])  # fmt: skip
