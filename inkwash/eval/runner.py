"""Run a ShapesEval evaluation of a pipeline: sample every prompt with fixed seeds, judge, score, FID/KID.

Owns the run folder (identity.json, samples.jsonl, images/, fid/, result.json, report.html) and resuming:
each finished batch is appended to samples.jsonl (fsynced) and each image written atomically, so an
interrupted evaluation picks up where it stopped. Knows pipelines only through `generate` and `info`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inkwash.data.base import to_uint8_hwc
from inkwash.errors import UserError
from inkwash.eval.judge import Judge
from inkwash.eval.shapeseval import TASKS, VERSION, bootstrap, load_prompts, score
from inkwash.formats.checkpoint import file_sha256

FORMAT = "inkwash-eval/1"
FID_SEED_BASE = 10_000_000  # image seeds of the FID set, apart from the benchmark's


@dataclass
class EvalConfig:
    sampler: str | None = None  # None: the model's own default
    steps: int | None = None
    guidance: float | None = None
    schedule: str | None = None
    per_prompt: int = 4
    tasks: tuple[str, ...] = TASKS
    seed: int = 0
    limit: int | None = None  # only the first `limit` prompts of each task (quick evaluations)
    precision: str = "fp32"  # or "bf16": the network under autocast
    workers: int = 1  # processes of one thread each sampling in parallel (needs a model loaded from a file)
    batch_size: int = 16  # images sampled together (16 with guidance is the fastest batch on a 2-core CPU)
    fid_images: int = 500  # 0: no FID/KID
    fid_reference: int = 2000
    features: str = "shapes"
    refiner: str | None = None  # a second model file that finishes each image (SDXL's base + refiner)
    handoff: float = 0.8  # the fraction of the denoising the base does when there is a refiner
    quantize: str | None = None  # a mode of inkwash.accel.quant (int8, int8-dynamic, fp8), applied to the network
    fast: bool = False  # inkwash.accel.fast's plan for the device (torch.compile, ...)
    cache: str | None = None  # a step cache (inkwash.accel.cache): "fbcache:0.1", "deepcache:3"

    def __post_init__(self):
        if not 1 <= self.per_prompt <= 16:
            raise UserError(f"images per prompt must be from 1 to 16, got {self.per_prompt}")
        if self.workers < 1:
            raise UserError(f"workers must be at least 1, got {self.workers}")
        if self.fid_images == 1 or self.fid_images < 0:
            raise UserError(f"FID needs at least 2 images (or 0 for none), got {self.fid_images}")
        if not 0.0 <= self.handoff <= 1.0:
            raise UserError(f"handoff is the fraction of denoising the base model does, in [0, 1]; got {self.handoff}")
        if self.refiner and not Path(self.refiner).is_file():
            raise UserError(f"refiner file {self.refiner} does not exist")
        self.tasks = tuple(self.tasks)
        load_prompts(self.tasks)  # validates the task names


def image_seed(cfg: EvalConfig, index: int, k: int) -> int:
    """The fixed seed of image k of the prompt at `index` in the full prompt set."""
    return cfg.seed + 16 * index + k


def _fsync_append(path: Path, lines: list[dict]) -> None:
    torn = path.exists() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"  # a crash mid-line
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + "".join(json.dumps(line) + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _save_png(arr: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def _read_done(out: Path) -> dict[tuple[str, int], dict]:
    """Every logged sample in a run folder (samples.jsonl and the workers' samples-wN.jsonl)."""
    done = {}
    for path in sorted(out.glob("samples*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that image is simply made again
            done[(rec["id"], rec["k"])] = rec
    return done


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def _worker(source: str, out: str, cfg: EvalConfig, sampling: dict, batches: list, w: int) -> None:
    """One worker process: its own pipeline and judge, one thread, its own log."""
    torch.set_num_threads(1)
    from inkwash.pipeline import load

    run = _Run(_accelerated(load(source), cfg), Path(out), cfg, sampling, Judge(), progress=False)
    for batch in batches:
        run.batch(batch, Path(out) / f"samples-w{w}.jsonl")


def _accelerated(pipe, cfg: EvalConfig):
    """The pipeline with the evaluation's --quantize / --fast applied (once)."""
    if (cfg.quantize or cfg.fast) and not pipe.accel:
        from inkwash.accel.fast import accelerate

        accelerate(pipe, quantize_mode=cfg.quantize, fast=cfg.fast)
    return pipe


def machine(device: torch.device | str | None = None) -> dict:
    """The machine an evaluation ran on: the CPU, and the GPU when the pipeline sampled on one."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"device": "cpu", "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__.split("+")[0]}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        out |= {"device": "cuda", "gpu": torch.cuda.get_device_name(device)}
    return out


@dataclass
class _Run:
    pipe: object
    out: Path
    cfg: EvalConfig
    sampling: dict
    judge: Judge
    progress: bool
    timing: dict = field(default_factory=lambda: {"sampling_s": 0.0, "judge_s": 0.0})
    logged_before: int = 0  # lines in the workers' logs when this run began
    refiner: object = None

    def __post_init__(self):
        if self.cfg.refiner and self.refiner is None:
            from inkwash.pipeline import load

            self.refiner = load(self.cfg.refiner)

    def generate(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        t = time.perf_counter()
        extra = {"refiner": self.refiner, "handoff": self.cfg.handoff} if self.refiner is not None else {}
        x = self.pipe.generate(prompts, seed=seeds, precision=self.cfg.precision, **self.sampling, **extra)
        self.timing["sampling_s"] += time.perf_counter() - t
        return to_uint8_hwc(x)

    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", disable=not self.progress, dynamic_ncols=True)

    def benchmark(self) -> list[dict]:
        prompts = load_prompts(self.cfg.tasks)
        if self.cfg.limit is not None:
            prompts = [p for t in self.cfg.tasks for p in [q for q in prompts if q["task"] == t][: self.cfg.limit]]
        jobs = [(p, k) for p in prompts for k in range(self.cfg.per_prompt)]
        done = _read_done(self.out)
        todo = [(p, k) for p, k in jobs if (p["id"], k) not in done]
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        batches = [todo[i : i + self.cfg.batch_size] for i in range(0, len(todo), self.cfg.batch_size)]
        with self.bar(len(jobs), "ShapesEval") as bar:
            bar.update(len(jobs) - len(todo))
            if self.cfg.workers > 1 and self.pipe.source and len(batches) > 1:
                self.in_workers(batches, bar)
            else:
                for batch in batches:
                    self.batch(batch, self.out / "samples.jsonl")
                    bar.update(len(batch))
        done = _read_done(self.out)
        return [done[(p["id"], k)] for p, k in jobs]

    def batch(self, batch: list[tuple[dict, int]], log: Path) -> None:
        """Sample, save, judge and log one batch of (prompt, k)."""
        seeds = [image_seed(self.cfg, p["index"], k) for p, k in batch]
        t0 = self.timing["sampling_s"]
        arr = self.generate([p["prompt"] for p, _ in batch], seeds)
        per_image = (self.timing["sampling_s"] - t0) / len(batch)
        t = time.perf_counter()
        readings = self.judge(arr)
        judge_s = (time.perf_counter() - t) / len(batch)
        self.timing["judge_s"] += judge_s * len(batch)
        records = []
        for (p, k), seed, img, reading in zip(batch, seeds, arr, readings):
            name = f"images/{p['id']}-{k}.png"
            _save_png(img, self.out / name)
            records.append({
                "id": p["id"], "task": p["task"], "prompt": p["prompt"], "k": k, "seed": seed, "image": name,
                "correct": score(p["spec"], reading.objects), "reading": reading.to_dict(),
                "sample_s": per_image, "judge_s": judge_s,
            })  # fmt: skip
        _fsync_append(log, records)

    def in_workers(self, batches: list, bar) -> None:
        """Batches dealt round-robin to `workers` processes of one thread each (on a small CPU, faster than
        one process's intra-op threads), each logging to its own samples-wN.jsonl."""
        import multiprocessing as mp

        n = self.cfg.workers
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(self.pipe.source, str(self.out), self.cfg, self.sampling,
                                                   batches[w::n], w), daemon=True) for w in range(n)]  # fmt: skip
        for proc in procs:
            proc.start()
        try:
            total = sum(len(b) for b in batches)
            start = bar.n
            while any(proc.is_alive() for proc in procs):
                time.sleep(1.0)
                made = sum(_count_lines(f) for f in self.out.glob("samples-w*.jsonl")) - self.logged_before
                bar.update(max(0, min(made, total) - (bar.n - start)))
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            raise UserError(f"an evaluation worker failed; run the same command again to resume in {self.out}")

    def fid(self) -> dict | None:
        n = self.cfg.fid_images
        if n == 0:
            return None
        from inkwash.data.shapes import ShapesDataset
        from inkwash.eval.fid import REFERENCE_SEED, features, fid_kid, get_extractor, shapes_reference_features

        size = self.pipe.image_size
        world = ShapesDataset(size, seed=REFERENCE_SEED)  # captions of the very scenes the reference renders show
        folder = self.out / "fid"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{i:05d}.png" for i in range(n)]
        todo = [i for i in range(n) if not paths[i].exists()]
        with self.bar(n, "FID images") as bar:
            bar.update(n - len(todo))
            for start in range(0, len(todo), self.cfg.batch_size):
                idx = todo[start : start + self.cfg.batch_size]
                arr = self.generate([world.scene(i)[1] for i in idx], [FID_SEED_BASE + self.cfg.seed + i for i in idx])
                for i, img in zip(idx, arr):
                    _save_png(img, paths[i])
                bar.update(len(idx))
        t = time.perf_counter()
        extractor = get_extractor(self.cfg.features)
        gen = features(extractor, np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))
        ref = shapes_reference_features(extractor, size, n=self.cfg.fid_reference)
        out = {"features": self.cfg.features, **fid_kid(gen, ref)}
        self.timing["fid_s"] = time.perf_counter() - t  # features and statistics; sampling is in sampling_s
        return out


def _model_info(pipe) -> dict:
    info = pipe.info()
    return {
        "name": info["name"], "path": pipe.source or None, "sha256": file_sha256(pipe.source),
        "parameters": info["parameters"],
        "image_size": info["image_size"], "arch": info["model"].get("arch"), "prediction": info["prediction"],
        "process": info["process"].get("kind"), "macs_per_step": info["macs_per_step"],
    }  # fmt: skip


def evaluate(pipe, out_dir: str | os.PathLike, cfg: EvalConfig | None = None, *, progress: bool = True,
             judge: Judge | None = None, report: bool = True) -> dict:  # fmt: skip
    """Evaluate `pipe` into `out_dir` (resuming what is there) and return the result dict (also result.json)."""
    cfg = cfg or EvalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = pipe.settings(sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance, schedule=cfg.schedule,
                      cache=cfg.cache)  # fmt: skip
    sampling = dataclasses.asdict(s)
    rest = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in sampling and k != "batch_size"}
    settings = {"benchmark": VERSION, "model": pipe.name, **sampling, **rest}
    settings["tasks"] = list(settings["tasks"])
    identity = {"benchmark": VERSION, "model_sha256": file_sha256(pipe.source), **sampling, "seed": cfg.seed,
                "precision": cfg.precision}  # fmt: skip
    if cfg.quantize or cfg.fast:  # absent otherwise, so earlier run folders still resume
        identity |= {"quantize": cfg.quantize, "fast": cfg.fast}
    if cfg.refiner:
        identity |= {"refiner_sha256": file_sha256(cfg.refiner), "handoff": cfg.handoff}
    path = out / "identity.json"  # what fixes every image; tasks, counts and FID options may change
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            raise UserError(f"{out} holds an evaluation with other settings ({', '.join(diff)}); "
                            "choose another output folder or delete it")  # fmt: skip
    else:
        _atomic_json(path, identity)
    t_start = time.perf_counter()
    run = _Run(_accelerated(pipe, cfg), out, cfg, sampling, judge or Judge(), progress)
    run.logged_before = sum(_count_lines(f) for f in out.glob("samples-w*.jsonl"))
    samples = run.benchmark()
    fid = run.fid()
    correct = {}
    for task in cfg.tasks:
        rows = [r for r in samples if r["task"] == task]
        if rows:
            correct[task] = np.array([r["correct"] for r in rows]).reshape(-1, cfg.per_prompt)
    sampled = [r["sample_s"] for r in samples]
    judged = [r["judge_s"] for r in samples]
    result = {
        "format": FORMAT,
        "benchmark": VERSION,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": _model_info(pipe),
        "settings": {k: settings[k] for k in settings if k not in ("benchmark", "model")},
        "scores": bootstrap(correct, seed=cfg.seed),
        "fid": fid,
        "timing": {
            "images": len(samples),
            "seconds_per_image": float(np.mean(sampled) + np.mean(judged)),
            "sampling_s": float(np.sum(sampled)),
            "judge_s": float(np.sum(judged)),
            "fid_s": run.timing.get("fid_s"),
            "total_s": time.perf_counter() - t_start,
        },  # fmt: skip
        "machine": machine(getattr(pipe, "device", None)),
        "samples": samples,
    }
    _atomic_json(out / "result.json", result)
    if report:
        from inkwash.eval.report import write_report

        write_report(result, out)
    return result
