"""Denoiser = network + process + prediction kind; its one job is x_t, t -> x0_hat.

Knows the network only as a callable `net(x, t, **cond)`; knows nothing of samplers or text.
"""

from __future__ import annotations

import torch
from torch import nn

from .process import Process, check_prediction, to_x0_eps

Tensor = torch.Tensor


def expand(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample [B] tensor against a [B, ...] tensor."""
    v = torch.as_tensor(v)
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


class Denoiser:
    """Wraps a network so every sampler sees the same thing: `denoiser(x, t, **cond) -> x0_hat` (float32).

    `learn_sigma`: the network emits twice the channels, the prediction then a variance (DiT, PixArt-α;
    Nichol & Dhariwal 2021); only the prediction is used, so every sampler works with such a model."""

    def __init__(self, net: nn.Module, process: Process, prediction: str = "eps", learn_sigma: bool = False):
        self.net = net
        self.process = process
        self.prediction = check_prediction(prediction)
        self.learn_sigma = learn_sigma

    def raw(self, x: Tensor, t, **cond) -> Tensor:
        """The network's own output at x_t (the quantity trained against `from_x0_eps`), without any variance."""
        t = torch.as_tensor(t, dtype=torch.float64)
        t_batch = t.expand(x.shape[0]) if t.dim() == 0 else t
        scale = expand(self.process.input_scale(t_batch), x).to(x.device)
        dtype = next(self.net.parameters()).dtype
        x_in = (x * scale).to(dtype)
        net_t = self.process.net_time(t_batch).to(device=x.device, dtype=torch.float32)
        out = self.net(x_in, net_t, **cond)
        return out[:, : out.shape[1] // 2] if self.learn_sigma else out  # [B, C, ...]: the variance half dropped

    def x0_and_eps(self, x: Tensor, t, **cond) -> tuple[Tensor, Tensor]:
        """Both estimates at once; coefficients come from float64 and are applied in float32."""
        out = self.raw(x, t, **cond).float()
        alpha, sigma = (expand(v, x).to(x.device, torch.float32) for v in self.process.alpha_sigma(t))
        return to_x0_eps(out, x.float(), alpha, sigma, self.prediction)

    def __call__(self, x: Tensor, t, **cond) -> Tensor:
        return self.x0_and_eps(x, t, **cond)[0]
