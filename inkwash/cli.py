"""`inkwash generate | train | info`: thin entry points that build objects and call the library.

A user mistake (UserError) is printed as one sentence on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError


def _generate(args) -> None:
    from .pipeline import load, save_png

    pipe = load(args.model)
    images = pipe(
        args.prompt, negative_prompt=args.negative, n=args.n, seed=args.seed, size=args.size,
        steps=args.steps, sampler=args.sampler, schedule=args.schedule, guidance=args.guidance, rescale=args.rescale,
    )  # fmt: skip
    out = Path(args.output)
    for i, img in enumerate(images):
        path = out if (len(images) == 1 and out.suffix == ".png") else _numbered(out, args.seed + i)
        print(save_png(img, path))


def _numbered(out: Path, seed: int) -> Path:
    folder = out.parent if out.suffix == ".png" else out
    stem = out.stem if out.suffix == ".png" else "inkwash"
    return folder / f"{stem}-{seed:05d}.png"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _train(args) -> None:
    from .train.trainer import TrainConfig, train

    cfg = {}
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise UserError(f"training config {path} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"training config {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--set takes key=value, got {item!r}")
        cfg[key.replace("-", "_")] = _parse_value(value)
    for key in ("output_dir", "steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    path = train(TrainConfig.from_dict(cfg), resume=args.resume)
    print(path)


def _info(args) -> None:
    from .pipeline import load

    print(json.dumps(load(args.model).info(), indent=2))


def build_parser() -> argparse.ArgumentParser:
    from .sampling import SAMPLERS, SCHEDULES

    p = argparse.ArgumentParser(prog="inkwash", description="Text-to-image diffusion: train, sample, measure.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="an inkwash model file (default: the bundled Shapes model)")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--sampler", default=None, help=f"one of: {', '.join(SAMPLERS)}")
    g.add_argument("--schedule", default=None, help=f"one of: {', '.join(SCHEDULES)}")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--rescale", type=float, default=None, help="guidance rescale phi (Lin et al. 2023)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    g.add_argument("-n", type=int, default=1, help="images per prompt")
    g.add_argument("-o", "--output", default="out", help="a .png path, or a folder for numbered images")
    g.set_defaults(fn=_generate)

    t = sub.add_parser("train", help="train a model (runs unchanged under torchrun)")
    t.add_argument("--config", help="a JSON file of training options (see inkwash.train.TrainConfig)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one option (JSON value)")
    t.add_argument("--output-dir", dest="output_dir", default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue exactly from the run's last checkpoint")
    t.set_defaults(fn=_train)

    i = sub.add_parser("info", help="print a model's config, parameter count and MACs per step")
    i.add_argument("model", nargs="?", default=None)
    i.set_defaults(fn=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        msg = str(e).rstrip(".")
        print(f"inkwash: error: {msg[:1].upper()}{msg[1:]}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inkwash: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
