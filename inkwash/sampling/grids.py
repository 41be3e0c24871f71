"""Time grids: small functions returning steps + 1 float64 times, noisiest first, ending at the clean end.

VP grids follow diffusers' spacings (leading, trailing, linspace); Karras and exponential grids are
spaced in the noise level sigma/alpha; the flow grid is FLUX's linspace with SD3's/FLUX's shift.
"""

from __future__ import annotations

import math

import torch

from ..diffusion.process import EDM, VP, Flow, Process, shift_time
from ..errors import UserError

SCHEDULES = ("leading", "trailing", "linspace", "karras", "exponential", "shift", "sd3", "lcm")


def _finish(process: Process, t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.to(torch.float64), torch.tensor([process.t_clean], dtype=torch.float64)])


def _need_vp(process: Process, name: str) -> VP:
    if not isinstance(process, VP):
        raise UserError(f"the {name!r} schedule spaces discrete timesteps and needs a VP model; try 'karras'")
    return process


def leading(process: Process, steps: int, offset: int = 1) -> torch.Tensor:
    """Stable Diffusion's spacing: 0, k, 2k, ... (+ offset), k = n // steps."""
    vp = _need_vp(process, "leading")
    k = vp.n // steps
    return _finish(process, (torch.arange(steps) * k + offset).flip(0).clamp(max=vp.n - 1))


def trailing(process: Process, steps: int) -> torch.Tensor:
    """Lin et al. (2023) table 2: start at the last timestep, step n / steps."""
    vp = _need_vp(process, "trailing")
    t = torch.round(torch.arange(vp.n, 0, -vp.n / steps, dtype=torch.float64)) - 1
    return _finish(process, t[:steps])


def linspace(process: Process, steps: int, t_last: float | None = None) -> torch.Tensor:
    """Evenly spaced times from the noisiest down to `t_last` (VP: timestep 0; Flow: 1 / steps)."""
    if isinstance(process, VP):
        return _finish(process, torch.linspace(process.n - 1, 0 if t_last is None else t_last, steps))
    if isinstance(process, Flow):
        return _finish(process, torch.linspace(1.0, 1.0 / steps if t_last is None else t_last, steps))
    return karras(process, steps)


def _ratio_bounds(process: Process, ratio_min, ratio_max) -> tuple[float, float]:
    lo, hi = process.ratio_range()
    return (lo if ratio_min is None else ratio_min), (hi if ratio_max is None else ratio_max)


def karras(process: Process, steps: int, rho: float = 7.0, ratio_min=None, ratio_max=None) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: noise levels evenly spaced in sigma^(1/rho). Flow: on t in [1/1000, 1]."""
    if isinstance(process, Flow):
        lo, hi = ratio_min or 1e-3, ratio_max or 1.0
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        return _finish(process, (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)
    lo, hi = _ratio_bounds(process, ratio_min, ratio_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    ratios = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return _finish(process, process.t_from_ratio(ratios))


def exponential(process: Process, steps: int, ratio_min=None, ratio_max=None) -> torch.Tensor:
    """Noise levels evenly spaced in log sigma (k-diffusion's get_sigmas_exponential)."""
    if isinstance(process, Flow):
        lo, hi = ratio_min or 1e-3, ratio_max or 1.0
        return _finish(process, torch.exp(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64)))
    lo, hi = _ratio_bounds(process, ratio_min, ratio_max)
    ratios = torch.exp(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64))
    return _finish(process, process.t_from_ratio(ratios))


def shift(process: Process, steps: int, seq_len: int | None = None, t_last: float | None = None) -> torch.Tensor:
    """FLUX's get_schedule: linspace(1, 0) shifted by SD3's static shift or FLUX's exp(mu(seq_len))."""
    if not isinstance(process, Flow):
        raise UserError("the 'shift' schedule is for flow models; try 'trailing' or 'karras'")
    t = torch.linspace(1.0, 1.0 / steps if t_last is None else t_last, steps, dtype=torch.float64)
    return _finish(process, shift_time(t, process.shift_for(seq_len)))


def sd3(process: Process, steps: int, n_train: int = 1000) -> torch.Tensor:
    """SD3's reference spacing (Stability's sd3_impl, diffusers' FlowMatchEulerDiscreteScheduler): linspace from 1
    to the shifted first of `n_train` training times, shifted (again), then the clean end."""
    if not isinstance(process, Flow) or process.dynamic_shift:
        raise UserError("the 'sd3' schedule is for flow models with a static shift; try 'shift'")
    return shift(process, steps, t_last=float(shift_time(1.0 / n_train, process.shift)))


def lcm(process: Process, steps: int, original_steps: int = 50) -> torch.Tensor:
    """LCM's skipping-step grid (Luo et al. 2023): `steps` picks from the `original_steps` distillation grid."""
    vp = _need_vp(process, "lcm")
    if steps > original_steps:
        raise UserError(f"LCM sampling takes at most {original_steps} steps, got {steps}")
    k = vp.n // original_steps
    origin = (torch.arange(1, original_steps + 1) * k - 1).flip(0)
    idx = torch.floor(torch.arange(steps, dtype=torch.float64) * original_steps / steps).long()
    return _finish(process, origin[idx])


GRIDS = {
    "leading": leading,
    "trailing": trailing,
    "linspace": linspace,
    "karras": karras,
    "exponential": exponential,
    "shift": shift,
    "sd3": sd3,
    "lcm": lcm,
}


def default_schedule(process: Process) -> str:
    if isinstance(process, Flow):
        return "shift"
    if isinstance(process, EDM):
        return "karras"
    return "trailing"


def make_times(process: Process, steps: int, schedule: str | None = None, **opts) -> torch.Tensor:
    """The sampling grid: `steps` + 1 times from the noisiest to the clean end."""
    if int(steps) != steps or steps <= 0:
        raise UserError(f"steps must be a positive whole number, got {steps}")
    name = schedule or default_schedule(process)
    if name not in GRIDS:
        raise UserError(f"unknown schedule {name!r}; valid: {', '.join(GRIDS)}")
    return GRIDS[name](process, int(steps), **opts)
