"""Several text encoders read the same prompt, their outputs combined (SDXL: CLIP ViT-L and OpenCLIP ViT-bigG;
SD3: both CLIPs and T5).

`combine="features"` concatenates the encoders' token features position by position (SDXL: 768 + 1280 = 2048
wide; meant for encoders that share a tokenizer, shorter sequences are zero-padded); `combine="sequence"`
zero-pads every encoder's features to the widest and concatenates the token sequences (SD3's CLIP + T5).
The pooled vector is the last encoder's (SDXL: bigG's) or all pooled vectors concatenated (SD3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.errors import UserError
from inkwash.text.base import TextEmbedding, TextEncoder

COMBINES = ("features", "sequence")
POOLINGS = ("last", "concat")


def _pad(t: torch.Tensor, length: int, width: int | None = None, value=0.0) -> torch.Tensor:
    """Pad [B, L, D] (or a [B, L] mask) to `length` tokens and, for features, `width` channels."""
    if t.dim() == 2:
        return F.pad(t, (0, length - t.shape[1]), value=value)
    return F.pad(t, (0, (width or t.shape[2]) - t.shape[2], 0, length - t.shape[1]), value=value)


class DualTextEncoder(TextEncoder):
    """Text encoders side by side; trainable when any of them is (the frozen ones stay frozen)."""

    def __init__(self, encoders: list[TextEncoder], combine: str = "features", pooled: str = "last"):
        super().__init__()
        if len(encoders) < 2:
            raise UserError("a dual text encoder needs at least two encoders")
        if combine not in COMBINES:
            raise UserError(f"unknown text combine {combine!r}; valid: {', '.join(COMBINES)}")
        if pooled not in POOLINGS:
            raise UserError(f"unknown pooled choice {pooled!r}; valid: {', '.join(POOLINGS)}")
        self.encoders = nn.ModuleList(encoders)
        self.combine, self.pooled = combine, pooled
        dims = [e.dim for e in encoders]
        self.dim = sum(dims) if combine == "features" else max(dims)
        self.pooled_dim = encoders[-1].pooled_dim if pooled == "last" else sum(e.pooled_dim for e in encoders)
        lengths = [e.max_length for e in encoders]
        self.max_length = max(lengths) if combine == "features" else sum(lengths)
        self.trainable = any(getattr(e, "trainable", False) for e in encoders)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        embs = [enc(prompts) for enc in self.encoders]
        if self.combine == "features":
            L = max(e.tokens.shape[1] for e in embs)
            tokens = torch.cat([_pad(e.tokens, L) for e in embs], dim=-1)
            mask = torch.stack([_pad(e.mask, L, value=False) for e in embs]).any(dim=0)
        else:
            tokens = torch.cat([_pad(e.tokens, e.tokens.shape[1], self.dim) for e in embs], dim=1)
            mask = torch.cat([e.mask for e in embs], dim=1)
        pooled = embs[-1].pooled if self.pooled == "last" else torch.cat([e.pooled for e in embs], dim=-1)
        return TextEmbedding(tokens, mask, pooled)

    # Frozen pretrained encoders are rebuilt from their own packages: only trainable ones are trained and saved.

    def _trainable_prefixes(self) -> tuple[str, ...]:
        return tuple(f"encoders.{i}." for i, e in enumerate(self.encoders) if getattr(e, "trainable", False))

    def train(self, mode: bool = True) -> DualTextEncoder:
        super().train(mode)
        for e in self.encoders:  # a frozen pretrained encoder never runs its dropout
            if not getattr(e, "trainable", False):
                e.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> DualTextEncoder:
        for e in self.encoders:
            e.requires_grad_(requires_grad and getattr(e, "trainable", False))
        return self

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = tuple(prefix + p for p in self._trainable_prefixes())
        for key in [k for k in sd if k.startswith(prefix + "encoders.") and not k.startswith(keep)]:
            del sd[key]  # only this module's frozen encoders (a parent may share the dict)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k.startswith(self._trainable_prefixes())]
        if strict and (missing or result.unexpected_keys):
            bad = f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
            raise RuntimeError(f"dual text encoder weights do not fit: {bad}")
        return result
