"""Post-training quantization of a network's Linear layers (and 1x1 convolutions): int8 weight-only, dynamic int8
and fp8 weights, each with symmetric per-output-channel scales.

Owns `quantize(net, mode)`, the layer it swaps in (`QuantLinear`) and the check of what a device can run
(`check_mode`). Works on any `nn.Module`, so every network (U-Net, DiT, PixArt, MMDiT) gets it; knows nothing of
noise, text or file formats.

- `int8`: weights stored as int8 with scale s = max|W_row| / 127; each matmul multiplies by the int8 weights cast to
  the activation's dtype and applies s to the output (the weights' memory drops 4x from fp32, 2x from bf16).
- `int8-dynamic`: the same int8 weights; activations are quantized per row (token) at run time, s_x = max|x_row| /
  127, and the matmul runs in integers (`torch._int_mm`, int32 accumulation; VNNI / AMX on x86 CPUs, tensor cores
  on CUDA): y = (q_x q_W^T) s_x s_W + b.
- `fp8`: weights stored as float8_e4m3fn with s = max|W_row| / 448. On a GPU with fp8 tensor cores (compute
  capability 8.9+: Ada, Hopper) activations are cast to fp8 per row too and the matmul is `torch._scaled_mm` with
  row-wise scales; elsewhere the fp8 weights are widened to the activation's dtype for each matmul (announced once:
  it saves memory, not time).

Own code rather than torchao: torchao 0.18 runs with torch 2.13 on this CPU, but its int8 weight-only layer was
slower than fp32 eagerly (25 vs 20 ms on a 512-2048-512 MLP, 256 rows, one thread) and its dynamic int8 layer took
about twice as long as `torch._int_mm` called directly (4.7 vs 2.4 ms per 512x2048 layer); a dependency for that
was not worth it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.errors import UserError

MODES = ("int8", "int8-dynamic", "fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_FEATURES = 16  # smaller layers (e.g. a 3-channel skip) save nothing worth their rounding


def quantize_weight(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q, s): q int8 (int8 modes) or float8_e4m3fn (fp8), s [out] float32, with W ~ q * s[:, None].

    Symmetric per output channel: s = max|W_row| / 127 and q = round(W / s) for int8; s = max|W_row| / 448 and
    q = fp8(W / s) (round to nearest) for fp8. An all-zero row gets s = 1 (q = 0)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    top = FP8_MAX if mode == "fp8" else INT8_MAX
    s = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    scaled = w / s[:, None]
    if mode == "fp8":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s
    return scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (q int8 [M, K], s [M, 1] float32), symmetric per row (dynamic int8)."""
    x = x.float()
    s = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    return (x / s).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N]: `torch._int_mm` where it takes the shapes, else the same product
    in float32 (exact while K * 127^2 < 2^24, i.e. K <= 1040; beyond, within float32 rounding)."""
    m, k = a.shape
    n = b.shape[1]
    cuda_ok = a.device.type != "cuda" or (m > 16 and k % 8 == 0 and n % 8 == 0)
    if a.device.type in ("cpu", "cuda") and cuda_ok and hasattr(torch, "_int_mm"):
        return torch._int_mm(a, b)
    with torch.autocast(a.device.type, enabled=False):
        return (a.float() @ b.float()).round().to(torch.int32)


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` has fp8 tensor cores to run on: CUDA compute capability 8.9+ (Ada, Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_mode(mode: str, device: torch.device | str) -> None:
    """UserError for a mode that is unknown or that this device cannot run."""
    device = torch.device(device)
    if mode not in MODES:
        raise UserError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")
    if mode == "fp8" and device.type == "cuda" and not fp8_matmul_supported(device):
        name, cap = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        raise UserError(f"fp8 needs a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper); {name} is "
                        f"{cap[0]}.{cap[1]}: use --quantize int8 or int8-dynamic")  # fmt: skip
    if mode != "int8" and device.type not in ("cpu", "cuda"):
        raise UserError(f"--quantize {mode} runs on CPU and CUDA devices, not {device.type}: use int8")


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear would return for x here: the autocast dtype inside autocast, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class QuantLinear(nn.Module):
    """A Linear (or a 1x1 Conv2d, `conv=True`) with quantized weights: `qweight` [out, in] int8 or fp8, `scale`
    [out] float32, `bias` [out] or None, as buffers (nothing here trains)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, mode: str,
                 conv: bool = False):  # fmt: skip
        super().__init__()
        self.mode, self.conv = mode, conv
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_float(cls, layer: nn.Linear | nn.Conv2d, mode: str) -> QuantLinear:
        conv = isinstance(layer, nn.Conv2d)
        w = layer.weight.flatten(1) if conv else layer.weight  # a 1x1 conv's [out, in, 1, 1] -> [out, in]
        q, s = quantize_weight(w, mode)
        return cls(q.to(w.device), s.to(w.device), layer.bias, mode, conv)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight these int8 / fp8 values and scales stand for: q * s [out, in]."""
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def extra_repr(self) -> str:
        kind = "conv1x1" if self.conv else "linear"
        return f"{kind}, in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:  # [B, C, H, W] -> channels last, as a Linear over C
            return self.linear(x.movedim(1, -1)).movedim(-1, 1)
        return self.linear(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _out_dtype(x)
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features)  # [M, K]
        if self.mode == "int8-dynamic":
            q, sx = quantize_rows(x2)
            y = int_mm(q, self.qweight.t()).float() * sx * self.scale  # [M, N]
            y = y if self.bias is None else y + self.bias.float()
        elif (
            self.mode == "fp8"
            and fp8_matmul_supported(x.device)
            and self.in_features % 16 == 0 == self.out_features % 16
        ):
            y = self.fp8_matmul(x2)
        else:  # int8 weight-only, or fp8 weights without fp8 matmuls: widen the weights, scale the output
            w = self.qweight.to(dtype)
            y = F.linear(x2.to(dtype), w) * self.scale.to(dtype)
            y = y if self.bias is None else y + self.bias.to(dtype)
        return y.to(dtype).reshape(*lead, self.out_features)

    def fp8_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """Per-row fp8 activations times the fp8 weights on tensor cores, row-wise scales, bf16 out."""
        xf = x2.float()
        sx = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [M, 1]
        xq = (xf / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return torch._scaled_mm(xq, self.qweight.t(), scale_a=sx, scale_b=self.scale[None, :],
                                bias=bias, out_dtype=torch.bfloat16)  # fmt: skip


def quantizable(module: nn.Module) -> bool:
    """A Linear, or a 1x1 stride-1 ungrouped Conv2d (a Linear over channels), wide enough to be worth it."""
    if isinstance(module, nn.Linear):
        w = module.weight
    elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1):
        if module.groups != 1 or module.padding not in ((0, 0), "valid") or module.dilation != (1, 1):
            return False
        w = module.weight
    else:
        return False
    return w.device.type != "meta" and min(w.shape[0], w.shape[1]) >= MIN_FEATURES


_ANNOUNCED: set[str] = set()


def quantize(net: nn.Module, mode: str, device: torch.device | str | None = None) -> nn.Module:
    """Replace every quantizable layer of `net` by a `QuantLinear` of `mode` (in place; returns `net`). UserError
    for an unknown mode or one the device (default: where the network's parameters are) cannot run."""
    p = next(net.parameters(), None)
    device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    check_mode(mode, device)
    if mode == "fp8" and not fp8_matmul_supported(device) and "fp8" not in _ANNOUNCED:
        _ANNOUNCED.add("fp8")
        print(f"inkwash: {device.type} has no fp8 matmuls; fp8 weights are widened for each matmul "
              "(less memory, not faster).", file=sys.stderr)  # fmt: skip
    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            if quantizable(child):
                setattr(module, child_name, QuantLinear.from_float(child, mode))
    return net


def quantized_layers(net: nn.Module) -> list[QuantLinear]:
    return [m for m in net.modules() if isinstance(m, QuantLinear)]


def state_bytes(net: nn.Module) -> int:
    """Bytes of every tensor in the state dict (the weights' memory)."""
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())
