"""Multiply-accumulate counts of a forward pass, via torch's FlopCounterMode (works on the meta device).

Owns nothing but counting; knows nothing of particular networks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, example_inputs: Sequence | Mapping) -> int:
    """Multiply-accumulates (MACs) of one forward pass; FlopCounterMode's FLOPs are 2 per MAC, so we halve them.

    `example_inputs` is a tuple of positional arguments or a dict of keyword arguments. Build the model
    and inputs under `torch.device("meta")` to count a large network without allocating it.
    """
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    counter = FlopCounterMode(display=False)
    # The math attention backend is made of counted matmuls; CPU's fused kernel would count as zero.
    with counter, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        model(*args, **kwargs)
    return counter.get_total_flops() // 2
