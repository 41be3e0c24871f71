"""Noise processes: the one path x_t = alpha(t) * x0 + sigma(t) * eps, and how networks predict along it.

Owns alpha/sigma (float64), their inverse, the time a network sees, training-time draws and the
conversions between prediction kinds. Knows nothing of networks, samplers or text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import UserError

PREDICTIONS = ("eps", "v", "x0", "flow")

Tensor = torch.Tensor


def _f64(t) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class Process:
    """Base class. Subclasses define `alpha_sigma`, `t_from_ratio` (the inverse of sigma/alpha) and the time range."""

    kind: str
    t_max: float  # the noisiest time used for sampling
    t_clean: float  # the time at which alpha = 1, sigma = 0 (the end of every sampling grid)

    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def ratio(self, t) -> Tensor:
        """sigma / alpha: the noise level of the equivalent variance-exploding path (k-diffusion's sigma)."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_from_ratio(self, ratio) -> Tensor:
        """Inverse of `ratio`: the time at which sigma / alpha equals `ratio`."""
        raise NotImplementedError

    def net_time(self, t) -> Tensor:
        """The time value the network is conditioned on."""
        return _f64(t)

    def input_scale(self, t) -> Tensor:
        """Factor applied to x_t before the network sees it (EDM's c_in; 1 for VP and Flow)."""
        return torch.ones_like(_f64(t))

    def t_from_u(self, u: Tensor) -> Tensor:
        """Map u in [0, 1] (0 clean, 1 noisiest) to a training time."""
        raise NotImplementedError

    def normalized_time(self, t) -> Tensor:
        """Map a time to [0, 1] (0 clean, 1 noisiest); the inverse of `t_from_u`, used to bin losses."""
        raise NotImplementedError

    def init_noise(self, shape, generator: torch.Generator | None, t=None) -> Tensor:
        """x at the start of sampling: eps scaled to the marginal std at `t` of unit-variance data."""
        alpha, sigma = self.alpha_sigma(self.t_max if t is None else t)
        eps = torch.randn(shape, generator=generator, dtype=torch.float32)
        return eps * float(torch.sqrt(alpha**2 + sigma**2))

    def ratio_range(self) -> tuple[float, float]:
        """The smallest and largest noise level (sigma / alpha) the process is trained on."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


# --- VP: discrete betas ---------------------------------------------------------------------------


def betas_for(schedule: str, n: int, beta_start: float, beta_end: float) -> Tensor:
    """Beta schedules of DDPM (linear), Stable Diffusion (scaled_linear) and Nichol & Dhariwal (cosine)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "cosine":  # improved DDPM eq. 17, betas clipped at 0.999 (diffusers' squaredcos_cap_v2)
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise UserError(f"unknown beta schedule {schedule!r}; valid: linear, scaled_linear, cosine")


@dataclass
class VP(Process):
    """Variance-preserving DDPM process over discrete timesteps 0..n-1 (the network sees the index).

    Between integer timesteps log(sigma/alpha) is interpolated linearly, the inverse of diffusers'
    `_sigma_to_t`, so Karras and exponential grids land on fractional timesteps consistently.
    """

    schedule: str = "scaled_linear"
    n: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    kind = "vp"

    def __post_init__(self):
        self.betas = betas_for(self.schedule, self.n, self.beta_start, self.beta_end)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.log_ratios = 0.5 * torch.log((1 - self.alphas_cumprod) / self.alphas_cumprod)  # increasing in t
        self.t_max = float(self.n - 1)
        self.t_clean = -1.0

    def _log_ratio(self, t: Tensor) -> Tensor:
        tc = t.clamp(0, self.n - 1)
        lo = tc.floor().clamp(max=self.n - 2).long()
        w = tc - lo
        return (1 - w) * self.log_ratios[lo] + w * self.log_ratios[lo + 1]

    def alpha_sigma(self, t):
        t = _f64(t)
        s = torch.exp(self._log_ratio(t))
        alpha, sigma = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
        clean = t < 0
        return torch.where(clean, 1.0, alpha), torch.where(clean, 0.0, sigma)

    def t_from_ratio(self, ratio):
        ratio = _f64(ratio)
        log_r = torch.log(ratio.clamp(min=1e-10))
        lr = self.log_ratios
        lo = (torch.searchsorted(lr, log_r, right=True) - 1).clamp(0, self.n - 2)
        w = ((log_r - lr[lo]) / (lr[lo + 1] - lr[lo])).clamp(0, 1)
        return torch.where(ratio <= 0, self.t_clean, lo + w)

    def t_from_u(self, u):
        return (_f64(u) * self.n).floor().clamp(0, self.n - 1)  # DDPM trains on integer timesteps

    def normalized_time(self, t):
        return (_f64(t) + 1) / self.n

    def ratio_range(self):
        return float(torch.exp(self.log_ratios[0])), float(torch.exp(self.log_ratios[-1]))


# --- Flow: rectified flow -------------------------------------------------------------------------


def flux_mu(seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """FLUX's resolution-dependent shift: mu linear in the image token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + m * (seq_len - base_seq_len)


def shift_time(t, shift: float) -> Tensor:
    """SD3's time shift t' = s t / (1 + (s - 1) t); FLUX's exp(mu) / (exp(mu) + 1/t - 1) is s = exp(mu)."""
    t = _f64(t)
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class Flow(Process):
    """Rectified flow x_t = (1 - t) x0 + t eps, t in [0, 1] (the network sees t * time_scale).

    `shift` (SD3: 3.0) warps sampling grids and shifted training draws; with `dynamic_shift` the shift is
    exp(mu) with mu from the image's token count (FLUX), given at sampling time.
    """

    shift: float = 1.0
    dynamic_shift: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    time_scale: float = 1000.0

    kind = "flow"
    t_max = 1.0
    t_clean = 0.0

    def alpha_sigma(self, t):
        t = _f64(t)
        return 1 - t, t

    def t_from_ratio(self, ratio):
        ratio = _f64(ratio)
        return torch.where(torch.isinf(ratio), 1.0, ratio / (1 + ratio))

    def net_time(self, t):
        return _f64(t) * self.time_scale

    def shift_for(self, seq_len: int | None = None) -> float:
        """The time shift to use: static, or exp(mu) for an image of `seq_len` tokens."""
        if not self.dynamic_shift:
            return self.shift
        if seq_len is None:
            raise UserError("this flow model shifts time by resolution; give the image token count")
        mu = flux_mu(seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)
        return math.exp(mu)

    def t_from_u(self, u):
        return _f64(u)

    def normalized_time(self, t):
        return _f64(t)

    def ratio_range(self):
        return 1e-3 / (1 - 1e-3), float("inf")

    def init_noise(self, shape, generator, t=None):
        return torch.randn(shape, generator=generator, dtype=torch.float32)


# --- EDM / VE -------------------------------------------------------------------------------------


@dataclass
class EDM(Process):
    """Karras et al. (2022): x = x0 + sigma eps with t = sigma; the network sees c_noise = ln(sigma) / 4."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    time_scale: float = 1000.0  # c_noise is multiplied by this, to suit sinusoidal time embeddings

    kind = "edm"
    t_clean = 0.0

    def __post_init__(self):
        self.t_max = self.sigma_max

    def alpha_sigma(self, t):
        t = _f64(t)
        return torch.ones_like(t), t

    def t_from_ratio(self, ratio):
        return _f64(ratio)

    def net_time(self, t):
        return 0.25 * torch.log(_f64(t).clamp(min=1e-20)) * self.time_scale

    def input_scale(self, t):
        return 1 / torch.sqrt(_f64(t) ** 2 + self.sigma_data**2)  # c_in

    def t_from_u(self, u):
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + _f64(u) * (hi - lo))

    def normalized_time(self, t):
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return ((torch.log(_f64(t).clamp(min=1e-20)) - lo) / (hi - lo)).clamp(0, 1)

    def ratio_range(self):
        return self.sigma_min, self.sigma_max


PROCESSES = {"vp": VP, "flow": Flow, "edm": EDM}


def process_from_dict(d: dict) -> Process:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in PROCESSES:
        raise UserError(f"unknown process {kind!r}; valid: {', '.join(PROCESSES)}")
    return PROCESSES[kind](**d)


# --- predictions ----------------------------------------------------------------------------------
# For every kind, with x = alpha x0 + sigma eps:
#   eps:  the noise;  x0: the data;  v = alpha eps - sigma x0 (Salimans & Ho);  flow: u = eps - x0 (velocity).


def check_prediction(kind: str) -> str:
    if kind not in PREDICTIONS:
        raise UserError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")
    return kind


def to_x0_eps(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Convert a network output of prediction `kind` at x_t to (x0, eps)."""
    if kind == "eps":
        return (x - sigma * out) / alpha, out
    if kind == "x0":
        return out, (x - alpha * out) / sigma
    if kind == "v":
        norm = alpha**2 + sigma**2
        return (alpha * x - sigma * out) / norm, (sigma * x + alpha * out) / norm
    if kind == "flow":
        x0 = (x - sigma * out) / (alpha + sigma)
        return x0, out + x0
    raise UserError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")


def from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """The quantity a network of prediction `kind` should output (the training target)."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "flow":
        return eps - x0
    raise UserError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")


def x0_error_factor(alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """c with |target error|^2 = c |x0 error|^2 at fixed x_t (for min-SNR weighting in any parametrisation)."""
    snr = alpha**2 / sigma**2
    if kind == "eps":
        return snr
    if kind == "x0":
        return torch.ones_like(snr)
    if kind == "v":
        return (alpha**2 + sigma**2) ** 2 / sigma**2
    if kind == "flow":
        return ((alpha + sigma) / sigma) ** 2
    raise UserError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")
