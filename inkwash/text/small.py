"""A small trainable text encoder: a fixed word vocabulary with a byte fallback, and a pre-LN transformer.

No pretrained weights. The tokenizer is deterministic and versioned by `WordByteTokenizer.VERSION`: a
checkpoint trained with one vocabulary must not be read with another, so never reorder `WORDS`; append.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.errors import UserError
from inkwash.text.base import TextEmbedding, TextEncoder

# Append-only: the id of a word is its position here (offset by the specials and the 256 bytes).
WORDS = (
    "a an the of on in at to and with is are there one two three four five six seven eight nine ten "
    "circle circles disc discs square squares box boxes triangle triangles star stars diamond diamonds "
    "rhombus hexagon hexagons cross crosses plus pluses shape shapes object objects "
    "red green blue yellow purple violet orange pink cyan turquoise white brown black gray grey beige "
    "small little tiny large big huge "
    "left right top bottom centre center middle above below under over beneath next side upper lower "
    "background picture image photo drawing of some several many few "
    "dog cat car house tree person man woman sky sun water city flower"
).split()

PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3
BYTE_OFFSET = N_SPECIAL
WORD_OFFSET = BYTE_OFFSET + 256
_SPLIT = re.compile(r"\w+|[^\w\s]")


class WordByteTokenizer:
    """Lower-cases, splits into words and punctuation; known words -> one id, others -> their UTF-8 bytes."""

    VERSION = 1

    def __init__(self, max_length: int = 64):
        self.max_length = max_length
        self.word_ids = {w: WORD_OFFSET + i for i, w in enumerate(WORDS)}
        self.vocab_size = WORD_OFFSET + len(WORDS)

    def encode(self, text: str) -> list[int]:
        """BOS, tokens, EOS (the empty prompt is [BOS, EOS])."""
        ids = [BOS]
        for piece in _SPLIT.findall(text.lower()):
            wid = self.word_ids.get(piece)
            ids.extend([wid] if wid is not None else [BYTE_OFFSET + b for b in piece.encode("utf-8")])
        ids.append(EOS)
        return ids

    def __call__(self, prompts: list[str], truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, L] long, mask [B, L] bool, padded to the longest prompt (at most max_length)."""
        seqs = [self.encode(p) for p in prompts]
        for p, s in zip(prompts, seqs):
            if len(s) > self.max_length and not truncate:
                raise UserError(
                    f"Prompt {p[:40]!r} is {len(s)} tokens long; the small text encoder takes at most "
                    f"{self.max_length}."
                )
        seqs = [s if len(s) <= self.max_length else s[: self.max_length - 1] + [EOS] for s in seqs]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, ids != PAD


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), x + mlp(ln(x)); attention through SDPA."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).unbind(2)  # 3 x [B,L,H,d]
        attn_mask = mask[:, None, None, :]  # [B, 1, 1, L]: attend to real keys only (BOS is always real)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class SmallTextEncoder(TextEncoder):
    """Trainable: embedding + learned positions + `layers` pre-LN blocks + final LN; pooled = masked mean."""

    trainable = True

    def __init__(self, dim: int = 256, layers: int = 4, heads: int = 4, max_length: int = 64, truncate: bool = True):
        super().__init__()
        if dim % heads:
            raise UserError(f"Small text encoder: dim {dim} must be divisible by heads {heads}.")
        if max_length < 2:
            raise UserError(f"Small text encoder: max_length must be at least 2, got {max_length}.")
        self.dim = self.pooled_dim = dim
        self.max_length = max_length
        self.truncate = truncate
        self.tokenizer = WordByteTokenizer(max_length)
        self.embed = nn.Embedding(self.tokenizer.vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_length, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """GPT-2 style: small normal embeddings and linears, residual projections scaled by depth."""
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        for name, p in self.blocks.named_parameters():
            if p.dim() == 2:
                std = 0.02 / (2 * len(self.blocks)) ** 0.5 if name.endswith(("proj.weight", "2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, L] long and mask [B, L] bool (on the CPU)."""
        return self.tokenizer(list(prompts), truncate=self.truncate)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids.to(self.pos.device), mask.to(self.pos.device))

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbedding:
        """Token ids [B, L] and mask [B, L] (True at real tokens) -> embedding."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # [B, L, D]
        for block in self.blocks:
            x = block(x, mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        x = self.ln(x) * m
        pooled = x.sum(1) / m.sum(1)
        return TextEmbedding(x, mask, pooled)
