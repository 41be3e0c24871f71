"""Train the Shapes judge's shape network and write inkwash/assets/shapes-judge.safetensors.

The recipe: render Shapes scenes (seed 1; the judge is validated on seed 4242, FID references use 12345) at
sizes from 32 to 128 px, degrade a random 3/4 of them (noise, blur, JPEG at random strengths, milder and
harsher than the validation's), segment them exactly as the judge does, label each blob by the ground-truth
object whose centre it holds, and fit ShapeNet to the crops with AdamW. Deterministic for its seed; about
5 minutes on one thread of the 2-core CPU.

    .venv/bin/python scripts/train_judge.py            # writes the bundled file
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from inkwash.data.base import to_uint8_hwc
from inkwash.data.shapes import SHAPES, ShapesDataset
from inkwash.eval.judge import ASSET, ShapeNet, segment
from inkwash.formats.checkpoint import save_model

SIZES = (32, 40, 48, 64, 80, 96, 128)


def random_degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = max(img.shape[:2])
    kind = rng.choice(["clean", "noise", "blur", "jpeg", "mixed"])
    if kind in ("blur", "mixed"):
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.6) * side / 64)))
    if kind in ("noise", "mixed"):
        img = np.clip(img + rng.normal(0, rng.uniform(0.01, 0.09) * 255, img.shape), 0, 255).round().astype(np.uint8)
    if kind in ("jpeg", "mixed"):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(50, 96)))
        img = np.asarray(Image.open(buf).convert("RGB"))
    return img


def make_crops(n_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops [M, 1, 24, 24] and shape labels [M] from `n_images` degraded renders."""
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    per = n_images // len(SIZES)
    for k, size in enumerate(SIZES):
        images, _, scenes = ShapesDataset(size, seed=seed).batch(range(k * per, (k + 1) * per))
        arr = to_uint8_hwc(images)
        arr = np.stack([random_degrade(a, rng) for a in arr])
        for (_, _, blobs), scene in zip(segment(arr), scenes):
            for b in blobs:
                inside = set(b.pixels.tolist())
                held = [o for o in scene["objects"] if o["centre"][1] * size + o["centre"][0] in inside]
                if len(held) == 1:
                    crops.append(b.crop)
                    labels.append(SHAPES.index(held[0]["shape"]))
    return torch.from_numpy(np.stack(crops))[:, None], torch.tensor(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=14000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--out", default=str(ASSET))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()
    x, y = make_crops(args.images, args.seed)
    xv, yv = make_crops(2800, args.seed + 1000)
    print(f"{len(x)} training crops, {len(xv)} held-out, made in {time.time() - t0:.0f} s", flush=True)
    net = ShapeNet(args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x), (args.batch,), generator=g)
        xb = x[idx]
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # a pixel of jitter: crops are never exact
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            net.eval()
            with torch.no_grad():
                acc = (net(xv).argmax(-1) == yv).float().mean().item()
            net.train()
            print(f"step {step}  loss {loss.item():.4f}  held-out shape accuracy {acc:.4f}  "
                  f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip
    net.eval()
    meta = {"kind": "shapes-judge", "width": net.width, "recipe": vars(args), "held_out_accuracy": acc}
    print(save_model(args.out, {"model": net.state_dict()}, meta))


if __name__ == "__main__":
    main()
