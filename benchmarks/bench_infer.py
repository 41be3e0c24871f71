"""Inference benchmark: inkwash's networks vs diffusers' with identical weights, eager and compiled, and the
quantization modes; or FLUX.1 at full size on a GPU (`--gpu-flux`). Prints tables; never asserts a time.

CPU (default): for each pair -- the bundled Shapes U-Net's architecture (unet-xs, 32 px), a small Stable Diffusion
layout (sd15's four levels at 64 channels, 4 x 32 x 32 latents, 768-wide context) and DiT-S/2 (class-conditional,
4 x 32 x 32 latents) -- seconds for 20 sampling steps at batch 2 (one image with classifier-free guidance), ours and
diffusers', each eager and each compiled (torch.compile, static shapes; the first two calls, which compile, are not
timed), as ratios; the rounds alternate the models so background load hits both alike, and each keeps its best.
Then our networks quantized (inkwash.accel.quant): weight memory and s/step.

--gpu-flux: FLUX.1 dev's transformer (11.9B parameters, random weights, bf16, 1024 x 1024, batch 1, 512 text
tokens) ours vs diffusers' FluxTransformer2DModel with the same weights, eager and compiled: ms per step and MFU
against the measured bf16 matmul peak; then whole 28-step generations (FLUX.1 dev's shifted flow-Euler grid) through
our TeaCache (`--tea`, default 0.4 with TeaCache's FLUX polynomial), eager and with every block compiled: the
transformer time of a generation and how many of its calls ran the blocks; then ours with fp8 weights and
matmuls. Without a GPU it runs the same rows on a tiny MMDiT (the check that the script works;
scripts/gpu_infer.sh). Random weights decide differently from a trained FLUX.1 checkpoint, so the cached rows'
count of computed calls is reported beside their time, never assumed.

Usage: python benchmarks/bench_infer.py [--pairs unet-shapes sd-small dit-s2] [--steps 20] [--rounds 2]
       python benchmarks/bench_infer.py --gpu-flux [--preset flux-dev] [--size 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # benchmarks/ is a folder of scripts; this checkout's inkwash first

from bench_dit_train import matmul_peak  # noqa: E402

from inkwash.accel.quant import MODES, quantize, state_bytes  # noqa: E402
from inkwash.models.registry import get_preset  # noqa: E402

SD_SMALL = dataclasses.replace(get_preset("sd15"), model_channels=64)  # SD's layout at a fifth of its width


@dataclasses.dataclass
class Pair:
    """Two networks with identical weights and one call each: (x [B, C, H, W], t [B]) -> output."""

    name: str
    ours: nn.Module
    theirs: nn.Module | None
    call_ours: Callable
    call_theirs: Callable | None
    x: torch.Tensor


def _randomise(model: nn.Module, std: float | None = None) -> None:
    """Every matrix drawn N(0, 1 / fan_in) (or N(0, std)), every bias N(0, 0.02); norm scales stay 1, so the
    activations keep their size through the network and the outputs of the two sides mean something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=std or p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                nn.init.normal_(p, std=0.02)


def unet_pair(name: str, cfg, size: int, batch: int = 2, tokens: int = 77) -> Pair:
    from diffusers import UNet2DConditionModel

    from inkwash.formats.diffusers_unet import unet_config_to_diffusers, unet_from_diffusers

    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(cfg)).eval()
    _randomise(theirs)
    ours = unet_from_diffusers(dict(theirs.config), {k: v.clone() for k, v in theirs.state_dict().items()}).eval()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    y = torch.randn(batch, cfg.y_dim, generator=g) if cfg.y_dim else None
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    return Pair(
        name, ours, theirs,
        lambda m, x, t: m(x, t, context=ctx, y=y),
        lambda m, x, t: m(x, t, encoder_hidden_states=ctx, class_labels=y).sample,
        x,
    )  # fmt: skip


def dit_pair(name: str, preset: str, batch: int = 2) -> Pair:
    from diffusers import DiTTransformer2DModel

    from inkwash.formats.diffusers_dit import DIFFUSERS_DIT_FREQ_SHIFT, dit_config_to_diffusers, dit_from_diffusers

    cfg = dataclasses.replace(get_preset(preset), freq_shift=DIFFUSERS_DIT_FREQ_SHIFT)
    torch.manual_seed(0)
    kwargs = dit_config_to_diffusers(cfg)
    theirs = DiTTransformer2DModel(**kwargs).eval()
    _randomise(theirs)
    first = theirs.transformer_blocks[0].norm1  # diffusers holds one time/class embedder per block; ours, one
    for block in theirs.transformer_blocks[1:]:
        block.norm1.emb = first.emb
    ours = dit_from_diffusers(kwargs, {k: v.clone() for k, v in theirs.state_dict().items()}).eval()
    y = torch.tensor([7, cfg.num_classes])[:batch]  # a class and the null class
    x = torch.randn(
        batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(1)
    )
    return Pair(
        name, ours, theirs,
        lambda m, x, t: m(x, t, y=y),
        lambda m, x, t: m(x, timestep=t, class_labels=y).sample,
        x,
    )  # fmt: skip


PAIRS = {
    "unet-shapes": lambda: unet_pair("unet-shapes (unet-xs, 32 px)", get_preset("unet-xs"), 32, tokens=32),
    "sd-small": lambda: unet_pair("sd-small (sd15 @ 64 ch, 32x32 latents)", SD_SMALL, 32),
    "dit-s2": lambda: dit_pair("dit-s2 (32x32 latents)", "dit-s2"),
}


@torch.no_grad()
def sample(call: Callable, model: nn.Module, x: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` network calls in a plain Euler-style loop (the samplers' cost beside it is nil)."""
    start = time.perf_counter()
    for i in range(steps):
        t = torch.full((x.shape[0],), 999.0 * (1 - i / steps))
        out = call(model, x, t)
        x = x - 0.01 * out[:, : x.shape[1]]
    return time.perf_counter() - start


def time_pair(pair: Pair, steps: int, rounds: int, compile_too: bool) -> dict:
    """Best seconds per `steps`-step sampling for each (side, mode), rounds alternating the sides."""
    sides = {"ours": (pair.ours, pair.call_ours)}
    if pair.theirs is not None:
        sides["diffusers"] = (pair.theirs, pair.call_theirs)
    runs = {f"{s}:eager": (m, c) for s, (m, c) in sides.items()}
    if compile_too:
        runs |= {f"{s}:compiled": (torch.compile(m, dynamic=False), c) for s, (m, c) in sides.items()}
    res = {"name": pair.name, "params": sum(p.numel() for p in pair.ours.parameters()), "s": {}, "warm_s": {}}
    with torch.no_grad():
        ref = pair.call_ours(pair.ours, pair.x, torch.full((pair.x.shape[0],), 500.0))
        if pair.theirs is not None:
            other = pair.call_theirs(pair.theirs, pair.x, torch.full((pair.x.shape[0],), 500.0))
            res["max_abs_diff"] = (ref - other).abs().max().item()
            res["max_abs_out"] = ref.abs().max().item()
    for name, (m, c) in runs.items():  # warm-up: compiles (static shapes: the loop's one shape)
        start = time.perf_counter()
        sample(c, m, pair.x, 2)
        res["warm_s"][name] = time.perf_counter() - start
    for _ in range(rounds):
        for name, (m, c) in runs.items():
            res["s"][name] = min(res["s"].get(name, math.inf), sample(c, m, pair.x, steps))
    return res


class _Bound(nn.Module):
    """One side's call as a module taking (x, t), for the FLOP counter."""

    def __init__(self, net: nn.Module, call: Callable):
        super().__init__()
        self.net, self.call = net, call

    def forward(self, x, t):
        return self.call(self.net, x, t)


def call_macs(pair: Pair) -> int:
    """Multiply-adds of one network call of the pair (batch 2), counted by torch's FLOP counter."""
    from inkwash.models.flops import count_flops

    return count_flops(_Bound(pair.ours, pair.call_ours), (pair.x, torch.full((pair.x.shape[0],), 500.0)))


def cpu_peak(rounds: int = 5) -> float:
    """This CPU's best measured fp32 FLOP/s at the running thread count: the better of a 2048^3 matmul and a 3x3
    convolution (256 channels, 2 x 32 x 32; oneDNN's convolutions can beat its own GEMM)."""
    conv, x = nn.Conv2d(256, 256, 3, padding=1, bias=False), torch.randn(2, 256, 32, 32)
    with torch.no_grad():
        conv(x)
        best = math.inf
        for _ in range(rounds):
            start = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - start)
    conv_flops = 2 * 2 * 256 * 256 * 9 * 32 * 32 / best
    return max(matmul_peak(torch.device("cpu"), n=2048, reps=2, rounds=rounds), conv_flops)


KERNELS = ("convolution", "addmm", "aten::mm", "bmm", "scaled_dot_product", "_slow_conv2d")  # the heavy arithmetic


def kernel_floor(pair: Pair, steps: int = 3) -> dict:
    """Profile `steps` calls of each side: the seconds spent in the heavy kernels (convolutions, matmuls,
    attention: both sides call the same ones with the same shapes, so they cost the same in ours) and in total.
    With identical arithmetic, ours / diffusers cannot go below diffusers' kernel share even if everything
    else took no time: the floor of the ratio."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for side, (m, c) in {"ours": (pair.ours, pair.call_ours), "diffusers": (pair.theirs, pair.call_theirs)}.items():
        sample(c, m, pair.x, 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sample(c, m, pair.x, steps)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        kernels = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in KERNELS)) / 1e6
        out[side] = {"total_s": total, "kernel_s": kernels}
    out["floor"] = out["diffusers"]["kernel_s"] / out["diffusers"]["total_s"]
    return out


def quant_rows(pair: Pair, steps: int, rounds: int) -> list[dict]:
    rows = []
    for mode in (None, *MODES):
        net = pair.ours if mode is None else quantize(copy.deepcopy(pair.ours), mode)
        best = min(sample(pair.call_ours, net, pair.x, steps) for _ in range(rounds))
        with torch.no_grad():
            t = torch.full((pair.x.shape[0],), 500.0)
            ref, out = pair.call_ours(pair.ours, pair.x, t), pair.call_ours(net, pair.x, t)
        err = ((out - ref).norm() / ref.norm()).item()
        rows.append({"pair": pair.name, "mode": mode or "fp32", "mib": state_bytes(net) / 2**20,
                     "s_per_step": best / steps, "rel_err": err})  # fmt: skip
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers

    return (f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, Python {platform.python_version()}")  # fmt: skip


def cpu_main(args: argparse.Namespace) -> dict:
    print(f"# {machine()}")
    print(f"# {args.steps} steps, batch 2, best of {args.rounds} rounds; ratio = ours / diffusers (< 1: ours faster)")
    print()
    print("| network | params | ours eager s | diffusers eager s | ratio | ours compiled s | diffusers compiled s "
          "| ratio | max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    results, quant = [], []
    for key in args.pairs:
        pair = PAIRS[key]()
        r = time_pair(pair, args.steps, args.rounds, not args.no_compile)
        results.append(r)
        s = r["s"]
        cells = [
            f"{s['ours:eager']:.2f}",
            f"{s['diffusers:eager']:.2f}",
            f"{s['ours:eager'] / s['diffusers:eager']:.2f}",
        ]
        if "ours:compiled" in s:
            cells += [f"{s['ours:compiled']:.2f}", f"{s['diffusers:compiled']:.2f}",
                      f"{s['ours:compiled'] / s['diffusers:compiled']:.2f}"]  # fmt: skip
        else:
            cells += ["-", "-", "-"]
        print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + f" | {r['max_abs_diff']:.1e} |",
              flush=True)  # fmt: skip
        r["macs_per_call"] = call_macs(pair)
        if args.profile:
            r["kernels"] = kernel_floor(pair)
        if key in args.quant_pairs:
            quant += quant_rows(pair, args.steps, args.rounds)
    peak = cpu_peak()
    print()
    print(f"Share of this CPU's measured fp32 peak ({peak / 1e9:.0f} GFLOP/s at {torch.get_num_threads()} thread(s)) "
          "that each side's multiply-adds reach; at the same arithmetic no implementation can take less than "
          "(its share / 100%) of a side's time, so the floor for 'ours / diffusers' is diffusers' share.")  # fmt: skip
    print()
    print("| network | GMAC per call | ours eager | diffusers eager | ours compiled | diffusers compiled |")
    print("|---|---|---|---|---|---|")
    for r in results:
        flops = 2 * r["macs_per_call"] * args.steps
        shares = {k: flops / v / peak for k, v in r["s"].items()}
        r["peak_share"], r["peak_flops"] = shares, peak
        cells = [f"{100 * shares[k]:.0f}%" if k in shares else "-"
                 for k in ("ours:eager", "diffusers:eager", "ours:compiled", "diffusers:compiled")]  # fmt: skip
        print(f"| {r['name']} | {r['macs_per_call'] / 1e9:.2f} | " + " | ".join(cells) + " |")
    if args.profile:
        print()
        print("Profiled (torch.profiler, 3 calls each): time in the heavy kernels (convolutions, matmuls, "
              "attention) and in total; floor = diffusers' kernel share, the lowest ratio the same kernels "
              "allow.")  # fmt: skip
        print()
        print("| network | ours: kernels / total s | diffusers: kernels / total s | floor |\n|---|---|---|---|")
        for r in results:
            k = r["kernels"]
            o, d = k["ours"], k["diffusers"]
            print(f"| {r['name']} | {o['kernel_s']:.3f} / {o['total_s']:.3f} | {d['kernel_s']:.3f} / "
                  f"{d['total_s']:.3f} | {k['floor']:.2f} |")  # fmt: skip
    if quant:
        print()
        print("| network | weights | state dict MiB | s/step (eager) | rel. output error vs fp32 |")
        print("|---|---|---|---|---|")
        for q in quant:
            print(f"| {q['pair']} | {q['mode']} | {q['mib']:.2f} | {q['s_per_step']:.4f} | {q['rel_err']:.4f} |")
    return {"machine": machine(), "pairs": results, "quantization": quant}


# ---------------------------------------------------------------------------- FLUX on a GPU


def flux_inputs(cfg, size: int, tokens: int, device, dtype):
    g = torch.Generator().manual_seed(1)
    side = size // 8  # the FLUX autoencoder's f = 8
    x = torch.randn(1, cfg.in_channels, side, side, generator=g).to(device, dtype)
    ctx = torch.randn(1, tokens, cfg.context_dim, generator=g).to(device, dtype)
    y = torch.randn(1, cfg.y_dim, generator=g).to(device, dtype)
    return x, ctx, y


def flux_step_macs(cfg, size: int, tokens: int) -> int:
    from inkwash.models.flops import count_flops
    from inkwash.models.mmdit import MMDiT

    side = size // 8
    with torch.device("meta"):
        net = MMDiT(cfg)
        kw = {"x": torch.zeros(1, cfg.in_channels, side, side), "t": torch.zeros(1),
              "context": torch.zeros(1, tokens, cfg.context_dim), "y": torch.zeros(1, cfg.y_dim)}  # fmt: skip
        if cfg.guidance_embed:
            kw["guidance"] = torch.zeros(1)
    return count_flops(net, kw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def ms_per_step(fn: Callable, device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def flux_main(args: argparse.Namespace) -> dict:
    from inkwash.models.mmdit import MMDiT

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    cfg = get_preset(args.preset)
    dtype = torch.bfloat16 if gpu else torch.float32
    size, tokens = args.size, args.tokens
    macs = flux_step_macs(cfg, size, tokens)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(device, args.peak_n)
    head = {"device": torch.cuda.get_device_name(device) if gpu else machine(), "torch": torch.__version__,
            "preset": args.preset, "size": size, "tokens": tokens, "dtype": str(dtype).split(".")[-1],
            "tflop_per_step": 2 * macs / 1e12, "peak_tflops": peak / 1e12,
            "roofline_ms": 2 * macs / peak * 1e3, "rows": []}  # fmt: skip
    print(f"# {head['device']}, torch {torch.__version__}; {args.preset} at {size} px, {tokens} text tokens, "
          f"{head['dtype']}; {head['tflop_per_step']:.2f} TFLOP/step, matmul peak {head['peak_tflops']:.1f} TFLOP/s, "
          f"roofline {head['roofline_ms']:.1f} ms", flush=True)  # fmt: skip

    torch.manual_seed(0)
    with torch.device("meta"):
        ours = MMDiT(cfg).to(dtype)  # on the meta device: allocated once, in bf16, by to_empty
    ours = ours.to_empty(device=device).eval()
    with torch.no_grad():  # to_empty left the memory as it was: norm scales 1, then every weight drawn
        for name, p in ours.named_parameters():
            if p.dim() == 1 and not name.endswith("bias"):
                p.fill_(1.0)
    _randomise(ours)
    x, ctx, y = flux_inputs(cfg, size, tokens, device, dtype)
    t = torch.full((1,), 500.0, device=device)
    g = torch.full((1,), 3.5, device=device) if cfg.guidance_embed else None
    call_ours = lambda m: m(x, t, context=ctx, y=y, guidance=g)  # noqa: E731

    def record(name: str, measure: Callable[[], tuple[dict, str]]) -> None:
        """Run one row's measurement, print its table line and rewrite the JSON; a failing row (e.g. out of
        memory) is recorded as such and must not lose the others."""
        entry = {"name": name}
        try:
            fields, text = measure()
            entry.update(fields)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            text = f"failed: {entry['error']} |"
        head["rows"].append(entry)
        print(f"| {name} | {text} |", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(head, indent=1) + "\n")

    def row(name: str, fn: Callable) -> None:
        def measure() -> tuple[dict, str]:
            ms = ms_per_step(fn, device, args.steps, args.warmup)
            fields = {"ms": ms, "mfu": 2 * macs / (ms / 1e3) / peak}
            if gpu:
                fields["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            return fields, f"{ms:.1f} | {100 * fields['mfu']:.1f}%"

        record(name, measure)

    print("| row | ms/step | MFU |\n|---|---|---|")
    rows = [r for r in args.rows if not r.startswith("ours:fp8")] + [r for r in args.rows if r.startswith("ours:fp8")]
    calls: dict[str, Callable] = {}  # row name -> one step; fp8 rows last (they quantize ours in place)
    if any(r.startswith("diffusers") for r in rows):
        try:
            call_theirs = diffusers_flux(ours, cfg, x, ctx, y, t, g, device, dtype)
            with torch.no_grad():
                diff = call_theirs(False).float().reshape(-1) - _pack_out(call_ours(ours), cfg).float().reshape(-1)
            head["max_abs_diff"] = diff.abs().max().item()
            calls["diffusers:eager"] = lambda: call_theirs(False)
            calls["diffusers:compiled"] = lambda: call_theirs(True)
        except ImportError as e:
            print(f"diffusers unavailable ({e}); our rows only")
    compiled = {}

    def ours_compiled():
        if "net" not in compiled:  # compiled again after fp8 quantization changed the modules
            compiled["net"] = torch.compile(ours, dynamic=False)
        return call_ours(compiled["net"])

    def to_fp8():
        if not compiled.get("fp8"):
            quantize(ours, "fp8", device)
            compiled.clear()
            compiled["fp8"] = True
            if gpu:
                torch.cuda.empty_cache()

    def generation(compiled: bool) -> None:
        def measure() -> tuple[dict, str]:
            fields = cached_generation(ours, x, ctx, y, g, args, device, compiled)
            return fields, f"{fields['seconds']:.2f} s per generation, {fields['computed']} of {args.gen_steps} " \
                "calls computed |"  # fmt: skip

        record(f"ours teacache:{args.tea:g} {args.gen_steps} steps" + (" compiled blocks" if compiled else ""), measure)

    calls["ours:eager"] = lambda: call_ours(ours)
    calls["ours:compiled"] = ours_compiled
    calls["ours:fp8"] = lambda: (to_fp8(), call_ours(ours))[1]
    calls["ours:fp8-compiled"] = lambda: (to_fp8(), ours_compiled())[1]
    for name in rows:
        if name.startswith("ours:teacache"):
            generation(compiled=name.endswith("compiled"))
        elif name in calls:
            if name.startswith("ours:fp8"):
                to_fp8()  # outside the timed calls
            row(name.replace(":", " ").replace("fp8-compiled", "fp8 compiled"), calls[name])
    return head


def flux_grid(cfg, x: torch.Tensor, steps: int) -> torch.Tensor:
    """FLUX.1's sampling times, 1 -> 0: a uniform grid shifted by exp(mu) for the image's token count."""
    from inkwash.diffusion.process import flux_mu, shift_time

    tokens = (x.shape[-2] // cfg.patch_size) * (x.shape[-1] // cfg.patch_size)
    return shift_time(torch.linspace(1.0, 0.0, steps + 1), math.exp(flux_mu(tokens)))


@torch.no_grad()
def cached_generation(net, x, ctx, y, g, args, device, compiled: bool) -> dict:
    """One flow-Euler generation of `args.gen_steps` steps through TeaCache (after one untimed warm-up
    generation): seconds, and the calls that ran the blocks. `compiled`: the cache of a compiled network, which
    compiles each block (what `--fast --cache teacache:T` does)."""
    from inkwash.accel.cache import make_cache

    cache = make_cache(torch.compile(net, dynamic=False) if compiled else net, f"teacache:{args.tea}")
    times = flux_grid(net.cfg, x, args.gen_steps).tolist()

    def generate() -> torch.Tensor:
        cache.reset()
        z = x.clone()
        for a, b in zip(times[:-1], times[1:]):
            v = cache(z, torch.full((1,), a * 1000.0, device=device), context=ctx, y=y, guidance=g)
            z = z + (b - a) * v
        return z

    generate()
    sync(device)
    start = time.perf_counter()
    z = generate()
    sync(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(z).all():
        raise RuntimeError("the cached generation gave non-finite latents")
    return {"seconds": seconds, "computed": sum(1 for n in cache.log if n), "steps": args.gen_steps,
            "threshold": args.tea, "flux_polynomial": cache.rescale is not None}  # fmt: skip


def diffusers_flux(ours, cfg, x, ctx, y, t, g, device, dtype) -> Callable[[bool], torch.Tensor]:
    """diffusers' FluxTransformer2DModel with our weights, resident beside ours (FLUX.1 dev: 24 GB a side in bf16),
    as `call(compiled)` -> its packed output for our inputs."""
    from diffusers import FluxTransformer2DModel

    from inkwash.formats.diffusers_flux import flux_config_to_diffusers, flux_state_dict_to_diffusers

    with torch.device("meta"):
        theirs = FluxTransformer2DModel(**flux_config_to_diffusers(cfg))
    theirs.load_state_dict(flux_state_dict_to_diffusers(ours.state_dict(), cfg), assign=True)
    theirs = theirs.to(device, dtype).eval()
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] += torch.arange(h, device=device)[:, None]
    ids[..., 2] += torch.arange(w, device=device)[None, :]
    img_ids, txt_ids = ids.reshape(h * w, 3), torch.zeros(ctx.shape[1], 3, device=device)
    packed = x.view(1, cfg.in_channels, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, h * w, -1)
    nets = {False: theirs}

    def call(compiled: bool) -> torch.Tensor:
        if compiled not in nets:
            nets[compiled] = torch.compile(theirs, dynamic=False)
        return nets[compiled](packed, ctx, y, t / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=g).sample

    return call


def _pack_out(out: torch.Tensor, cfg) -> torch.Tensor:
    from inkwash.models.mmdit import pack

    return pack(out, cfg.patch_size)


FLUX_ROWS = ("diffusers:eager", "diffusers:compiled", "ours:eager", "ours:compiled", "ours:teacache",
             "ours:teacache-compiled", "ours:fp8", "ours:fp8-compiled")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--quant-pairs", nargs="*", default=["unet-shapes", "dit-s2"], choices=list(PAIRS),
                   help="pairs whose network is also timed in each quantization mode")  # fmt: skip
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", action="store_true", help="also the kernel-time floor of the ratio (torch.profiler)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--gpu-flux", action="store_true", help="FLUX.1's transformer at full size (see the docstring)")
    p.add_argument("--preset", default="flux-dev", help="--gpu-flux: the MMDiT preset (mmdit-tiny off a GPU)")
    p.add_argument("--size", type=int, default=1024, help="--gpu-flux: image side in pixels (latents: / 8)")
    p.add_argument("--tokens", type=int, default=512, help="--gpu-flux: text tokens")
    p.add_argument("--rows", nargs="+", default=list(FLUX_ROWS), choices=FLUX_ROWS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tea", type=float, default=0.4, help="--gpu-flux: the TeaCache threshold of the cached rows")
    p.add_argument(
        "--gen-steps", dest="gen_steps", type=int, default=28, help="--gpu-flux: steps per cached generation"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="skip measuring the matmul peak")
    p.add_argument("--peak-n", type=int, default=8192)
    p.add_argument("--json", default=None, help="also write the results here (rewritten after every row)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = flux_main(args) if args.gpu_flux else cpu_main(args)
    if args.json and not args.gpu_flux:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
