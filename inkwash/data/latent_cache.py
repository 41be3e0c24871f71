"""A latent cache: a data set encoded once by an autoencoder, read memory-mapped while training.

A cache folder holds `moments.npy` ([N, 2C, h, w] float32: the posterior's mean and log-variance, so training
still draws a fresh latent sample each time), `captions.json`, and `meta.json`, written last, which names the
autoencoder by its file hash. A cache made with another autoencoder, or left half-written, is refused with a
sentence saying how to rebuild it. Knows no networks: `inkwash.train.latents` writes caches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

FORMAT = 1


class LatentCache:
    """Item i: (moments [2C, h, w], caption). `batch(indices)` -> (moments [B, 2C, h, w], captions, None)."""

    def __init__(self, folder: str | Path, vae_sha256: str | None = None, image_size: int | None = None):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{self.folder} is not a finished latent cache (no meta.json); build it with "
                            "`inkwash cache-latents`")  # fmt: skip
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise UserError(
                f"latent cache {self.folder} has format {self.meta.get('format')}, not {FORMAT}; rebuild it"
            )
        if vae_sha256 is not None and self.meta["vae_sha256"] != vae_sha256:
            raise UserError(f"latent cache {self.folder} was made with another autoencoder (file hash "
                            f"{self.meta['vae_sha256']}, this one is {vae_sha256}); rebuild it with "
                            "`inkwash cache-latents`")  # fmt: skip
        if image_size is not None and self.meta["image_size"] != image_size:
            raise UserError(f"latent cache {self.folder} holds {self.meta['image_size']} px images, not "
                            f"{image_size} px; rebuild it or set image_size to {self.meta['image_size']}")  # fmt: skip
        self.moments = np.load(self.folder / "moments.npy", mmap_mode="r")
        self.captions = json.loads((self.folder / "captions.json").read_text())
        if len(self.captions) != len(self.moments) or len(self.moments) != self.meta["items"]:
            raise UserError(
                f"latent cache {self.folder} is inconsistent (items, moments and captions differ); rebuild it"
            )

    def __len__(self) -> int:
        return len(self.moments)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(np.array(self.moments[i])), "caption": self.captions[i], "scene": None}

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, list[str], None]:
        order = np.argsort(indices)  # memory-mapped reads in file order, handed back in the asked order
        rows = np.asarray(indices)[order]
        data = np.empty((len(indices), *self.moments.shape[1:]), dtype=np.float32)
        data[order] = self.moments[rows]
        return torch.from_numpy(data), [self.captions[i] for i in indices], None
