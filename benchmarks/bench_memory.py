"""Peak memory of generating one image at the published sizes, per memory mode (weight dtype, offload, VAE tiling).

Without CUDA (here): a meta-device estimate, nothing allocated. Weights: every parameter and buffer counted in its
storage dtype after `cast_storage` (fp8: Linear/Conv weights at one byte, biases and norms fp32, the VAE fp32).
Activations: the live-tensor peak of one forward of each phase (text encoders, one denoiser step on the
classifier-free-guidance batch, the VAE decode), traced op by op on the meta device, with attention as a fused
kernel (flash / memory-efficient SDPA, whose L x L scores are never stored; the meta device would otherwise take the
math path). A mode's peak is the largest phase's resident weights plus that phase's activations:
  none       every weight resident          model       the phase's component only
  sequential the largest single module's own weights (a module that owns tensors directly)
Not counted: the CUDA context, allocator fragmentation and cuBLAS/attention workspaces, the latents and text
embeddings carried between phases (a few MB).

With CUDA and --cuda: torch.cuda.max_memory_allocated around one real forward of each phase per mode, with random
weights (text encoders from transformers configs), weights starting on the CPU.

    python benchmarks/bench_memory.py                 # all families, markdown table
    python benchmarks/bench_memory.py --models sd15 --cuda
"""

from __future__ import annotations

import argparse
import contextlib
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from inkwash.accel.offload import _owners, cast_storage, offload, weight_bytes
from inkwash.models.registry import build_model, get_preset
from inkwash.pipeline import example_inputs
from inkwash.text.clip import TOWERS, build_text_model, text_config
from inkwash.text.t5 import build_t5_encoder, t5_config

GB = 1e9


def text_encoder(name: str, device="meta") -> nn.Module:
    """A published text encoder (configs in inkwash.text): CLIP ViT-L/14, OpenCLIP ViT-bigG/14, T5-XXL encoder."""
    if name == "t5-xxl":
        return build_t5_encoder(t5_config(), device=device)
    tower = {"clip-l": "clip-l", "clip-g": "open-clip-bigg"}[name]
    return build_text_model(text_config(TOWERS[tower]), projection=name == "clip-g", device=device)


@dataclass
class Family:
    denoiser: str
    vae: str
    text: tuple[tuple[str, int], ...]  # (encoder, tokens)
    size: int  # published resolution, px
    context_tokens: int
    cfg: bool = True  # classifier-free guidance: the denoiser sees a batch of 2


FAMILIES = {
    "sd15": Family("sd15", "vae-sd", (("clip-l", 77),), 512, 77),
    "sdxl-base": Family("sdxl-base", "vae-sdxl", (("clip-l", 77), ("clip-g", 77)), 1024, 77),
    "sd3-medium": Family("sd3-medium", "vae-sd3", (("clip-l", 77), ("clip-g", 77), ("t5-xxl", 256)), 1024, 333),
    "flux-dev": Family("flux-dev", "vae-flux", (("clip-l", 77), ("t5-xxl", 512)), 1024, 512, cfg=False),
}
MODES = [  # (weight dtype, offload, VAE tile in latent positions)
    ("fp32", "none", None), ("bf16", "none", None), ("fp8", "none", None), ("bf16", "model", None),
    ("fp8", "model", None), ("bf16", "sequential", None), ("bf16", "sequential", 64),
]  # fmt: skip


class LivePeak(TorchDispatchMode):
    """The peak bytes of tensor storages created inside the mode and still alive, checked after every op."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # views and in-place ops allocate nothing
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    self.refs[s._cdata] = (StorageWeakRef(s), s.nbytes())
        for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
            del self.refs[key]
        self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
        return out


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return q.new_empty(*q.shape[:-1], v.shape[-1])  # a fused kernel stores only its output


@contextlib.contextmanager
def fused_attention():
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _compute_dtype(module: nn.Module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.dtype in (torch.float32, torch.bfloat16, torch.float16))


def denoiser_inputs(fam: Family, net: nn.Module, device="meta") -> dict:
    cfg = get_preset(fam.denoiser)
    side = fam.size // 8
    kw = example_inputs(cfg, side, fam.context_tokens, device=device)
    b, dtype = (2 if fam.cfg else 1), _compute_dtype(net)
    kw = {k: v.expand(b, *v.shape[1:]) for k, v in kw.items()}
    return {k: v.to(dtype) if v.is_floating_point() and k != "t" else v for k, v in kw.items()}


def phases(fam: Family, parts: dict[str, nn.Module], vae_tile: int | None, device="meta") -> dict[str, callable]:
    """Each phase's forward on `device` inputs: text encoders (one after another), a denoiser step, the decode."""

    def text():
        for (_, tokens), enc in zip(fam.text, parts["text"]):
            enc(input_ids=torch.zeros(1, tokens, dtype=torch.long, device=device))

    def denoise():
        parts["denoiser"](**denoiser_inputs(fam, parts["denoiser"], device))

    def decode():
        vae = parts["vae"]
        z = torch.zeros(
            1, vae.cfg.latent_channels, fam.size // 8, fam.size // 8, device=device, dtype=_compute_dtype(vae)
        )
        vae.decode_latent(z, tile=vae_tile)

    return {"text": text, "denoiser": denoise, "vae": decode}


def build(fam: Family, dtype: str, device="meta") -> dict:
    with torch.device(device):
        parts = {
            "text": nn.ModuleList([text_encoder(n, device) for n, _ in fam.text]),
            "denoiser": build_model(get_preset(fam.denoiser)),
            "vae": build_model(get_preset(fam.vae)),
        }
    for name, m in parts.items():
        if dtype != "fp8" or name != "vae":
            cast_storage(m.eval().requires_grad_(False), dtype)
    return parts


def largest_owner(m: nn.Module) -> int:
    sizes = [sum(t.numel() * t.element_size() for t in [*o.parameters(False), *o.buffers(False)]) for o in _owners(m)]
    return max(sizes, default=0)


@torch.no_grad()
def estimate(fam: Family) -> list[dict]:
    """Meta-device estimates for every mode."""
    rows, cache = [], {}
    for dtype, mode, tile in MODES:
        if dtype not in cache:
            parts = build(fam, dtype)
            acts = {}
            for tiled in (None, 64):
                for name, run in phases(fam, parts, tiled).items():
                    if name == "vae" or tiled is None:
                        with fused_attention(), LivePeak() as peak:
                            run()
                        acts[name if name != "vae" or tiled is None else "vae-tiled"] = peak.peak
            w = {k: weight_bytes(m) for k, m in parts.items()}
            own = {k: largest_owner(m) for k, m in parts.items()}
            cache[dtype] = (w, own, acts)
        w, own, acts = cache[dtype]
        act = {**acts, "vae": acts["vae-tiled" if tile else "vae"]}
        resident = {"none": dict.fromkeys(w, sum(w.values())), "model": w, "sequential": own}[mode]
        peaks = {p: resident[p] + act[p] for p in ("text", "denoiser", "vae")}
        top = max(peaks, key=peaks.get)
        rows.append({"dtype": dtype, "offload": mode, "tile": tile, "weights": sum(w.values()),
                     "resident": resident[top], "activations": act[top], "phase": top, "peak": peaks[top]})  # fmt: skip
    return rows


@torch.no_grad()
def measure(fam: Family) -> list[dict]:
    """CUDA: max_memory_allocated over the three phases per mode, weights starting on the CPU."""
    rows = []
    for dtype, mode, tile in MODES:
        parts = build(fam, dtype, device="cpu")
        place = offload(mode, parts, "cuda")
        if place is None:
            for m in parts.values():
                m.to("cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for run in phases(fam, parts, tile, device="cuda").values():
            run()
        torch.cuda.synchronize()
        rows.append({"dtype": dtype, "offload": mode, "tile": tile, "weights": sum(map(weight_bytes, parts.values())),
                     "peak": torch.cuda.max_memory_allocated()})  # fmt: skip
        del parts, place
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--cuda", action="store_true", help="measure on the GPU instead of estimating on the meta device")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cuda = args.cuda and torch.cuda.is_available()
    where = torch.cuda.get_device_name() if cuda else "meta-device estimate, no GPU measured"
    print(f"# {where}; torch {torch.__version__}, Python {platform.python_version()}")
    print(
        "| model | weights | offload | VAE tile | all weights GB | peak GB | largest phase: resident + activations GB |"
    )
    print("|---|---|---|---|---:|---:|---|")
    for name in args.models:
        fam = FAMILIES[name]
        for r in measure(fam) if cuda else estimate(fam):
            split = "measured" if cuda else f"{r['phase']}: {r['resident'] / GB:.2f} + {r['activations'] / GB:.2f}"
            print(f"| {name} | {r['dtype']} | {r['offload']} | {r['tile'] or '-'} | {r['weights'] / GB:.2f} | "
                  f"{r['peak'] / GB:.2f} | {split} |")  # fmt: skip


if __name__ == "__main__":
    main()
