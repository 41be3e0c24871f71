"""Shapes world: determinism, captions true of their images, coverage of the vocabulary, speed-free."""

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inkwash.data.shapes import (
    BACKGROUNDS,
    CANONICAL,
    COLOURS,
    NUMBERS,
    SHAPES,
    SYNONYMS,
    ShapesDataset,
    plural,
)
from inkwash.errors import UserError


def forms(word: str) -> list[str]:
    """A canonical word and its synonyms."""
    return [word] + SYNONYMS.get(word, [])


def mentions(text: str, word: str) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in forms(word) + [plural(f) for f in forms(word)])


def test_deterministic_in_seed_and_index():
    a, b = ShapesDataset(64, seed=3), ShapesDataset(64, seed=3)
    for i in (0, 7, 123456789, 2**40):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["scene"] == y["scene"]
    imgs, caps, scenes = a.batch([5, 0, 5])
    assert torch.equal(imgs[0], imgs[2]) and torch.equal(imgs[1], a[0]["image"]) and caps[1] == a[0]["caption"]
    other = ShapesDataset(64, seed=4)
    assert [other.scene(i)[1] for i in range(20)] != [a.scene(i)[1] for i in range(20)]
    with pytest.raises(IndexError):
        a[-1]


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_sizes_and_value_range(size):
    ds = ShapesDataset(size, seed=0)
    imgs, caps, scenes = ds.batch(range(8))
    assert imgs.shape == (8, 3, size, size) and imgs.dtype == torch.float32
    assert imgs.min() >= -1 and imgs.max() <= 1
    assert all(isinstance(c, str) and c for c in caps)
    for k, s in enumerate(scenes):
        assert s["size"] == size
        rendered = torch.from_numpy(ds.render(s)).permute(2, 0, 1).float()
        assert (rendered - (imgs[k] + 1) * 127.5).abs().max() <= 0.5 + 1e-3


@pytest.mark.parametrize("size", [16, 31, 257, 64.0])
def test_bad_size_is_user_error(size):
    with pytest.raises(UserError):
        ShapesDataset(size)


def check_caption_true(ds: ShapesDataset, caption: str, scene: dict, image: np.ndarray) -> None:
    S, objs = scene["size"], scene["objects"]
    bg = np.array(scene["background_rgb"], float)
    assert 1 <= len(objs) <= 4
    for o in objs:
        x, y = o["centre"]
        x0, y0, x1, y1 = o["bbox"]
        assert 0 <= x0 <= x < x1 <= S and 0 <= y0 <= y < y1 <= S
        assert image[y, x].tolist() == list(COLOURS[o["colour"]]), "the object colour is painted at its centre"
        assert np.linalg.norm(np.array(o["rgb"], float) - bg) >= 100, "object contrasts with the background"
        assert mentions(caption, o["colour"]) and mentions(caption, o["shape"])
    for i, a in enumerate(objs):  # painted boxes are disjoint
        for b in objs[i + 1 :]:
            ax0, ay0, ax1, ay1 = a["bbox"]
            bx0, by0, bx1, by1 = b["bbox"]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
    if "background" in caption:
        assert mentions(caption, scene["background"] + " background") or mentions(caption, scene["background"])
    kind = scene["kind"]
    if kind == "count":
        n = next(k for k, w in NUMBERS.items() if re.search(rf"\b{w}\b", caption))
        assert len(objs) == n
        assert len({(o["shape"], o["colour"]) for o in objs}) == 1
    elif kind == "relation":
        (rel,) = scene["relations"]
        a, b = objs[rel["subject"]], objs[rel["object"]]
        phrases = forms(CANONICAL["relation"][rel["relation"]])
        phrase = next(p for p in sorted(phrases, key=len, reverse=True) if f" {p} " in caption)
        left, right = caption.split(f" {phrase} ", 1)
        assert mentions(left, a["colour"]) and mentions(left, a["shape"])
        assert mentions(right, b["colour"]) and mentions(right, b["shape"])
        (ax, ay), (bx, by) = a["centre"], b["centre"]
        dx, dy = bx - ax, by - ay
        margin = 0.2 * S  # independent of the generator's own constants
        expect = {
            "left of": dx > margin and abs(dy) < dx,
            "right of": -dx > margin and abs(dy) < -dx,
            "above": dy > margin and abs(dx) < dy,
            "below": -dy > margin and abs(dx) < -dy,
        }
        assert expect[rel["relation"]], (caption, scene)
    elif kind == "single" and scene["positions"]:
        pos = scene["positions"][0]["position"]
        assert any(p in caption for p in forms(CANONICAL["position"][pos]))
        x, y = objs[0]["centre"]
        expect = {
            "left": x < S / 2 - 0.1 * S,
            "right": x > S / 2 + 0.1 * S,
            "top": y < S / 2 - 0.1 * S,
            "bottom": y > S / 2 + 0.1 * S,
            "centre": abs(x - S / 2) < 0.15 * S and abs(y - S / 2) < 0.15 * S,
        }
        assert expect[pos], (caption, scene)
    elif kind == "attribute":
        assert len({o["shape"] for o in objs}) == len(objs) == len({o["colour"] for o in objs})


@pytest.mark.parametrize("size", [32, 64])
def test_captions_true_of_images(size):
    ds = ShapesDataset(size, seed=1)
    imgs, caps, scenes = ds.batch(range(600))
    for k in range(len(caps)):
        image = np.rint((imgs[k].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        check_caption_true(ds, caps[k], scenes[k], image)
        json.dumps(scenes[k])


def test_vocabulary_coverage_and_canonical_only():
    ds = ShapesDataset(64, seed=0)
    scenes_caps = [ds.scene(i) for i in range(3000)]
    objs = [o for s, _ in scenes_caps for o in s["objects"]]
    assert {o["shape"] for o in objs} == set(SHAPES)
    assert {o["colour"] for o in objs} == set(COLOURS)
    assert {o["size"] for o in objs} == {"small", "large"}
    assert {s["background"] for s, _ in scenes_caps} == set(BACKGROUNDS)
    assert {s["kind"] for s, _ in scenes_caps} == {"single", "relation", "count", "attribute"}
    assert {len(s["objects"]) for s, _ in scenes_caps} == {1, 2, 3, 4}
    assert {p["position"] for s, _ in scenes_caps for p in s["positions"]} == set(CANONICAL["position"])
    assert {r["relation"] for s, _ in scenes_caps for r in s["relations"]} == set(CANONICAL["relation"])
    synonyms = {w for alts in SYNONYMS.values() for w in alts}
    text = " | ".join(c for _, c in scenes_caps)
    assert all(re.search(rf"\b{w}\b", text) for w in ["disc", "box", "violet", "big", "beneath"])
    canon = ShapesDataset(64, seed=0, canonical_only=True)
    canon_text = " | ".join(canon.scene(i)[1] for i in range(2000))
    for phrase in list(CANONICAL["relation"].values()) + list(CANONICAL["position"].values()):
        canon_text = canon_text.replace(phrase, "#")  # "to the left of" contains the synonym "left of"
    assert not [w for w in synonyms if re.search(rf"\b{w}\b", canon_text)]


def test_dataloader_and_len():
    ds = ShapesDataset(32, seed=0)
    assert len(ds) == 2**31
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ShapesDataset.collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == len(batch["scene"]) == 4


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    index=st.integers(0, 2**62),
    size=st.sampled_from([32, 33, 48, 97, 200, 256]),
    canonical=st.booleans(),
)
def test_any_seed_index_and_size(seed, index, size, canonical):
    ds = ShapesDataset(size, seed=seed, canonical_only=canonical)
    item, again = ds[index], ds[index]
    assert torch.equal(item["image"], again["image"]) and item["caption"] == again["caption"]
    assert item["scene"] == again["scene"] == ds.scene(index)[0]
    check_caption_true(ds, item["caption"], item["scene"], ds.render(item["scene"]))


def test_caption_variants_leave_words_out_and_keep_images():
    plain = ShapesDataset(32, seed=2)
    varied = ShapesDataset(32, seed=2, omit_colour=0.3, omit_size=0.3, say_one=0.3)
    a_img, a_caps, a_scenes = plain.batch(range(3000))
    b_img, b_caps, b_scenes = varied.batch(range(3000))
    assert torch.equal(a_img, b_img) and a_scenes == b_scenes  # images and scenes never change
    changed = [(a, b) for a, b in zip(a_caps, b_caps) if a != b]
    assert 0.3 < len(changed) / len(a_caps) < 0.6
    colour_words = [w for c in COLOURS if c not in BACKGROUNDS for w in forms(c)]
    no_colour = [b for _, b in changed if not any(re.search(rf"\b{w}\b", b) for w in colour_words)]
    assert {"a circle", "two squares"} <= {re.sub(r"^(an image|a picture|a drawing) of ", "", c) for c in b_caps}
    assert len(no_colour) > 0.15 * len(changed)
    assert any(b.startswith("one ") or " of one " in b for b in b_caps)
    for a, b in changed:  # a variant only leaves words out, or counts a single object
        assert set(b.replace("one ", "").split()) <= set(a.split()) | {"a", "an"}, (a, b)
    for k in range(len(b_caps)):  # the words that remain are still true of the image
        scene, cap = b_scenes[k], b_caps[k]
        for o in scene["objects"]:
            assert mentions(cap, o["shape"])
    assert [varied.scene(i)[1] for i in range(50)] == b_caps[:50]  # deterministic
    assert ShapesDataset(32, seed=2, omit_colour=0.0).batch(range(50))[1] == a_caps[:50]  # off = unchanged
    with pytest.raises(UserError, match="probability"):
        ShapesDataset(32, omit_colour=1.5)
