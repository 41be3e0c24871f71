"""Trivial encoders: `NullEncoder` (unconditional) and `ClassLabelEncoder` (a fixed list of labels)."""

from __future__ import annotations

import torch
from torch import nn

from inkwash.errors import UserError
from inkwash.text.base import TextEmbedding, TextEncoder


class NullEncoder(TextEncoder):
    """Ignores the prompt. Returns ONE zero token with mask True per prompt, and a zero pooled vector.

    A single valid (zero) key keeps cross-attention well defined: softmax over one key is 1, so the
    attention output is just the value projection's bias, never the NaN an all-masked row would give.
    """

    trainable = False

    def __init__(self, dim: int = 64):
        super().__init__()
        self.dim = self.pooled_dim = dim
        self.max_length = 1
        self.register_buffer("_probe", torch.zeros(0), persistent=False)  # follows .to(device)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        B, dev = len(prompts), self._probe.device
        return TextEmbedding(
            torch.zeros(B, 1, self.dim, device=dev),
            torch.ones(B, 1, dtype=torch.bool, device=dev),
            torch.zeros(B, self.dim, device=dev),
        )


class ClassLabelEncoder(TextEncoder):
    """Prompt must be one of `labels` (or "" for unconditional); each maps to a learned embedding.

    Returns one token per prompt ([B, 1, dim], mask True) and the same vector as pooled. The empty prompt
    gets its own learned "null" embedding, so classifier-free guidance works.
    """

    trainable = True

    def __init__(self, labels: list[str] | tuple[str, ...], dim: int = 64):
        super().__init__()
        labels = [str(x) for x in labels]
        if not labels:
            raise UserError("The class-label text encoder needs at least one label.")
        if "" in labels or len(set(labels)) != len(labels):
            raise UserError("Class labels must be distinct and non-empty.")
        self.labels = labels
        self._index = {label: i for i, label in enumerate(labels)}
        self.dim = self.pooled_dim = dim
        self.max_length = 1
        self.embedding = nn.Embedding(len(labels) + 1, dim)  # last row = the unconditional "" prompt
        nn.init.normal_(self.embedding.weight, std=0.02)

    def label_ids(self, prompts: list[str]) -> torch.Tensor:
        """Index of each prompt in `labels` ("" -> the null class); UserError on anything else."""
        ids = []
        for p in prompts:
            if p == "":
                ids.append(len(self.labels))
            elif p in self._index:
                ids.append(self._index[p])
            else:
                valid = ", ".join(repr(x) for x in self.labels)
                raise UserError(f"Unknown class label {p!r}; valid labels are {valid} (or '' for none).")
        return torch.tensor(ids, dtype=torch.long, device=self.embedding.weight.device)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        vec = self.embedding(self.label_ids(list(prompts)))  # [B, D]
        mask = torch.ones(vec.shape[0], 1, dtype=torch.bool, device=vec.device)
        return TextEmbedding(vec.unsqueeze(1), mask, vec)
