"""inkwash.data: datasets of captioned images (built-in Shapes, image folders). No networks, no noise."""

from __future__ import annotations

from pathlib import Path

from inkwash.data.folders import ImageFolderDataset
from inkwash.data.shapes import ShapesDataset
from inkwash.errors import UserError


def build_dataset(spec: str, size: int, seed: int = 0) -> ShapesDataset | ImageFolderDataset:
    """ "shapes" (or "shapes:canonical", canonical words only) -> ShapesDataset; a folder -> ImageFolderDataset."""
    if spec in ("shapes", "shapes:canonical"):
        return ShapesDataset(size=size, seed=seed, canonical_only=spec.endswith(":canonical"))
    if Path(spec).is_dir():
        return ImageFolderDataset(spec, size)
    raise UserError(f"Unknown dataset {spec!r}: use 'shapes', 'shapes:canonical' or the path of an image folder.")


__all__ = ["ImageFolderDataset", "ShapesDataset", "build_dataset"]
