"""What every dataset item looks like: {"image": [3, H, W] float32 in [-1, 1], "caption": str, "scene": dict | None}."""

from __future__ import annotations

import torch


def collate(items: list[dict]) -> dict:
    """DataLoader collate_fn: stacks images, keeps captions and scenes as lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "scene": [it["scene"] for it in items],
    }
