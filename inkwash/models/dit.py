"""DiT: the Diffusion Transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers").

Owns `DiTConfig` and `DiT`: patchify, fixed 2D sin-cos positions, `depth` adaLN-Zero blocks, a modulated final
layer, unpatchify. The condition c = time embedding + class embedding (DiT's ImageNet models, with a null class
for classifier-free guidance) or + an embedded pooled text vector y (inkwash's text presets). Knows nothing of
noise: `t` is whatever float the diffusion process hands the network. Other projects' key names live in
`inkwash.formats.diffusers_dit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.models.layers import MLPEmbedder
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
class DiTConfig(PatchTransformerConfig):
    """Shape of a DiT. Condition by class label (num_classes > 0) or pooled vector (y_dim > 0), not both."""

    in_channels: int = 4
    out_channels: int = 4  # predicted channels; the network emits twice as many when learn_sigma
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 0  # > 0: y is a class label [B] in 0..num_classes, where num_classes is the null class
    y_dim: int = 0  # > 0: y is a vector [B, y_dim] (e.g. pooled text) embedded and added to the time embedding
    context_dim: int = 0  # DiT has no cross-attention; the field exists so every denoiser config has it
    learn_sigma: bool = False  # DiT's learned variance: out_channels more channels (the interpolation v)
    sample_size: int = 32  # the latent side the positions are laid out for (see pos_embed_2d)
    interpolation_scale: float = 1.0
    freq_shift: float = 0.0  # time features' frequency shift: 0 in DiT, 1 in diffusers' port
    norm_eps: float = 1e-6
    mlp_norm_eps: float = 1e-6  # the LayerNorm before the MLP; diffusers' port uses 1e-5

    def __post_init__(self):
        if self.context_dim:
            raise ValueError("DiT has no cross-attention: context_dim must be 0 (use PixArt for text tokens)")
        if self.num_classes and self.y_dim:
            raise ValueError("DiT conditions on a class label or a y vector, not both (num_classes, y_dim)")
        self.check_widths()


class DiTBlock(nn.Module):
    """adaLN-Zero block: c regresses shift, scale and gate for self-attention and for the MLP (DiT Fig. 3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float, mlp_eps: float):
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = Attention(dim, heads)
        self.norm2 = layer_norm(dim, mlp_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x [B, N, D], c [B, D] (SiLU already applied) -> [B, N, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)  # [B, 1, D] each
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def attn_input(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """What self-attention sees: the normed, modulated x [B, N, D] (TeaCache's change indicator)."""
        shift1, scale1 = self.adaLN(c)[:, None].chunk(6, dim=-1)[:2]
        return modulate(self.norm1(x), shift1, scale1)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear to p*p*C features per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = layer_norm(dim)
        self.adaLN = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)  # [B, D] each
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, p*p*C]


class DiT(nn.Module):
    """DiT: forward(x [B,C,H,W], t [B], y [B] labels or [B,y_dim]) -> [B,out,H,W] (2*out with learn_sigma)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embed = TimestepEmbedder(D, cfg.freq_shift)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes else None  # + the null class
        self.y_embed = MLPEmbedder(cfg.y_dim, D) if cfg.y_dim else None
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.mlp_norm_eps) for _ in range(cfg.depth)
        )
        self.final = FinalLayer(D, cfg.patch_size, cfg.output_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, and adaLN-Zero: every block's modulation
        and the output layer start at zero, so each block is the identity and a new model predicts zero."""
        xavier_init(self)
        for emb in (self.t_embed.fc1, self.t_embed.fc2, self.class_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        for layer in [b.adaLN for b in self.blocks] + [self.final.adaLN, self.final.linear]:
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """c = SiLU(time embedding + class or y embedding): [B, D], SiLU applied once for every adaLN."""
        cfg = self.cfg
        c = self.t_embed(t, dtype)  # [B, D]
        needs_y = bool(cfg.num_classes or cfg.y_dim)
        if (y is None) == needs_y:
            wanted = f"class labels [B] in 0..{cfg.num_classes}" if cfg.num_classes else f"y [B, {cfg.y_dim}]"
            raise ValueError(f"this DiT needs {wanted}" if needs_y else "this DiT is unconditional but was given y")
        if self.class_embed is not None:
            if y.dtype.is_floating_point or y.dim() != 1:
                raise ValueError(f"this DiT takes integer class labels [B], got {y.dtype} of shape {tuple(y.shape)}")
            c = c + self.class_embed(y)
        elif self.y_embed is not None:
            c = c + self.y_embed(y.to(dtype))
        return F.silu(c)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        micro: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if context is not None or micro is not None:
            raise ValueError("DiT takes neither text tokens (context) nor micro-conditions")
        cfg, p = self.cfg, self.cfg.patch_size
        t = t.expand(x.shape[0]) if t.dim() == 0 else t  # [B]
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.patch_embed(x)  # [B, h*w, D]
        pos = pos_embed_2d(cfg.hidden_size, h, w, cfg.sample_size // p, cfg.interpolation_scale, x.device)
        tokens = tokens + pos.to(tokens.dtype)
        c = self.condition(t, y, tokens.dtype)  # [B, D]
        for block in self.blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final(tokens, c), h, w, p)  # [B, out, H, W]
