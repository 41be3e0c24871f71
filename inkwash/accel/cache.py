"""Step caching as Denoiser wrappers: First-Block Cache and TeaCache for the transformers, DeepCache for the U-Net.

Adjacent sampling steps see nearly the same input, so most of a network's work repeats. Both caches wrap the
network inside a `Denoiser`, so guidance, every sampler, the pipeline and the evaluation get them unchanged:

- `fbcache:T` (First-Block Cache; ParaAttention, diffusers' `apply_first_block_cache`, after TeaCache, Liu et al.
  2024): each call runs the first transformer block. When the relative L1 change of that block's residual
  (output - input) against the one of the last fully computed call stays under T, the other blocks are skipped
  and their cached residual is added instead. The reference is the last *computed* call, so the change
  accumulates across skipped calls until it passes T and forces a full one. Decided per batch row, so an image
  comes out the same whatever shares its batch, and the cond and uncond rows of classifier-free guidance each
  keep their own cache. DiT, PixArt-α and MMDiT (FLUX, SD3).
- `teacache:T` (TeaCache, Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache"): decides before any
  block runs, from the first block's modulated input (its normed input under the timestep's shift and scale).
  The relative L1 change of that input from the previous call, passed through the model's rescaling polynomial,
  is summed over calls; while the sum stays under T, every block is skipped (the first too) and the blocks'
  cached residual is added to their input; a computed call resets the sum. FLUX.1-shaped MMDiTs use TeaCache's
  published FLUX polynomial (so its thresholds carry over: 0.25 -> about 1.5x, 0.4 -> 1.8x, 0.6 -> 2.0x on
  FLUX.1-dev at 50 steps); other networks the raw change. Per batch row, like the First-Block Cache. TeaCache4FLUX
  also always computes the last step; a cache here cannot know which call is the last, so it does not.
- `deepcache:N[:B]` (DeepCache, Ma et al. 2024): every N-th call runs the whole U-Net and keeps the feature map
  that enters the shallow up block; the calls between run only the shallow branch (the input conv, the first B
  down blocks, and the last B + 1 up blocks) on that cached map. U-Nets only.

A cache keeps state across the calls of one generation and resets itself when the noise level goes up (a new
generation), when the batch shape changes, or on `reset()`; the pipeline also builds a fresh one per run.
Knows networks through their public pieces (block lists, embedders); knows nothing of noise or samplers.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.diffusion.denoiser import Denoiser
from inkwash.errors import UserError
from inkwash.models.dit import DiT
from inkwash.models.mmdit import MMDiT
from inkwash.models.pixart import PixArt
from inkwash.models.unet import UNet

Tensor = torch.Tensor
METHODS = ("fbcache", "teacache", "deepcache")
# TeaCache's rescaling polynomial for FLUX.1 (TeaCache4FLUX), highest power first: maps the modulated input's
# relative change to an estimate of the output's.
FLUX_RESCALE = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
DEEPCACHE_BRANCH = 1  # shallow branch: the input conv and the first down block, the last two up blocks
USAGE = "use fbcache:THRESHOLD or teacache:THRESHOLD for transformers (e.g. fbcache:0.08, teacache:0.25) or " \
        "deepcache:INTERVAL[:BRANCH] for U-Nets (e.g. deepcache:3), or none"  # fmt: skip


@dataclass(frozen=True)
class CacheSpec:
    """A parsed `--cache` value; `str()` gives its canonical text (what PNGs and evaluation runs record)."""

    method: str  # "fbcache", "teacache" or "deepcache"
    threshold: float = 0.0  # fbcache, teacache: the relative L1 change under which blocks are skipped
    interval: int = 1  # deepcache: a full forward every `interval` calls
    branch: int = DEEPCACHE_BRANCH  # deepcache: down blocks in the shallow branch

    def __str__(self) -> str:
        if self.method in ("fbcache", "teacache"):
            return f"{self.method}:{self.threshold:g}"
        return f"deepcache:{self.interval}" + (f":{self.branch}" if self.branch != DEEPCACHE_BRANCH else "")


def parse_cache(text: str | CacheSpec | None) -> CacheSpec | None:
    """`fbcache:0.08`, `teacache:0.25`, `deepcache:3`, `deepcache:3:0` -> CacheSpec; None, "" or "none" -> None."""
    if text is None or isinstance(text, CacheSpec):
        return text
    t = str(text).strip().lower()
    if t in ("", "none", "off"):
        return None
    m = re.fullmatch(r"(fbcache|teacache):([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", t)
    if m:
        return CacheSpec(m[1], threshold=float(m[2]))
    m = re.fullmatch(r"deepcache:([0-9]+)(?::([0-9]+))?", t)
    if m and int(m[1]) >= 1:
        return CacheSpec("deepcache", interval=int(m[1]), branch=DEEPCACHE_BRANCH if m[2] is None else int(m[2]))
    raise UserError(f"--cache {text!r} is not a step cache inkwash knows: {USAGE}")


def check_cache(net: nn.Module, spec: CacheSpec | str | None) -> CacheSpec | None:
    """The parsed spec, or a UserError when `net`'s architecture cannot take it."""
    spec = parse_cache(spec)
    if spec is None:
        return None
    net = uncompiled(net)
    name = type(net).__name__
    if spec.method in ("fbcache", "teacache") and not isinstance(net, (DiT, PixArt, MMDiT)):
        raise UserError(f"{spec.method} needs a transformer (DiT, PixArt, MMDiT), not a {name}; for a U-Net use "
                        "deepcache:INTERVAL")  # fmt: skip
    if spec.method == "deepcache":
        if not isinstance(net, UNet):
            raise UserError(f"deepcache needs a U-Net, not a {name}; for a transformer use fbcache:THRESHOLD")
        units = len(_down_units(net))
        if spec.branch > units:
            raise UserError(f"deepcache branch {spec.branch} is deeper than this U-Net's {units} down blocks")
    return spec


def uncompiled(net: nn.Module) -> nn.Module:
    """The module under a `torch.compile` wrapper: a cache calls the network's pieces, not the whole."""
    return getattr(net, "_orig_mod", net)


def make_cache(net: nn.Module, spec: CacheSpec | str | None) -> StepCache | None:
    """A fresh step cache around `net` (None for no cache): call it as the network; its `log` says what each
    call computed."""
    spec = check_cache(net, spec)
    if spec is None:
        return None
    backend = None if uncompiled(net) is net else getattr(net, "compile_backend", "inductor")
    net = uncompiled(net)
    if spec.method == "deepcache":
        return DeepCache(net, spec.interval, spec.branch)
    return (FirstBlockCache if spec.method == "fbcache" else TeaCache)(net, spec.threshold, backend)


def with_step_cache(denoiser: Denoiser, spec: CacheSpec | str | None) -> Denoiser:
    """The same denoiser with its network behind a fresh step cache (nothing carries over between runs)."""
    cache = make_cache(denoiser.net, spec)
    return denoiser if cache is None else Denoiser(cache, denoiser.process, denoiser.prediction, denoiser.learn_sigma)


class StepCache(nn.Module):
    """A network behind a cache: `cache(x, t, **cond)` as the network, state kept between calls.

    `log` has one entry per call since the last reset: the number of batch rows run through the whole network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.log: list[int] = []
        self._last: tuple | None = None  # (input shape, highest network time) of the previous call

    def reset(self) -> None:
        self.log = []
        self._last = None
        self.clear()

    def clear(self) -> None:
        """Drop the cached tensors."""
        raise NotImplementedError

    @property
    def full_rows(self) -> int:
        return sum(self.log)

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        t_max = float(torch.as_tensor(t).max())
        if self._last is not None and (self._last[0] != x.shape or t_max > self._last[1]):
            self.reset()  # a new generation: noise went back up, or another batch
        self._last = (x.shape, t_max)
        return self.step(x, t, **cond)

    def step(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------- First-Block Cache


class FirstBlockCache(StepCache):
    """First-Block Cache on a DiT, PixArt-α or MMDiT. The network's own forward runs, with its chain of blocks
    replaced by `_Chain` (a shallow view of the network; the network itself is not modified). `backend`: a
    compiled network's torch.compile backend; the chain then calls each block compiled (the blocks run one by
    one, so the whole network's compiled graph cannot be used), the rest of the forward eagerly."""

    def __init__(self, net: nn.Module, threshold: float, backend: str | None = None):
        super().__init__(net)
        self.threshold = float(threshold)
        self.clear()
        chain = _Chain(self, net, backend)
        view = copy.copy(net)
        view._modules = dict(net._modules)  # the view's own table of children; parameters stay shared
        if isinstance(net, MMDiT):
            view._modules["double_blocks"], view._modules["single_blocks"] = nn.ModuleList([chain]), nn.ModuleList()
        else:
            view._modules["blocks"] = nn.ModuleList([chain])
        self.__dict__["view"] = view  # not a child: its parameters are the network's

    def clear(self) -> None:
        self.first_residual: Tensor | None = None  # [B, N, D] the first block's residual at each row's last full call
        self.rest_residual: Tensor | None = None  # [B, N, D] what the other blocks added then

    def step(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return self.view(x, t, **cond)

    def decide(self, residual: Tensor) -> Tensor:
        """Rows [B] bool that must run the remaining blocks: the first call, and rows whose first-block residual
        moved by at least `threshold` (relative mean absolute change) since their last full call."""
        if self.first_residual is None:
            return torch.ones(residual.shape[0], dtype=torch.bool, device=residual.device)
        return ~(relative_change(residual, self.first_residual) < self.threshold)  # NaN (a zero residual) computes

    def update(self, rows: Tensor, first: Tensor, rest: Tensor) -> None:
        """Remember the first-block and remaining-block residuals of the rows just computed."""
        self.first_residual[rows], self.rest_residual[rows] = first, rest


def relative_change(now: Tensor, before: Tensor) -> Tensor:
    """Per row [B]: mean |now - before| / mean |before|, in float32 (both caches' indicator)."""
    before = before.float().flatten(1)
    return (now.float().flatten(1) - before).abs().mean(1) / before.abs().mean(1)


def flux_shaped(net: nn.Module) -> bool:
    """An MMDiT with FLUX.1's blocks (dev or schnell), for which TeaCache's FLUX polynomial was fitted."""
    cfg = getattr(net, "cfg", None)
    return isinstance(net, MMDiT) and (cfg.hidden_size, cfg.depth, cfg.depth_single) == (3072, 19, 38)


class TeaCache(FirstBlockCache):
    """TeaCache on a DiT, PixArt-α or MMDiT: the same stand-in chain as the First-Block Cache, but the decision
    comes before the first block, from its modulated input, and a skip skips every block. `rest_residual` here
    is what all the blocks added at each row's last full call."""

    def __init__(self, net: nn.Module, threshold: float, backend: str | None = None):
        super().__init__(net, threshold, backend)
        self.rescale = FLUX_RESCALE if flux_shaped(net) else None

    def clear(self) -> None:
        super().clear()
        self.previous: Tensor | None = None  # [B, N, D] the modulated input at the previous call
        self.distance: Tensor | None = None  # [B] the summed (rescaled) change since each row's last full call

    def decide(self, modulated: Tensor) -> Tensor:
        """Rows [B] bool that must run the blocks: the first call, and rows whose summed change reaches
        `threshold`; their sum starts again from 0."""
        B = modulated.shape[0]
        if self.previous is None or self.rest_residual is None:
            rows = torch.ones(B, dtype=torch.bool, device=modulated.device)
            distance = torch.zeros(B, device=modulated.device)
        else:
            change = relative_change(modulated, self.previous)
            if self.rescale is not None:
                change = sum(c * change ** (len(self.rescale) - 1 - i) for i, c in enumerate(self.rescale))
            distance = self.distance + change
            rows = ~(distance < self.threshold)  # NaN computes
        self.distance = torch.where(rows, torch.zeros_like(distance), distance)
        self.previous = modulated
        return rows


class _Chain(nn.Module):
    """Stands in for a transformer's block list: the first block, then per row either the other blocks or
    the cached residual. DiT and PixArt call it as `block(tokens, *args)`; MMDiT as its (only) double block,
    `block(txt, img, vec, pe, mask)`, and it runs the other double blocks and all single blocks itself."""

    def __init__(self, cache: FirstBlockCache, net: nn.Module, backend: str | None = None):
        super().__init__()
        self.__dict__["cache"] = cache  # not a child
        self.mmdit = isinstance(net, MMDiT)
        # compiled blocks: dynamic shapes, since rows that must compute run as a smaller batch
        each = (lambda blocks: blocks) if backend is None else \
            (lambda blocks: nn.ModuleList(torch.compile(b, backend=backend, dynamic=None) for b in blocks))  # fmt: skip
        if self.mmdit:
            first, self.doubles, self.singles = each(net.double_blocks[:1]), each(net.double_blocks[1:]), \
                each(net.single_blocks)  # fmt: skip
        else:
            first, self.rest_blocks = each(net.blocks[:1]), each(net.blocks[1:])
        self.first = first[0]

    def forward(self, *inputs):
        if isinstance(self.cache, TeaCache):
            return self.tea(inputs)
        if self.mmdit:
            txt, img, vec, pe, mask = inputs
            txt, h1 = self.first(txt, img, vec, pe, mask)
            h0, args = img, (txt, vec, pe, mask)
        else:
            h0, args = inputs[0], inputs[1:]
            h1 = self.first(h0, *args)
        cache = self.cache
        first = h1 - h0  # [B, N, D]
        rows = cache.decide(first)
        cache.log.append(int(rows.sum()))
        if bool(rows.all()):
            out = self.rest(h1, args)
            cache.first_residual, cache.rest_residual = first, out - h1
        else:
            out = h1 + cache.rest_residual
            if bool(rows.any()):
                idx = rows.nonzero().squeeze(1)
                computed = self.rest(h1[idx], self.take(args, idx, shared=2 if self.mmdit else None))
                out[idx] = computed
                cache.update(idx, first[idx], computed - h1[idx])
        return (args[0], out) if self.mmdit else out

    def tea(self, inputs: tuple):
        """TeaCache: per row, either every block or their cached residual, decided from the modulated input."""
        cache, h0 = self.cache, inputs[1 if self.mmdit else 0]
        rows = cache.decide(self.first.attn_input(*inputs))
        cache.log.append(int(rows.sum()))
        if bool(rows.all()):
            out = self.blocks(inputs)
            cache.rest_residual = out - h0
        else:
            out = h0 + cache.rest_residual
            if bool(rows.any()):
                idx = rows.nonzero().squeeze(1)
                computed = self.blocks(self.take(inputs, idx, shared=3 if self.mmdit else None))
                out[idx] = computed
                cache.rest_residual[idx] = computed - h0[idx]
        return (inputs[0], out) if self.mmdit else out

    def blocks(self, inputs: tuple) -> Tensor:
        """Every block, from the chain's inputs; for MMDiT the image tokens after the last block."""
        if self.mmdit:
            txt, img, vec, pe, mask = inputs
            txt, h = self.first(txt, img, vec, pe, mask)
            return self.rest(h, (txt, vec, pe, mask))
        return self.rest(self.first(*inputs), inputs[1:])

    def take(self, args: tuple, idx: Tensor, shared: int | None) -> tuple:
        """The batch rows `idx` of each per-row argument; args[shared] is shared by all rows (MMDiT's RoPE angles)."""
        return tuple(a if a is None or i == shared else a[idx] for i, a in enumerate(args))

    def rest(self, h: Tensor, args: tuple) -> Tensor:
        """The blocks after the first; for MMDiT the image tokens after the last block."""
        if not self.mmdit:
            for block in self.rest_blocks:
                h = block(h, *args)
            return h
        txt, vec, pe, mask = args
        for block in self.doubles:
            txt, h = block(txt, h, vec, pe, mask)
        if not len(self.singles):
            return h
        joint = torch.cat((txt, h), dim=1)  # [B, L + N, C]
        for block in self.singles:
            joint = block(joint, vec, pe, mask)
        return joint[:, txt.shape[1] :]


# ---------------------------------------------------------------------------- DeepCache


def _down_units(net: UNet) -> list[tuple]:
    """The down path after the input conv, one entry per skip tensor it pushes: (level, j) or (level, None)."""
    return [(lv, j) for lv in net.down for j in [*range(len(lv.res)), None] if j is not None or lv.resample is not None]


def _up_units(net: UNet) -> list[tuple]:
    """The up path: (level, j) blocks, each taking one skip tensor, and (level, None) upsamplers."""
    return [(lv, j) for lv in net.up for j in [*range(len(lv.res)), None] if j is not None or lv.resample is not None]


class DeepCache(StepCache):
    """DeepCache on the U-Net: a full forward every `interval` calls keeps the feature map entering the up block
    that takes skip number `branch` (0: the input conv's); the calls between run only the input conv, the first
    `branch` down blocks and the up blocks from that one on."""

    def __init__(self, net: UNet, interval: int, branch: int = DEEPCACHE_BRANCH):
        super().__init__(net)
        self.interval, self.branch = int(interval), int(branch)
        self.down = _down_units(net)
        self.up = _up_units(net)
        pops = [i for i, (_, j) in enumerate(self.up) if j is not None]
        self.resume = pops[len(pops) - 1 - branch]  # the up unit that takes skip number `branch`
        self.clear()

    def clear(self) -> None:
        self.feature: Tensor | None = None  # [B, C, h, w] entering up unit `resume` at the last full call

    def step(self, x: Tensor, t: Tensor, context=None, context_mask=None, y=None, micro=None, guidance=None):
        net = self.net
        full = self.feature is None or len(self.log) % self.interval == 0
        self.log.append(x.shape[0] if full else 0)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t  # [B]
        emb = net.embed(t, y, micro, x.dtype, guidance)  # [B, E]
        ctx = (context, context_mask)
        h = net.conv_in(x)
        skips = [h]
        for lv, j in self.down if full else self.down[: self.branch]:
            h = lv.resample(h) if j is None else lv.block(j, h, emb, *ctx)
            skips.append(h)
        if full:
            h = net.mid.res[0](h, emb)
            if net.mid_attn is not None:
                h = net.mid.res[1](net.mid_attn(h, *ctx), emb)
        for i, (lv, j) in enumerate(self.up):
            if i == self.resume:
                if full:
                    self.feature = h
                h = self.feature
            elif i < self.resume and not full:
                continue
            h = lv.resample(h) if j is None else lv.block(j, torch.cat([h, skips.pop()], dim=1), emb, *ctx)
        return net.conv_out(F.silu(net.norm_out(h)))  # [B, out_channels, H, W]
