"""Where weights live while generating: their storage precision and their device.

Storage precision (`cast_storage`): fp32, bf16 or fp16 weights (the network then computes in that precision, as
diffusers' `torch_dtype` does), or fp8 weights (float8_e4m3fn with a per-output-channel or per-tensor scale) for the
Linear and Conv2d layers, upcast layer by layer just for that layer's forward to the compute precision (fp32, or the
autocast precision when one is active). fp8 here saves memory, not time.

Offloading keeps one copy of every weight on the storage device (the CPU) and gives a module a copy on the execution
device only while it is used, putting the stored tensors back afterwards (nothing is copied back: inference weights
do not change):
- `ModelOffload`: a whole component (text encoder, denoiser, VAE) is on the execution device from its first module
  call until another component is used or `release()` is called; at most one component is resident.
- `SequentialOffload`: every module that owns weights gets them just for its own forward (forward pre/post hooks),
  and its tensor inputs are moved to the execution device first; at most one module's own weights are resident.

The logic is device-agnostic: tests run it on the CPU with the meta device standing in for a GPU. Knows nothing of
noise, samplers or file formats; which modules make up a component is the caller's business.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UserError

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
OFFLOADS = ("none", "model", "sequential")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_SCALES = ("channel", "tensor")


def check_storage(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise UserError(f"unknown weight dtype {dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    return dtype


def check_offload(offload: str) -> str:
    if offload not in OFFLOADS:
        raise UserError(f"unknown offload mode {offload!r}; use one of {', '.join(OFFLOADS)}")
    return offload


# --------------------------------------------------------------------------------- storage precision


def quantize_fp8(w: torch.Tensor, scale: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """w ~= q.float() * s with q in float8_e4m3fn: s = amax / 448 per output channel (dim 0) or for the whole
    tensor, so each channel's largest magnitude maps to e4m3's largest finite value."""
    if scale not in FP8_SCALES:
        raise UserError(f"unknown fp8 scale {scale!r}; use one of {', '.join(FP8_SCALES)}")
    w = w.detach().float()
    dims = tuple(range(1, w.dim())) if scale == "channel" and w.dim() > 1 else tuple(range(w.dim()))
    amax = w.abs().amax(dim=dims, keepdim=True)
    s = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def _compute_dtype(device: torch.device) -> torch.dtype:
    """fp32, or the autocast precision where autocast is on for this device type."""
    kind = device.type if device.type in ("cuda", "cpu", "mps", "xpu") else "cpu"
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.float32


def _fp8_upcast(module: nn.Module, args) -> None:
    q, s = module.weight_fp8, module.weight_scale
    module.weight = (q.float() * s).to(_compute_dtype(q.device))  # one layer's weight, for this forward only


def _fp8_drop(module: nn.Module, args, output) -> None:
    module.weight = _placeholder(module.weight_fp8)


def _placeholder(q: torch.Tensor) -> torch.Tensor:
    """What `weight` is between forwards: a meta tensor of the weight's shape in fp32, so code that reads a layer's
    weight dtype from outside it (transformers' T5 does) sees the precision the layer computes in, and code that
    reads its values fails loudly instead of using fp8 numbers unscaled."""
    return torch.empty((), dtype=torch.float32, device="meta").expand(q.shape)  # no storage of that size, even on meta


def fp8_weights(module: nn.Module, scale: str = "channel") -> int:
    """Store every Linear and Conv2d weight in `module` as float8_e4m3fn with a float32 scale (buffers
    `weight_fp8`, `weight_scale`), upcast at each use; between uses `weight` is a meta placeholder. Biases and all
    other tensors stay as they are. Returns the number of layers converted."""
    n = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(m._parameters.get("weight"), torch.Tensor):
            q, s = quantize_fp8(m.weight, scale)
            del m._parameters["weight"]
            m.register_buffer("weight_fp8", q)
            m.register_buffer("weight_scale", s)
            m.weight = _placeholder(q)
            m.register_forward_pre_hook(_fp8_upcast)
            m.register_forward_hook(_fp8_drop)
            n += 1
    return n


def cast_storage(module: nn.Module, dtype: str, fp8_scale: str = "channel") -> nn.Module:
    """Keep `module`'s floating-point weights in `dtype` (see the module docstring); in place."""
    check_storage(dtype)
    if dtype == "fp8":
        fp8_weights(module, fp8_scale)
    else:
        module.to(STORAGE_DTYPES[dtype])
    return module


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer the module holds (fp8 weights at one byte each)."""
    return sum(t.numel() * t.element_size() for t in _tensors(module, recurse=True))


def _tensors(module: nn.Module, recurse: bool) -> Iterable[torch.Tensor]:
    yield from module.parameters(recurse=recurse)
    yield from module.buffers(recurse=recurse)


# --------------------------------------------------------------------------------- placement


class _Resident:
    """A module's own parameters and buffers: the stored tensors, and execution-device copies on demand."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.stored = {("p", k): v for k, v in module._parameters.items() if v is not None}
        self.stored |= {("b", k): v for k, v in module._buffers.items() if v is not None}

    def load(self, device: torch.device) -> None:
        for (kind, name), t in self.stored.items():
            copy = t.to(device, non_blocking=True)
            if kind == "p":
                self.module._parameters[name] = nn.Parameter(copy, requires_grad=False)
            else:
                self.module._buffers[name] = copy

    def unload(self) -> None:
        for (kind, name), t in self.stored.items():
            (self.module._parameters if kind == "p" else self.module._buffers)[name] = t


def _owners(module: nn.Module) -> list[nn.Module]:
    """Modules in `module` (itself included) that directly own a parameter or a buffer."""
    return [m for m in module.modules() if any(True for _ in _tensors(m, recurse=False))]


def _to_storage(modules: Iterable[nn.Module], storage: torch.device) -> None:
    for m in modules:
        if any(t.device != storage for t in _tensors(m, recurse=True)):
            m.to(storage)


_MODEL_OFFLOADS: weakref.WeakSet = weakref.WeakSet()  # every live ModelOffload: one resident component per device


class ModelOffload:
    """Each named component on the execution device only while it is in use (diffusers' model CPU offload).

    The first call of any module of a component loads that whole component and unloads the one loaded before, in
    this placement or any other on the same device (a base model and its refiner)."""

    def __init__(self, components: dict[str, nn.Module], device: str | torch.device,
                 storage: str | torch.device = "cpu"):  # fmt: skip
        self.device, self.storage = torch.device(device), torch.device(storage)
        _to_storage(components.values(), self.storage)
        self.components = {name: [_Resident(m) for m in _owners(c)] for name, c in components.items()}
        self.active: str | None = None
        _MODEL_OFFLOADS.add(self)
        self.handles = []
        for name, c in components.items():
            for m in c.modules():
                self.handles.append(m.register_forward_pre_hook(lambda *_, name=name: self.use(name)))

    def use(self, name: str) -> None:
        """Load component `name` onto the execution device (and unload the resident one)."""
        if self.active == name:
            return
        for other in list(_MODEL_OFFLOADS):
            if other.device == self.device:
                other.release()
        for r in self.components[name]:
            r.load(self.device)
        self.active = name

    def release(self) -> None:
        """Put the resident component back to its stored weights."""
        if self.active is not None:
            for r in self.components[self.active]:
                r.unload()
            self.active = None

    def remove(self) -> None:
        """Release and take the hooks off (the weights stay on the storage device)."""
        self.release()
        for h in self.handles:
            h.remove()
        self.handles = []


def _send(x, device: torch.device):
    """Tensors (in tuples, lists, dicts) moved to `device`; anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_send(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _send(v, device) for k, v in x.items()}
    return x


class SequentialOffload:
    """Every module's own weights on the execution device only during its forward (diffusers' sequential CPU
    offload): forward pre-hooks load them and move the tensor inputs, forward hooks put the stored ones back."""

    def __init__(self, modules: Iterable[nn.Module], device: str | torch.device, storage: str | torch.device = "cpu"):
        self.device, self.storage = torch.device(device), torch.device(storage)
        modules = list(modules)
        _to_storage(modules, self.storage)
        self.handles = []
        for module in modules:
            for m in _owners(module):
                r = _Resident(m)
                self.handles.append(m.register_forward_pre_hook(self._pre(r), with_kwargs=True, prepend=True))
                self.handles.append(m.register_forward_hook(lambda *_, r=r: r.unload(), prepend=True))

    def _pre(self, r: _Resident):
        def hook(module, args, kwargs):
            r.load(self.device)
            return _send(args, self.device), _send(kwargs, self.device)

        return hook

    def release(self) -> None:
        """Nothing stays resident between forwards."""

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def offload(mode: str, components: dict[str, nn.Module], device: str | torch.device,
            storage: str | torch.device = "cpu") -> ModelOffload | SequentialOffload | None:  # fmt: skip
    """The placement for an offload mode ("none": None, the caller moves everything to the device)."""
    check_offload(mode)
    if mode == "model":
        return ModelOffload(components, device, storage)
    if mode == "sequential":
        return SequentialOffload(components.values(), device, storage)
    return None
