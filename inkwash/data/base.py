"""What every dataset item looks like: {"image": [3, H, W] float32 in [-1, 1], "caption": str, "scene": dict | None}."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8_hwc(images) -> np.ndarray:
    """The inverse of the item format: float images [B, 3, H, W] in [-1, 1] (tensor or array) -> uint8
    [B, H, W, 3], clipped and rounded."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def collate(items: list[dict]) -> dict:
    """DataLoader collate_fn: stacks images, keeps captions and scenes as lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "scene": [it["scene"] for it in items],
    }
