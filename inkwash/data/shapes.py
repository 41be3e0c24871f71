"""Shapes: a procedural world of captioned images, deterministic in (seed, index), at 32-256 px.

Owns the vocabulary (canonical words and their synonyms), scene sampling, geometry of the claims a caption
makes, and rendering. Every caption is true of its image: positions and relations hold with a margin,
objects never overlap (their boxes are apart), counts are exact, object colours contrast with the
background. Knows nothing of text encoders, networks or noise.

Scene dict (JSON-able), the ground truth a judge can use:
    size: int, background: str, background_rgb: [r, g, b], kind: "single" | "relation" | "count" | "attribute",
    objects: [{shape, colour, rgb, size: "small" | "large", half_extent: px, centre: [x, y] px,
               bbox: [x0, y0, x1, y1] px, tight around the painted pixels, x1/y1 exclusive}],
    positions: [{object: i, position: "left" | "right" | "top" | "bottom" | "centre"}]  (claimed by caption),
    relations: [{subject: i, relation: "left of" | "right of" | "above" | "below", object: j}]  (claimed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from inkwash.data.base import collate
from inkwash.errors import UserError

MIN_SIZE, MAX_SIZE = 32, 256

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
COLOURS = {  # object colours, far apart in RGB
    "red": (220, 20, 30),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (250, 220, 20),
    "purple": (130, 40, 170),
    "orange": (250, 130, 0),
    "pink": (255, 120, 200),
    "cyan": (0, 220, 230),
    "white": (255, 255, 255),
    "brown": (120, 70, 20),
    "black": (0, 0, 0),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "beige": (245, 235, 210)}
MIN_CONTRAST = 120.0  # least RGB distance between an object colour and its background
SIZES = {"small": (0.09, 0.12), "large": (0.18, 0.22)}  # half-extent as a fraction of the image side
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three", 4: "four"}

# Geometry of claims, in units of the image side.
EDGE_BAND = 0.35  # "left" means the centre lies in the leftmost 35% (and within CROSS_BAND of the middle row)
CROSS_BAND = 0.2
CENTRE_BAND = 0.1
REL_MIN_OFFSET = 0.25  # "A left of B": B.x - A.x >= 0.25 S and |dy| <= REL_MAX_SLOPE * dx
REL_MAX_SLOPE = 0.5
GAP = 0.03  # least gap between object boxes

CANONICAL = {  # the words a caption uses when `canonical_only`
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "background": list(BACKGROUNDS),
    "size": list(SIZES),
    "position": {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "centre": "in the centre",
    },
    "relation": {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"},
    "number": list(NUMBERS.values()),
}
SYNONYMS = {  # canonical word or phrase -> alternatives, held apart so an evaluation can hold them out
    "circle": ["disc"],
    "square": ["box"],
    "diamond": ["rhombus"],
    "cross": ["plus sign"],
    "purple": ["violet"],
    "gray": ["grey"],
    "large": ["big"],
    "small": ["little"],
    "on the left": ["on the left side"],
    "on the right": ["on the right side"],
    "at the top": ["near the top"],
    "at the bottom": ["near the bottom"],
    "in the centre": ["in the center", "in the middle"],
    "to the left of": ["left of"],
    "to the right of": ["right of"],
    "above": ["over"],
    "below": ["under", "beneath"],
}
SYNONYM_RATE = 0.3
KIND_WEIGHTS = {"single": 0.3, "relation": 0.3, "count": 0.2, "attribute": 0.2}
PREFIXES = ("", "", "", "", "", "an image of ", "a picture of ", "a drawing of ")


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def contrasting(bg: str) -> list[str]:
    """Object colours far enough from background `bg`."""
    b = np.array(BACKGROUNDS[bg], float)
    return [c for c, rgb in COLOURS.items() if np.linalg.norm(np.array(rgb, float) - b) >= MIN_CONTRAST]


_CONTRASTING = {bg: contrasting(bg) for bg in BACKGROUNDS}


# ---------------------------------------------------------------------------------------------- masks


def _polygon(shape: str, c: float, R: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(c, c - R), (c + R, c + 0.75 * R), (c - R, c + 0.75 * R)]
    if shape == "diamond":
        return [(c, c - R), (c + 0.75 * R, c), (c, c + R), (c - 0.75 * R, c)]
    if shape == "hexagon":
        a = np.arange(6) * np.pi / 3
        return list(zip(c + R * np.cos(a), c + R * np.sin(a)))
    if shape == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, R, 0.45 * R)
        return list(zip(c + rad * np.cos(a), c + rad * np.sin(a)))
    return None


@lru_cache(maxsize=1024)
def shape_mask(shape: str, r: int, supersample: int = 4) -> np.ndarray:
    """Antialiased coverage [2r+1, 2r+1, 1] float32 in [0, 1] of `shape` with half-extent r, centred."""
    n, ss = 2 * r + 1, supersample
    img = Image.new("L", (n * ss, n * ss), 0)
    draw = ImageDraw.Draw(img)
    c, R = (r + 0.5) * ss, (r + 0.5) * ss - 0.5
    poly = _polygon(shape, c, R)
    if poly is not None:
        draw.polygon(poly, fill=255)
    elif shape == "circle":
        draw.ellipse([c - R, c - R, c + R, c + R], fill=255)
    elif shape == "square":
        h = 0.85 * R
        draw.rectangle([c - h, c - h, c + h, c + h], fill=255)
    elif shape == "cross":
        w, h = 0.3 * R, 0.95 * R
        draw.rectangle([c - w, c - h, c + w, c + h], fill=255)
        draw.rectangle([c - h, c - w, c + h, c + w], fill=255)
    else:
        raise UserError(f"Unknown shape {shape!r}; valid shapes are {', '.join(SHAPES)}.")
    m = np.asarray(img.resize((n, n), Image.BOX), dtype=np.float32) / 255.0
    m.setflags(write=False)
    return m[:, :, None]


@lru_cache(maxsize=1024)
def _tight(shape: str, r: int) -> tuple[int, int, int, int]:
    """Painted extent of the mask as offsets from the centre: (dx0, dy0, dx1, dy1), end exclusive."""
    m = shape_mask(shape, r)[:, :, 0] > 0
    ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    return int(xs[0]) - r, int(ys[0]) - r, int(xs[-1]) + 1 - r, int(ys[-1]) + 1 - r


# ---------------------------------------------------------------------------------------------- geometry


def position_holds(pos: str, x: float, y: float, S: int) -> bool:
    """Whether a centre (x, y) in an S-px image is `pos` ("left", ..., "centre")."""
    u, v = x / (S - 1), y / (S - 1)
    if pos == "left":
        return u <= EDGE_BAND and abs(v - 0.5) <= CROSS_BAND
    if pos == "right":
        return u >= 1 - EDGE_BAND and abs(v - 0.5) <= CROSS_BAND
    if pos == "top":
        return v <= EDGE_BAND and abs(u - 0.5) <= CROSS_BAND
    if pos == "bottom":
        return v >= 1 - EDGE_BAND and abs(u - 0.5) <= CROSS_BAND
    if pos == "centre":
        return abs(u - 0.5) <= CENTRE_BAND and abs(v - 0.5) <= CENTRE_BAND
    raise ValueError(pos)


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], S: int) -> bool:
    """Whether centre a is `rel` ("left of", "right of", "above", "below") centre b, with the margin."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # image y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along >= REL_MIN_OFFSET * S and abs(across) <= REL_MAX_SLOPE * along


def boxes_apart(a: dict, b: dict, S: int) -> bool:
    g = max(1, round(GAP * S))
    (ax, ay), (bx, by) = a["centre"], b["centre"]
    reach = a["half_extent"] + b["half_extent"] + 1 + g
    return abs(ax - bx) >= reach or abs(ay - by) >= reach


# ---------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class CaptionVariants:
    """Optional caption variants, each drawn per caption with its probability; images never change.

    omit_colour: the object colour words are left out ("a circle", "two squares", "a star above a cross");
    omit_size: the size words are left out; say_one: a one-object caption counts ("one red circle").
    The background phrase, synonyms and prefixes are kept. Off (all 0) by default.
    """

    omit_colour: float = 0.0
    omit_size: float = 0.0
    say_one: float = 0.0

    def __post_init__(self):
        for name in ("omit_colour", "omit_size", "say_one"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise UserError(f"Shapes caption option {name} must be a probability in [0, 1], got {value!r}.")

    @property
    def active(self) -> bool:
        return bool(self.omit_colour or self.omit_size or self.say_one)


class _SceneSampler:
    """Draws one scene and its caption from a seeded `random.Random`.

    `drop` names the caption words left out ("colour", "size", and "one" for counting a single object);
    the scene and every random draw are the same with or without them, so the image does not change.
    """

    def __init__(self, S: int, rng: random.Random, canonical_only: bool, drop: frozenset[str] = frozenset()):
        self.S, self.rng, self.canonical_only, self.drop = S, rng, canonical_only, drop

    def word(self, canonical: str) -> str:
        alts = SYNONYMS.get(canonical)
        if self.canonical_only or not alts or self.rng.random() >= SYNONYM_RATE:
            return canonical
        return self.rng.choice(alts)

    def new_object(self, shape: str, colour: str, size: str) -> dict:
        lo, hi = SIZES[size]
        r = max(3, round(self.rng.uniform(lo, hi) * self.S))
        return {"shape": shape, "colour": colour, "rgb": list(COLOURS[colour]), "size": size, "half_extent": r}

    def place(self, objs: list[dict], ok=lambda objs: True, tries: int = 200) -> bool:
        """Uniform non-overlapping centres satisfying `ok`; False if none found in `tries`."""
        S, rand = self.S, self.rng.random
        for _ in range(tries):
            for o in objs:
                r = o["half_extent"]
                span = S - 2 * r  # centres r .. S-1-r
                o["centre"] = [r + int(rand() * span), r + int(rand() * span)]
            if ok(objs) and all(boxes_apart(a, b, S) for i, a in enumerate(objs) for b in objs[i + 1 :]):
                return True
        return False

    def describe(self, o: dict, with_size: bool, one: bool = False) -> str:
        size = [self.word(o["size"])] if with_size else []
        colour = [self.word(o["colour"])]  # drawn even when dropped: the random stream stays the same
        words = self.keep(size, "size") + self.keep(colour, "colour") + [self.word(o["shape"])]
        return f"{'one' if one else article(words[0])} {' '.join(words)}"

    def keep(self, words: list[str], what: str) -> list[str]:
        return [] if what in self.drop else words

    def single(self, colours: list[str]) -> tuple | None:
        """ "a large red circle", "a green triangle on the left"."""
        rng = self.rng
        o = self.new_object(rng.choice(SHAPES), rng.choice(colours), rng.choice(list(SIZES)))
        pos = rng.choice(POSITIONS) if rng.random() < 0.5 else None
        if not self.place([o], lambda os: pos is None or position_holds(pos, *os[0]["centre"], self.S)):
            return None
        text = self.describe(o, rng.random() < 0.6, one="one" in self.drop)
        if pos is None:
            return [o], text, [], []
        return [o], f"{text} {self.word(CANONICAL['position'][pos])}", [{"object": 0, "position": pos}], []

    def relation(self, colours: list[str]) -> tuple | None:
        """ "a red circle above a blue square": two distinguishable objects and one relation."""
        rng = self.rng
        a = self.new_object(rng.choice(SHAPES), rng.choice(colours), rng.choice(list(SIZES)))
        b = a
        while (a["shape"], a["colour"]) == (b["shape"], b["colour"]):
            b = self.new_object(rng.choice(SHAPES), rng.choice(colours), rng.choice(list(SIZES)))
        rel = rng.choice(RELATIONS)

        def holds(os: list[dict]) -> bool:
            return relation_holds(rel, os[0]["centre"], os[1]["centre"], self.S)

        if not self.place([a, b], holds):
            for o in (a, b):  # two large objects may not fit; two small ones do
                o.update(self.new_object(o["shape"], o["colour"], "small"))
            if not self.place([a, b], holds):
                return None
        sized = rng.random() < 0.3
        text = f"{self.describe(a, sized)} {self.word(CANONICAL['relation'][rel])} {self.describe(b, sized)}"
        return [a, b], text, [], [{"subject": 0, "relation": rel, "object": 1}]

    def count(self, colours: list[str]) -> tuple | None:
        """ "three red circles": exactly n identical objects and nothing else."""
        rng = self.rng
        n = rng.choice(list(NUMBERS))
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        size = rng.choice(list(SIZES)) if n == 2 else "small"
        objs = [self.new_object(shape, colour, size) for _ in range(n)]
        if not self.place(objs):
            return None
        words = [NUMBERS[n]] + self.keep([self.word(size)] if rng.random() < 0.4 else [], "size")
        words += self.keep([self.word(colour)], "colour")
        return objs, " ".join(words + [plural(self.word(shape))]), [], []

    def attribute(self, colours: list[str]) -> tuple | None:
        """ "a red circle and a blue square": distinct shapes with distinct colours (binding)."""
        rng = self.rng
        n = 2 if rng.random() < 0.7 else 3
        shapes, cols = rng.sample(SHAPES, n), rng.sample(colours, n)
        sizes = ["large" if n == 2 and rng.random() < 0.3 else "small" for _ in range(n)]
        objs = [self.new_object(s, c, z) for s, c, z in zip(shapes, cols, sizes)]
        if not self.place(objs):
            return None
        parts = [self.describe(o, False) for o in objs]
        text = " and ".join(parts) if n == 2 else f"{parts[0]}, {parts[1]} and {parts[2]}"
        return objs, text, [], []

    def sample(self) -> tuple[dict, str]:
        rng = self.rng
        bg = rng.choice(list(BACKGROUNDS))
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        drawn = None
        while drawn is None:  # None only when placement failed; draw the scene afresh
            drawn = getattr(self, kind)(_CONTRASTING[bg])
        objs, text, positions, relations = drawn
        for o in objs:
            x, y, r = *o["centre"], o["half_extent"]
            dx0, dy0, dx1, dy1 = _tight(o["shape"], r)
            o["bbox"] = [x + dx0, y + dy0, x + dx1, y + dy1]
        if rng.random() < 0.3:
            text += ("," if positions else "") + f" on {article(bg)} {self.word(bg)} background"
        text = rng.choice(PREFIXES) + text
        scene = {
            "size": self.S,
            "background": bg,
            "background_rgb": list(BACKGROUNDS[bg]),
            "kind": kind,
            "objects": objs,
            "positions": positions,
            "relations": relations,
        }
        return scene, text


def sample_scene(
    size: int, seed: int, index: int, canonical_only: bool = False, variants: CaptionVariants | None = None
) -> tuple[dict, str]:
    """The (scene, caption) at `index` of the world with `seed`; pure function of its arguments.

    With `variants` the caption may leave words out (see CaptionVariants); the scene is the same either way:
    which words to drop is drawn from a second generator, seeded apart from the scene's."""
    rng = random.Random(f"inkwash-shapes:{seed}:{index}")  # str seeds hash with sha512: stable across runs
    drop = frozenset()
    if variants is not None and variants.active:
        vr = random.Random(f"inkwash-shapes-variants:{seed}:{index}")
        probs = {"colour": variants.omit_colour, "size": variants.omit_size, "one": variants.say_one}
        drop = frozenset(what for what, p in probs.items() if vr.random() < p)
    return _SceneSampler(size, rng, canonical_only, drop).sample()


@lru_cache(maxsize=1024)
def _stamp(shape: str, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(1 - coverage, coverage), each [1, n, n]: painting is `region = region * keep + coverage * rgb`."""
    m = shape_mask(shape, r)[None, :, :, 0]
    return 1.0 - m, np.ascontiguousarray(m)


_RGB = {c: np.asarray(rgb, np.float32)[:, None, None] for c, rgb in COLOURS.items()}


def paint(canvas: np.ndarray, scene: dict) -> None:
    """Paint `scene` into `canvas` [3, S, S] float32 in 0..255 (overwritten)."""
    canvas[:] = np.asarray(BACKGROUNDS[scene["background"]], np.float32)[:, None, None]
    for o in scene["objects"]:
        x, y, r = *o["centre"], o["half_extent"]
        keep, cover = _stamp(o["shape"], r)
        region = canvas[:, y - r : y + r + 1, x - r : x + r + 1]
        region *= keep
        region += cover * _RGB[o["colour"]]  # exactly the object colour where coverage is 1


# ---------------------------------------------------------------------------------------------- dataset


class ShapesDataset:
    """Unbounded map-style dataset of captioned Shapes images; item i is a pure function of (seed, i).

    `len()` is 2**31 so that DataLoader's sequential sampler works; any index >= 0 is valid. Items are
    already independent random scenes, so iterate in order: do NOT use `shuffle=True` (a permutation of
    2**31 indices does not fit in memory); a RandomSampler with `replacement=True` is fine. Items are
    {"image": float32 [3, H, W] in [-1, 1], "caption": str, "scene": dict}; use `collate` with a
    DataLoader (scenes differ in length), or `batch(indices)`, the fast path.
    """

    LENGTH = 2**31

    def __init__(
        self,
        size: int = 64,
        seed: int = 0,
        canonical_only: bool = False,
        omit_colour: float = 0.0,
        omit_size: float = 0.0,
        say_one: float = 0.0,
    ):
        if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
            raise UserError(f"Shapes image size must be an integer from {MIN_SIZE} to {MAX_SIZE} px, got {size}.")
        self.size, self.seed, self.canonical_only = size, int(seed), canonical_only
        self.variants = CaptionVariants(omit_colour, omit_size, say_one)

    def __len__(self) -> int:
        return self.LENGTH

    def scene(self, index: int) -> tuple[dict, str]:
        """(scene, caption) at `index`, without rendering."""
        index = int(index)
        if index < 0:
            raise IndexError(f"Shapes indices are >= 0, got {index}.")
        return sample_scene(self.size, self.seed, index, self.canonical_only, self.variants)

    def __getitem__(self, index: int) -> dict:
        images, captions, scenes = self.batch([index])
        return {"image": images[0], "caption": captions[0], "scene": scenes[0]}

    def batch(self, indices) -> tuple[torch.Tensor, list[str], list[dict]]:
        """-> images [B, 3, H, W] float32 in [-1, 1], captions, scenes."""
        indices = list(indices)
        S = self.size
        canvas = np.empty((len(indices), 3, S, S), np.float32)
        captions, scenes = [], []
        for k, i in enumerate(indices):
            scene, caption = self.scene(i)
            paint(canvas[k], scene)
            captions.append(caption)
            scenes.append(scene)
        canvas *= 1 / 127.5
        canvas -= 1.0
        return torch.from_numpy(canvas), captions, scenes

    def render(self, scene: dict) -> np.ndarray:
        """uint8 [H, W, 3] image of a scene dict (as found in items)."""
        S = int(scene["size"])
        canvas = np.empty((3, S, S), np.float32)
        paint(canvas, scene)
        return np.rint(canvas).astype(np.uint8).transpose(1, 2, 0).copy()

    collate = staticmethod(collate)
