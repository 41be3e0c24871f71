"""Conditioning bound to a denoiser, with classifier-free guidance (Ho & Salimans 2022), negative
prompts and guidance rescale (Lin et al. 2023, Alg. 2). The result is a `model(x, t) -> x0` for samplers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diffusion.denoiser import Denoiser, expand
from ..diffusion.process import to_x0_eps

Tensor = torch.Tensor


def _pad_tokens(v: Tensor, length: int, value) -> Tensor:
    pad = [0, 0] * (v.dim() - 2) + [0, length - v.shape[1]]
    return F.pad(v, pad, value=value)


def cat_cond(*conds: dict) -> dict:
    """Concatenate conditioning dicts along the batch, padding token sequences to the longest."""
    keys = set().union(*conds)
    out = {}
    for key in keys:
        vs = [c.get(key) for c in conds]
        if any(v is None for v in vs):
            if any(v is not None for v in vs):
                raise ValueError(f"conditioning {key!r} is given for part of the batch only")
            continue
        if key in ("context", "context_mask"):
            length, fill = max(v.shape[1] for v in vs), (False if key == "context_mask" else 0.0)
            vs = [_pad_tokens(v, length, fill) if v.shape[1] != length else v for v in vs]
        out[key] = torch.cat(vs)
    return out


class Guided:
    """`model(x, t) -> x0` with guidance: out = u + w (c - u) on the network's output, cond and uncond
    in one batched forward. `rescale` (phi) matches the std of the guided output to the conditional one."""

    def __init__(self, denoiser: Denoiser, cond: dict, uncond: dict | None = None, scale=1.0, rescale=0.0):
        self.denoiser, self.cond, self.uncond = denoiser, cond, uncond
        self.scale = torch.as_tensor(scale, dtype=torch.float32)  # a number, or one per sample [B]
        self.rescale = rescale
        self.guided = uncond is not None and not bool((self.scale == 1).all())
        self.both = cat_cond(cond, uncond) if self.guided else cond

    def __call__(self, x: Tensor, t) -> Tensor:
        den = self.denoiser
        if not self.guided:
            return den(x, t, **self.cond)
        t = torch.as_tensor(t, dtype=torch.float64)
        t2 = torch.cat([t, t]) if t.dim() else t
        out_c, out_u = den.raw(torch.cat([x, x]), t2, **self.both).float().chunk(2)
        w = expand(self.scale.to(x.device), x)
        out = out_u + w * (out_c - out_u)
        if self.rescale:
            dims = tuple(range(1, x.dim()))
            ratio = out_c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
            out = self.rescale * out * ratio + (1 - self.rescale) * out
        alpha, sigma = (expand(v, x).to(x.device, torch.float32) for v in den.process.alpha_sigma(t))
        return to_x0_eps(out, x.float(), alpha, sigma, den.prediction)[0]
