"""Per-prompt embedding cache for frozen encoders: each distinct caption is encoded once per run."""

from __future__ import annotations

import torch
from torch import nn

from inkwash.text.base import TextEmbedding, TextEncoder


class CachedTextEncoder(TextEncoder):
    """Wraps a frozen encoder; stores (tokens, mask, pooled) per prompt unpadded, re-pads per batch.

    Padding is to the longest prompt of the batch, as the wrapped encoders do, so the output matches the
    wrapped encoder's. Entries live on the device they were computed on and move with the output.
    `max_entries` bounds memory (the oldest entries are dropped first); None keeps everything.
    """

    trainable = False

    def __init__(self, encoder: TextEncoder, max_entries: int | None = None):
        super().__init__()
        if encoder.trainable:
            raise ValueError("CachedTextEncoder needs a frozen encoder; a trainable one changes every step.")
        self.encoder = encoder
        self.dim, self.pooled_dim, self.max_length = encoder.dim, encoder.pooled_dim, encoder.max_length
        self.max_entries = max_entries
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def _encode(self, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        emb = self.encoder(prompts)
        L = emb.mask.shape[1]
        positions = torch.arange(1, L + 1, device=emb.mask.device)
        ends = (emb.mask.long() * positions).amax(1).tolist()  # keep up to the last real token; one device sync
        return {p: (emb.tokens[i, :n], emb.mask[i, :n], emb.pooled[i]) for i, (p, n) in enumerate(zip(prompts, ends))}

    def _evict(self) -> None:
        if self.max_entries is not None:
            for key in list(self._cache)[: max(0, len(self._cache) - self.max_entries)]:
                del self._cache[key]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        fresh = self._encode(missing) if missing else {}
        entries = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        self._cache.update(fresh)
        self._evict()
        L = max(t.shape[0] for t, _, _ in entries)
        tokens = torch.stack([nn.functional.pad(t, (0, 0, 0, L - t.shape[0])) for t, _, _ in entries])
        mask = torch.stack([nn.functional.pad(m, (0, L - m.shape[0]), value=False) for _, m, _ in entries])
        pooled = torch.stack([p for _, _, p in entries])
        return TextEmbedding(tokens, mask, pooled)
