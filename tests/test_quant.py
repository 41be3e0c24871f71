"""Quantization (inkwash.accel.quant): the scale formulas, int8 / fp8 storage in memory, the integer matmul against
an independent float computation, and every network's output against its float original."""

import copy

import pytest
import torch
from torch import nn

from inkwash.accel.quant import (
    FP8_MAX,
    MODES,
    QuantLinear,
    check_mode,
    int_mm,
    quantize,
    quantize_weight,
    quantized_layers,
    state_bytes,
)
from inkwash.errors import UserError
from inkwash.models.registry import build_model, get_preset
from inkwash.pipeline import example_inputs

NETS = ("unet-tiny", "dit-tiny", "pixart-tiny", "mmdit-tiny")
# Relative L2 error of a whole tiny network's output, randomly initialised (measured: int8 0.3-0.8%, dynamic int8
# 0.5-1.3%, fp8 1.6-4.1%); the bounds leave room, and an error of 0 would mean nothing was quantized.
BOUNDS = {"int8": 0.02, "int8-dynamic": 0.04, "fp8": 0.1}


def lively(name: str) -> tuple[nn.Module, dict]:
    """A tiny network of every weight drawn at random (the zero-initialised gates would hide everything) and
    random inputs for each condition it takes."""
    torch.manual_seed(0)
    cfg = get_preset(name)
    net = build_model(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.1)
    kw = example_inputs(cfg, cfg.size_multiple * 4, context_tokens=6, device="cpu")
    kw = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in kw.items()}
    kw["x"], kw["t"] = torch.randn(2, *kw["x"].shape[1:]), torch.tensor([300.0, 700.0])
    for k in ("context", "y", "micro", "guidance"):
        if k in kw:
            kw[k] = torch.randn(2, *kw[k].shape[1:])
    if "y" in kw and not kw["y"].is_floating_point():
        kw["y"] = torch.tensor([0, 1])
    return net, kw


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NETS)
def test_quantized_network_is_close_to_float_but_not_equal(one_thread, name, mode):
    net, kw = lively(name)
    with torch.no_grad():
        ref = net(**kw)
        q = quantize(copy.deepcopy(net), mode)
        out = q(**kw)
    assert len(quantized_layers(q)) >= 4
    assert not any(isinstance(m, nn.Linear) and min(m.weight.shape) >= 16 for m in q.modules())
    err = rel(out, ref)
    assert 1e-4 < err < BOUNDS[mode], err


def test_unet_one_by_one_convolutions_are_quantized(one_thread):
    net, kw = lively("unet-tiny")
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert convs
    quantize(net, "int8")
    assert all(isinstance(net.get_submodule(n), QuantLinear) and net.get_submodule(n).conv for n in convs)


def test_int8_scale_formula_and_rounding():
    torch.manual_seed(1)
    w = torch.randn(24, 40) * torch.linspace(0.01, 3, 24)[:, None]
    w[5] = 0.0  # an all-zero row
    q, s = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    expect = w.abs().amax(1) / 127
    expect[5] = 1.0
    torch.testing.assert_close(s, expect)
    assert q.abs().amax(1)[torch.arange(24) != 5].eq(127).all()  # each row's largest weight maps to +-127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()  # round to nearest
    layer = QuantLinear(q, s, None, "int8")
    torch.testing.assert_close(layer.dequantized(), q.float() * s[:, None])


def test_fp8_scale_formula_and_relative_error():
    torch.manual_seed(2)
    w = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]
    q, s = quantize_weight(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(s, w.abs().amax(1) / FP8_MAX)
    deq = q.float() * s[:, None]
    big = (w / s[:, None]).abs() >= 2**-6  # e4m3's normal range: 3 mantissa bits, relative error <= 2^-4
    assert ((deq - w).abs()[big] <= 2**-4 * w.abs()[big] + 1e-12).all()
    assert (deq.abs().amax(1) - w.abs().amax(1)).abs().max() < 1e-6 * w.abs().max()  # the max maps to 448 exactly


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_weights_really_are_one_byte_in_memory(mode):
    net, _ = lively("dit-tiny")
    lin = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear) and min(m.weight.shape) >= 16}
    float_bytes = state_bytes(net)
    quantize(net, mode)
    sd = net.state_dict()
    for n in lin:
        assert sd[f"{n}.qweight"].element_size() == 1 and sd[f"{n}.qweight"].dtype in (torch.int8, torch.float8_e4m3fn)
        assert f"{n}.weight" not in sd
    w_elems = sum(m.weight.numel() for m in lin.values())
    scales = sum(m.weight.shape[0] for m in lin.values())
    assert float_bytes - state_bytes(net) == w_elems * 4 - w_elems - scales * 4  # 4 bytes -> 1, plus a scale per row


def test_dynamic_int8_matches_an_independent_float64_computation(one_thread):
    torch.manual_seed(3)
    lin = nn.Linear(48, 40)
    x = torch.randn(3, 7, 48) * 4
    q = QuantLinear.from_float(lin, "int8-dynamic")
    with torch.no_grad():
        out = q(x)
    # the oracle: quantize rows and weights by the formula in float64, multiply in float64
    x2 = x.reshape(-1, 48).double()
    sx = x2.abs().amax(1, keepdim=True) / 127
    qx = (x2 / sx).round()
    sw = lin.weight.double().abs().amax(1) / 127
    qw = (lin.weight.double() / sw[:, None]).round()
    expect = (qx @ qw.T) * sx * sw + lin.bias.double()
    torch.testing.assert_close(out.reshape(-1, 40).double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(33, 64, 48), (5, 24, 40), (1, 16, 16)])
def test_int_mm_matches_float_product(shape):
    m, k, n = shape
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    out = int_mm(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out, (a.long() @ b.long()).int())


def test_quantized_layers_follow_autocast(one_thread):
    net, kw = lively("dit-tiny")
    quantize(net, "int8-dynamic")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.blocks[0].attn.qkv(torch.randn(2, 5, 32)).dtype == torch.bfloat16
        out = net(**kw)
    assert torch.isfinite(out).all()


def test_unknown_mode_and_a_device_that_cannot_run_it_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown quantization"):
        check_mode("int4", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A100")
    with pytest.raises(UserError, match="fp8 needs a GPU"):
        check_mode("fp8", "cuda")
    check_mode("int8", "cuda")
    with pytest.raises(UserError, match="not mps"):
        check_mode("int8-dynamic", "mps")
    for mode in MODES:
        check_mode(mode, "cpu")
