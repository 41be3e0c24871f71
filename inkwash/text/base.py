"""The one interface every text encoder implements. Knows nothing of networks or noise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextEmbedding:
    """What a text encoder returns for a batch of prompts."""

    tokens: torch.Tensor  # [B, L, D] per-token embeddings (zeros at padding)
    mask: torch.Tensor  # [B, L] bool, True at real tokens
    pooled: torch.Tensor  # [B, P] one vector per prompt

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device=None, dtype=None) -> TextEmbedding:
        return TextEmbedding(
            self.tokens.to(device=device, dtype=dtype), self.mask.to(device), self.pooled.to(device=device, dtype=dtype)
        )

    @staticmethod
    def cat(items: list[TextEmbedding]) -> TextEmbedding:
        """Concatenate along the batch, padding token sequences to the longest."""
        L = max(e.tokens.shape[1] for e in items)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, L - t.shape[1]), value=v)  # noqa: E731
        return TextEmbedding(
            torch.cat([pad(e.tokens, 0.0) for e in items]),
            torch.cat([pad(e.mask, False) for e in items]),
            torch.cat([e.pooled for e in items]),
        )

    def index(self, idx) -> TextEmbedding:
        return TextEmbedding(self.tokens[idx], self.mask[idx], self.pooled[idx])


class TextEncoder(nn.Module):
    """prompts -> TextEmbedding. Subclasses set `dim` (token width), `pooled_dim` and `max_length`."""

    dim: int
    pooled_dim: int
    max_length: int
    trainable: bool = False

    def forward(self, prompts: list[str]) -> TextEmbedding:  # pragma: no cover - interface
        raise NotImplementedError
