"""Stable Diffusion's U-Net (Rombach et al. 2022), text-conditioned through cross-attention.

Owns `UNetConfig` and `UNet`. Knows nothing of noise: `t` is whatever float the diffusion process
hands the network (a VP timestep index, or flow time x1000). Other projects' key names live in
`inkwash.formats.diffusers_unet`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.models.layers import (
    Downsample,
    MLPEmbedder,
    ResBlock,
    SpatialTransformer,
    Upsample,
    timestep_embedding,
)


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a U-Net. Level i has model_channels * channel_mult[i] channels; attention where listed."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = full resolution) with transformer blocks
    num_heads: int = 8  # heads per transformer block, unless head_dim > 0
    head_dim: int = 0  # if > 0, heads = channels // head_dim (SD 2.x, SDXL)
    transformer_depth: int | tuple[int, ...] = 1  # blocks per spatial transformer; a tuple: per level (SDXL)
    context_dim: int = 768  # text token width; 0 = no cross-attention at all
    y_dim: int = 0  # extra conditioning vector added to the time embedding; 0 = none
    micro_conditions: int = 0  # SDXL micro-conditioning: scalars (original size, crop, target size) per image
    micro_embed_dim: int = 256  # Fourier features per scalar; they join y before its MLP (SDXL's "text_time")
    guidance_embed_dim: int = 0  # LCM: Fourier features of the guidance scale joining the time's; 0 = none
    mid_attention: bool = True  # mid block is ResBlock-transformer-ResBlock; False: one ResBlock (diffusers)
    norm_groups: int = 32
    norm_eps: float = 1e-5
    scale_shift: bool = False  # ResBlock uses the embedding as GroupNorm scale and shift
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0

    def __post_init__(self):
        for name in ("channel_mult", "attention_levels"):  # JSON gives lists; keep the dataclass hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.transformer_depth, list | tuple):
            object.__setattr__(self, "transformer_depth", tuple(self.transformer_depth))
            if len(self.transformer_depth) != len(self.channel_mult):
                raise ValueError(f"transformer_depth {self.transformer_depth} needs one entry per level "
                                 f"({len(self.channel_mult)})")  # fmt: skip
        bad = [i for i in self.attention_levels if not 0 <= i < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {len(self.channel_mult)} levels")
        for ch in self.level_channels:
            if ch % self.norm_groups:
                raise ValueError(f"{ch} channels not divisible by norm_groups={self.norm_groups}")
            if ch % self.heads(ch):
                raise ValueError(f"{ch} channels not divisible into {self.heads(ch)} heads")

    @property
    def guidance_embed(self) -> bool:
        """Guidance-distilled (LCM): the scale is a network input and sampling runs no classifier-free guidance."""
        return self.guidance_embed_dim > 0

    @property
    def size_multiple(self) -> int:
        """The input's side must be a multiple of this (one halving per level below the first)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def level_channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, ch: int) -> int:
        return ch // self.head_dim if self.head_dim else self.num_heads

    def depth(self, level: int) -> int:
        """Transformer blocks at a level (the mid block takes the deepest level's, as SDXL's)."""
        d = self.transformer_depth
        return d[level] if isinstance(d, tuple) else d


class Level(nn.Module):
    """One resolution: ResBlocks, each optionally followed by a spatial transformer, then a resampler."""

    def __init__(self, res: list[ResBlock], attn: list[SpatialTransformer], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per ResBlock
        self.resample = resample

    def block(self, j: int, h: torch.Tensor, emb: torch.Tensor, context, mask) -> torch.Tensor:
        h = self.res[j](h, emb)
        return self.attn[j](h, context, mask) if len(self.attn) else h


GUIDANCE_FACTOR = 1000.0  # LCM embeds (w - 1) * this: diffusers' get_guidance_scale_embedding of its w = scale - 1


def guidance_features(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale Fourier features [B, dim] of inkwash's scale w [B] (u + w (c - u)): diffusers'
    `get_guidance_scale_embedding(w - 1)`, [sin, cos] with frequencies 10000^(-i / (half - 1))."""
    return timestep_embedding((w - 1) * GUIDANCE_FACTOR, dim, flip_sin_to_cos=False, freq_shift=1.0)


class UNet(nn.Module):
    """U-Net: forward(x [B,C,H,W], t [B], context [B,L,D], context_mask [B,L], y [B,y_dim], micro [B,n],
    guidance [B]) -> [B,out,H,W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        chans, E, n = cfg.level_channels, cfg.time_embed_dim, cfg.num_res_blocks
        norm = dict(groups=cfg.norm_groups, eps=cfg.norm_eps, scale_shift=cfg.scale_shift)

        def transformer(ch: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(
                ch, cfg.heads(ch), cfg.context_dim, depth=cfg.depth(level), groups=cfg.norm_groups
            )

        self.time_embed = MLPEmbedder(cfg.model_channels, E)
        y_in = cfg.y_dim + cfg.micro_conditions * cfg.micro_embed_dim
        self.y_embed = MLPEmbedder(y_in, E) if y_in else None
        # LCM: the guidance features join the time features before the time MLP (diffusers' cond_proj)
        g_dim = cfg.guidance_embed_dim
        self.guidance_in = nn.Linear(g_dim, cfg.model_channels, bias=False) if g_dim else None
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)

        skips, ch = [chans[0]], chans[0]  # channels of every skip tensor, in the order they are pushed
        self.down = nn.ModuleList()
        for i, out in enumerate(chans):
            res = []
            for _ in range(n):
                res.append(ResBlock(ch, out, E, **norm))
                ch = out
                skips.append(ch)
            last = i == len(chans) - 1
            attn = [transformer(ch, i) for _ in range(n)] if i in cfg.attention_levels else []
            self.down.append(Level(res, attn, None if last else Downsample(ch)))
            skips += [] if last else [ch]

        self.mid = Level([ResBlock(ch, ch, E, **norm) for _ in range(2 if cfg.mid_attention else 1)], [], None)
        self.mid_attn = transformer(ch, len(chans) - 1) if cfg.mid_attention else None

        self.up = nn.ModuleList()  # deepest level first
        for i, out in reversed(list(enumerate(chans))):
            res = []
            for _ in range(n + 1):
                res.append(ResBlock(ch + skips.pop(), out, E, **norm))
                ch = out
            attn = [transformer(ch, i) for _ in range(n + 1)] if i in cfg.attention_levels else []
            self.up.append(Level(res, attn, Upsample(ch) if i > 0 else None))

        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Zero every residual branch's last layer and the output conv: the untrained net is the identity
        on each residual path and predicts zero (SD's `zero_module`), which keeps early training stable."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight), nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, SpatialTransformer):
                nn.init.zeros_(m.proj_out.weight), nn.init.zeros_(m.proj_out.bias)
        nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)
        if self.guidance_in is not None:  # LCM: a student built from its teacher starts as exactly the teacher
            nn.init.zeros_(self.guidance_in.weight)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, micro: torch.Tensor | None, dtype,
              guidance: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Time embedding plus the embedding of y and the micro-conditions' Fourier features (concatenated, as
        SDXL's `text_time`) and of the guidance scale (LCM), SiLU applied once here for every ResBlock: -> [B, E]."""
        cfg = self.cfg
        fourier = {"flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift}
        if (guidance is None) != (self.guidance_in is None):
            raise ValueError("this U-Net is guidance-distilled: give guidance [B] (the guidance scale)"
                             if guidance is None else "this U-Net takes no guidance input")  # fmt: skip
        feats = timestep_embedding(t, cfg.model_channels, **fourier).to(dtype)  # [B, C]
        if guidance is not None:  # [B] -> [B, C], added to the time features (LCM; diffusers' time_cond_proj)
            w = torch.as_tensor(guidance, dtype=torch.float32, device=t.device).expand(t.shape[0])
            feats = feats + self.guidance_in(guidance_features(w, cfg.guidance_embed_dim).to(dtype))
        emb = self.time_embed(feats)  # [B, E]
        if (y is None) != (cfg.y_dim == 0):
            raise ValueError(
                f"this U-Net needs y [B, {cfg.y_dim}]" if cfg.y_dim else "this U-Net has y_dim=0 but was given y"
            )
        if (micro is None) != (cfg.micro_conditions == 0):
            raise ValueError(f"this U-Net needs micro [B, {cfg.micro_conditions}]" if cfg.micro_conditions
                             else "this U-Net takes no micro-conditions")  # fmt: skip
        parts = [] if y is None else [y.to(dtype)]
        if micro is not None:  # [B, n] -> [B, n * D]
            feats = timestep_embedding(micro.reshape(-1), cfg.micro_embed_dim, **fourier)
            parts.append(feats.reshape(micro.shape[0], -1).to(dtype))
        if parts:
            emb = emb + self.y_embed(torch.cat(parts, dim=-1))
        return F.silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        micro: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t  # [B]
        emb = self.embed(t, y, micro, x.dtype, guidance)  # [B, E]
        ctx = (context, context_mask)
        h = self.conv_in(x)  # [B, C0, H, W]
        skips = [h]
        for level in self.down:
            for j in range(len(level.res)):
                h = level.block(j, h, emb, *ctx)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # [B, C, H/2, W/2]
                skips.append(h)
        h = self.mid.res[0](h, emb)
        if self.mid_attn is not None:
            h = self.mid.res[1](self.mid_attn(h, *ctx), emb)
        for level in self.up:
            for j in range(len(level.res)):
                h = level.block(j, torch.cat([h, skips.pop()], dim=1), emb, *ctx)
            if level.resample is not None:
                h = level.resample(h)  # [B, C, 2H, 2W]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, out_channels, H, W]
