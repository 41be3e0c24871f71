"""The multimodal diffusion transformer of SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers") and
FLUX.1 (Black Forest Labs 2024): double-stream blocks with separate image and text weights over one joint
attention, then (FLUX) single-stream blocks over the concatenated tokens, all modulated by one conditioning vector.
FLUX places tokens with RoPE and normalises queries and keys; SD3 adds a fixed 2D sine-cosine table to the image
tokens and has no single-stream blocks.

Owns `MMDiTConfig`, `MMDiT` and its presets (`PRESETS`). Knows nothing of noise: `t` is whatever float the
diffusion process hands the network; for inkwash's `Flow` process that is t x 1000 (FLUX's own time factor),
which this network embeds as is. Other projects' key names live in `inkwash.formats.diffusers_flux`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.errors import UserError
from inkwash.models.layers import MLPEmbedder, attention
from inkwash.models.transformer import (
    MLP,
    PatchTransformerConfig,
    TimestepEmbedder,
    modulate,
    pos_embed_2d,
    xavier_init,
)


@dataclass(frozen=True)
class MMDiTConfig(PatchTransformerConfig):
    """Shape of an MMDiT (defaults: FLUX.1). Latents are packed into patch_size x patch_size patches inside the
    model. With depth_single=0 (SD3) the last double block updates only the image tokens, since nothing reads
    the text tokens after it."""

    in_channels: int = 16  # latent channels before packing (FLUX: 16, so 64 features per 2x2 token)
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single: int = 38  # single-stream blocks
    mlp_ratio: float = 4.0
    context_dim: int = 4096  # text token width (T5-XXL)
    y_dim: int = 768  # pooled text vector width (CLIP-L); 0 = none
    guidance_embed: bool = False  # FLUX dev: the guidance scale is an input (guidance distillation)
    guidance_factor: float = 1000.0  # the guidance scale is embedded as guidance * this (FLUX's time factor)
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE width per position axis (t, h, w); () = no RoPE
    theta: float = 10000.0
    pos_embed_max_size: int = 0  # > 0: a fixed sine-cosine table for this many tokens a side, center-cropped (SD3)
    qk_norm: bool = True  # RMSNorm on queries and keys per head (FLUX, SD3.5; not SD3)
    qkv_bias: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))  # JSON gives lists; keep the dataclass hashable
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} not divisible into {self.num_heads} heads")
        if self.axes_dim and (sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim)):
            raise ValueError(f"axes_dim={self.axes_dim} must be even and sum to the head width {self.head_dim}")
        if not self.axes_dim and not self.pos_embed_max_size:
            raise ValueError("an MMDiT needs positions: RoPE axes_dim, or a pos_embed_max_size table")
        if self.pos_embed_max_size and self.hidden_size % 4:
            raise ValueError(f"a 2D sine-cosine table needs hidden_size divisible by 4, not {self.hidden_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# ---------------------------------------------------------------------------- pieces


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (as FLUX does), with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def ada_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, C] layer-normalised without affine (eps 1e-6), then scaled by (1 + scale) and shifted."""
    return modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles for positions ids [L, n_axes]: axis i gets axes_dim[i] / 2 frequencies theta^(-2j/d_i)
    (Su et al. 2021) -> cos, sin [L, head_dim / 2] in float32 (angles in float64 where the device has it)."""
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for i, d in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, d, 2, dtype=dtype, device=ids.device) / d)  # [d/2]
        angles.append(ids[:, i].to(dtype)[:, None] * omega[None])  # [L, d/2]
    a = torch.cat(angles, dim=-1)
    return a.cos().float(), a.sin().float()


def apply_rope(x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate each consecutive pair (x0, x1) of x [B, H, L, D] by its angle; pe = (cos, sin) [L, D/2]."""
    cos, sin = pe
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, H, L, D/2] each
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # [B, H, L, D/2, 2]
    return out.flatten(-2).to(x.dtype)


def split_heads(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, 3 * H * D] -> [3, B, H, L, D] (FLUX's "B L (K H D) -> K B H L D")."""
    B, L, _ = qkv.shape
    return qkv.view(B, L, 3, heads, -1).permute(2, 0, 3, 1, 4)


class StreamAttention(nn.Module):
    """One stream's share of joint attention: fused QKV, optional RMSNorm on queries and keys per head, output
    projection (none for a stream whose output nobody reads)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, qk_norm: bool, out: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm, self.k_norm = qk_norms(dim // heads, qk_norm)
        self.proj = nn.Linear(dim, dim) if out else None

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, C] -> q, k, v [B, H, L, D], queries and keys normalised."""
        q, k, v = split_heads(self.qkv(x), self.heads)
        return self.q_norm(q), self.k_norm(k), v


def qk_norms(head_dim: int, on: bool) -> tuple[nn.Module, nn.Module]:
    return (RMSNorm(head_dim), RMSNorm(head_dim)) if on else (nn.Identity(), nn.Identity())


def with_rope(q: torch.Tensor, k: torch.Tensor, pe) -> tuple[torch.Tensor, torch.Tensor]:
    return (q, k) if pe is None else (apply_rope(q, pe), apply_rope(k, pe))


class DoubleStreamBlock(nn.Module):
    """Image and text tokens keep their own weights (modulation, QKV, output, MLP) but attend jointly over
    [txt, img] (SD3's MM-DiT block; FLUX adds RoPE and QK-norm). `text_out=False`: the text tokens only feed
    this block's attention (SD3's last block, "context_pre_only"); they get shift and scale, and come back as is."""

    def __init__(self, cfg: MMDiTConfig, text_out: bool = True):
        super().__init__()
        C, H, norm = cfg.hidden_size, cfg.num_heads, cfg.qk_norm
        self.img_mod = nn.Linear(C, 6 * C)  # shift, scale, gate for attention, then for the MLP
        self.img_attn = StreamAttention(C, H, cfg.qkv_bias, norm)
        self.img_mlp = MLP(C, cfg.mlp_hidden)
        self.txt_mod = nn.Linear(C, (6 if text_out else 2) * C)
        self.txt_attn = StreamAttention(C, H, cfg.qkv_bias, norm, out=text_out)
        self.txt_mlp = MLP(C, cfg.mlp_hidden) if text_out else None

    def forward(self, txt, img, vec, pe, mask) -> tuple[torch.Tensor, torch.Tensor]:
        # txt [B, L, C], img [B, N, C], vec [B, C] (SiLU applied), mask [B, L + N] bool or None
        i_mod = self.img_mod(vec).chunk(6, dim=-1)  # 6 x [B, C]
        t_mod = self.txt_mod(vec).chunk(6 if self.txt_mlp is not None else 2, dim=-1)
        tq, tk, tv = self.txt_attn.qkv_heads(ada_norm(txt, t_mod[0], t_mod[1]))  # [B, H, L, D] each
        iq, ik, iv = self.img_attn.qkv_heads(ada_norm(img, i_mod[0], i_mod[1]))  # [B, H, N, D] each
        q, k = with_rope(torch.cat((tq, iq), dim=2), torch.cat((tk, ik), dim=2), pe)
        out = attention(q, k, torch.cat((tv, iv), dim=2), mask)  # [B, L + N, C]
        t_out, i_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        img = img + i_mod[2][:, None] * self.img_attn.proj(i_out)
        img = img + i_mod[5][:, None] * self.img_mlp(ada_norm(img, i_mod[3], i_mod[4]))
        if self.txt_mlp is None:
            return txt, img
        txt = txt + t_mod[2][:, None] * self.txt_attn.proj(t_out)
        txt = txt + t_mod[5][:, None] * self.txt_mlp(ada_norm(txt, t_mod[3], t_mod[4]))
        return txt, img

    def attn_input(self, txt, img, vec, *_) -> torch.Tensor:
        """What the image stream's QKV projection sees: the normed, modulated img [B, N, C] (TeaCache's change
        indicator, as TeaCache4FLUX computes it)."""
        shift, scale = self.img_mod(vec).chunk(6, dim=-1)[:2]
        return ada_norm(img, shift, scale)


class SingleStreamBlock(nn.Module):
    """One set of weights for all tokens; attention and MLP run in parallel from one fused input projection,
    and one output projection merges them (Dehghani et al. 2023, ViT-22B)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        C, self.heads, self.mlp_hidden = cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden
        self.mod = nn.Linear(C, 3 * C)  # shift, scale, gate
        self.linear1 = nn.Linear(C, 3 * C + cfg.mlp_hidden)  # QKV and the MLP's hidden layer
        self.linear2 = nn.Linear(C + cfg.mlp_hidden, C)  # attention output and MLP activations -> C
        self.q_norm, self.k_norm = qk_norms(cfg.head_dim, cfg.qk_norm)

    def forward(self, x, vec, pe, mask) -> torch.Tensor:
        # x [B, L + N, C], vec [B, C] (SiLU applied)
        shift, scale, gate = self.mod(vec).chunk(3, dim=-1)  # [B, C] each
        qkv, h = self.linear1(ada_norm(x, shift, scale)).split([3 * x.shape[-1], self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads)  # [B, H, L + N, D] each
        q, k = with_rope(self.q_norm(q), self.k_norm(k), pe)
        out = torch.cat((attention(q, k, v, mask), F.gelu(h, approximate="tanh")), dim=-1)
        return x + gate[:, None] * self.linear2(out)


class FinalLayer(nn.Module):
    """adaLN (continuous, no gate) then a linear map to the packed patch features; modulation order (shift, scale)
    as in the FLUX and SD3 originals."""

    def __init__(self, C: int, out: int):
        super().__init__()
        self.mod = nn.Linear(C, 2 * C)
        self.linear = nn.Linear(C, out)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(vec).chunk(2, dim=-1)
        return self.linear(ada_norm(x, shift, scale))


# ---------------------------------------------------------------------------- the network


def pack(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p]: tokens row-major, features (c, ph, pw) as FLUX packs latents."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpack(x: torch.Tensor, p: int, H: int, W: int) -> torch.Tensor:
    """Inverse of pack: [B, (H/p)(W/p), C p p] -> [B, C, H, W]."""
    B = x.shape[0]
    x = x.view(B, H // p, W // p, -1, p, p).permute(0, 3, 1, 4, 2, 5)  # [B, C, h, p, w, p]
    return x.reshape(B, -1, H, W)


class MMDiT(nn.Module):
    """MMDiT (FLUX or SD3): forward(x [B,C,H,W], t [B], context [B,L,D], context_mask [B,L], y [B,y_dim],
    guidance [B]) -> [B,out,H,W]."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        C, p = cfg.hidden_size, cfg.patch_size
        self.img_in = nn.Linear(cfg.in_channels * p * p, C)
        self.txt_in = nn.Linear(cfg.context_dim, C)
        self.time_in = TimestepEmbedder(C)
        self.vector_in = MLPEmbedder(cfg.y_dim, C) if cfg.y_dim else None
        self.guidance_in = TimestepEmbedder(C) if cfg.guidance_embed else None
        if cfg.pos_embed_max_size:  # fixed, but saved: SD3 checkpoints carry their own table
            side = cfg.pos_embed_max_size
            self.register_buffer("pos_embed", pos_embed_2d(C, side, side, base=side))  # [side^2, C]
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(cfg, text_out=cfg.depth_single > 0 or i < cfg.depth - 1) for i in range(cfg.depth)
        )
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = FinalLayer(C, cfg.out_channels * p * p)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's recipe: Xavier-uniform linears with zero bias, N(0, 0.02) for the conditioning MLPs, and zero
        modulations and output layer. Every gate starts at 0, so each block is the identity and the untrained
        net predicts zero; the gates learn first, which keeps early training stable (Peebles & Xie 2023)."""
        xavier_init(self)
        for emb in (self.time_in, self.vector_in, self.guidance_in):
            if emb is not None:
                nn.init.normal_(emb.fc1.weight, std=0.02), nn.init.normal_(emb.fc2.weight, std=0.02)
        zero = [b.img_mod for b in self.double_blocks] + [b.txt_mod for b in self.double_blocks]
        zero += [b.mod for b in self.single_blocks] + [self.final_layer.mod, self.final_layer.linear]
        for m in zero:
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)

    def embed(self, t, y, guidance, dtype) -> torch.Tensor:
        """Conditioning vector: MLP(time) + MLP(guidance * guidance_factor) + MLP(y), SiLU applied once for every
        modulation: -> [B, C]."""
        cfg = self.cfg
        vec = self.time_in(t, dtype)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this MMDiT is guidance-distilled: give guidance [B] (the guidance scale)")
            g = torch.as_tensor(guidance, dtype=torch.float32, device=t.device).expand(t.shape[0])  # [B]
            vec = vec + self.guidance_in(g * cfg.guidance_factor, dtype)
        if (y is None) != (self.vector_in is None):
            raise ValueError(
                f"this MMDiT needs y [B, {cfg.y_dim}]" if cfg.y_dim else "this MMDiT has y_dim=0 but was given y"
            )
        if y is not None:
            vec = vec + self.vector_in(y.to(dtype))
        return F.silu(vec)

    def positions(self, L: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE angles for L text tokens at (0, 0, 0) followed by the h x w image tokens at (0, row, col)."""
        if not self.cfg.axes_dim:
            return None
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
        ids = torch.cat([torch.zeros(L, 3, dtype=img_ids.dtype, device=device), img_ids])  # [L + hw, 3]
        return rope(ids, self.cfg.axes_dim, self.cfg.theta)

    def table_positions(self, h: int, w: int) -> torch.Tensor:
        """The center h x w crop of the fixed position table -> [h * w, C] (SD3's `cropped_pos_embed`)."""
        side = self.cfg.pos_embed_max_size
        if h > side or w > side:
            raise UserError(f"{h}x{w} tokens exceed this MMDiT's {side}x{side} position table")
        top, left = (side - h) // 2, (side - w) // 2
        return self.pos_embed.view(side, side, -1)[top : top + h, left : left + w].reshape(h * w, -1)

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
        """t: the process's network time (flow: t x 1000). context_mask: True for real text tokens; padding is
        masked as a key everywhere, so it cannot change the image. guidance: the raw guidance scale (e.g. 3.5)."""
        cfg, (B, _, H, W) = self.cfg, x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise UserError(f"latent size {H}x{W} is not a multiple of the MMDiT patch size {p}")
        if context is None:
            raise ValueError(f"this MMDiT needs context [B, L, {cfg.context_dim}]")
        if micro is not None:
            raise ValueError("this MMDiT takes no micro-conditions")
        t = t.expand(B) if t.dim() == 0 else t  # [B]
        vec = self.embed(t, y, guidance, x.dtype)  # [B, C]
        img = self.img_in(pack(x, p))  # [B, N, C]
        if self.cfg.pos_embed_max_size:
            img = img + self.table_positions(H // p, W // p).to(img.dtype)
        txt = self.txt_in(context.to(x.dtype))  # [B, L, C]
        L, N = txt.shape[1], img.shape[1]
        pe = self.positions(L, H // p, W // p, x.device)  # cos, sin [L + N, D/2]
        mask = None
        if context_mask is not None:  # keys: text as given, every image token real
            mask = torch.cat([context_mask.bool(), context_mask.new_ones(B, N, dtype=torch.bool)], dim=1)
        for block in self.double_blocks:
            txt, img = block(txt, img, vec, pe, mask)
        h = torch.cat((txt, img), dim=1)  # [B, L + N, C]
        for block in self.single_blocks:
            h = block(h, vec, pe, mask)
        return unpack(self.final_layer(h[:, L:], vec), p, H, W)  # [B, out_channels, H, W]


# ---------------------------------------------------------------------------- presets

_FLUX = MMDiTConfig()  # FLUX.1 exactly: 16 latent channels, 2x2 packing, T5-XXL context, CLIP-L pooled vector
PRESETS: dict[str, MMDiTConfig] = {
    "flux-dev": MMDiTConfig(guidance_embed=True),  # 11,901,408,320 parameters
    "flux-schnell": _FLUX,  # timestep-distilled: no guidance input
    # Shapes-scale latent model (f = 4, 4 channels); 384 = the default MiniLM text encoder's width.
    "mmdit-shapes": MMDiTConfig(
        in_channels=4, out_channels=4, hidden_size=256, num_heads=4, depth=3, depth_single=6,
        context_dim=384, y_dim=384, axes_dim=(8, 28, 28),
    ),
    # Stable Diffusion 3 Medium (2,028,328,000 parameters) and 3.5 Large (8,056,627,520): CLIP-L + G pooled (2048).
    "sd3-medium": MMDiTConfig(
        hidden_size=1536, num_heads=24, depth=24, depth_single=0, y_dim=2048, axes_dim=(), pos_embed_max_size=192,
        qk_norm=False,
    ),
    "sd3.5-large": MMDiTConfig(
        hidden_size=2432, num_heads=38, depth=38, depth_single=0, y_dim=2048, axes_dim=(), pos_embed_max_size=192,
    ),
    # Two smaller sizes beside mmdit-shapes for a scaling curve on Shapes latents (head width 64 throughout).
    "mmdit-shapes-s": MMDiTConfig(
        in_channels=4, out_channels=4, hidden_size=128, num_heads=2, depth=2, depth_single=4,
        context_dim=384, y_dim=384, axes_dim=(16, 24, 24),
    ),
    "mmdit-shapes-m": MMDiTConfig(
        in_channels=4, out_channels=4, hidden_size=192, num_heads=3, depth=3, depth_single=6,
        context_dim=384, y_dim=384, axes_dim=(16, 24, 24),
    ),
    "mmdit-tiny": MMDiTConfig(  # tests
        in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth=1, depth_single=1,
        context_dim=24, y_dim=12, axes_dim=(4, 6, 6),
    ),
}  # fmt: skip
