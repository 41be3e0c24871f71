"""Training objective: draw t, noise x0 along the process, regress the prediction target.

Time sampling (uniform, SD3's logit-normal, shifted), min-SNR-gamma weighting (Hang et al. 2023) and
offset noise live here. Knows nothing of networks beyond the Denoiser.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import UserError
from .denoiser import Denoiser, expand
from .process import Flow, from_x0_eps, shift_time, x0_error_factor

Tensor = torch.Tensor

TIME_SAMPLINGS = ("uniform", "logit_normal", "shifted")


@dataclass
class TimeSampler:
    """How training times are drawn, as u in (0, 1) mapped through the process (0 clean, 1 noisiest).

    uniform: u ~ U(0, 1).  logit_normal: u = sigmoid(N(mean, std)) (SD3, Esser et al. 2024, eq. 19).
    shifted: u ~ U(0, 1) then SD3's shift (`shift`, or the process's).
    `shift` also shifts the other methods' draws: a number, or "process" for the Flow process's own shift —
    with FLUX's `dynamic_shift`, exp(mu) for the image's token count (SD3 section 5.3.2, FLUX: training at a
    resolution sees the same shifted times its sampling grid uses).
    `low`/`high` keep u in a part of the schedule: SDXL's refiner is trained on the low-noise fifth (high=0.2).
    """

    method: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    shift: float | str | None = None
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if self.method not in TIME_SAMPLINGS:
            raise UserError(f"unknown time sampling {self.method!r}; valid: {', '.join(TIME_SAMPLINGS)}")
        if not 0.0 <= self.low < self.high <= 1.0:
            raise UserError(f"time sampling range needs 0 <= low < high <= 1, got low={self.low}, high={self.high}")
        if not (self.shift in (None, "process") or (isinstance(self.shift, (int, float)) and self.shift > 0)):
            raise UserError(f'time sampling shift must be a positive number or "process", got {self.shift!r}')

    def shift_for(self, process=None, seq_len: int | None = None) -> float:
        """The shift applied to drawn times (1 = none)."""
        shift = "process" if self.shift is None and self.method == "shifted" else self.shift
        if shift == "process":
            return process.shift_for(seq_len) if isinstance(process, Flow) else 1.0
        return 1.0 if shift is None else float(shift)

    def draw_u(self, n: int, generator: torch.Generator | None, process=None, seq_len: int | None = None) -> Tensor:
        """`seq_len`: the image's token count, for a process whose shift depends on resolution."""
        if self.method == "logit_normal":
            u = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64))
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        shift = self.shift_for(process, seq_len)
        if shift != 1.0:
            u = shift_time(u, shift)
        return self.low + (self.high - self.low) * u

    def to_dict(self) -> dict:
        return asdict(self)


def min_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) on the x0 error, expressed for the loss on `prediction`'s target."""
    snr = alpha**2 / sigma**2
    return snr.clamp(max=gamma) / x0_error_factor(alpha, sigma, prediction)


def diffusion_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    time_sampler: TimeSampler | None = None,
    min_snr_gamma: float | None = None,
    offset_noise: float = 0.0,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample MSE on the prediction target, and the times drawn. Randomness from `generator` (CPU).
    `seq_len`: the network's image token count, for time sampling shifted by resolution."""
    process, kind = denoiser.process, denoiser.prediction
    b = x0.shape[0]
    t = process.t_from_u((time_sampler or TimeSampler()).draw_u(b, generator, process, seq_len))
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    if offset_noise:  # Guttenberg 2023: a per-channel constant, so the model can shift mean brightness
        eps = eps + offset_noise * torch.randn(b, x0.shape[1], *([1] * (x0.dim() - 2)), generator=generator)
    eps = eps.to(x0.device)
    alpha64, sigma64 = process.alpha_sigma(t)
    alpha, sigma = (expand(v, x0).to(x0.device, torch.float32) for v in (alpha64, sigma64))
    x_t = alpha * x0.float() + sigma * eps
    target = from_x0_eps(x0.float(), eps, alpha, sigma, kind)
    out = denoiser.raw(x_t, t, **(cond or {})).float()
    loss = ((out - target) ** 2).mean(dim=tuple(range(1, x0.dim())))
    if min_snr_gamma:
        loss = loss * min_snr_weight(alpha64, sigma64, kind, min_snr_gamma).to(loss)
    return loss, t
