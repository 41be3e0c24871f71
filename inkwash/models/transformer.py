"""Shared pieces of the transformer backbones (DiT, PixArt-α): patches, 2D sin-cos positions, time embedding,
adaLN modulation, biased multi-head attention and the GELU-tanh MLP.

Owns the layers every image transformer reuses. Knows nothing of noise, text encoders or other projects' key
names (those live in `inkwash.formats`). Attention goes through `layers.attention` (SDPA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.models.layers import MLPEmbedder, attention, timestep_embedding

TIME_FREQ_DIM = 256  # sinusoidal features of t before the time MLP (DiT's `frequency_embedding_size`)


class PatchTransformerConfig:
    """What every patch transformer's config (DiT, PixArt, MMDiT) shares: its size rule, output width and the
    width checks. A plain mixin for the frozen dataclasses, which supply the fields it reads."""

    @property
    def size_multiple(self) -> int:
        """The input's side must be a multiple of this (one token per patch)."""
        return self.patch_size

    @property
    def output_channels(self) -> int:
        """Channels the network emits: the prediction, then a learned variance when learn_sigma."""
        return self.out_channels * (2 if getattr(self, "learn_sigma", False) else 1)

    def check_widths(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible into {self.num_heads} heads")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos positions)")


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens by a strided conv: [B, C, H, W] -> [B, (H/p)(W/p), D]."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W, p = x.shape[-2], x.shape[-1], self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, D], row-major over the patch grid


def unpatchify(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Tokens of p*p*C features, ordered (row, column, channel) inside a patch -> image:
    [B, h*w, p*p*C] -> [B, C, h*p, w*p] (DiT's `unpatchify`)."""
    B, C = x.shape[0], x.shape[-1] // (p * p)
    x = x.reshape(B, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * p, w * p)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos * w_i), cos(pos * w_i)], w_i = 10000 ** (-i / (dim / 2)): [M] -> [M, dim], float64 (MAE / DiT)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    out = torch.outer(pos.reshape(-1).double(), 1.0 / 10000**omega)  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def pos_embed_2d(dim: int, h: int, w: int, base: int, scale: float = 1.0, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of an h x w patch grid -> [h*w, dim] float32.

    The first half of the channels encodes the column, the second the row (DiT's convention). Positions are
    stretched so each side spans `base / scale` units whatever its length (PixArt-α's `lewei_scale`, diffusers'
    `interpolation_scale`): a grid of `base` patches with scale 1 gets the integer positions DiT trained on, and
    other sizes get interpolated ones, so any input size works.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows = torch.arange(h, dtype=torch.float32, device=device) / (h / base) / scale
    cols = torch.arange(w, dtype=torch.float32, device=device) / (w / base) / scale
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")  # [h, w] each
    emb = torch.cat([sincos_1d(dim // 2, grid_c), sincos_1d(dim // 2, grid_r)], dim=1)  # [h*w, dim]
    return emb.float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with x [B, N, D] and shift / scale [B, D] (or [B, 1, D])."""
    if shift.dim() == 2:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


class TimestepEmbedder(MLPEmbedder):
    """Float times t [B] -> sinusoidal features -> Linear-SiLU-Linear -> [B, dim] (DiT's `TimestepEmbedder`).

    `freq_shift` is 0 in DiT and PixArt-α; diffusers' DiT port uses 1.
    """

    def __init__(self, dim: int, freq_shift: float = 0.0):
        super().__init__(TIME_FREQ_DIM, dim)
        self.freq_shift = freq_shift

    def forward(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        feats = timestep_embedding(t, TIME_FREQ_DIM, flip_sin_to_cos=True, freq_shift=self.freq_shift)
        return super().forward(feats.to(dtype))


class Attention(nn.Module):
    """Multi-head attention with biased projections (timm / DiT / PixArt-α). Self-attention with one fused QKV
    when `context_dim` is 0; otherwise cross-attention from the tokens to a context of width `context_dim`."""

    def __init__(self, dim: int, heads: int, context_dim: int = 0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible into {heads} heads")
        self.heads = heads
        if context_dim:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x [B, N, C], context [B, L, Dc], mask [B, L] bool (True = attend) -> [B, N, C]
        B, N, C = x.shape
        H = self.heads
        if context is None:
            qkv = self.qkv(x).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = self.q(x).view(B, N, H, C // H).transpose(1, 2)  # [B, H, N, D]
            kv = self.kv(context).view(B, context.shape[1], 2, H, C // H).permute(2, 0, 3, 1, 4)  # [2, B, H, L, D]
            k, v = kv[0], kv[1]
        return self.out(attention(q, k, v, mask))


class MLP(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear: the transformer feed-forward and PixArt's caption projection."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def layer_norm(dim: int, eps: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm without its own scale and shift: adaLN supplies them."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


def xavier_init(module: nn.Module) -> None:
    """DiT's base initialisation: xavier-uniform linears with zero bias; the patch conv as a linear on its
    flattened kernel. Callers then zero or re-draw what their design says."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            nn.init.zeros_(m.proj.bias)
