"""Shared network layers: timestep embeddings, ResBlocks, attention, GEGLU, spatial transformers.

Owns the building blocks every backbone may reuse. Knows nothing of noise, processes or other
projects' key names (those live in `inkwash.formats`). All attention goes through
`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of float times t [B] -> [B, dim] in float32 (DDPM / "Attention is all you need").

    frequencies = max_period ** (-i / (half - freq_shift)), i = 0..half-1.
    SD uses flip_sin_to_cos=True, freq_shift=0.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * exponent.exp()[None]  # [B, half]
    sin, cos = args.sin(), args.cos()
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # [B, 2*half]
    return F.pad(emb, (0, dim % 2))


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: lifts a time or conditioning vector to the embedding width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the (already SiLU-activated) embedding added or used as scale-shift;
    `emb_dim=0` for a block with no embedding (the autoencoder's)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, groups: int, eps: float, scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch * (2 if scale_shift else 1)) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, Cin, H, W], emb [B, E] (SiLU already applied) -> [B, Cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is None:
            return self.skip(x) + self.conv2(F.silu(self.norm2(h)))
        e = self.emb_proj(emb)[:, :, None, None]  # [B, Cout or 2*Cout, 1, 1]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + e)
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3 conv: [B, C, H, W] -> [B, C, H/2, W/2]. `asymmetric`: pad right and bottom only, as the
    Stable Diffusion autoencoder does (the U-Net pads all sides)."""

    def __init__(self, ch: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, N, D], k/v [B, H, L, D], mask [B, L] bool (True = attend) -> [B, N, H*D]."""
    if mask is not None:
        # A row with no real key would give NaN; let it attend everywhere, as an additive -1e4 bias would.
        mask = (mask | ~mask.any(dim=-1, keepdim=True))[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, N, D]
    return out.transpose(1, 2).flatten(2)  # [B, N, H*D]


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (no bias) and a biased output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        return self.out(attention(qkv[0], qkv[1], qkv[2]))  # [B, N, C]


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to context tokens; K and V projections fused."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, N, C], context [B, L, Dc], mask [B, L] bool -> [B, N, C]
        B, N, C = x.shape
        L, H = context.shape[1], self.heads
        q = self.q(x).view(B, N, H, C // H).transpose(1, 2)  # [B, H, N, D]
        kv = self.kv(context).view(B, L, 2, H, C // H).permute(2, 0, 3, 1, 4)  # [2, B, H, L, D]
        return self.out(attention(q, kv[0], kv[1], mask))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020): dim -> 2*inner -> inner -> dim."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention (skipped when there is no context or context_dim=0), GEGLU."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.attn2 = CrossAttention(dim, context_dim, heads) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # [B, N, C]
        if self.attn2 is not None and context is not None:
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, residual (SD's Transformer2D)."""

    def __init__(self, ch: int, heads: int, context_dim: int, *, depth: int = 1, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(TransformerBlock(ch, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))  # [B, HW, C]
        for block in self.blocks:
            h = block(h, context, mask)
        h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)  # [B, C, H, W]
        return x + h
