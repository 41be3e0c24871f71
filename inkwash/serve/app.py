"""The HTTP server: an OpenAI-style images API, jobs with live progress, a gallery, the arena and the studio.

Thin over three parts: `Engine` (one per model) batches the denoising of all running requests, `Store`
keeps jobs, results and votes durable, and `Service` (below) connects them: it validates and normalises a
request, records it, hands it to the engine and records the outcome. Routes only translate HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import os
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..pipeline import MAX_PROMPT_CHARS, Pipeline, load, png_parameters, save_png, to_pil
from ..sampling import SAMPLERS
from .engine import Cancelled, Engine, Work
from .ranking import ranking
from .store import TERMINAL, Store

STUDIO = Path(__file__).resolve().parent / "studio"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_NAME = re.compile(r"^\d{1,3}\.png$")


@dataclass
class Limits:
    """What one request may ask for; each is refused with a 4xx and one sentence when exceeded."""

    max_size: int = 256
    max_steps: int = 100
    max_n: int = 8
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_guidance: float = 30.0
    max_body_bytes: int = 64 * 1024
    max_queue: int = 256  # requests waiting to start; one more is answered 429

    def __post_init__(self):
        for name in ("max_size", "max_steps", "max_n", "max_prompt_chars", "max_body_bytes", "max_queue"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise UserError(
                    f"{flag} must be at least 1, got {getattr(self, name)}; it bounds what a request may ask"
                )
        if self.max_guidance < 0:
            raise UserError(f"--max-guidance must be at least 0, got {self.max_guidance}")


@dataclass
class ServeConfig:
    models: list = field(default_factory=lambda: [None])  # model files or presets; None is the bundled model
    data_dir: str | Path = "inkwash-data"
    limits: Limits = field(default_factory=Limits)
    api_keys: tuple[str, ...] = ()
    max_rows: int = 64  # rows of one batched network forward
    max_active: int | None = None  # requests sampled at once; 1 = no batching across requests
    precision: str | None = None  # network autocast; None: what `fast` picks for the device, else fp32
    device: str = "cpu"
    arena: list[dict] | None = None  # contestants: {"name", "model", "settings"}; default from the models
    dtype: str = "fp32"  # weight storage (Pipeline.set_memory)
    offload: str = "none"  # "model" or "sequential" (Pipeline.set_memory)
    quantize: str | None = None  # a mode of inkwash.accel.quant
    fast: bool = False  # inkwash.accel.fast's plan for the device (torch.compile; on GPUs also bf16, fp8)
    cache: str | None = None  # a step cache every request uses by default ("deepcache:3", "fbcache:0.1")

    @property
    def run_precision(self) -> str:
        from ..accel.fast import plan_for

        return self.precision or (plan_for(self.device).precision if self.fast else "fp32")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- request bodies (the OpenAPI schema documents them) ------------------------------------------------


class GenerationBody(BaseModel):
    """OpenAI's images/generations fields, plus inkwash's sampling controls."""

    model_config = ConfigDict(extra="ignore")  # OpenAI's quality, style, user, ... are accepted and ignored

    prompt: str = Field("", description="What to draw (a text-conditioned model; required there).")
    class_label: int | None = Field(
        None, description="A class-conditional model's class (ImageNet DiT: 0..999), given instead of a prompt."
    )
    model: str | None = Field(None, description="A model id from /v1/models; the first model by default.")
    n: int = Field(1, description="Images to generate (1 to the server's max_n).")
    size: str | int | None = Field(None, description='"WxW" (square), a side in pixels, or "auto".')
    response_format: str = Field("b64_json", description='"b64_json" or "url".')
    negative_prompt: str = Field("", description="What to steer away from (replaces the unconditional prompt).")
    steps: int | None = Field(None, description="Denoising steps; the model's default when absent.")
    guidance: float | None = Field(None, description="Classifier-free guidance scale; 1 disables it.")
    sampler: str | None = Field(None, description=f"One of {', '.join(SAMPLERS)}.")
    schedule: str | None = Field(None, description="Time grid (trailing, karras, ...); the model's default.")
    seed: int | None = Field(None, description="Image i uses seed + i; random when absent.")
    stream: bool = Field(
        False,
        description="Server-sent events as OpenAI streams images: "
        "`image_generation.partial_image`, then `image_generation.completed` per image.",
    )
    partial_images: int = Field(0, description="Previews to stream before the final image (0 to 3).")


class MatchBody(BaseModel):
    prompt: str
    seed: int | None = None


class VoteBody(BaseModel):
    winner: str = Field(description='"left", "right" or "tie".')


# --- the service --------------------------------------------------------------------------------------


@dataclass
class Live:
    """In-memory progress of a running job (the database holds only state changes)."""

    step: int = 0
    steps: int = 0
    preview: torch.Tensor | None = None
    version: int = 0


class Service:
    def __init__(self, cfg: ServeConfig):
        self.cfg, self.limits = cfg, cfg.limits
        self.store = Store(cfg.data_dir)
        engine = Engine(lambda: _load_models(cfg), max_rows=cfg.max_rows, max_active=cfg.max_active,
                        precision=cfg.run_precision)  # fmt: skip
        try:
            self.engine = engine.start()
        except BaseException:
            self.store.close()
            raise
        self.pipes: dict[str, Pipeline] = self.engine.pipes
        self.live: dict[str, Live] = {}
        self.waiters: dict[str, list[asyncio.Future]] = {}
        self.cancel_requested: set[str] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.rng = random.Random()
        try:
            self.contestants = self._contestants(cfg.arena)
        except UserError:
            self.stop()
            raise

    # lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for job in self.store.unfinished():  # a restart loses nothing: interrupted jobs run again
            if job["model"] in self.pipes:
                self._enqueue(job)
            else:
                self.store.finish(job["id"], "failed", error=f"model {job['model']!r} is not served any more")

    def stop(self) -> None:
        self.engine.stop()
        self.store.close()

    # requests
    def normalise(self, body: GenerationBody) -> tuple[str, dict]:
        """(model name, the request with every default resolved); an ApiError for anything out of bounds."""
        lim = self.limits
        name = body.model or next(iter(self.pipes))
        if name not in self.pipes:
            raise ApiError(404, f"model {name!r} is not served here; see /v1/models", "model", "model_not_found")
        pipe = self.pipes[name]
        prompt, label = body.prompt.strip(), body.class_label
        if pipe.num_classes:
            if prompt or body.negative_prompt:
                raise ApiError(400, f"model {name!r} is class-conditional and takes no prompt; give class_label "
                               f"0..{pipe.num_classes - 1} instead", "prompt")  # fmt: skip
            if label is None or not 0 <= label < pipe.num_classes:
                raise ApiError(400, f"model {name!r} is class-conditional: class_label must be between 0 and "
                               f"{pipe.num_classes - 1}, got {label}", "class_label")  # fmt: skip
        elif label is not None:
            raise ApiError(400, f"model {name!r} is text-conditioned and has no class labels; give a prompt",
                           "class_label")  # fmt: skip
        elif not prompt:
            raise ApiError(400, 'the prompt is empty; say what to draw, e.g. "a red circle"', "prompt")
        for param, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
            if len(text) > lim.max_prompt_chars:
                raise ApiError(400, f"{param} is longer than {lim.max_prompt_chars} characters", param)
        if not 1 <= body.n <= lim.max_n:
            raise ApiError(400, f"n must be between 1 and {lim.max_n}, got {body.n}", "n")
        size = _parse_size(body.size, pipe.image_size)
        if size > lim.max_size:
            raise ApiError(400, f"size {size} is larger than this server's limit of {lim.max_size}", "size")
        if body.steps is not None and not 1 <= body.steps <= lim.max_steps:
            raise ApiError(400, f"steps must be between 1 and {lim.max_steps}, got {body.steps}", "steps")
        if body.guidance is not None and not 0 <= body.guidance <= lim.max_guidance:
            raise ApiError(400, f"guidance must be between 0 and {lim.max_guidance}, got {body.guidance}", "guidance")
        if body.seed is not None and not 0 <= body.seed < 2**32:
            raise ApiError(400, f"seed must be between 0 and {2**32 - 1}, got {body.seed}", "seed")
        if body.response_format not in ("b64_json", "url"):
            raise ApiError(400, f'response_format must be "b64_json" or "url", got {body.response_format!r}',
                           "response_format")  # fmt: skip
        try:
            pipe.check_size(size)
            s = pipe.settings(sampler=body.sampler, steps=body.steps, guidance=body.guidance, schedule=body.schedule)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        seed = self.rng.randrange(2**31) if body.seed is None else body.seed
        return name, {
            "prompt": prompt, "negative_prompt": body.negative_prompt, "n": body.n, "size": size, "seed": seed,
            "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "schedule": s.schedule,
            "rescale": s.rescale, "cache": s.cache, "class_label": label,
        }  # fmt: skip

    def submit(self, model: str, request: dict, kind: str = "api") -> dict:
        if self.engine.queued >= self.limits.max_queue:
            raise ApiError(429, f"the queue is full ({self.engine.queued} requests waiting); try again shortly",
                           code="queue_full")  # fmt: skip
        job = self.store.add_job(uuid.uuid4().hex, kind, model, request)
        self._enqueue(job)
        return job

    def _enqueue(self, job: dict) -> None:
        r, job_id = job["request"], job["id"]
        settings = {k: r[k] for k in ("sampler", "steps", "guidance", "schedule", "rescale")}
        settings["cache"] = r.get("cache")  # jobs stored before caching was served have none
        self.live[job_id] = Live(steps=r["steps"])

        def on_start():
            self.store.set_running(job_id)

        def on_progress(step, steps, preview):
            live = self.live.get(job_id)
            if live is not None:
                if preview is not None:
                    live.preview = preview.detach().clone()
                live.step, live.steps, live.version = step, steps, live.version + 1

        def on_done(images):
            pipe = self.pipes[job["model"]]
            s = pipe.settings(**settings)
            folder = self.store.images / job_id
            files = []
            for i, img in enumerate(to_pil(images)):
                seed = r["seed"] + i
                shown = r["prompt"] if r.get("class_label") is None else f"class {r['class_label']}"
                text = png_parameters(shown, r["negative_prompt"], s, seed, r["size"], job["model"],
                                      distilled=pipe.guidance_distilled, extra=pipe.accel)  # fmt: skip
                img.info["parameters"] = text
                tmp = save_png(img, folder / f".{i}.tmp.png")
                os.replace(tmp, folder / f"{i}.png")
                files.append({"file": f"{i}.png", "seed": seed})
            self.store.finish(job_id, "succeeded", images=files)
            self._finished(job_id)

        def on_error(error):
            if isinstance(error, Cancelled):
                if job_id not in self.cancel_requested:
                    return  # the server is stopping: the job stays queued for the next start
                self.store.finish(job_id, "cancelled")
            else:
                message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
                self.store.finish(job_id, "failed", error=message)
            self._finished(job_id)

        work = Work(job_id, job["model"], r["prompt"], r["negative_prompt"], r["n"], r["seed"], r["size"], settings,
                    on_start, on_progress, on_done, on_error, class_label=r.get("class_label"))  # fmt: skip
        self.engine.submit(work)

    def _finished(self, job_id: str) -> None:
        live = self.live.pop(job_id, None)
        if live is not None:
            live.version += 1
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: str) -> None:
        for fut in self.waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result(None)

    async def wait(self, job_id: str) -> dict:
        """The job once it is finished."""
        fut = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(job_id, []).append(fut)
        job = self.store.job(job_id)
        if job["status"] not in TERMINAL:
            await fut
        return self.store.job(job_id)

    async def follow(self, job_id: str) -> AsyncIterator[tuple[dict, Live | None]]:
        """(job, live progress) whenever the progress changes, polled every 50 ms; last (job, None) once finished."""
        seen = -1
        while True:
            job = self.store.job(job_id)
            if job["status"] in TERMINAL:
                yield job, None
                return
            live = self.live.get(job_id)
            if live is not None and live.version != seen:
                seen = live.version
                yield job, live
            await asyncio.sleep(0.05)

    def cancel(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job["status"] not in TERMINAL:
            self.cancel_requested.add(job_id)
            if not self.engine.cancel(job_id):
                self.store.finish(job_id, "cancelled")
                self._finished(job_id)
        return self.store.job(job_id)

    def get(self, job_id: str) -> dict:
        job = self.store.job(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", code="job_not_found")
        return job

    def view(self, job: dict) -> dict:
        """A job as the API shows it."""
        live = self.live.get(job["id"])
        steps = job["request"]["steps"]
        step = live.step if live else (steps if job["status"] == "succeeded" else 0)
        out = {
            "id": job["id"], "object": "job", "status": job["status"], "created": job["created"],
            "finished": job["finished"], "model": job["model"], "request": job["request"],
            "progress": {"step": step, "steps": live.steps if live and live.steps else steps},
            "error": job["error"],
            "images": [{"url": f"/v1/images/files/{job['id']}/{im['file']}", "seed": im["seed"]}
                       for im in job["images"]],
        }  # fmt: skip
        if job["kind"] == "arena" and self.store.blind(job["id"]):  # no hints before the vote
            for key in ("model", "request"):
                out.pop(key)
            out["progress"] = _percent(out["progress"])
        return out

    def image_path(self, job_id: str, name: str) -> Path:
        """The file of a job's image; nothing outside the image folder can be named."""
        if not JOB_ID.match(job_id) or not IMAGE_NAME.match(name):
            raise ApiError(404, "no such image", code="image_not_found")
        root = self.store.images.resolve()
        path = (root / job_id / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ApiError(404, "no such image", code="image_not_found")
        return path

    # arena
    def _contestants(self, given: list[dict] | None) -> list[dict]:
        """Who competes: given, or every model at its defaults; one model also against fewer steps and lower
        guidance of itself, so a single-model server still has an arena."""
        if given:
            shape = 'the arena file must be a JSON list of {"name", "model", "settings"} objects'
            if not isinstance(given, list) or not all(isinstance(c, dict) and "name" in c for c in given):
                raise UserError(shape)
            out = [{"name": str(c["name"]), "model": c.get("model") or next(iter(self.pipes)),
                    "settings": dict(c.get("settings") or {})} for c in given]  # fmt: skip
            for c in out:
                if c["model"] not in self.pipes:
                    raise UserError(f"arena contestant {c['name']!r} names model {c['model']!r}, which is not served")
                try:
                    self.normalise(GenerationBody(prompt="a check", model=c["model"], **c["settings"]))
                except (ApiError, ValueError) as e:
                    raise UserError(f"arena contestant {c['name']!r} has settings this server refuses: {e}") from None
            return out
        out = [{"name": name, "model": name, "settings": {}} for name in self.pipes]
        if len(out) == 1:
            name, s = out[0]["name"], self.pipes[out[0]["name"]].sampling
            out += [
                {"name": f"{name} · {max(1, s.steps // 4)} steps", "model": name,
                 "settings": {"steps": max(1, s.steps // 4)}},
                {"name": f"{name} · guidance 1.5", "model": name, "settings": {"guidance": 1.5}},
            ]  # fmt: skip
        return out

    def new_match(self, prompt: str, seed: int | None) -> dict:
        if len(self.contestants) < 2:
            raise ApiError(409, "the arena needs at least two contestants")
        left, right = self.rng.sample(self.contestants, 2)
        seed = self.rng.randrange(2**31) if seed is None else seed
        jobs = []
        for c in (left, right):
            model, request = self.normalise(GenerationBody(prompt=prompt, model=c["model"], seed=seed, **c["settings"]))
            jobs.append(self.submit(model, request, kind="arena"))
        match_id = uuid.uuid4().hex
        self.store.add_match(match_id, prompt, seed, (left["name"], jobs[0]["id"]), (right["name"], jobs[1]["id"]))
        # which contestant drew which side stays hidden until the vote (see `view`)
        return {"id": match_id, "object": "arena.match", "prompt": prompt,
                "left": self.view(self.get(jobs[0]["id"])), "right": self.view(self.get(jobs[1]["id"]))}  # fmt: skip

    def vote(self, match_id: str, winner: str) -> dict:
        if winner not in ("left", "right", "tie"):
            raise ApiError(400, f'winner must be "left", "right" or "tie", got {winner!r}', "winner")
        m = self.store.match(match_id) if JOB_ID.match(match_id) else None
        if m is None:
            raise ApiError(404, f"no arena match {match_id!r}", code="match_not_found")
        jobs = [self.store.job(m["left_job"]), self.store.job(m["right_job"])]
        if any(j["status"] != "succeeded" for j in jobs):
            raise ApiError(409, "both images must be finished before a vote", code="match_not_ready")
        if not self.store.vote(match_id, winner):
            raise ApiError(409, "this match already has a vote", code="already_voted")
        return {
            "match": {"id": match_id, "prompt": m["prompt"], "winner": winner,
                      "left": {"contestant": m["left_name"], "job": self.view(jobs[0])},
                      "right": {"contestant": m["right_name"], "job": self.view(jobs[1])}},
            "ranking": self.ranking(),
        }  # fmt: skip

    def ranking(self) -> list[dict]:
        return ranking(self.store.votes(), [c["name"] for c in self.contestants])

    def models(self) -> list[dict]:
        out = []
        for name, pipe in self.pipes.items():
            sizes = sorted({s for s in (pipe.image_size // 2, pipe.image_size, 2 * pipe.image_size,
                                        4 * pipe.image_size) if _fits(pipe, s, self.limits.max_size)})  # fmt: skip
            lim = self.limits
            out.append({
                "id": name, "object": "model", "owned_by": "inkwash", "image_size": pipe.image_size, "sizes": sizes,
                "num_classes": pipe.num_classes,
                "samplers": list(SAMPLERS), "defaults": {k: getattr(pipe.sampling, k) for k in
                                                         ("sampler", "steps", "guidance", "schedule")},
                "limits": {"max_steps": lim.max_steps, "max_n": lim.max_n, "max_prompt_chars": lim.max_prompt_chars,
                           "max_size": lim.max_size, "max_guidance": lim.max_guidance},
            })  # fmt: skip
        return out


def _load_models(cfg: ServeConfig) -> dict[str, Pipeline]:
    """The served pipelines by unique name (run on the engine's thread)."""
    from ..accel.cache import check_cache
    from ..accel.fast import accelerate

    pipes: dict[str, Pipeline] = {}
    for spec in cfg.models:
        pipe = load(spec, cfg.device).set_memory(dtype=cfg.dtype, offload_mode=cfg.offload)
        # the batch changes with the requests running: compiled with dynamic shapes, not one graph per batch size
        accelerate(pipe, quantize_mode=cfg.quantize, fast=cfg.fast, dynamic=True)
        if cfg.cache is not None:
            pipe.sampling.cache = str(check_cache(pipe.net, cfg.cache))
        name = pipe.name
        while name in pipes:
            name += "+"
        pipes[name] = pipe
    return pipes


def _fits(pipe: Pipeline, size: int, max_size: int) -> bool:
    return 0 < size <= max_size and size % pipe.size_multiple == 0


def _parse_size(size, default: int) -> int:
    if size is None or size == "auto":
        return default
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size) or re.fullmatch(r"\s*(\d+)\s*", size)
        if m is None:
            raise ApiError(400, f'size must look like "{default}x{default}", got {size!r}', "size")
        if len(m.groups()) == 2 and m.group(1) != m.group(2):
            raise ApiError(400, f"only square sizes are supported, got {size!r}", "size")
        value = int(m.group(1))
    if value <= 0:
        raise ApiError(400, f"size must be positive, got {value}", "size")
    return value


def _percent(progress: dict) -> dict:
    """Progress in hundredths, for arena jobs: their step counts would hint at who is who."""
    return {"step": round(100 * progress["step"] / max(progress["steps"], 1)), "steps": 100}


def preview_url(x0: torch.Tensor) -> str:
    buf = io.BytesIO()
    to_pil(x0[None].float().clamp(-1, 1))[0].save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _openai_stream(service: Service, job_id: str, partial_images: int) -> AsyncIterator[str]:
    """OpenAI's image streaming: `image_generation.partial_image` events (previews at even fractions of the
    steps), then one `image_generation.completed` per image, or an `error` event."""
    sent = 0
    async for job, live in service.follow(job_id):
        r = job["request"]
        common = {"created_at": int(time.time()), "size": f"{r['size']}x{r['size']}", "quality": "auto",
                  "background": "opaque", "output_format": "png"}  # fmt: skip
        if live is not None:
            if (
                sent < partial_images
                and live.preview is not None
                and live.step >= (sent + 1) * live.steps / (partial_images + 1)
            ):
                b64 = preview_url(live.preview).split(",", 1)[1]
                yield _sse("image_generation.partial_image", {"type": "image_generation.partial_image",
                           "b64_json": b64, "partial_image_index": sent, **common})  # fmt: skip
                sent += 1
            continue
        if job["status"] != "succeeded":
            message = job["error"] or f"the job was {job['status']}"
            yield _sse("error", {"type": "error", "error": {"message": message, "type": "server_error"}})
            return
        for i, im in enumerate(job["images"]):
            b64 = base64.b64encode(service.image_path(job_id, im["file"]).read_bytes()).decode()
            usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                     "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}  # fmt: skip
            yield _sse("image_generation.completed", {"type": "image_generation.completed", "b64_json": b64,
                       "usage": usage, "index": i, "seed": im["seed"], "id": job_id, **common})  # fmt: skip


def _sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


# --- the app ------------------------------------------------------------------------------------------


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether announced by Content-Length or streamed: the
    body (small by construction) is read in full before the app sees it, then replayed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = _error(413, f"the request body is larger than {self.limit} bytes", code="body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(cfg: ServeConfig | None = None, **kwargs) -> FastAPI:
    """The FastAPI app. `create_app(models=[path], data_dir=...)` is shorthand for a ServeConfig."""
    if cfg is None:
        limits = kwargs.pop("limits", None) or Limits(**{k: kwargs.pop(k) for k in list(kwargs)
                                                           if k in Limits.__dataclass_fields__})  # fmt: skip
        cfg = ServeConfig(limits=limits, **kwargs)
    service = Service(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start(asyncio.get_running_loop())
        yield
        service.stop()

    app = FastAPI(
        title="inkwash",
        summary="Text-to-image diffusion with an OpenAI-style images API, batched at every denoising step.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return _error(e.status, e.message, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field_name = loc[0] if loc else "body"  # not "size.str": the union member pydantic tried last
        return _error(400, f"{field_name}: {err.get('msg', 'invalid value')}", field_name)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    def authorised(request: Request) -> None:
        if not cfg.api_keys:
            return
        header = request.headers.get("authorization", "")
        key = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("key", "")
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in cfg.api_keys):
            raise ApiError(401, "a valid API key is needed: send Authorization: Bearer KEY", code="invalid_api_key")

    v1 = [Depends(authorised)]

    @app.get("/v1/models", dependencies=v1, tags=["models"])
    def list_models():
        return {"object": "list", "data": service.models()}

    @app.post("/v1/images/generations", dependencies=v1, tags=["images"])
    async def generations(body: GenerationBody, request: Request):
        """OpenAI's images API: waits for the images and returns them (`b64_json`) or links to them (`url`)."""
        model, req = service.normalise(body)
        if not 0 <= body.partial_images <= 3:
            raise ApiError(400, f"partial_images must be between 0 and 3, got {body.partial_images}", "partial_images")
        job_id = service.submit(model, req)["id"]
        if body.stream:
            events = _openai_stream(service, job_id, body.partial_images)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        job = await service.wait(job_id)
        if job["status"] != "succeeded":
            raise ApiError(500 if job["status"] == "failed" else 409, job["error"] or f"the job was {job['status']}")
        data = []
        for im in job["images"]:
            if body.response_format == "url":
                url = str(request.base_url).rstrip("/") + f"/v1/images/files/{job['id']}/{im['file']}"
                data.append({"url": url, "revised_prompt": req["prompt"], "seed": im["seed"]})
            else:
                raw = service.image_path(job["id"], im["file"]).read_bytes()
                data.append({"b64_json": base64.b64encode(raw).decode(), "revised_prompt": req["prompt"],
                             "seed": im["seed"]})  # fmt: skip
        return {"created": int(job["created"]), "data": data, "id": job["id"], "model": model, "request": req}

    @app.post("/v1/jobs", status_code=202, dependencies=v1, tags=["jobs"])
    def create_job(body: GenerationBody):
        """Queue a generation and return at once; follow it at /v1/jobs/{id}/events."""
        model, req = service.normalise(body)
        return service.view(service.submit(model, req))

    @app.get("/v1/jobs/{job_id}", dependencies=v1, tags=["jobs"])
    def get_job(job_id: str):
        return service.view(service.get(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=v1, tags=["jobs"])
    def cancel_job(job_id: str):
        return service.view(service.cancel(job_id))

    @app.get("/v1/jobs/{job_id}/events", dependencies=v1, tags=["jobs"])
    async def job_events(job_id: str):
        """Server-sent events: `progress` (step, steps, a preview PNG of the first image's current estimate),
        then one of `done`, `failed`, `cancelled` with the job."""
        service.get(job_id)

        async def stream() -> AsyncIterator[str]:
            async for job, live in service.follow(job_id):
                if live is None:
                    yield _sse("done" if job["status"] == "succeeded" else job["status"], service.view(job))
                    return
                data = {"step": live.step, "steps": live.steps, "status": job["status"]}
                if job["kind"] == "arena" and service.store.blind(job_id):
                    data |= _percent(data)
                if live.preview is not None:
                    data["preview"] = preview_url(live.preview)
                yield _sse("progress", data)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/gallery", dependencies=v1, tags=["jobs"])
    def gallery(limit: int = 48, before: float | None = None):
        """Finished generations, newest first; page with `before` = the last one's `created`."""
        limit = max(1, min(limit, 200))
        return {"object": "list", "data": [service.view(j) for j in service.store.gallery(limit, before)]}

    @app.get("/v1/images/files/{job_id}/{name}", dependencies=v1, tags=["images"])
    def image_file(job_id: str, name: str):
        return FileResponse(service.image_path(job_id, name), media_type="image/png")

    @app.get("/v1/arena/contestants", dependencies=v1, tags=["arena"])
    def contestants():
        return {"object": "list", "data": service.contestants}

    @app.post("/v1/arena/matches", dependencies=v1, tags=["arena"])
    def new_match(body: MatchBody):
        """The same prompt and seed through two contestants, side by side and unnamed until the vote."""
        return service.new_match(body.prompt, body.seed)

    @app.post("/v1/arena/matches/{match_id}/vote", dependencies=v1, tags=["arena"])
    def vote(match_id: str, body: VoteBody):
        return service.vote(match_id, body.winner)

    @app.get("/v1/arena/ranking", dependencies=v1, tags=["arena"])
    def arena_ranking():
        """Bradley–Terry ratings (Elo scale) with 95% bootstrap intervals, from every vote so far."""
        return {"object": "list", "data": service.ranking()}

    @app.get("/healthz", tags=["server"])
    def health():
        return {"ok": True, "queued": service.engine.queued, "running": service.engine.running}

    @app.get("/", include_in_schema=False)
    def studio():
        return FileResponse(STUDIO / "index.html", media_type="text/html")

    app.mount("/studio", StaticFiles(directory=STUDIO, check_dir=False), name="studio")
    app.add_middleware(BodyLimit, limit=cfg.limits.max_body_bytes)
    return app


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(cfg)
    print(f"inkwash: serving {', '.join(app.state.service.pipes)} at http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
