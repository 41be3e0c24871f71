"""Image folders with captions: `metadata.jsonl` (`file_name`, `text`) or `.txt` sidecars next to images.

Owns discovery, caption lookup and resize + centre-crop. Items look like Shapes items with `scene` None.
Knows nothing of text encoders, networks or noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from inkwash.data.base import collate
from inkwash.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"


def _read_metadata(path: Path) -> dict[Path, str]:
    """Captions from one metadata.jsonl; `file_name` is relative to the file's folder."""
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} line {n} is not a JSON object with 'file_name' and 'text' keys.") from e
        if not isinstance(text, str):
            raise UserError(f"{path} line {n}: 'text' must be a string.")
        captions[(path.parent / name).resolve()] = text
    return captions


def load_image(path: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: RGB, shorter side resized to `size` (bicubic), centre-cropped."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"Cannot read image {path}: it is missing, unreadable or corrupt.") from e
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.array(im.crop((left, top, left + size, top + size)))


class ImageFolderDataset:
    """Images under `root` (recursive) with captions, resized + centre-cropped to `size`.

    Caption of an image: its row in a `metadata.jsonl` (any folder; names relative to that folder), else the
    text of `<stem>.txt` beside it, else "" (uncaptioned; `require_captions=True` turns that into an error).
    Items: {"image": float32 [3, size, size] in [-1, 1], "caption": str, "scene": None}.
    """

    def __init__(self, root: str | Path, size: int, require_captions: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"Image folder {self.root} does not exist or is not a folder.")
        if not isinstance(size, int) or size < 8:
            raise UserError(f"Image size must be an integer of at least 8 px, got {size}.")
        self.size = size
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not self.paths:
            raise UserError(f"No images ({', '.join(IMAGE_EXTS)}) found under {self.root}.")
        metadata: dict[Path, str] = {}
        for meta in sorted(self.root.rglob(METADATA)):
            metadata.update(_read_metadata(meta))
        self.captions = [self._caption(p, metadata) for p in self.paths]
        if require_captions:
            missing = [p for p, c in zip(self.paths, self.captions) if c is None]
            if missing:
                raise UserError(f"{len(missing)} images have no caption, for example {missing[0]}.")
        self.captions = [c or "" for c in self.captions]

    @staticmethod
    def _caption(path: Path, metadata: dict[Path, str]) -> str | None:
        key = path.resolve()
        if key in metadata:
            return metadata[key]
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            return sidecar.read_text(encoding="utf-8").strip()
        return None

    def __len__(self) -> int:
        return len(self.paths)

    def _tensor(self, index: int) -> torch.Tensor:
        arr = load_image(self.paths[index], self.size)
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Index {index} out of range for {len(self)} images.")
        return {"image": self._tensor(index), "caption": self.captions[index], "scene": None}

    def batch(self, indices) -> tuple[torch.Tensor, list[str], list[None]]:
        """-> images [B, 3, size, size] float32 in [-1, 1], captions, scenes (all None)."""
        indices = list(indices)
        images = torch.stack([self._tensor(i) for i in indices])
        return images, [self.captions[i] for i in indices], [None] * len(indices)

    collate = staticmethod(collate)
