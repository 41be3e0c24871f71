"""`--fast` and `--quantize`: the one place that decides which speed settings a device gets, and applies them to a
pipeline's network.

Owns `Plan` (what to do), `plan_for(device)` (the choice per device, from measurements in docs/results.md) and
`accelerate(pipe, ...)` (quantize, channels_last, torch.compile; records what it did in `pipe.accel` for the PNG
parameters). Knows pipelines only through `net`, `device` and `accel`; the network stays a module called as
before, so every sampler, the server and the evaluation get the same speed-ups.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
from torch import nn

from inkwash.accel.quant import check_mode, fp8_matmul_supported, quantize
from inkwash.errors import UserError


@dataclass(frozen=True)
class Plan:
    """Speed settings for one device: network precision, quantization, channels_last, torch.compile."""

    precision: str = "fp32"  # "bf16": the network under bf16 autocast
    quantize: str | None = None  # a mode of inkwash.accel.quant, or None
    channels_last: bool = False  # convolutions in NHWC (only networks that have 3x3 convolutions: the U-Net)
    compile: bool = False  # torch.compile (inductor), static shapes

    def label(self) -> str:
        """A short description for PNG parameters and evaluation identities, e.g. "compile, bf16"."""
        parts = ["compile"] if self.compile else []
        parts += ["channels_last"] if self.channels_last else []
        parts += [self.precision] if self.precision != "fp32" else []
        parts += [self.quantize] if self.quantize else []
        return ", ".join(parts) or "none"


def plan_for(device: torch.device | str) -> Plan:
    """The fastest settings measured for this kind of device (docs/fast-inference.md, "--fast").

    CUDA: bf16 autocast + torch.compile, plus fp8 matmuls on GPUs that have them (Ada, Hopper). CPU: torch.compile
    (the bundled U-Net at an evaluation batch: 1.20x eager, outputs within 3e-6). Not on the CPU plan:
    channels_last (no difference), bf16 (it changes images; it stays --precision's choice)."""
    device = torch.device(device)
    if device.type == "cuda":
        return Plan(precision="bf16", quantize="fp8" if fp8_matmul_supported(device) else None, compile=True)
    if device.type == "cpu":
        return Plan(compile=True)
    return Plan()


def accelerate(pipe, *, quantize_mode: str | None = None, fast: bool = False, dynamic: bool = False) -> Plan:
    """Apply `--quantize` and/or `--fast` to `pipe` (in place) and return the plan applied; an explicit
    `quantize_mode` overrides the plan's. UserError for a quantization this device cannot run. `dynamic`: compile
    for varying batch sizes (a server) rather than one static shape."""
    plan = plan_for(pipe.device) if fast else Plan()
    stored = getattr(pipe, "dtype", "fp32") != "fp32" or getattr(pipe, "placement", None) is not None
    if stored and quantize_mode is not None:
        raise UserError("--quantize stores the network's weights itself: use it without --dtype and --offload")
    if stored and plan.quantize:  # the weights already have their storage (--dtype / --offload): keep it
        plan = dataclasses.replace(plan, quantize=None)
    if fast and plan == Plan():
        print(f"inkwash: --fast has no measured speed-up for {pipe.device.type} yet; running as is.", file=sys.stderr)
    if quantize_mode is not None:
        check_mode(quantize_mode, pipe.device)
        plan = dataclasses.replace(plan, quantize=quantize_mode)
    pipe.net = apply(pipe.net, plan, pipe.device, dynamic=dynamic)
    if quantize_mode is not None:
        pipe.accel["Quantize"] = quantize_mode
    if fast:
        pipe.accel["Fast"] = plan.label()
    return plan


def apply(net: nn.Module, plan: Plan, device: torch.device | str = "cpu", backend: str = "inductor",
          dynamic: bool = False) -> nn.Module:  # fmt: skip
    """The network with the plan's quantization, memory format and compilation (quantized in place); `backend`:
    torch.compile's (tests use aot_eager, which traces the same graph without generating code)."""
    if plan.quantize:
        quantize(net, plan.quantize, device)
    if plan.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if plan.compile:
        net = torch.compile(net, dynamic=None if dynamic else False, backend=backend)
        net.compile_backend = backend  # lands on the network itself: a step cache compiles its blocks alike
    return net
