"""`inkwash generate | train | distill | train-vae | cache-latents | eval | eval-vae | leaderboard | serve | info |
export-diffusers | export-onnx`.

A user mistake (UserError) is printed as one sentence on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError


def _generate(args) -> None:
    from .pipeline import ONNX_MANIFEST, load, load_onnx, save_png

    opts = {"tokenizer": args.tokenizer, "prediction": args.prediction, "text_encoders": args.text_encoders}
    memory = {"dtype": args.dtype, "offload_mode": args.offload, "vae_tile": args.vae_tiling, "device": args.device}
    if args.onnx and args.model:
        raise UserError("give either --model or --onnx, not both")
    onnx = args.onnx or (args.model if args.model and (Path(args.model) / ONNX_MANIFEST).is_file() else None)
    if onnx and (args.lora or args.refiner):
        raise UserError("an ONNX export runs as it was exported: it takes no --lora or --refiner")
    if onnx and (args.dtype != "fp32" or args.offload != "none" or args.vae_tiling or args.quantize or args.fast
                 or args.cache or args.precision not in (None, "fp32")):  # fmt: skip
        raise UserError("an ONNX export runs in float32 through onnxruntime; --dtype, --offload, --vae-tiling, "
                        "--quantize, --fast, --cache and --precision do not apply to it")  # fmt: skip
    pipe = load_onnx(onnx, args.device) if onnx else load(args.model, **opts)
    for spec in args.lora or []:  # merged into fp32 weights, before they are stored in another dtype or offloaded
        print(pipe.add_lora(*_lora_spec(spec)).summary(), file=sys.stderr)
    if not onnx:
        pipe.set_memory(**memory)
    refiner = load(args.refiner, **opts).set_memory(**memory) if args.refiner else None
    precision = "fp32" if onnx else _accelerate([pipe, refiner], args)
    images = pipe(
        args.prompt, negative_prompt=args.negative, n=args.n, seed=args.seed, size=args.size,
        steps=args.steps, sampler=args.sampler, schedule=args.schedule, guidance=args.guidance, rescale=args.rescale,
        precision=precision, refiner=refiner, handoff=args.handoff, class_label=args.class_label,
        cache=args.cache,
    )  # fmt: skip
    out = Path(args.output)
    for i, img in enumerate(images):
        path = out if (len(images) == 1 and out.suffix == ".png") else _numbered(out, args.seed + i)
        print(save_png(img, path))


def _export_diffusers(args) -> None:
    from .formats.export import export_diffusers

    index = export_diffusers(args.model, args.output)
    parts = ", ".join(f"{k} ({v[1]})" for k, v in index.items() if isinstance(v, list) and v[0])
    print(f"{args.output}: {index['_class_name']}" + (f" with {parts}" if parts else ""))


def _lora_spec(spec: str) -> tuple[str, float]:
    """FILE or FILE:SCALE -> (file, scale)."""
    path, _, scale = spec.rpartition(":")
    try:
        return (path, float(scale)) if path else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def _accelerate(pipes: list, args) -> str:
    """Apply --quantize / --fast to each pipeline given; the precision to run in (--precision, else the plan's)."""
    from .accel.fast import accelerate

    plans = [accelerate(p, quantize_mode=args.quantize, fast=args.fast) for p in pipes if p is not None]
    return args.precision or plans[0].precision


def _export_onnx(args) -> None:
    from .accel.onnx import export_onnx
    from .pipeline import load

    if args.model is not None and Path(args.model).is_dir():
        raise UserError(f"{args.model} is a folder; export-onnx takes an inkwash model file")
    print(export_onnx(load(args.model), args.output, size=args.size))


def _numbered(out: Path, seed: int) -> Path:
    folder = out.parent if out.suffix == ".png" else out
    stem = out.stem if out.suffix == ".png" else "inkwash"
    return folder / f"{stem}-{seed:05d}.png"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _read_json(name: str, what: str):
    path = Path(name)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def _options(args, what: str, flags: tuple[str, ...]) -> dict:
    """A training run's options: the --config JSON file, then each --set key=value, then the named flags."""
    cfg = _read_json(args.config, f"{what} config") if args.config else {}
    if not isinstance(cfg, dict):
        raise UserError(f"{what} config {args.config} must hold a JSON object of options")
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--set takes key=value, got {item!r}")
        cfg[key.replace("-", "_")] = _parse_value(value)
    for key in flags:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def _train(args) -> None:
    from .train.trainer import TrainConfig, train

    cfg = _options(args, "training", ("output_dir", "steps", "eval_every"))
    print(train(TrainConfig.from_dict(cfg), resume=args.resume))


def _distill(args) -> None:
    from .train.distill import DistillConfig, distill

    cfg = _options(args, "distillation", ("output_dir", "steps", "method", "teacher"))
    print(distill(DistillConfig.from_dict(cfg), resume=args.resume))


def _train_vae(args) -> None:
    from .train.vae_trainer import VAETrainConfig, train_vae

    cfg = _options(args, "VAE training", ("output_dir", "steps"))
    print(train_vae(VAETrainConfig.from_dict(cfg), resume=args.resume))


def _cache_latents(args) -> None:
    from .train.latents import build_latent_cache

    cache = build_latent_cache(args.vae, args.output, dataset=args.dataset, image_size=args.image_size,
                               items=args.items, seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    print(f"{len(cache)} items, moments {tuple(cache.moments.shape[1:])} each")
    print(cache.folder)


def _eval_vae(args) -> None:
    from .eval.vae_eval import evaluate_vae, format_result

    result = evaluate_vae(args.model, images=args.images, size=args.size, seed=args.seed,
                          batch_size=args.batch_size)  # fmt: skip
    print(format_result(result))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(out)


def _eval(args) -> None:
    from .accel.fast import plan_for
    from .eval.runner import EvalConfig, evaluate
    from .eval.shapeseval import TASKS
    from .pipeline import load

    pipe = load(args.model)
    precision = args.precision or (plan_for(pipe.device).precision if args.fast else "fp32")
    cfg = EvalConfig(
        sampler=args.sampler, steps=args.steps, guidance=args.guidance, schedule=args.schedule,
        per_prompt=args.per_prompt, tasks=tuple(args.tasks or TASKS), seed=args.seed, limit=args.limit,
        batch_size=args.batch_size, fid_images=args.fid, features=args.features, precision=precision,
        workers=args.workers, refiner=args.refiner, handoff=args.handoff, quantize=args.quantize, fast=args.fast,
        cache=args.cache,
    )  # fmt: skip
    s = pipe.settings(sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance, schedule=cfg.schedule,
                      cache=cfg.cache)  # fmt: skip
    suffix = "" if precision == "fp32" else f"-{precision}"
    suffix += f"-{args.quantize}" if args.quantize else ""
    suffix += "-fast" if args.fast else ""
    suffix += f"-{s.cache.replace(':', '-')}" if s.cache else ""
    out = Path(args.output or f"evals/{pipe.name}-{s.sampler}-{s.steps}-g{s.guidance:g}{suffix}")
    result = evaluate(pipe, out, cfg)
    sc, t = result["scores"], result["timing"]
    for name, v in sc.items():
        print(f"{name:14} {100 * v['mean']:5.1f}  ({100 * v['lo']:.1f}-{100 * v['hi']:.1f})")
    fid = result["fid"]
    if fid:
        print(f"{'FID':14} {fid['fid']:.2f}   KID {fid['kid']:.4f} ({fid['features']} features)")
    print(f"{t['seconds_per_image']:.3f} s/image over {t['images']} images")
    print(out / "result.json")
    print(out / "report.html")


def _leaderboard(args) -> None:
    from .eval.leaderboard import collect, format_table, sort_rows, write_leaderboard

    paths = args.paths or ["evals"]
    rows = collect(paths)
    if not rows:
        raise UserError(f"no evaluation results (result.json) under {', '.join(map(str, paths))}; run inkwash eval")
    rows = sort_rows(rows, args.sort, descending=None if not args.ascending else False)
    print(format_table(rows))
    md, html = write_leaderboard(rows, Path(args.output or paths[0]))
    print(md)
    print(html)


def _serve(args) -> None:
    import os

    from .serve.app import Limits, ServeConfig, serve

    arena = _read_json(args.arena, "arena file") if args.arena else None
    keys = tuple(args.api_key or ()) + tuple(k for k in os.environ.get("INKWASH_API_KEYS", "").split(",") if k)
    limits = Limits(max_size=args.max_size, max_steps=args.max_steps, max_n=args.max_n, max_queue=args.max_queue)
    cfg = ServeConfig(
        models=args.model or [None], data_dir=args.data_dir, limits=limits, api_keys=keys, max_rows=args.max_batch,
        max_active=args.max_active, precision=args.precision, device=args.device, arena=arena, dtype=args.dtype,
        offload=args.offload, quantize=args.quantize, fast=args.fast, cache=args.cache,
    )  # fmt: skip
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    serve(cfg, args.host, args.port)


def _info(args) -> None:
    from .models.registry import PRESETS
    from .pipeline import load, preset_info

    if args.model in PRESETS and not Path(args.model).exists():  # a preset: counted on the meta device
        info = preset_info(args.model, args.size)
    else:
        if args.size is not None:
            raise UserError("--size is for presets; a model file is counted at the size it was trained at")
        info = load(args.model).info()
    print(json.dumps(info, indent=2))


def _run_parser(sub, name: str, help: str, options: str) -> argparse.ArgumentParser:
    """A training command's parser: --config, --set, --output-dir, --steps, --resume (read by `_options`)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", help=f"a JSON file of options (see {options})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one option (JSON value)")
    p.add_argument("--output-dir", dest="output_dir", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue exactly from the run's last checkpoint")
    return p


def _accel_flags(p: argparse.ArgumentParser) -> None:
    from .accel.quant import MODES

    p.add_argument("--quantize", default=None, choices=MODES, help="quantize the network's linear layers: int8 "
                   "weights, int8 weights and activations, or fp8 weights (docs/fast-inference.md)")  # fmt: skip
    p.add_argument("--fast", action="store_true", help="the fastest settings measured for this device "
                   "(CPU: torch.compile; GPUs: also bf16 and fp8 matmuls on Hopper)")  # fmt: skip


def _storage_flags(p: argparse.ArgumentParser) -> None:
    from .accel.offload import OFFLOADS, STORAGE_DTYPES

    p.add_argument("--dtype", default="fp32", choices=list(STORAGE_DTYPES), help="weight storage: bf16/fp16 "
                   "halve memory and compute in it; fp8: Linear/Conv weights in 8 bits, upcast at use")  # fmt: skip
    p.add_argument("--offload", default="none", choices=OFFLOADS, help="keep weights on the CPU: model (each "
                   "component on --device only while used), sequential (each layer only for its forward)")  # fmt: skip


CACHE_HELP = (
    "step caching: fbcache:THRESHOLD or teacache:THRESHOLD (transformers, e.g. fbcache:0.1) or "
    "deepcache:INTERVAL[:BRANCH] (U-Nets, e.g. 3)"
)


def build_parser() -> argparse.ArgumentParser:
    from .eval.shapeseval import TASKS
    from .pipeline import DEFAULT_VAE_TILE, PRECISIONS
    from .sampling import SAMPLERS, SCHEDULES

    p = argparse.ArgumentParser(prog="inkwash", description="Text-to-image diffusion: train, sample, measure.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt", nargs="?", default=None, help="what to draw (not for class-conditional models)")
    g.add_argument("--class-label", dest="class_label", type=int, default=None, metavar="N",
                   help="a class-conditional model's class (ImageNet DiT: 0..999); CFG: the null class")  # fmt: skip
    g.add_argument("--model", default=None, help="an inkwash model file, a Stable Diffusion 1.x/2.x/XL, SD3 or FLUX.1 "
                   ".safetensors single file, a diffusers folder or an export-onnx folder (default: the bundled "
                   "Shapes model)")  # fmt: skip
    g.add_argument("--tokenizer", default=None, metavar="FOLDER", help="for a single file: the CLIP tokenizer "
                   "folder (vocab.json, merges.txt); default $INKWASH_CLIP_TOKENIZER, else tokenizer/ beside "
                   "it")  # fmt: skip
    g.add_argument("--prediction", default=None, choices=("eps", "v"), help="for a single file: what the "
                   "network predicts, where the family's default is wrong (SD 2.x: v; its 512 px bases: "
                   "eps)")  # fmt: skip
    g.add_argument("--text-encoders", dest="text_encoders", default=None, metavar="FOLDER", help="for a FLUX.1 or "
                   "SD3 single file: a folder laid out like its diffusers repository (text_encoder*/, tokenizer*/, "
                   "FLUX: vae/); default $INKWASH_TEXT_ENCODERS, else the file's folder")  # fmt: skip
    g.add_argument("--onnx", default=None, metavar="FOLDER", help="run an `inkwash export-onnx` folder through "
                   "onnxruntime (the same samplers, guidance and seeds)")  # fmt: skip
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--sampler", default=None, help=f"one of: {', '.join(SAMPLERS)}")
    g.add_argument("--schedule", default=None, help=f"one of: {', '.join(SCHEDULES)}")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (a guidance-"
                   "distilled model, e.g. FLUX dev, takes it as an input and runs one forward per step)")  # fmt: skip
    g.add_argument("--rescale", type=float, default=None, help="guidance rescale phi (Lin et al. 2023)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    g.add_argument("-n", type=int, default=1, help="images per prompt")
    g.add_argument("--precision", default=None, choices=PRECISIONS, help="network precision (bf16: autocast; "
                   "default fp32, or what --fast picks)")  # fmt: skip
    _accel_flags(g)
    _storage_flags(g)
    g.add_argument("--device", default="cpu", help="where the networks run (cpu, cuda, cuda:1, mps)")
    g.add_argument("--vae-tiling", dest="vae_tiling", type=int, nargs="?", const=DEFAULT_VAE_TILE, default=None,
                   metavar="LATENT_TILE", help="decode the image in overlapping tiles of this many latent positions "
                   f"a side (default {DEFAULT_VAE_TILE}: 512 px at f = 8)")  # fmt: skip
    g.add_argument("--refiner", default=None, help="a second model (file or folder) that finishes the denoising "
                   "(SDXL refiner)")  # fmt: skip
    g.add_argument("--handoff", type=float, default=0.8, help="fraction of the denoising the base model does")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="merge a LoRA (kohya or diffusers/PEFT "
                   "safetensors) into the model, times SCALE (default 1); repeatable")  # fmt: skip
    g.add_argument("--cache", default=None, help=CACHE_HELP)
    g.add_argument("-o", "--output", default="out", help="a .png path, or a folder for numbered images")
    g.set_defaults(fn=_generate)

    ox = sub.add_parser("export-onnx", help="export a model's text encoder, network and VAE decoder to ONNX")
    ox.add_argument("model", nargs="?", default=None, help="an inkwash model file (default: the bundled model)")
    ox.add_argument("-o", "--output", required=True, help="the folder to write (graphs and inkwash-onnx.json)")
    ox.add_argument("--size", type=int, default=None, help="image side in pixels the graphs take (default: the "
                    "model's)")  # fmt: skip
    ox.set_defaults(fn=_export_onnx)

    t = _run_parser(sub, "train", "train a model (runs unchanged under torchrun)", "inkwash.train.TrainConfig")
    t.add_argument("--eval-every", dest="eval_every", type=int, default=None, metavar="N",
                   help="a quick ShapesEval every N steps, logged to eval.jsonl with the training compute")  # fmt: skip
    t.set_defaults(fn=_train)

    d = _run_parser(sub, "distill", "distil a model to a few steps (LCM, progressive, reflow); resumable",
                    "inkwash.train.distill.DistillConfig and TrainConfig")  # fmt: skip
    d.add_argument("--method", default=None, help="lcm, progressive or reflow")
    d.add_argument("--teacher", default=None, metavar="MODEL_FILE", help="the inkwash model file to distil")
    d.set_defaults(fn=_distill)

    tv = _run_parser(sub, "train-vae", "train a KL autoencoder for latent diffusion (resumable)",
                     "inkwash.train.vae_trainer.VAETrainConfig")  # fmt: skip
    tv.set_defaults(fn=_train_vae)

    cl = sub.add_parser("cache-latents", help="encode a data set once with an autoencoder, for latent training")
    cl.add_argument("--vae", required=True, help="the autoencoder file (as train-vae writes)")
    cl.add_argument("-o", "--output", required=True, help="the cache folder (replaced if it exists)")
    cl.add_argument("--dataset", default="shapes", help="shapes, or a folder of images with captions")
    cl.add_argument("--image-size", dest="image_size", type=int, default=64)
    cl.add_argument("--items", type=int, default=10_000, help="items 0..N-1 of the data set")
    cl.add_argument("--seed", type=int, default=0, help="the data set's seed (as the training run's)")
    cl.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    cl.set_defaults(fn=_cache_latents)

    ev = sub.add_parser("eval-vae", help="a VAE's reconstruction PSNR, judge accuracy and speed on held-out Shapes")
    ev.add_argument("model", help="an inkwash VAE file (as train-vae writes)")
    ev.add_argument("--images", type=int, default=500, help="held-out Shapes scenes (default 500)")
    ev.add_argument("--size", type=int, default=None, help="image side in pixels (default: the VAE's training size)")
    ev.add_argument("--seed", type=int, default=None, help="Shapes seed of the held-out scenes (default: training "
                    "seed + 1000003; must differ from the training seed)")  # fmt: skip
    ev.add_argument("--batch-size", dest="batch_size", type=int, default=50)
    ev.add_argument("-o", "--output", default=None, help="also write the result as JSON here")
    ev.set_defaults(fn=_eval_vae)

    e = sub.add_parser("eval", help="score a model on ShapesEval (GenEval-style) with FID/KID; resumable")
    e.add_argument("model", nargs="?", default=None, help="an inkwash model file (default: the bundled model)")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--sampler", default=None, help=f"one of: {', '.join(SAMPLERS)}")
    e.add_argument("--schedule", default=None, help=f"one of: {', '.join(SCHEDULES)}")
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--per-prompt", dest="per_prompt", type=int, default=4, help="images per prompt (default 4)")
    e.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="some of: " + ", ".join(TASKS))
    e.add_argument("--limit", type=int, default=None, help="only the first N prompts of each task")
    e.add_argument("--fid", type=int, default=500, help="images for FID/KID (0: none; default 500)")
    e.add_argument("--features", default="shapes", help="FID features: shapes, or inception:PATH (pytorch-fid's)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="prompts sampled together")
    e.add_argument("--precision", default=None, choices=PRECISIONS, help="network precision (bf16: autocast; "
                   "default fp32, or what --fast picks)")  # fmt: skip
    _accel_flags(e)
    e.add_argument("--workers", type=int, default=1, help="sampling processes of one thread each (2 on a 2-core CPU)")
    e.add_argument("--refiner", default=None, help="a second model file that finishes each image (base + refiner)")
    e.add_argument("--handoff", type=float, default=0.8, help="with --refiner: the fraction the base denoises")
    e.add_argument("--cache", default=None, help=CACHE_HELP)
    e.add_argument("-o", "--output", default=None, help="run folder (default evals/MODEL-SAMPLER-STEPS-gGUIDANCE)")
    e.set_defaults(fn=_eval)

    lb = sub.add_parser("leaderboard", help="a table of every evaluated run, also written as markdown and HTML")
    lb.add_argument("paths", nargs="*", help="folders to search for result.json (default: evals)")
    lb.add_argument("--sort", default="overall", help="column to sort by (default overall)")
    lb.add_argument("--ascending", action="store_true")
    lb.add_argument("-o", "--output", default=None, help="folder for leaderboard.md/.html (default: the first path)")
    lb.set_defaults(fn=_leaderboard)

    sv = sub.add_parser("serve", help="an OpenAI-style images API and the web studio (FastAPI + uvicorn)")
    sv.add_argument("--model", action="append", default=None, help="a model file; repeat to serve several "
                    "(default: the bundled model)")  # fmt: skip
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--data-dir", dest="data_dir", default="inkwash-data", help="jobs database and images")
    sv.add_argument("--api-key", dest="api_key", action="append", help="require this key (repeatable; also "
                    "INKWASH_API_KEYS=k1,k2)")  # fmt: skip
    sv.add_argument("--max-batch", dest="max_batch", type=int, default=64, help="rows of one batched forward")
    sv.add_argument("--max-active", dest="max_active", type=int, default=None,
                    help="requests sampled at once (1: one at a time, no batching across requests)")  # fmt: skip
    sv.add_argument("--max-size", dest="max_size", type=int, default=256)
    sv.add_argument("--max-steps", dest="max_steps", type=int, default=100)
    sv.add_argument("--max-n", dest="max_n", type=int, default=8)
    sv.add_argument("--max-queue", dest="max_queue", type=int, default=256, help="waiting requests before 429")
    sv.add_argument("--precision", default=None, choices=PRECISIONS, help="network precision (default fp32, or "
                    "what --fast picks)")  # fmt: skip
    sv.add_argument("--device", default="cpu")
    _accel_flags(sv)
    _storage_flags(sv)
    sv.add_argument("--cache", default=None, help="every request's default step cache: " + CACHE_HELP.split(": ", 1)[1])
    sv.add_argument("--arena", default=None, help='a JSON list of contestants {"name", "model", "settings"}')
    sv.set_defaults(fn=_serve)

    ex = sub.add_parser("export-diffusers", help="write a model file as a diffusers folder (from_pretrained)")
    ex.add_argument("model", help="an inkwash model file or autoencoder file")
    ex.add_argument("-o", "--output", required=True, help="the folder to write (must not exist or be empty)")
    ex.set_defaults(fn=_export_diffusers)

    i = sub.add_parser("info", help="print a model's config, parameter count and MACs per step")
    i.add_argument("model", nargs="?", default=None, help="a model file or a preset name (e.g. dit-xl2, flux-dev)")
    i.add_argument("--size", type=int, default=None, help="a preset's input side in network positions (latent "
                   "positions for a latent preset; default: the side it is laid out for, else 32)")  # fmt: skip
    i.set_defaults(fn=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        msg = str(e).rstrip(".")
        first = msg.split(" ", 1)[0]
        if first.isalpha():  # a word starts the sentence; a path, flag or name keeps its spelling
            msg = msg[:1].upper() + msg[1:]
        print(f"inkwash: error: {msg}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inkwash: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
