"""Sampling: time grids, samplers as plain functions, and guidance. Knows nothing of networks or text."""

from __future__ import annotations

import torch

from ..diffusion.process import Process
from .grids import GRIDS, SCHEDULES, default_schedule, make_times
from .guidance import Guided, cat_cond
from .samplers import SAMPLERS, get_sampler


def sample(
    model,
    shape: tuple[int, ...],
    *,
    process: Process,
    steps: int,
    sampler: str = "euler",
    schedule: str | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    callback=None,
    schedule_opts: dict | None = None,
    **sampler_opts,
) -> torch.Tensor:
    """Draw starting noise on the CPU from `generator`, then run `sampler` over the grid; returns x0."""
    fn = get_sampler(sampler)
    times = make_times(process, steps, schedule, **(schedule_opts or {}))
    x = process.init_noise(shape, generator, times[0]).to(device)
    return fn(model, x, times, process=process, generator=generator, callback=callback, **sampler_opts)


__all__ = [
    "GRIDS",
    "SAMPLERS",
    "SCHEDULES",
    "Guided",
    "cat_cond",
    "default_schedule",
    "get_sampler",
    "make_times",
    "sample",
]
