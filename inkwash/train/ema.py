"""Exponential moving average of a module's weights (the weights a trained model ships with).

Owns float32 shadow copies and their update rule; knows nothing of the loop that calls it.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after every optimizer step; buffers are copied."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the shadow weights towards `module`'s current weights."""
        params = dict(module.named_parameters())
        for name, value in module.state_dict().items():
            s = self.shadow[name]
            if name in params and value.is_floating_point():
                s.lerp_(value.detach().float(), 1.0 - self.decay)
            else:
                s.copy_(value)
        self.num_updates += 1

    def state_dict(self, dtype_like: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The shadow weights, cast to the dtypes of `dtype_like`'s state dict when given."""
        if dtype_like is None:
            return dict(self.shadow)
        ref = dtype_like.state_dict()
        return {k: v.to(ref[k].dtype) for k, v in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor], num_updates: int = 0) -> None:
        missing, unexpected = set(self.shadow) - set(sd), set(sd) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for k, v in sd.items():
            self.shadow[k].copy_(v)
        self.num_updates = num_updates

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the shadow weights into `module` (e.g. a copy used for sampling)."""
        module.load_state_dict(self.state_dict(module))
