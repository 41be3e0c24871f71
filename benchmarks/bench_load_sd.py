"""Benchmark: peak memory and time of loading a full-size Stable Diffusion 1.5 single file (issue 9, section 2).

    python benchmarks/bench_load_sd.py [--dtype fp16] [--keep FILE]

Writes a random SD 1.5 single file with every tensor of tests/fixtures/sd15-original-keys.json (1,143 tensors,
1.07 B numbers; fp16 by default as the pruned-emaonly release, 2.1 GB) and a tiny CLIP tokenizer beside it (the
tokenizer only tokenizes; the text model's 49,408-row embedding is read from the file), then, in a fresh process,
loads it with `inkwash.load` and reports the process's peak resident memory (VmHWM) after importing inkwash and
transformers, after the load, and after reading every weight once, against the file's size. inkwash builds every
network on the meta device and assigns the file's tensors (safetensors maps the file, so untouched pages are not
yet resident right after the load); the fused projections (q/k/v, k/v) are the only copies it makes, so reading
every weight should cost about one copy of the file.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def write(path: Path, dtype: torch.dtype) -> None:
    import sd_tiny
    from safetensors.torch import save_file

    shapes = json.loads((ROOT / "tests/fixtures/sd15-original-keys.json").read_text())
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("position_ids"):
            sd[k] = torch.arange(77)[None]
        elif k == "betas":
            sd[k] = sd_tiny.SCALED_LINEAR_BETAS.float()
        else:
            sd[k] = (0.02 * torch.randn(shape, generator=g)).to(dtype)
    save_file(sd, str(path))
    sd_tiny.write_tokenizer(path.parent / "tokenizer")


def hwm() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike ru_maxrss, not inherited across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: Path) -> None:
    """Child process: imports, then one load, then the numbers as JSON."""
    import transformers  # noqa: F401

    import inkwash.pipeline  # noqa: F401

    before = hwm()
    t = time.perf_counter()
    pipe = inkwash.pipeline.load(path)
    seconds = time.perf_counter() - t
    peak = hwm()
    parts = [p for m in (pipe.net, pipe.vae, pipe.encoder) for p in m.parameters()]
    params = sum(p.numel() * p.element_size() for p in parts)
    with torch.no_grad():
        for p in parts:  # read every weight once: memory-mapped pages become resident
            p.sum()
    touched = hwm()
    print(json.dumps({"before": before, "peak": peak, "touched": touched, "seconds": seconds, "param_bytes": params}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    p.add_argument("--keep", default=None, help="write the file here (default: a temporary folder)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return measure(Path(args.child))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep or tmp) / "sd15-random.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, torch.float16 if args.dtype == "fp16" else torch.float32)
        env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        size = path.stat().st_size
    gb = 1e9
    cost = r["touched"] - r["before"]
    print(
        f"| file ({args.dtype}) | weights | RSS after imports | peak after load | peak after reading every weight "
        "| cost (peak - imports) | load time |"
    )
    print("|---|---|---|---|---|---|---|")
    cells = [f"{size / gb:.2f} GB", f"{r['param_bytes'] / gb:.2f} GB", f"{r['before'] / gb:.2f} GB",
             f"{r['peak'] / gb:.2f} GB", f"{r['touched'] / gb:.2f} GB",
             f"{cost / gb:.2f} GB ({cost / size:.2f} x file)", f"{r['seconds']:.1f} s"]  # fmt: skip
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
