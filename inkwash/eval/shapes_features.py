"""The Shapes feature network: FID/KID features for Shapes images, as Inception's are for natural images.

A small CNN trained (scripts/train_shapes_features.py) multi-task on Shapes scenes. Its content features, the
global average of its last conv (192 channels, a 4x4 map), are trained to tell which (shape, colour) pairs are
present, how many objects of each shape, the background, and where objects of each shape, colour and size sit
on a 4x4 grid (coordinate channels, CoordConv, let positions survive the pooling). Its mid-level features, the
global average of its fourth conv (64 channels, a 16x16 map), are trained to grade Gaussian noise, blur and
JPEG compression: content features learn to ignore mild degradation, so without these FID would hardly see
noise (sigma 0.1 on the [-1, 1] scale moved FID less than two sets of 200 real renders differ).

`ShapesFeatures(images)` maps uint8 images [N, H, W, 3] of any size (trained on 32-128 px) -> float32
[N, 256]: mid-level then content features, each dimension standardised to mean 0 and standard deviation 1
on real renders. Images are resized to 64x64 with PIL bicubic and scaled to [-1, 1]; the network runs in
eval mode. `predict` reads the heads. The bundled weights are `inkwash/assets/shapes-features.safetensors`:
an inkwash model file (weights under `model.`, stored float16; the architecture config, vocabulary, training
arguments and held-out scores in its metadata).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from inkwash.data.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES
from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_model_file, strip_prefix

ASSET = Path(__file__).resolve().parent.parent / "assets" / "shapes-features.safetensors"
KIND = "shapes-features"  # the metadata "kind" of a feature-network file
GRID = 4  # position grid side
MAX_COUNT = 4  # counts per shape are 0..MAX_COUNT
# Regression head: how degraded the image is, so that FID sees noise, blur and compression and not only content.
# Targets: Gaussian noise sigma (on the [-1, 1] scale, as left at 64 px) / 0.1, blur radius (px at 64 px) / 0.5,
# (95 - JPEG quality) / 35.
QUALITY = ("noise", "blur", "jpeg")
QUALITY_SCALE = (0.1, 0.5, 35.0)
# Per-cell occupancy of the dense training head: (shape, colour) pair, shape, colour, size of centres in the cell.
DENSE = len(SHAPES) * len(COLOURS) + len(SHAPES) + len(COLOURS) + len(SIZES)


def head_sizes(n_shapes: int = len(SHAPES), n_colours: int = len(COLOURS), n_bg: int = len(BACKGROUNDS)) -> dict:
    """Output head name -> number of logits, in the order they are laid out in the last layer."""
    cells = GRID * GRID
    return {
        "presence": n_shapes * n_colours,  # sigmoid: (shape, colour) pair present
        "count": n_shapes * (MAX_COUNT + 1),  # softmax per shape over 0..MAX_COUNT objects
        "background": n_bg,  # softmax
        "grid_shape": n_shapes * cells,  # sigmoid: an object of this shape has its centre in this cell
        "grid_colour": n_colours * cells,
        "grid_size": len(SIZES) * cells,
    }


@dataclass(frozen=True)
class FeatureNetConfig:
    input_size: int = 64
    widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128, 256)  # one 3x3 conv + BatchNorm + SiLU each
    strides: tuple[int, ...] = (2, 1, 2, 1, 2, 1, 2)
    content_dim: int = 192  # width of the last, 1x1 conv: content features, read by the content heads
    mid_block: int = 3  # the conv whose global average is the mid-level features, read by the quality head
    coords: tuple[int, ...] = (0, 7)  # blocks (convs, the 1x1 last) given x, y coordinate channels besides their input
    heads: tuple[tuple[str, int], ...] = tuple(head_sizes().items())
    dense: int = DENSE  # training-only 1x1 conv on the last map: per-cell occupancy (0: none)

    @property
    def dim(self) -> int:
        """Feature dimension: mid-level then content features."""
        return self.widths[self.mid_block] + self.content_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["heads"] = [list(h) for h in self.heads]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureNetConfig:
        return cls(
            input_size=int(d["input_size"]),
            widths=tuple(int(w) for w in d["widths"]),
            strides=tuple(int(s) for s in d["strides"]),
            content_dim=int(d["content_dim"]),
            mid_block=int(d["mid_block"]),
            coords=tuple(int(i) for i in d["coords"]),
            heads=tuple((str(n), int(k)) for n, k in d["heads"]),
            dense=int(d["dense"]),
        )


def _conv(ci: int, co: int, k: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(ci, co, k, stride, k // 2, bias=False), nn.BatchNorm2d(co), nn.SiLU()]


def _coords(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] with two channels appended: x and y from -1 to 1 across the image."""
    B, _, H, W = x.shape
    u = torch.linspace(-1.0, 1.0, W, dtype=x.dtype, device=x.device).expand(B, 1, H, W)
    v = torch.linspace(-1.0, 1.0, H, dtype=x.dtype, device=x.device)[:, None].expand(B, 1, H, W)
    return torch.cat([x, u, v], 1)


class ShapesNet(nn.Module):
    """Conv trunk -> 1x1 conv to `content_dim`, whose global average feeds the content heads; the global average
    of block `mid_block` feeds the quality head. The features are both averages (mid-level first), standardised
    on real renders."""

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        n = len(cfg.widths)
        if len(cfg.strides) != n or not 0 <= cfg.mid_block < n or not all(0 <= i <= n for i in cfg.coords):
            raise ValueError(f"bad feature network config {cfg}")
        self.cfg = cfg
        blocks: list[nn.Module] = []
        ci = 3
        for i, (co, k, s) in enumerate(
            [(w, 3, s) for w, s in zip(cfg.widths, cfg.strides)] + [(cfg.content_dim, 1, 1)]
        ):
            blocks.append(nn.Sequential(*_conv(ci + 2 * (i in cfg.coords), co, k, s)))
            ci = co
        self.blocks = nn.ModuleList(blocks)
        mid = cfg.widths[cfg.mid_block]
        # Pooled activations are small where objects are small: standardise them for the heads.
        self.content_norm = nn.BatchNorm1d(cfg.content_dim)
        self.head = nn.Linear(cfg.content_dim, sum(k for _, k in cfg.heads))
        self.mid_norm = nn.BatchNorm1d(mid)
        self.quality = nn.Linear(mid, len(QUALITY))
        self.dense = nn.Conv2d(cfg.content_dim, cfg.dense, 1) if cfg.dense else None
        # The output features' standardisation, measured on real renders after training.
        self.register_buffer("feature_mean", torch.zeros(cfg.dim))
        self.register_buffer("feature_std", torch.ones(cfg.dim))

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 3, S, S] in [-1, 1] -> (mid-level map [B, mid, S/4, S/4], content map [B, content_dim, S/16, S/16])."""
        mid = x
        for i, block in enumerate(self.blocks):
            x = block(_coords(x) if i in self.cfg.coords else x)
            if i == self.cfg.mid_block:
                mid = x
        return mid, x

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, S, S] in [-1, 1] -> [B, dim]: global averages of the mid-level and content maps."""
        mid, h = self.maps(x)
        return torch.cat([mid.mean((2, 3)), h.mean((2, 3))], 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, S, S] in [-1, 1] -> [B, dim]: the pooled features, standardised with feature_mean and _std."""
        return (self.pooled(x) - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (pooled [B, dim], {content head: logits [B, k], "quality": [B, 3], "dense": [B, dense, S/16, S/16]})."""
        mid, h = self.maps(x)
        pm, pc = mid.mean((2, 3)), h.mean((2, 3))
        logits = self.head(self.content_norm(pc)).split([k for _, k in self.cfg.heads], dim=1)
        out = {name: z for (name, _), z in zip(self.cfg.heads, logits)}
        out["quality"] = self.quality(self.mid_norm(pm))
        if self.dense is not None:
            out["dense"] = self.dense(h)
        return torch.cat([pm, pc], 1), out


# ---------------------------------------------------------------------------------------------- data


def preprocess(images, size: int = 64) -> torch.Tensor:
    """uint8 [N, H, W, 3] (or a list of uint8 [H, W, 3]) -> float32 [N, 3, size, size] in [-1, 1].

    Resizing is PIL bicubic (antialiased when shrinking), a no-op for images already `size` px.
    """
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"Shapes features take uint8 images [N, H, W, 3]; got an array of shape {images.shape}.")
        items = list(images)
    else:
        items = [np.asarray(im) for im in images]
    out = np.empty((len(items), size, size, 3), np.uint8)
    for k, im in enumerate(items):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            raise UserError(f"Shapes features take uint8 images [H, W, 3]; got {im.dtype} of shape {im.shape}.")
        if im.shape[:2] != (size, size):
            im = np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
        out[k] = im
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float()
    return x.mul_(1 / 127.5).sub_(1.0).contiguous()


def scene_targets(scenes: list[dict]) -> dict[str, torch.Tensor]:
    """Training targets of the heads from Shapes scene dicts: multi-hot float for sigmoid heads, indices else."""
    shape_ix = {s: i for i, s in enumerate(SHAPES)}
    colour_ix = {c: i for i, c in enumerate(COLOURS)}
    size_ix = {z: i for i, z in enumerate(SIZES)}
    bg_ix = {b: i for i, b in enumerate(BACKGROUNDS)}
    B, nS, nC, cells = len(scenes), len(SHAPES), len(COLOURS), GRID * GRID
    presence = torch.zeros(B, nS, nC)
    count = torch.zeros(B, nS, dtype=torch.long)
    background = torch.zeros(B, dtype=torch.long)
    g_shape, g_colour, g_size = torch.zeros(B, nS, cells), torch.zeros(B, nC, cells), torch.zeros(B, len(SIZES), cells)
    g_pair = torch.zeros(B, nS, nC, cells)
    for b, sc in enumerate(scenes):
        S = sc["size"]
        background[b] = bg_ix[sc["background"]]
        for o in sc["objects"]:
            s, c, z = shape_ix[o["shape"]], colour_ix[o["colour"]], size_ix[o["size"]]
            presence[b, s, c] = 1
            count[b, s] += 1
            x, y = o["centre"]
            cell = min(GRID - 1, y * GRID // S) * GRID + min(GRID - 1, x * GRID // S)
            g_shape[b, s, cell] = g_colour[b, c, cell] = g_size[b, z, cell] = g_pair[b, s, c, cell] = 1
    return {
        "presence": presence.flatten(1),
        "count": count.clamp_(max=MAX_COUNT),
        "background": background,
        "grid_shape": g_shape.flatten(1),
        "grid_colour": g_colour.flatten(1),
        "grid_size": g_size.flatten(1),
        "dense": torch.cat([g_pair.flatten(1, 2), g_shape, g_colour, g_size], 1).unflatten(2, (GRID, GRID)),
    }


# ---------------------------------------------------------------------------------------------- loading


class ShapesFeatures:
    """Callable feature extractor: uint8 images [N, H, W, 3] -> float32 features [N, dim]."""

    name = "shapes"

    def __init__(self, net: ShapesNet, cache_key: str, meta: dict | None = None, device: str = "cpu"):
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.dim = net.cfg.dim
        self.input_size = net.cfg.input_size
        self.cache_key = cache_key
        self.meta = meta or {}

    def __repr__(self) -> str:
        return f"ShapesFeatures(dim={self.dim}, cache_key={self.cache_key!r})"

    @torch.no_grad()
    def _run(self, images, batch_size: int, heads: bool):
        n = len(images)
        feats, logits = [], []
        for i in range(0, n, batch_size) if n else [0]:  # an empty batch still gives well-shaped outputs
            x = preprocess(images[i : i + batch_size], self.input_size).to(self.device)
            pooled, z = self.net(x)
            feats.append(((pooled - self.net.feature_mean) / self.net.feature_std).float().cpu())
            if heads:
                logits.append({k: v.float().cpu() for k, v in z.items() if k != "dense"})
        f = torch.cat(feats)
        if not heads:
            return f
        return f, {k: torch.cat([z[k] for z in logits]) for k in logits[0]}

    def __call__(self, images, batch_size: int = 256) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, dim] (the pooled layer, standardised; eval mode, no grad, batched)."""
        return self._run(images, batch_size, heads=False).numpy().astype(np.float32, copy=False)

    def predict(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        """What the heads read off images: presence probabilities [N, shapes, colours], counts [N, shapes],
        background index [N], grid occupancy probabilities [N, shapes|colours|sizes, 4, 4], and the
        estimated degradation [N, 3] (see QUALITY: noise, blur, JPEG, each in units of QUALITY_SCALE)."""
        _, z = self._run(images, batch_size, heads=True)
        nS, nC, g = len(SHAPES), len(COLOURS), GRID
        N = len(images)
        return {
            "presence": torch.sigmoid(z["presence"]).reshape(N, nS, nC).numpy(),
            "count": z["count"].reshape(N, nS, MAX_COUNT + 1).argmax(-1).numpy(),
            "background": z["background"].argmax(-1).numpy(),
            "grid_shape": torch.sigmoid(z["grid_shape"]).reshape(N, nS, g, g).numpy(),
            "grid_colour": torch.sigmoid(z["grid_colour"]).reshape(N, nC, g, g).numpy(),
            "grid_size": torch.sigmoid(z["grid_size"]).reshape(N, len(SIZES), g, g).numpy(),
            "quality": z["quality"].numpy(),
        }


def file_key(path: str | Path) -> str:
    """Short sha256 of a file's bytes: the cache key of features computed with it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_shapes_features(path: str | Path | None = None, device: str = "cpu") -> ShapesFeatures:
    """The Shapes feature network from `path` (default: the bundled file); UserError if missing or corrupt."""
    path = Path(path) if path is not None else ASSET
    if not path.is_file():
        raise UserError(f"The Shapes feature network {path} is missing; reinstall inkwash or pass a path to one.")
    meta, tensors = load_model_file(path)  # UserError for unreadable or foreign files
    if meta.get("kind") != KIND or not isinstance(meta.get("arch"), dict):
        raise UserError(
            f"{path} is an inkwash model file but not a Shapes feature network (kind {meta.get('kind')!r})."
        )
    try:
        net = ShapesNet(FeatureNetConfig.from_dict(meta["arch"]))
        net.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in strip_prefix(tensors, "model").items()}
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:200]
        raise UserError(
            f"The Shapes feature network {path} is corrupt: its weights do not fit its config ({msg})."
        ) from None
    return ShapesFeatures(net, file_key(path), meta, device)
