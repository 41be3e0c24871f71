"""Samplers: plain functions `sampler(model, x, times, *, process, generator, callback, **opts) -> x0`.

`model(x, t) -> x0_hat` is a denoiser with its conditioning bound (see guidance.py). The state x lives
on the process's own scale (x_t = alpha x0 + sigma eps) in float32; coefficients are computed in
float64 from the process and applied in float32. Samplers keep no state between calls; fresh noise
comes from `generator` (a CPU generator, so a seed gives the same image on any device).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..diffusion.process import Process
from ..errors import UserError

Tensor = torch.Tensor
Model = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], None]


def _coeffs(process: Process, t) -> tuple[float, float]:
    alpha, sigma = process.alpha_sigma(t)
    return float(alpha), float(sigma)


def _ratio(alpha: float, sigma: float) -> float:
    """sigma / alpha, the variance-exploding noise level; infinite at pure noise (Flow at t = 1)."""
    return sigma / alpha if alpha > 0 else float("inf")


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)


def _steps(times: Tensor):
    """(i, t, t_next) for each step of the grid."""
    for i in range(len(times) - 1):
        yield i, times[i], times[i + 1]


def _report(callback: Callback | None, i: int, times: Tensor, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback(i, len(times) - 1, x, x0)


def _eps(x: Tensor, x0: Tensor, alpha: float, sigma: float) -> Tensor:
    return (x - alpha * x0) / sigma


def ddim(model: Model, x: Tensor, times: Tensor, *, process: Process, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): x' = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z, s = eta * sigma_DDIM.

    With eta = 0 this is the one deterministic first-order step: Euler on the probability-flow ODE in
    sigma/alpha (Karras et al. 2022) and flow-Euler on a Flow process are the same formula.
    """
    for i, t, t_next in _steps(times):
        a, s = _coeffs(process, t)
        a_next, s_next = _coeffs(process, t_next)
        x0 = model(x, t)
        eps = _eps(x, x0, a, s)
        s_eta = eta * (s_next / s) * max(0.0, 1 - (a / a_next) ** 2) ** 0.5 if eta else 0.0
        x = a_next * x0 + max(s_next**2 - s_eta**2, 0.0) ** 0.5 * eps
        if s_eta > 0:
            x = x + s_eta * _noise(x, generator)
        _report(callback, i, times, x, x0)
    return x


def euler(model: Model, x: Tensor, times: Tensor, *, process: Process, generator=None, callback=None):
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn): DDIM with eta = 0."""
    return ddim(model, x, times, process=process, generator=generator, callback=callback)


def flow_euler(model: Model, x: Tensor, times: Tensor, *, process: Process, generator=None, callback=None):
    """Euler on a rectified-flow path, x' = x + (t' - t) u (SD3, FLUX); the same step as `euler`."""
    return ddim(model, x, times, process=process, generator=generator, callback=callback)


def euler_ancestral(
    model: Model, x: Tensor, times: Tensor, *, process: Process, generator=None, callback=None, eta=1.0
):
    """Euler ancestral (k-diffusion): step down to sigma_down, add fresh noise sigma_up, in sigma/alpha."""
    for i, t, t_next in _steps(times):
        a, s = _coeffs(process, t)
        a_next, s_next = _coeffs(process, t_next)
        r, r_next = _ratio(a, s), _ratio(a_next, s_next)
        x0 = model(x, t)
        eps = _eps(x, x0, a, s)
        r_up = min(r_next, eta * r_next * max(0.0, 1 - (r_next / r) ** 2) ** 0.5)  # r = inf at pure noise
        r_down = (r_next**2 - r_up**2) ** 0.5
        x_ve = x0 + r_down * eps
        if r_up > 0:
            x_ve = x_ve + r_up * _noise(x, generator)
        x = a_next * x_ve
        _report(callback, i, times, x, x0)
    return x


def heun(model: Model, x: Tensor, times: Tensor, *, process: Process, generator=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Alg. 1) in sigma/alpha; Euler for the last step to
    sigma = 0 and for a first step from pure noise (alpha = 0, where sigma/alpha is infinite)."""
    for i, t, t_next in _steps(times):
        a, s = _coeffs(process, t)
        a_next, s_next = _coeffs(process, t_next)
        x0 = model(x, t)
        eps = _eps(x, x0, a, s)
        x_ve_pred = x0 + (s_next / a_next) * eps  # Euler step, on the variance-exploding scale
        if s_next == 0 or a == 0:  # to the clean end, or from pure noise (Flow at t = 1): Euler
            x = a_next * x_ve_pred
        else:
            x0_2 = model(a_next * x_ve_pred, t_next)
            eps_2 = (x_ve_pred - x0_2) / (s_next / a_next)
            x = a_next * (x / a + (s_next / a_next - s / a) * 0.5 * (eps + eps_2))
        _report(callback, i, times, x, x0)
    return x


def _dpmpp_2m(model, x, times, process, generator, callback, sde: bool):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in lambda = log(alpha / sigma); SDE variant (Lu et al.
    2022b / diffusers' sde-dpmsolver++ midpoint). First order on the first and the last step."""
    x0_prev, h_prev = None, None
    n = len(times) - 1
    for i, t, t_next in _steps(times):
        a, s = _coeffs(process, t)
        a_next, s_next = _coeffs(process, t_next)
        x0 = model(x, t)
        e_h = _ratio(a_next, s_next) / _ratio(a, s)  # exp(-h), h = lambda' - lambda; 0 at the clean end
        h = -torch.log(torch.tensor(e_h, dtype=torch.float64)).item() if e_h > 0 else float("inf")
        d = x0
        if x0_prev is not None and i < n - 1:
            r = h_prev / h
            d = x0 + (0.5 / r) * (x0 - x0_prev)  # D0 + D1 / 2 with D1 = (D0 - D_prev) / r
        if sde:
            x = (s_next / s * e_h) * x + a_next * (1 - e_h**2) * d
            noise = _noise(x, generator)
            x = x + s_next * max(0.0, 1 - e_h**2) ** 0.5 * noise
        else:
            x = (s_next / s) * x + a_next * (1 - e_h) * d
        x0_prev, h_prev = x0, h
        _report(callback, i, times, x, x0)
    return x


def dpmpp_2m(model: Model, x: Tensor, times: Tensor, *, process: Process, generator=None, callback=None):
    """DPM-Solver++(2M), deterministic (Lu et al. 2022)."""
    return _dpmpp_2m(model, x, times, process, generator, callback, sde=False)


def dpmpp_2m_sde(model: Model, x: Tensor, times: Tensor, *, process: Process, generator=None, callback=None):
    """DPM-Solver++(2M) SDE: the same multistep data prediction with fresh noise each step."""
    return _dpmpp_2m(model, x, times, process, generator, callback, sde=True)


def ddpm(model: Model, x: Tensor, times: Tensor, *, process: Process, generator=None, callback=None):
    """Ancestral sampling from the Gaussian posterior q(x_t' | x_t, x0) (Ho et al. 2020, eq. 6-7)."""
    for i, t, t_next in _steps(times):
        a, s = _coeffs(process, t)
        a_next, s_next = _coeffs(process, t_next)
        x0 = model(x, t)
        a_ts = a / a_next
        s_ts2 = max(s**2 - a_ts**2 * s_next**2, 0.0)
        x = (a_ts * s_next**2 / s**2) * x + (a_next * s_ts2 / s**2) * x0
        var = s_ts2 * s_next**2 / s**2
        if var > 0:
            x = x + var**0.5 * _noise(x, generator)
        _report(callback, i, times, x, x0)
    return x


def lcm(
    model: Model,
    x: Tensor,
    times: Tensor,
    *,
    process: Process,
    generator=None,
    callback=None,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
):
    """LCM multistep sampling (Luo et al. 2023, Alg. 3): denoise with the consistency boundary condition
    (c_skip, c_out on the network time x timestep_scaling), then re-noise to the next time."""
    for i, t, t_next in _steps(times):
        a_next, s_next = _coeffs(process, t_next)
        x0 = model(x, t)
        c = float(process.net_time(t)) * timestep_scaling
        c_skip, c_out = sigma_data**2 / (c**2 + sigma_data**2), c / (c**2 + sigma_data**2) ** 0.5
        denoised = c_out * x0 + c_skip * x
        x = a_next * denoised
        if s_next > 0:
            x = x + s_next * _noise(x, generator)
        _report(callback, i, times, x, denoised)
    return x


SAMPLERS: dict[str, Callable] = {
    "ddim": ddim,
    "ddpm": ddpm,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "lcm": lcm,
    "flow_euler": flow_euler,
}


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
