"""The spine: noise processes, prediction kinds, the Denoiser, and the training objective.

Knows nothing of network architectures, samplers, text or files.
"""

from .denoiser import Denoiser, expand
from .losses import TIME_SAMPLINGS, TimeSampler, diffusion_loss, min_snr_weight
from .process import (
    EDM,
    PREDICTIONS,
    VP,
    Flow,
    Process,
    flux_mu,
    from_x0_eps,
    process_from_dict,
    shift_time,
    to_x0_eps,
)

__all__ = [
    "EDM",
    "PREDICTIONS",
    "TIME_SAMPLINGS",
    "VP",
    "Denoiser",
    "Flow",
    "Process",
    "TimeSampler",
    "diffusion_loss",
    "expand",
    "flux_mu",
    "from_x0_eps",
    "min_snr_weight",
    "process_from_dict",
    "shift_time",
    "to_x0_eps",
]
