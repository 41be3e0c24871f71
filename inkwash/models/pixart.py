"""PixArt-α (Chen et al. 2023): a DiT that reads text tokens through cross-attention and modulates with adaLN-single.

Owns `PixArtConfig` and `PixArt`. One shared MLP turns the time embedding into 6 * D modulation values for all
blocks; each block adds its own learned `scale_shift_table` [6, D] (Sec. 2.3), which saves DiT's per-block adaLN
linears. Text tokens pass a caption projection (Linear-GELU-Linear) to the model width, and every block attends to
them between self-attention and the MLP. Optionally PixArt-α 1024's resolution and aspect-ratio conditions join
the time embedding. Knows nothing of noise; other projects' key names live in `inkwash.formats.diffusers_dit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.models.transformer import (
    MLP,
    Attention,
    PatchEmbed,
    PatchTransformerConfig,
    TimestepEmbedder,
    layer_norm,
    modulate,
    pos_embed_2d,
    unpatchify,
    xavier_init,
)


@dataclass(frozen=True)
class PixArtConfig(PatchTransformerConfig):
    """Shape of a PixArt-α transformer. context_dim is the text encoder's token width (T5-XXL: 4096)."""

    in_channels: int = 4
    out_channels: int = 4  # predicted channels; the network emits twice as many when learn_sigma
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    context_dim: int = 4096
    y_dim: int = 0  # PixArt takes no pooled vector; the field exists so every denoiser config has it
    learn_sigma: bool = False
    sample_size: int = 128  # the latent side the positions are laid out for (see pos_embed_2d)
    interpolation_scale: float = 1.0  # PixArt's `lewei_scale`: 2 for its 1024 px models
    size_conditioning: bool = False  # PixArt-α 1024: micro = [B, 3] (height, width, aspect ratio) joins t
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.context_dim <= 0:
            raise ValueError("PixArt cross-attends to text tokens: context_dim must be > 0")
        if self.y_dim:
            raise ValueError("PixArt takes no pooled vector: y_dim must be 0")
        self.check_widths()
        if self.size_conditioning and self.hidden_size % 3:
            raise ValueError(f"size conditioning splits hidden_size {self.hidden_size} in thirds")


class PixArtBlock(nn.Module):
    """Self-attention and MLP modulated by (shared t modulation + own table), plain cross-attention between."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads, context_dim=dim)
        self.norm2 = layer_norm(dim, eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None):
        # x [B, N, D], t6 [B, 6, D], context [B, L, D], mask [B, L] bool -> [B, N, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + t6).chunk(6, dim=1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(x, context, mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def attn_input(self, x: torch.Tensor, t6: torch.Tensor, *_) -> torch.Tensor:
        """What self-attention sees: the normed, modulated x [B, N, D] (TeaCache's change indicator)."""
        shift1, scale1 = (self.scale_shift_table[None] + t6).chunk(6, dim=1)[:2]
        return modulate(self.norm1(x), shift1, scale1)


class SizeEmbedder(nn.Module):
    """PixArt-α 1024's micro-conditions: sinusoidal features of height and width (each -> D/3) and of the
    aspect ratio (-> D/3), concatenated to [B, D]."""

    def __init__(self, dim: int):
        super().__init__()
        self.resolution = TimestepEmbedder(dim // 3)
        self.aspect_ratio = TimestepEmbedder(dim // 3)

    def forward(self, micro: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        B = micro.shape[0]
        res = self.resolution(micro[:, :2].reshape(-1), dtype).reshape(B, -1)  # [B, 2D/3]
        return torch.cat([res, self.aspect_ratio(micro[:, 2], dtype)], dim=1)  # [B, D]


class PixArt(nn.Module):
    """PixArt-α: forward(x [B,C,H,W], t [B], context [B,L,Dc], context_mask [B,L], micro [B,3]) -> [B,out,H,W]."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embed = TimestepEmbedder(D)
        self.size_embed = SizeEmbedder(D) if cfg.size_conditioning else None
        self.t_block = nn.Linear(D, 6 * D)  # adaLN-single: the one modulation MLP (after SiLU) shared by all blocks
        self.caption_proj = MLP(cfg.context_dim, D, D)
        self.blocks = nn.ModuleList(
            PixArtBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.norm_out = layer_norm(D)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)  # final layer's shift and scale
        self.linear_out = nn.Linear(D, cfg.patch_size**2 * cfg.output_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt-α's initialisation (DiT's, adapted): xavier linears, N(0, 0.02) for the time and caption MLPs and
        the shared modulation; cross-attention outputs and the output layer zero, so a new model predicts zero."""
        xavier_init(self)
        embedders = [self.t_embed, self.caption_proj] + ([self.size_embed.resolution, self.size_embed.aspect_ratio]
                                                         if self.size_embed is not None else [])  # fmt: skip
        for m in embedders:
            nn.init.normal_(m.fc1.weight, std=0.02), nn.init.normal_(m.fc2.weight, std=0.02)
        nn.init.normal_(self.t_block.weight, std=0.02)
        for layer in [b.cross_attn.out for b in self.blocks] + [self.linear_out]:
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def embed_time(self, t: torch.Tensor, micro: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Time embedding, plus the size embedding when configured: [B, D] (before SiLU)."""
        emb = self.t_embed(t, dtype)
        if (micro is None) != (self.size_embed is None):
            raise ValueError("this PixArt needs micro [B, 3] = (height, width, aspect ratio)" if self.size_embed
                             else "this PixArt takes no micro-conditions")  # fmt: skip
        return emb if micro is None else emb + self.size_embed(micro, dtype)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        micro: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg, p = self.cfg, self.cfg.patch_size
        if context is None:
            raise ValueError(f"PixArt needs text tokens: context [B, L, {cfg.context_dim}]")
        if y is not None:
            raise ValueError("PixArt takes no pooled vector y")
        B = x.shape[0]
        t = t.expand(B) if t.dim() == 0 else t  # [B]
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.patch_embed(x)  # [B, h*w, D]
        pos = pos_embed_2d(cfg.hidden_size, h, w, cfg.sample_size // p, cfg.interpolation_scale, x.device)
        tokens = tokens + pos.to(tokens.dtype)
        emb = self.embed_time(t, micro, tokens.dtype)  # [B, D]
        t6 = self.t_block(F.silu(emb)).view(B, 6, -1)  # [B, 6, D]
        ctx = self.caption_proj(context.to(tokens.dtype))  # [B, L, D]
        for block in self.blocks:
            tokens = block(tokens, t6, ctx, context_mask)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # [B, 1, D] each
        out = self.linear_out(modulate(self.norm_out(tokens), shift, scale))  # [B, N, p*p*C]
        return unpatchify(out, h, w, p)  # [B, out, H, W]
