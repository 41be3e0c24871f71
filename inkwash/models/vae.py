"""The KL autoencoder of latent diffusion (Rombach et al. 2022), in Stable Diffusion's layout.

Encoder: conv -> per level ResBlocks (+ a stride-2 conv, right/bottom padded, on all but the last level) ->
mid (ResBlock, single-head self-attention, ResBlock) -> GroupNorm-SiLU-conv to 2 x latent channels -> 1x1
`quant_conv` -> a diagonal Gaussian posterior (mean, log-variance). Decoder: 1x1 `post_quant_conv` -> conv ->
mid -> per level (deepest first) layers + 1 ResBlocks (+ nearest x2 and a conv) -> GroupNorm-SiLU-conv.
The downsampling factor is 2 ** (levels - 1): f = 8 for SD's four levels, f = 4 for three.

Diffusion runs on `to_latent(z) = (z - shift) * scale`; scale and shift live in the config (computed from
data by the trainer, published ones in the presets), never as magic numbers elsewhere. Tiled encode and
decode bound the memory of large images; tiles overlap and are blended linearly, either with full tiles and
symmetric ramps (`tiling="ramps"`) or exactly as diffusers' `AutoencoderKL.enable_tiling()` does
(`tiling="diffusers"`: same images as a diffusers user gets, to float precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .layers import Downsample, ResBlock, Upsample, attention

Tensor = torch.Tensor


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 512, 512)  # per level; f = 2 ** (len - 1)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention: bool = True
    use_quant_conv: bool = True  # SD 1/2/XL: yes; SD3 and FLUX: no
    scaling_factor: float = 1.0  # latent = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0

    def __post_init__(self):
        self.channels = tuple(self.channels)  # JSON gives a list

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)); log-variance clamped to [-30, 20] as in SD."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32).to(self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: [B]."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class MidAttention(nn.Module):
    """GroupNorm then single-head self-attention over all positions, with a residual (SD's VAE mid block)."""

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.out = nn.Linear(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(h).view(B, H * W, 3, 1, C).permute(2, 0, 3, 1, 4)  # each [B, 1, HW, C]
        h = self.out(attention(q, k, v))  # [B, HW, C]
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Mid(nn.Module):
    def __init__(self, ch: int, cfg: VAEConfig):
        super().__init__()
        norm = {"groups": cfg.norm_groups, "eps": cfg.norm_eps}
        self.res1 = ResBlock(ch, ch, 0, **norm)
        self.attn = MidAttention(ch, cfg.norm_groups, cfg.norm_eps) if cfg.mid_attention else nn.Identity()
        self.res2 = ResBlock(ch, ch, 0, **norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class Level(nn.Module):
    """ResBlocks then an optional resampler (down in the encoder, up in the decoder)."""

    def __init__(self, res: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        norm = {"groups": cfg.norm_groups, "eps": cfg.norm_eps}
        chs = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        levels, ch = [], chs[0]
        for i, out in enumerate(chs):
            res = [ResBlock(ch if j == 0 else out, out, 0, **norm) for j in range(cfg.layers_per_block)]
            levels.append(Level(res, Downsample(out, asymmetric=True) if i < len(chs) - 1 else None))
            ch = out
        self.down = nn.ModuleList(levels)
        self.mid = Mid(ch, cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        norm = {"groups": cfg.norm_groups, "eps": cfg.norm_eps}
        chs = list(reversed(cfg.channels))
        ch = chs[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = Mid(ch, cfg)
        levels = []
        for i, out in enumerate(chs):  # deepest level first
            res = [ResBlock(ch if j == 0 else out, out, 0, **norm) for j in range(cfg.layers_per_block + 1)]
            levels.append(Level(res, Upsample(out) if i < len(chs) - 1 else None))
            ch = out
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] <-> latents [B, C, H/f, W/f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z2, z = 2 * cfg.latent_channels, cfg.latent_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if cfg.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg.use_quant_conv else nn.Identity()

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction from a posterior sample, and the posterior (for the KL term)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    # --- the latent space diffusion sees -----------------------------------------------------------

    def to_latent(self, z: Tensor) -> Tensor:
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def from_latent(self, latent: Tensor) -> Tensor:
        return latent / self.cfg.scaling_factor + self.cfg.shift_factor

    def encode_latent(self, x: Tensor, generator: torch.Generator | None = None, tile: int | None = None,
                      tiling: str = "ramps") -> Tensor:  # fmt: skip
        """Images -> diffusion latents (a posterior sample with a generator, else its mean). `tile`: image tile side
        for tiled encoding, `tiling` its layout ("ramps" or "diffusers")."""
        moments = _tiler(tiling)(self.moments, x, tile, self.cfg.downsample) if tile else self.moments(x)
        posterior = DiagonalGaussian(moments)
        return self.to_latent(posterior.sample(generator) if generator is not None else posterior.mode())

    def decode_latent(self, latent: Tensor, tile: int | None = None, tiling: str = "ramps") -> Tensor:
        """Diffusion latents -> images in [-1, 1] (not clamped). `tile`: latent tile side for tiled decoding,
        `tiling` its layout ("ramps" or "diffusers")."""
        z = self.from_latent(latent)
        return _tiler(tiling)(self.decode, z, tile, 1 / self.cfg.downsample) if tile else self.decode(z)

    def moments(self, x: Tensor) -> Tensor:
        """The posterior's [mean, log-variance] stacked on channels: [B, 2C, h, w] (what a latent cache keeps)."""
        return self.quant_conv(self.encoder(x))


def _ramp(n: int, overlap: int, start: bool, end: bool) -> Tensor:
    """1-D blending weights for a tile of length n: linear ramps over the overlaps shared with neighbours."""
    w = torch.ones(n)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if start:
            w[:overlap] = ramp
        if end:
            w[-overlap:] = ramp.flip(0)
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def tiled(fn, x: Tensor, tile: int, scale: float, overlap_fraction: float = 0.25) -> Tensor:
    """Apply a convolutional `fn` (output side = input side / scale) on overlapping `tile`-sized tiles of x and
    blend the outputs with linear ramps; memory is bounded by one tile."""
    H, W = x.shape[-2:]
    unit = max(1, round(scale))  # encoding: tiles start on multiples of the factor, so outputs land on the grid
    tile = max(unit, tile // unit * unit)
    overlap = max(unit, int(tile * overlap_fraction) // unit * unit)
    stride = max(unit, tile - overlap)
    out = weight = None
    for top in _starts(H, tile, stride):
        for left in _starts(W, tile, stride):
            y = fn(x[..., top : top + tile, left : left + tile]).float()
            th, tw = y.shape[-2:]
            o = round(overlap / scale)
            wy = _ramp(th, o, top > 0, top + tile < H)
            wx = _ramp(tw, o, left > 0, left + tile < W)
            w = (wy[:, None] * wx[None, :]).to(y.device)
            if out is None:
                oh, ow = round(H / scale), round(W / scale)
                out = y.new_zeros(*y.shape[:-2], oh, ow)
                weight = y.new_zeros(oh, ow)
            t, lft = round(top / scale), round(left / scale)
            out[..., t : t + th, lft : lft + tw] += y * w
            weight[t : t + th, lft : lft + tw] += w
    return out / weight


def _blend_into(a: Tensor, b: Tensor, extent: int, dim: int) -> None:
    """diffusers' blend_v / blend_h: b's first rows along `dim` <- a linear fade from a's last rows, in place."""
    n = min(a.shape[dim], b.shape[dim], extent)
    for y in range(n):
        b.select(dim, y).copy_(a.select(dim, y - n) * (1 - y / n) + b.select(dim, y) * (y / n))


def tiled_diffusers(fn, x: Tensor, tile: int, scale: float, overlap_fraction: float = 0.25) -> Tensor:
    """`fn` on tiles laid out as diffusers' AutoencoderKL tiled_decode / _tiled_encode lay them: tiles start
    every int(tile * (1 - overlap)) input positions (the last ones may be partial), each output tile fades in from
    its upper then its left neighbour over int(out_tile * overlap) rows and is cropped to out_tile minus that.
    An input no larger than the tile is not tiled (as there)."""
    H, W = x.shape[-2:]
    if H <= tile and W <= tile:
        return fn(x)
    out_tile = int(round(tile / scale, 6))
    stride, extent = int(tile * (1 - overlap_fraction)), int(out_tile * overlap_fraction)
    keep = out_tile - extent
    rows = [[fn(x[..., i : i + tile, j : j + tile]) for j in range(0, W, stride)] for i in range(0, H, stride)]
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if i > 0:
                _blend_into(rows[i - 1][j], t, extent, -2)
            if j > 0:
                _blend_into(row[j - 1], t, extent, -1)
    return torch.cat([torch.cat([t[..., :keep, :keep] for t in row], dim=-1) for row in rows], dim=-2)


TILINGS = {"ramps": tiled, "diffusers": tiled_diffusers}


def _tiler(name: str):
    if name not in TILINGS:
        raise UserError(f"unknown VAE tiling {name!r}; use one of {', '.join(TILINGS)}")
    return TILINGS[name]
