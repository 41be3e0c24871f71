"""Image folders: metadata.jsonl and .txt captions, resize + centre-crop, clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from inkwash.data import ImageFolderDataset, ShapesDataset, build_dataset
from inkwash.errors import UserError


def save(path, w, h, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    save(tmp_path / "a.png", 40, 20)
    save(tmp_path / "b.jpg", 16, 48, (0, 0, 255))
    save(tmp_path / "sub" / "c.png", 32, 32, (0, 255, 0))
    save(tmp_path / "sub" / "d.png", 32, 32)
    rows = [{"file_name": "a.png", "text": "a red box"}, {"file_name": "b.jpg", "text": "a blue thing"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "sub" / "c.txt").write_text("a green square\n")
    return tmp_path


def test_captions_from_metadata_and_sidecars(folder):
    ds = ImageFolderDataset(folder, 16)
    caps = dict(zip([p.name for p in ds.paths], ds.captions))
    assert caps == {"a.png": "a red box", "b.jpg": "a blue thing", "c.png": "a green square", "d.png": ""}
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32 and item["scene"] is None
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    imgs, captions, scenes = ds.batch(range(len(ds)))
    assert imgs.shape == (4, 3, 16, 16) and captions == ds.captions and scenes == [None] * 4
    torch.testing.assert_close(imgs[0][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    with pytest.raises(UserError, match="no caption"):
        ImageFolderDataset(folder, 16, require_captions=True)


def test_resize_shorter_side_then_centre_crop(tmp_path):
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255  # white middle third
    Image.fromarray(arr).save(tmp_path / "wide.png")
    img = ImageFolderDataset(tmp_path, 10)[0]["image"]
    assert img.shape == (3, 10, 10)
    assert img[:, :, 2:8].min() > 0.9, "the centre crop keeps the white middle"


def test_corrupt_and_empty_folders(tmp_path, folder):
    (folder / "broken.png").write_bytes(b"not a png at all")
    ds = ImageFolderDataset(folder, 16)
    broken = [p.name for p in ds.paths].index("broken.png")
    with pytest.raises(UserError, match="broken.png"):
        ds[broken]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="No images"):
        ImageFolderDataset(empty, 16)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(UserError, match="metadata.jsonl line 1"):
        ImageFolderDataset(folder, 16)


def test_build_dataset(folder):
    assert isinstance(build_dataset("shapes", 32, seed=1), ShapesDataset)
    assert build_dataset("shapes:canonical", 32).canonical_only
    assert isinstance(build_dataset(str(folder), 16, 0), ImageFolderDataset)
    with pytest.raises(UserError, match="Unknown dataset"):
        build_dataset("/no/such/folder", 32, 0)
