"""Benchmark: DiT training throughput and MFU, inkwash `DiT` vs diffusers `DiTTransformer2DModel` (issue 6, section 4).

    python benchmarks/bench_dit_train.py [--preset dit-xl2] [--batch 256] [--steps 10] [--warmup 3]
        [--rows ours:eager diffusers:eager ours:blocks ...] [--loss-steps 8] [--json OUT] [--tiny]

Measures, on one device:
  (a) the bf16 matmul peak (best of several n^3 matmuls; fp32 on a CPU), the denominator of MFU;
  (b) training throughput per row: images/s of a full AdamW step (forward, backward, update), its MFU
      = 3 x forward MACs x 2 FLOP x img/s / peak (backward counted as twice the forward), and peak memory;
  (c) loss curves: the same diffusers weights converted into ours (`formats.diffusers_dit`), the same batches and
      seeds, N AdamW steps on both; prints both curves and their largest relative difference.

Protocol. Latents [B, 4, s, s] (s = the preset's sample size: 32 for the 256 px ImageNet presets), random class
labels, random integer t in [0, 1000), a plain MSE against a random target over *all* output channels (learned-sigma
channels included, the same for both models). bf16 mode is autocast (bf16 matmuls, fp32 weights, fp32 master
copy, fp32 gradients) with `AdamW(fused=True)` on CUDA: correct mixed precision with no hand-kept master copy, and
autocast's per-step weight casts cost about 2 ms of a ~350 ms DiT-XL/2 step. Warm-up steps (compilation happens
there), then `--steps` timed steps between `torch.cuda.synchronize` calls. A row that runs out of memory is retried
at half the batch (the row says so); any other failure is reported in its row and the next row runs.

Rows are `impl:mode[+option...]`: impl `ours` | `diffusers`; mode `eager` | `compile` (torch.compile of the whole
model) | `blocks` (regional: torch.compile of each transformer block; identical blocks share one compiled graph, so
compiling costs one block, not 28); options `+cudnn` (SDPA prefers cuDNN attention, then flash) and `+max`
(mode="max-autotune-no-cudagraphs": Triton GEMM templates, epilogue fusion).

Comparability: diffusers' DiT keeps a private copy of the time and class embedders in every block, each with label
dropout (p = 0.1, random per block). Label dropout is switched off in every row (classifier-free-guidance dropout
belongs in the data pipeline, where inkwash's trainer does it); the throughput rows keep diffusers' 28 copies (as
shipped, about 75M extra parameters for XL/2), while the loss-curve check ties them into one shared module as in
the original DiT and ours, so both models train exactly the same function and parameters.

Speed levers in inkwash's DiT (`models/dit.py`, `models/transformer.py`), all parity-preserving:
  - one fused QKV linear per block (diffusers: three), so one GEMM forward and one input-gradient GEMM backward;
  - attention by `F.scaled_dot_product_attention` on [B, heads, N, d] views of the fused QKV output (no copies;
    flash or cuDNN kernels on a GPU; the output's transpose back to [B, N, heads*d] is a view for flash);
  - one shared time/class embedder for all blocks (diffusers computes 28 and the optimizer updates 28);
  - one adaLN linear per block giving all six modulations at once (chunked views, no copies);
  - the residual stream stays in the compute dtype (bf16 under autocast): the fp32 position table is cast once;
  - no graph breaks: `torch.compile(fullgraph=True)` traces the forward and backward (tests/test_bench_dit.py);
  - regional compilation (`blocks` rows) cuts compile time ~28x at the cost of the fusions across block borders.
  Considered and left out: LayerNorm kept in bf16 under autocast (less eager traffic, but extra bf16 roundings and
  nothing gained once compiled), all blocks' modulations in one GEMM (needs 28 weights concatenated every step).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inkwash.formats import diffusers_dit as conv
from inkwash.models import DiT, DiTConfig, count_flops, get_preset

# The CPU fallback: a tiny class-conditional, learned-sigma DiT on 8x8 latents (16 tokens).
TINY = DiTConfig(hidden_size=64, depth=2, num_heads=4, num_classes=10, learn_sigma=True, sample_size=8)
# In order of interest: a run stopped by its time budget loses the last rows (full compiles and autotuning take
# longest; the last row is opportunistic).
GPU_ROWS = (
    "ours:eager", "diffusers:eager", "ours:blocks", "ours:blocks+cudnn", "diffusers:compile", "ours:compile",
    "ours:blocks+cudnn+max",
)  # fmt: skip
CPU_ROWS = ("ours:eager", "diffusers:eager")
T_MAX = 1000  # timesteps are drawn from 0..T_MAX-1, as DiT's 1000-step schedule


@dataclasses.dataclass
class Row:
    """One measured configuration; `error` set (and the numbers None) when it failed."""

    name: str
    batch: int
    img_s: float | None = None
    step_ms: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    note: str = ""
    error: str | None = None


def mfu(macs_per_image: float, img_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of training: forward + backward = 3 forwards, 2 FLOP per multiply-add."""
    return 3 * macs_per_image * 2 * img_per_s / peak_flops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 10, rounds: int = 5) -> float:
    """Best measured FLOP/s of n x n x n matmuls: bf16 on CUDA, fp32 elsewhere (what a CPU runs fast)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def bench_config(preset: str | None) -> DiTConfig:
    """The preset (TINY when None) with diffusers' time features (freq_shift 1), so diffusers can hold it too."""
    cfg = TINY if preset is None else get_preset(preset)
    if not isinstance(cfg, DiTConfig):
        raise SystemExit(f"preset {preset!r} is not a DiT")
    return dataclasses.replace(cfg, freq_shift=conv.DIFFUSERS_DIT_FREQ_SHIFT)


def forward_macs(cfg: DiTConfig) -> tuple[int, int]:
    """(multiply-adds of one image's forward pass at the configured latent size, parameters), on the meta device."""
    s = cfg.sample_size
    with torch.device("meta"):
        model = DiT(cfg)
        x, t, y = torch.zeros(1, cfg.in_channels, s, s), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    return count_flops(model, {"x": x, "t": t, "y": y}), sum(p.numel() for p in model.parameters())


def have_diffusers() -> bool:
    """Whether diffusers' DiT imports here (the GPU image may lack diffusers or hold a broken install)."""
    try:
        from diffusers import DiTTransformer2DModel  # noqa: F401
    except Exception as e:
        print(f"diffusers unavailable: {_short(e)}", flush=True)
        return False
    return True


def _no_label_dropout(model: nn.Module) -> nn.Module:
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0  # the table keeps its null-class row; only the random replacement stops
    return model


def _tie_embedders(model: nn.Module) -> nn.Module:
    """Make every block use block 0's time/class embedder module (one set of parameters, as in DiT and ours)."""
    first = model.transformer_blocks[0].norm1
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = first.emb
    return model


class Models:
    """Builds fresh copies of both networks from one reference weight set (diffusers' keys, kept on the CPU)."""

    def __init__(self, cfg: DiTConfig, device: torch.device, seed: int = 0, with_diffusers: bool = True):
        self.cfg, self.device = cfg, device
        self.kwargs = conv.dit_config_to_diffusers(cfg)
        self.ref: dict[str, torch.Tensor] | None = None
        if with_diffusers:
            from diffusers import DiTTransformer2DModel

            torch.manual_seed(seed)
            with torch.device(device):
                theirs = DiTTransformer2DModel(**self.kwargs).to(device)
            with torch.no_grad():  # every weight random and non-zero, then the embedder copies made identical
                for p in theirs.parameters():
                    nn.init.normal_(p, std=0.02)
                _tie_embedders(theirs)
            self.ref = {k: v.detach().to("cpu", copy=True) for k, v in theirs.state_dict().items()}
            del theirs

    def ours(self) -> nn.Module:
        if self.ref is None:
            torch.manual_seed(0)
            with torch.device(self.device):
                model = DiT(self.cfg)
            return model.to(self.device).train()
        sd = {k: v.clone() for k, v in self.ref.items()}  # never alias the reference
        return conv.dit_from_diffusers(self.kwargs, sd).to(self.device).train()

    def diffusers(self, tie: bool = False) -> nn.Module:
        if self.ref is None:
            raise RuntimeError("diffusers is not installed")
        from diffusers import DiTTransformer2DModel

        with torch.device(self.device):
            model = DiTTransformer2DModel(**self.kwargs).to(self.device)
        model.load_state_dict(self.ref)
        if tie:
            _tie_embedders(model)
        return _no_label_dropout(model).train()


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Both models' forward with one signature: -> [B, out (x2 with learned sigma), H, W]."""
    if isinstance(model, DiT) or isinstance(getattr(model, "_orig_mod", None), DiT):
        return model(x, t, y=y)
    return model(x, timestep=t, class_labels=y).sample


def make_batch(cfg: DiTConfig, batch: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(latents, t, labels, target), drawn on the CPU from `gen` so every device sees the same numbers."""
    s = cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, s, s, generator=gen)
    t = torch.randint(0, T_MAX, (batch,), generator=gen).float()
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    target = torch.randn(batch, cfg.output_channels, s, s, generator=gen)
    return tuple(v.to(device) for v in (x, t, y, target))


def train_step(fwd: nn.Module, opt: torch.optim.Optimizer, batch, bf16: bool) -> torch.Tensor:
    """One AdamW step on MSE(model output, target); -> the loss (a tensor: no host sync)."""
    x, t, y, target = batch
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = call(fwd, x, t, y)
    loss = F.mse_loss(out.float(), target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def optimizer(model: nn.Module, device: torch.device, lr: float = 1e-4) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=lr, **fused)


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """A parsed row name `impl:mode[+option...]`."""

    impl: str
    mode: str
    cudnn: bool = False
    max_autotune: bool = False

    @classmethod
    def parse(cls, name: str) -> RowSpec:
        impl, _, rest = name.partition(":")
        mode, *opts = rest.split("+")
        bad = [o for o in opts if o not in ("cudnn", "max")]
        if impl not in ("ours", "diffusers") or mode not in ("eager", "compile", "blocks") or bad:
            raise SystemExit(f"bad row {name!r}: want (ours|diffusers):(eager|compile|blocks)[+cudnn][+max]")
        return cls(impl, mode, "cudnn" in opts, "max" in opts)


def compiled(model: nn.Module, spec: RowSpec, backend: str) -> nn.Module:
    """The module to call for this row: the model itself, compiled whole, or with each block compiled."""
    if spec.mode == "eager":
        return model
    kw = {"dynamic": False, "backend": backend}
    if spec.max_autotune:
        kw["mode"] = "max-autotune-no-cudagraphs"
    if spec.mode == "compile":
        return torch.compile(model, **kw)
    for block in model.blocks if isinstance(model, DiT) else model.transformer_blocks:
        block.compile(**kw)
    return model


@contextlib.contextmanager
def attention_backend(cudnn: bool, device: torch.device) -> Iterator[None]:
    """With `cudnn`: SDPA tries cuDNN attention first, then flash, memory-efficient, math."""
    if not (cudnn and device.type == "cuda"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:160]


def time_row(name: str, models: Models, args: argparse.Namespace, macs: int, peak: float) -> Row:
    """Throughput of one row, halving the batch on out-of-memory down to --min-batch."""
    spec, device = RowSpec.parse(name), models.device
    batch, notes = args.batch, []
    while True:
        row = Row(name, batch)
        try:
            _time_once(row, spec, models, args, macs, peak)
            row.note = "; ".join(notes + ([row.note] if row.note else []))
            return row
        except Exception as e:  # one row's failure (a compile error, say) must not end the benchmark
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
            error = _short(e)
            if not oom:
                traceback.print_exc(file=sys.stderr)
        free(device)  # out of the handler: its traceback held the failed step's tensors
        torch._dynamo.reset()
        if not oom:
            return Row(name, batch, note="; ".join(notes), error=error)
        notes.append(f"OOM at batch {batch}")
        if batch // 2 < args.min_batch:
            return Row(name, batch, note="; ".join(notes), error="out of memory")
        batch //= 2


def _time_once(row: Row, spec: RowSpec, models: Models, args, macs: int, peak: float) -> None:
    """Fill in `row` from a fresh model; everything it allocates dies with this frame (the caller frees)."""
    device, bf16 = models.device, args.precision == "bf16"
    free(device)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = models.ours() if spec.impl == "ours" else models.diffusers()
    opt = optimizer(model, device)
    fwd = compiled(model, spec, args.compile_backend)
    batch = make_batch(models.cfg, row.batch, torch.Generator().manual_seed(1), device)
    with attention_backend(spec.cudnn, device):
        start = time.perf_counter()
        for _ in range(args.warmup):
            loss = train_step(fwd, opt, batch, bf16)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {loss.item()} after warm-up")
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(fwd, opt, batch, bf16)
        sync(device)
        dt = (time.perf_counter() - start) / args.steps
    row.img_s, row.step_ms = row.batch / dt, 1e3 * dt
    row.mfu = mfu(macs, row.img_s, peak)
    row.note = f"warm-up {warm_s:.1f} s" if spec.mode != "eager" else ""
    if device.type == "cuda":
        row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """True fp32 matmuls and convolutions (no TF32) for the loss-curve comparison."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def loss_curves(models: Models, steps: int, batch: int, precision: str, seed: int = 2) -> dict:
    """Train ours and diffusers (shared embedders) from the same weights on the same batches; both curves and
    the largest relative difference between them."""
    device = models.device
    gen = torch.Generator().manual_seed(seed)
    data = [make_batch(models.cfg, batch, gen, torch.device("cpu")) for _ in range(steps)]
    curves: dict[str, list[float]] = {}
    builders: dict[str, Callable[[], nn.Module]] = {"ours": models.ours, "diffusers": lambda: models.diffusers(True)}
    with exact_fp32(device):
        for impl, build in builders.items():
            free(device)
            model = build()
            opt = optimizer(model, device)
            losses = [train_step(model, opt, [v.to(device) for v in b], precision == "bf16") for b in data]
            curves[impl] = [v.item() for v in losses]
            del model, opt
    rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(curves["ours"], curves["diffusers"])]
    return {"precision": precision, "steps": steps, "batch": batch, **curves, "max_rel_diff": max(rel)}


def table(rows: list[Row], header: str) -> str:
    """The markdown table of the rows, under a one-line header."""
    lines = [header, "", "| row | batch | img/s | step ms | MFU | peak mem GiB | note |"]
    lines.append("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.batch} | - | - | - | - | ERROR {r.error} {r.note} |")
            continue
        mem = f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "-"
        lines.append(
            f"| {r.name} | {r.batch} | {r.img_s:.1f} | {r.step_ms:.1f} | {100 * r.mfu:.1f}% | {mem} | {r.note} |"
        )
    return "\n".join(lines)


def loss_lines(check: dict) -> list[str]:
    if "error" in check:
        return [f"loss curves, {check['precision']}: ERROR {check['error']}"]
    fmt = lambda xs: " ".join(f"{v:.6f}" for v in xs)  # noqa: E731
    return [
        f"loss curves, {check['precision']}, {check['steps']} AdamW steps, batch {check['batch']}:",
        f"  ours:      {fmt(check['ours'])}",
        f"  diffusers: {fmt(check['diffusers'])}",
        f"  max relative difference: {check['max_rel_diff']:.2e}",
    ]


def describe(args: argparse.Namespace, cfg: DiTConfig, peak: float, with_diffusers: bool) -> dict:
    """The run's settings and machine, the start of the results dict; "header" is the table's first line."""
    device = torch.device(args.device)
    macs, n_params = forward_macs(cfg)
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__ if with_diffusers else None,
        "preset": "tiny" if args.tiny else args.preset,
        "config": dataclasses.asdict(cfg),
        "params": n_params,
        "macs_per_image": macs,
        "peak_flops": peak,
        "precision": args.precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "loss_checks": [],
        "rows": [],
    }
    precision = "bf16 autocast" if args.precision == "bf16" else "fp32"
    res["header"] = (
        f"DiT {res['preset']} ({n_params / 1e6:.1f}M params, {macs / 1e9:.4g} GMAC/image fwd), {res['device']}, "
        f"torch {torch.__version__}, diffusers {res['diffusers']}; {precision}, AdamW, {args.steps} timed steps; "
        f"{'bf16' if device.type == 'cuda' else 'fp32'} matmul peak {peak / 1e12:.2f} TFLOP/s"
    )
    return res


def save(res: dict, rows: list[Row], path: str | None) -> None:
    """Fill in the rows and the table; write the JSON and the markdown (table and loss curves) when asked."""
    res["rows"] = [dataclasses.asdict(r) for r in rows]
    res["table"] = table(rows, res["header"])
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=1))
        curves = [line for c in res["loss_checks"] for line in loss_lines(c)]
        Path(path).with_suffix(".md").write_text(res["table"] + "\n\n" + "\n".join(curves) + "\n")


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark: loss curves first (quick, and the correctness claim), then the rows in order;
    -> the results dict, also written to --json after every step so a stopped run keeps what it measured."""
    started = time.perf_counter()
    device = torch.device(args.device)
    cfg = bench_config(None if args.tiny else args.preset)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(device, args.peak_n)
    with_diffusers = have_diffusers()
    res = describe(args, cfg, peak, with_diffusers)
    print(res["header"], flush=True)
    models = Models(cfg, device, with_diffusers=with_diffusers)
    rows: list[Row] = []
    for precision in args.loss_precisions if with_diffusers else ():
        try:
            check = loss_curves(models, args.loss_steps, args.loss_batch, precision)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            check = {"precision": precision, "error": _short(e)}
        print("\n".join(loss_lines(check)), flush=True)
        res["loss_checks"].append(check)
        save(res, rows, args.json)
    for name in args.rows:
        if name.startswith("diffusers") and not with_diffusers:
            continue
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            rows.append(Row(name, args.batch, error=f"skipped: past the {args.budget_s:.0f} s budget"))
        else:
            try:
                rows.append(time_row(name, models, args, res["macs_per_image"], peak))
            except KeyboardInterrupt:  # `timeout --signal=INT`: keep what was measured
                rows.append(Row(name, args.batch, error=f"interrupted after {time.perf_counter() - started:.0f} s"))
                save(res, rows, args.json)
                raise
        r = rows[-1]
        print(f"{name}: {r.error or f'{r.img_s:.1f} img/s, MFU {100 * r.mfu:.1f}%'} {r.note}", flush=True)
        res["elapsed_s"] = time.perf_counter() - started
        save(res, rows, args.json)
    print("\n" + res["table"], flush=True)
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dit-xl2")
    p.add_argument("--tiny", action="store_true", help="CPU fallback: a tiny DiT, batch 4, 2 steps, eager rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 256 (4 with --tiny)")
    p.add_argument("--min-batch", type=int, default=32, help="halve the batch on out-of-memory down to this")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --tiny)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default bf16 (fp32 on a CPU)")
    p.add_argument("--rows", nargs="+", default=None, help=f"default {' '.join(GPU_ROWS)} (CPU: eager rows)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="include compiled rows")
    p.add_argument("--compile-backend", default="inductor", help="e.g. aot_eager to test tracing on a CPU")
    p.add_argument("--loss-steps", type=int, default=None, help="loss-curve steps (default 8; 3 with --tiny)")
    p.add_argument("--loss-batch", type=int, default=None, help="loss-curve batch (default 16; 4 with --tiny)")
    p.add_argument("--loss-precisions", nargs="*", default=None, help="default fp32 bf16 (fp32 on a CPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="use this peak instead of measuring it")
    p.add_argument("--peak-n", type=int, default=None, help="matmul side for the peak (default 8192; 512 CPU)")
    p.add_argument("--budget-s", type=float, default=0.0, help="skip rows that would start after this many s")
    p.add_argument("--json", default=None, help="write results here (and the table beside it, .md)")
    args = p.parse_args(argv)
    cpu, tiny = args.device == "cpu", args.tiny

    def default(name: str, gpu, small):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny or (cpu and name in ("precision", "loss_precisions", "peak_n")) else gpu)

    for name, gpu, small in [
        ("batch", 256, 4), ("steps", 10, 2), ("warmup", 3, 1), ("loss_steps", 8, 3), ("loss_batch", 16, 4),
        ("precision", "bf16", "fp32"), ("loss_precisions", ["fp32", "bf16"], ["fp32"]), ("peak_n", 8192, 512),
    ]:  # fmt: skip
        default(name, gpu, small)
    if args.rows is None:
        args.rows = list(GPU_ROWS if not (tiny or cpu) or args.compile else CPU_ROWS)
    if args.compile is False:
        args.rows = [r for r in args.rows if ":eager" in r]
    for r in args.rows:
        RowSpec.parse(r)
    args.min_batch = min(args.min_batch, args.batch)
    args.warmup = max(args.warmup, 1)  # the warm-up's last loss is checked for finiteness
    return args


if __name__ == "__main__":
    run(parse_args())
