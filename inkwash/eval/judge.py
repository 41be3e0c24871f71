"""The Shapes judge: reads a scene (background; each object's shape, colour, size and centre) from an image.

Classical vision finds the objects and a small trained network names their shapes:

1. background = the median colour of the image's border, named by the nearest of the world's backgrounds;
2. foreground = pixels at least FG_DISTANCE (RGB) from the background; objects = its 4-connected components,
   less specks smaller than a fraction of the smallest object the world draws at this size; a component
   whose pixels near its main colour form separate runs (cores) is split between them (`_split`);
3. colour = the median of each object's core, named by the nearest palette colour;
4. coverage = each pixel's projection onto the (colour - background) axis, 0..1; blur and JPEG move coverage
   around but keep its sum, so the area, and from it the size class, survive degradation;
5. shape = `ShapeNet` on a 24x24 crop of the coverage map around the object (other objects masked out);
6. size and centre from the coverage's area and centroid, corrected by the shape's own geometry.

Knows the Shapes world (inkwash.data.shapes) and nothing of models or prompts. `degrade` makes the mild
degradations the judge is validated under (noise sigma 0.05, blur, JPEG 75).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from inkwash.data.base import to_uint8_hwc
from inkwash.data.shapes import BACKGROUNDS, COLOURS, MIN_CONTRAST, SHAPES, SIZES, shape_mask
from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_model_file

ASSET = Path(__file__).resolve().parent.parent / "assets" / "shapes-judge.safetensors"
CROP = 24  # side of the shape network's input
FG_DISTANCE = 0.45 * MIN_CONTRAST  # a pixel this far from the background belongs to an object
RING = 1 / 40  # coverage counts within this fraction of the side around a blob (blur spreads edges)
MIN_SPECK = 0.35  # components below this fraction of the smallest object's area are noise
MIN_CORE = 0.2  # a core (run of pixels near one palette colour) of this fraction of the smallest object
CORE_DISTANCE = 65.0  # RGB distance from a palette colour within which a pixel belongs to a core
SIZE_SPLIT = (SIZES["small"][1] + SIZES["large"][0]) / 2  # half-extent / side between "small" and "large"
_PALETTE = np.array(list(COLOURS.values()), np.float32)
_BGS = np.array(list(BACKGROUNDS.values()), np.float32)
DEGRADATIONS = ("clean", "noise", "blur", "jpeg")


@dataclass
class ReadObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    centre: tuple[float, float]  # px, x right and y down, the shape's own centre as the renderer places it
    half_extent: float  # px
    area: float  # px, summed coverage
    confidence: float  # the shape network's probability for `shape`
    colour_error: float  # RGB distance from the measured colour to the named palette colour


@dataclass
class Reading:
    size: int  # image side in px (the larger side if not square)
    background: str
    objects: list[ReadObject] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- network


class ShapeNet(nn.Module):
    """[N, 1, 24, 24] coverage crops -> [N, len(SHAPES)] logits."""

    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
            )  # fmt: skip

        w = width
        self.features = nn.Sequential(
            block(1, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(4 * w * 9, len(SHAPES))
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@lru_cache(maxsize=4)
def load_shape_net(path: str | None = None) -> ShapeNet:
    """The bundled (or given) trained shape network, in eval mode."""
    p = Path(path) if path else ASSET
    if not p.exists():
        raise UserError(f"the judge's shape network {p} is missing; train it with scripts/train_judge.py")
    meta, tensors = load_model_file(p)
    net = ShapeNet(int(meta.get("width", 16)))
    net.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()})
    return net.eval()


# ---------------------------------------------------------------------------------------------- geometry


@cache
def _shape_geometry(shape: str) -> tuple[float, float, float]:
    """(area per (r + 0.5)^2, centroid offset x and y per (r + 0.5)) of the rendered shape."""
    r = 24
    m = shape_mask(shape, r)[:, :, 0].astype(np.float64)
    ys, xs = np.mgrid[: m.shape[0], : m.shape[1]]
    a = m.sum()
    return a / (r + 0.5) ** 2, ((m * xs).sum() / a - r) / (r + 0.5), ((m * ys).sum() / a - r) / (r + 0.5)


@cache
def min_object_pixels(side: int) -> float:
    """Pixel count (coverage >= 0.5) of the smallest object the world draws in a `side`-px image."""
    r = max(3, round(SIZES["small"][0] * side))
    return float(min((shape_mask(s, r)[:, :, 0] >= 0.5).sum() for s in SHAPES))


# ---------------------------------------------------------------------------------------------- segmentation


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of a bool mask [N, H, W]: 0 for background, else a per-image id.

    Every pixel starts with its own index + 1 and repeatedly takes the largest id among its neighbours,
    then jumps to the id its id's pixel holds (pointer jumping), so labels settle in few passes."""
    n, h, w = mask.shape
    m = mask.to(torch.int32)
    ids = torch.arange(1, h * w + 1, dtype=torch.int32).view(1, h, w) * m
    while True:
        nb = ids.clone()
        torch.maximum(nb[:, 1:], ids[:, :-1], out=nb[:, 1:])
        torch.maximum(nb[:, :-1], ids[:, 1:], out=nb[:, :-1])
        torch.maximum(nb[:, :, 1:], ids[:, :, :-1], out=nb[:, :, 1:])
        torch.maximum(nb[:, :, :-1], ids[:, :, 1:], out=nb[:, :, :-1])
        nb *= m
        flat = nb.view(n, -1)
        jumped = torch.gather(flat, 1, (flat - 1).clamp_(min=0).long()).view(n, h, w)
        nb = torch.maximum(jumped, nb).mul_(m)
        if torch.equal(nb, ids):
            return ids
        ids = nb


def _nearest(table: np.ndarray, rgb: np.ndarray) -> tuple[int, float]:
    d = np.linalg.norm(table - rgb, axis=1)
    i = int(d.argmin())
    return i, float(d[i])


@dataclass
class _Blob:
    """One segmented object before its shape is named."""

    pixels: np.ndarray  # flat indices into the image
    rgb: np.ndarray  # measured colour
    coverage: np.ndarray  # [H, W] coverage of this object alone
    crop: np.ndarray  # [CROP, CROP]


def _segment(img: np.ndarray, labels: np.ndarray, bg: np.ndarray) -> tuple[str, np.ndarray, list[_Blob]]:
    """Background name, and the objects' blobs, of one uint8 [H, W, 3] image with background colour `bg`."""
    h, w, _ = img.shape
    x = img.reshape(-1, 3).astype(np.float32)
    bg_name = list(BACKGROUNDS)[_nearest(_BGS, bg)[0]]
    flat = labels.ravel()
    ids, counts = np.unique(flat[flat > 0], return_counts=True)
    smallest = min_object_pixels(max(h, w))
    parts = []
    for i in ids[counts >= MIN_SPECK * smallest]:
        parts += _split(np.nonzero(flat == i)[0], x, bg, w, max(2.0, MIN_CORE * smallest))
    owner = np.zeros(h * w, np.int64)
    for k, (pix, _) in enumerate(parts, 1):
        owner[pix] = k
    ring = max(1, round(max(h, w) * RING))
    blobs = []
    for k, (pix, core) in enumerate(parts, 1):
        rgb = np.median(x[core], axis=0)
        axis = rgb - bg
        cov = np.clip((x - bg) @ axis / max(float(axis @ axis), 1.0), 0, 1)
        cov *= _near(owner == k, h, w, ring)  # the blob and a ring around it: edges count, far noise does not
        cov[(owner != 0) & (owner != k)] = 0  # other objects are not this one
        cov = cov.reshape(h, w)
        blobs.append(_Blob(pix, rgb, cov, _crop(cov, pix, w)))
    return bg_name, bg, blobs


def _split(pix: np.ndarray, x: np.ndarray, bg: np.ndarray, w: int, min_core: float) -> list[tuple]:
    """One component -> [(pixels, core pixels)] per object in it.

    A core is a connected run of pixels close to the component's main palette colour (that of its pixels
    farthest from the background). Blends (antialiased edges, blur, JPEG's chroma bleeding into the gap between two
    objects of one colour) are far from it, so objects that touch after degradation keep separate cores; the
    other pixels go to the nearest core. Objects of different colours that touch stay one blob: cores of
    other colours would also be found in the blends of one object with the background (dim yellow is brown)."""
    rgb = x[pix]
    db = np.linalg.norm(rgb - bg, axis=1)
    far = db >= db.min() + 0.6 * (db.max() - db.min())  # the pixels farthest from the background
    main = _nearest(_PALETTE, np.median(rgb[far], axis=0))[0]
    sel = np.linalg.norm(rgb - _PALETTE[main], axis=1) <= CORE_DISTANCE
    if not sel.any():  # an off-palette object: one blob, coloured by its farthest pixels
        return [(pix, pix[far])]
    ys, xs = pix // w, pix % w
    y0, x0 = ys.min(), xs.min()
    m = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), bool)
    m[ys[sel] - y0, xs[sel] - x0] = True
    lab = label_components(torch.from_numpy(m)[None])[0].numpy()[ys - y0, xs - x0]
    cores = [np.nonzero(lab == v)[0] for v in np.unique(lab[lab > 0]) if (lab == v).sum() >= min_core]
    if len(cores) <= 1:
        return [(pix, pix[cores[0] if cores else sel])]
    yx = np.stack([ys, xs], 1).astype(np.float32)
    gap = np.stack([np.min(np.linalg.norm(yx[:, None] - yx[None, c], axis=2), axis=1) for c in cores], 1)
    owner = gap.argmin(1)
    return [(pix[owner == j], pix[c]) for j, c in enumerate(cores)]


def _near(mask: np.ndarray, h: int, w: int, ring: int) -> np.ndarray:
    """Flat float mask of the pixels within `ring` px (Chebyshev) of a flat bool mask."""
    t = torch.from_numpy(mask.reshape(1, 1, h, w).astype(np.float32))
    return F.max_pool2d(t, 2 * ring + 1, stride=1, padding=ring).numpy().ravel()


def _crop(cov: np.ndarray, pix: np.ndarray, w: int) -> np.ndarray:
    """A CROP x CROP resampling of the square around a blob's pixels, with a margin."""
    ys, xs = pix // w, pix % w
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    half = 0.62 * (max(xs.max() - xs.min(), ys.max() - ys.min()) + 1) + 1
    x0, y0 = int(np.floor(cx - half)), int(np.floor(cy - half))
    side = int(np.ceil(2 * half)) + 1
    pad = np.zeros((side, side), np.float32)
    h, wi = cov.shape
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, wi), min(y0 + side, h)
    pad[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = cov[sy0:sy1, sx0:sx1]
    t = torch.from_numpy(pad)[None, None]
    return F.interpolate(t, size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def _as_uint8(images) -> np.ndarray:
    """uint8 [N, H, W, 3] from uint8 arrays, PIL images, or float tensors [N, 3, H, W] in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return to_uint8_hwc(images)
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    arr = np.stack([np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images])
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise UserError(f"the judge reads uint8 RGB images [N, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return arr


def segment(images) -> list[tuple[str, np.ndarray, list[_Blob]]]:
    """Per image: background name, background colour, and its objects' blobs."""
    arr = _as_uint8(images)
    if min(arr.shape[1:3]) < 16:
        raise UserError(f"the judge needs images of at least 16 px, got {arr.shape[2]}x{arr.shape[1]}")
    x = torch.from_numpy(arr).float()
    out = []
    for start in range(0, len(arr), 256):
        chunk = x[start : start + 256]
        border = torch.cat([chunk[:, :2].flatten(1, 2), chunk[:, -2:].flatten(1, 2), chunk[:, :, :2].flatten(1, 2),
                            chunk[:, :, -2:].flatten(1, 2)], 1)  # fmt: skip
        bg = border.median(dim=1).values[:, None, None]
        labels = label_components((chunk - bg).norm(dim=-1) >= FG_DISTANCE).numpy()
        bgs = bg[:, 0, 0].numpy()
        out += [_segment(arr[start + k], labels[k], bgs[k]) for k in range(len(chunk))]
    return out


# ---------------------------------------------------------------------------------------------- the judge


class Judge:
    """`Judge()(images) -> list[Reading]`; images as uint8 [N, H, W, 3], PIL images or tensors in [-1, 1]."""

    def __init__(self, net: ShapeNet | None = None):
        self.net = net if net is not None else load_shape_net()

    @torch.no_grad()
    def __call__(self, images) -> list[Reading]:
        arr = _as_uint8(images)
        segs = segment(arr)
        crops = [b.crop for _, _, blobs in segs for b in blobs]
        probs = np.zeros((0, len(SHAPES)), np.float32)
        if crops:
            probs = torch.softmax(self.net(torch.from_numpy(np.stack(crops))[:, None]), -1).numpy()
        readings, k = [], 0
        for bg_name, _, blobs in segs:
            reading = Reading(max(arr.shape[1:3]), bg_name)
            for b in blobs:
                reading.objects.append(_describe(b, probs[k]))
                k += 1
            readings.append(reading)
        return readings


def _describe(b: _Blob, p: np.ndarray) -> ReadObject:
    h, w = b.coverage.shape
    side = max(h, w)
    si = int(p.argmax())
    shape = SHAPES[si]
    ci, cerr = _nearest(_PALETTE, b.rgb)
    area = float(b.coverage.sum())
    unit, ox, oy = _shape_geometry(shape)
    rr = float(np.sqrt(area / unit))  # r + 0.5
    ys, xs = np.mgrid[:h, :w]
    cx, cy = (b.coverage * xs).sum() / area, (b.coverage * ys).sum() / area
    half = rr - 0.5
    return ReadObject(
        shape=shape, colour=list(COLOURS)[ci], size="large" if half >= SIZE_SPLIT * side else "small",
        centre=(float(cx - ox * rr), float(cy - oy * rr)), half_extent=half, area=area,
        confidence=float(p[si]), colour_error=cerr,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- validation


def degrade(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A mild degradation of a uint8 [H, W, 3] image: "noise" (Gaussian, sigma 0.05 of full scale),
    "blur" (Gaussian, radius side/64 px: 0.5 px at 32 px), "jpeg" (quality 75), or "clean"."""
    if kind == "clean":
        return img
    if kind == "noise":
        return np.clip(img + rng.normal(0, 0.05 * 255, img.shape), 0, 255).round().astype(np.uint8)
    pil = Image.fromarray(img)
    if kind == "blur":
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(max(img.shape[:2]) / 64)))
    if kind == "jpeg":
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=75)
        return np.asarray(Image.open(buf).convert("RGB"))
    raise ValueError(f"unknown degradation {kind!r}; use one of {', '.join(DEGRADATIONS)}")


def scene_matches(scene: dict, reading: Reading, tolerance: float = 0.05) -> bool:
    """Whether `reading` is the exact scene: background, and a one-to-one match of objects with equal shape,
    colour and size class and centres within `tolerance` of the image side."""
    if reading.background != scene["background"] or len(reading.objects) != len(scene["objects"]):
        return False
    tol = tolerance * scene["size"]
    free = list(reading.objects)
    for o in scene["objects"]:
        cands = [r for r in free if (r.shape, r.colour, r.size) == (o["shape"], o["colour"], o["size"])]
        if not cands:
            return False
        best = min(cands, key=lambda r: np.hypot(r.centre[0] - o["centre"][0], r.centre[1] - o["centre"][1]))
        if np.hypot(best.centre[0] - o["centre"][0], best.centre[1] - o["centre"][1]) > tol:
            return False
        free.remove(best)
    return True
