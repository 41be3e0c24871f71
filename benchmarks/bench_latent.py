"""Pixel vs latent diffusion, what a step costs: the same U-Net on 64x64 RGB pixels and on the f = 4 autoencoder's
16x16x4 latents (encoding on the fly, or from a latent cache), training images/s and sampling s/image (decoding
included), with MACs per step from the meta device.

    .venv/bin/python benchmarks/bench_latent.py [--vae inkwash/assets/shapes-vae-f4.safetensors] [--steps 8]

Without --vae, an untrained `vae-shapes-f4` (same cost) is written to a temporary file. Never fails on a time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from inkwash.formats.checkpoint import save_model
from inkwash.models.registry import build_model, config_to_dict, get_preset
from inkwash.pipeline import Pipeline
from inkwash.train import trainer as T
from inkwash.train.latents import build_latent_cache

NET = {**config_to_dict(get_preset("unet-xs")), "y_dim": 0}


def train_speed(cfg: T.TrainConfig, steps: int) -> tuple[float, Pipeline]:
    tr = T.Trainer(cfg)
    bins = torch.zeros(2, T.LOSS_BINS, dtype=torch.float64)
    for _ in range(2):
        tr.train_step(bins)
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step(bins)
    images_per_s = steps * tr.global_batch / (time.perf_counter() - t0)
    with tr.inference_pipeline() as pipe:
        return images_per_s, pipe


def sample_speed(pipe: Pipeline, n: int, steps: int) -> float:
    pipe.generate(["a red circle"] * n, steps=2)
    t0 = time.perf_counter()
    pipe.generate(["a red circle"] * n, steps=steps, sampler="dpmpp_2m")
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", default=None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps")
    ap.add_argument("--sample-steps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        vae = args.vae
        if vae is None:
            vae = Path(tmp) / "vae.safetensors"
            cfg = get_preset("vae-shapes-f4")
            save_model(vae, {"vae": build_model(cfg).state_dict()}, {"kind": "vae", "vae": config_to_dict(cfg)})
        build_latent_cache(vae, Path(tmp) / "cache", image_size=args.size, items=args.batch * (args.steps + 2),
                           progress=False)  # fmt: skip
        base = dict(model=NET, text_encoder="minilm", image_size=args.size, batch_size=args.batch, steps=10**6,
                    sample_prompts=(), sampling={"sampler": "dpmpp_2m", "steps": 20, "guidance": 5.0})  # fmt: skip
        rows = {}
        for name, extra in (
            ("pixels", {}),
            ("latents, encoded on the fly", {"vae": str(vae)}),
            ("latents, from the cache", {"vae": str(vae), "latent_cache": str(Path(tmp) / "cache")}),
        ):
            cfg = T.TrainConfig(**base, **extra, output_dir=str(Path(tmp) / name.split(",")[0]))
            ips, pipe = train_speed(cfg, args.steps)
            rows[name] = {"train_images_per_s": round(ips, 2), "macs_per_step": pipe.info()["macs_per_step"],
                          "sample_s_per_image": round(sample_speed(pipe, 4, args.sample_steps), 3)}  # fmt: skip
    print(f"device: cpu ({torch.get_num_threads()} threads), {args.size} px, batch {args.batch}")
    print(f"{'':<30}{'train img/s':>12}{'U-Net MACs/step':>17}{'sample s/img':>14}")
    for name, r in rows.items():
        print(
            f"{name:<30}{r['train_images_per_s']:>12}{r['macs_per_step'] / 1e6:>15.0f} M{r['sample_s_per_image']:>14}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
