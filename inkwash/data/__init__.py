"""inkwash.data: datasets of captioned images (built-in Shapes, image folders). No networks, no noise."""

from __future__ import annotations

from pathlib import Path

from inkwash.data.folders import ImageFolderDataset
from inkwash.data.shapes import ShapesDataset
from inkwash.errors import UserError


def build_dataset(spec: str, size: int, seed: int = 0, **options) -> ShapesDataset | ImageFolderDataset:
    """ "shapes" (or "shapes:canonical", canonical words only) -> ShapesDataset; a folder -> ImageFolderDataset.

    `options` go to the data set: for Shapes the caption variants `omit_colour`, `omit_size`, `say_one`
    (probabilities per caption; see shapes.CaptionVariants). Image folders take none."""
    if spec in ("shapes", "shapes:canonical"):
        allowed = ("omit_colour", "omit_size", "say_one")
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise UserError(f"Unknown Shapes option(s) {unknown}; valid: {', '.join(allowed)}.")
        return ShapesDataset(size=size, seed=seed, canonical_only=spec.endswith(":canonical"), **options)
    if Path(spec).is_dir():
        if options:
            raise UserError(f"Image folder data sets take no options, got {sorted(options)}.")
        return ImageFolderDataset(spec, size)
    raise UserError(f"Unknown dataset {spec!r}: use 'shapes', 'shapes:canonical' or the path of an image folder.")


__all__ = ["ImageFolderDataset", "ShapesDataset", "build_dataset"]
