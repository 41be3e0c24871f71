"""Render the bundled model's sample grid for docs/: one row per prompt, four seeds, upscaled 4x.

Usage: .venv/bin/python scripts/bundled_grid.py [MODEL] [OUT.png]
"""

from __future__ import annotations

import sys

from PIL import Image, ImageDraw

import inkwash

PROMPTS = [
    "a green triangle",
    "a large red circle on the left",
    "a blue square",
    "a yellow star",
    "a purple hexagon",
    "an orange diamond",
    "a large white cross",
    "two red circles",
    "a red circle above a blue square",
]
SEEDS, SCALE, LABEL_W = 4, 4, 260


def main(model: str | None = None, out: str = "docs/bundled-samples.png") -> None:
    pipe = inkwash.load(model)
    size = pipe.image_size * SCALE
    grid = Image.new("RGB", (LABEL_W + SEEDS * (size + 4), len(PROMPTS) * (size + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(PROMPTS):
        images = pipe(prompt, n=SEEDS, seed=100)
        y = r * (size + 4)
        draw.text((6, y + size // 2 - 6), prompt, fill="black")
        for c, img in enumerate(images):
            grid.paste(img.resize((size, size), Image.NEAREST), (LABEL_W + c * (size + 4), y))
    grid.save(out)
    s = pipe.sampling
    print(out, f"({s.sampler}, {s.steps} steps, guidance {s.guidance}, seeds 100-103)")


if __name__ == "__main__":
    main(*sys.argv[1:])
