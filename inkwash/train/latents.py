"""Writing latent caches: encode a data set once with an autoencoder (see `inkwash.data.latent_cache`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from inkwash.data.latent_cache import FORMAT, LatentCache
from inkwash.errors import UserError
from inkwash.formats.checkpoint import file_sha256
from inkwash.pipeline import load_vae


@torch.no_grad()
def build_latent_cache(
    vae_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dataset: str = "shapes",
    image_size: int = 64,
    items: int = 10_000,
    seed: int = 0,
    dataset_args: dict | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> LatentCache:
    """Encode items 0..items-1 of the data set (as the trainer builds it from `seed`) and write the cache."""
    from inkwash.train.trainer import build_dataset, load_batch

    vae = load_vae(vae_path).to(device)
    f = vae.cfg.downsample
    if image_size % f:
        raise UserError(f"image size {image_size} is not a multiple of the autoencoder's factor {f}")
    ds = build_dataset(dataset, image_size, seed, **(dataset_args or {}))
    items = min(items, len(ds))
    if items <= 0:
        raise UserError("a latent cache needs at least one item")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shape = (items, 2 * vae.cfg.latent_channels, image_size // f, image_size // f)
    moments = np.lib.format.open_memmap(out / "moments.npy", mode="w+", dtype=np.float32, shape=shape)
    captions: list[str] = []
    for start in tqdm(range(0, items, batch_size), desc="encoding", disable=not progress, unit="batch"):
        idx = list(range(start, min(items, start + batch_size)))
        images, caps = load_batch(ds, idx)
        moments[start : start + len(idx)] = vae.moments(images.to(device)).float().cpu().numpy()
        captions += caps
    moments.flush()
    (out / "captions.json").write_text(json.dumps(captions))
    meta = {
        "format": FORMAT, "vae_sha256": file_sha256(vae_path), "vae_path": str(vae_path), "dataset": dataset,
        "dataset_args": dataset_args or {}, "seed": seed, "image_size": image_size, "items": items,
        "moments_shape": list(shape),
    }  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=2))  # last: marks the cache finished
    return LatentCache(out)
