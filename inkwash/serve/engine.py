"""Step-level continuous batching: every request keeps its own sampler, all requests share each network forward.

Each admitted request runs the ordinary sampler (`Pipeline.prepare` + `SamplingRun`) as a greenlet (a
coroutine with its own stack) on the engine's one thread, with a stand-in for the network: calling it
switches back to the engine with (x, t, conditioning). Once every running request is parked at such a call
or finished, the engine concatenates the waiting inputs of each model (padding token sequences), runs the
real network once, and resumes each request with its rows. So requests with different prompts, seeds,
guidance, samplers and step counts join and leave between any two network calls, as LLM servers do for
tokens, and no sampler needs to know (Heun's two calls per step and DPM-Solver's history work unchanged).
`max_active=1` is the plain server: one request at a time.

A request with a step cache (`settings["cache"]`, e.g. "deepcache:3") keeps its own cache, whose state follows
that request's steps, so its forwards run apart from the others' (still one forward per step for it).

One thread does all tensor work, model loading included. Two reasons, both measured on a 2-core CPU:
hand-offs between threads cost more than a forward of the bundled model, and with libgomp (PyTorch's
OpenMP) a second thread that has ever run a parallel op makes every op of the first about 2x slower.
"""

from __future__ import annotations

import atexit
import collections
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import greenlet
import torch

from ..accel.cache import make_cache
from ..pipeline import Pipeline, autocast_for
from ..sampling import cat_cond

Tensor = torch.Tensor
PREVIEW_EVERY_S = 0.25  # latent models: how often a running request's preview is decoded


class Cancelled(Exception):
    """Raised inside a request's sampler when the request was cancelled or the engine is stopping."""


@dataclass
class Work:
    """One request. Callbacks run on the engine's thread: `on_start` when admitted, then progress per step (with a
    preview image [3, H, W] in [-1, 1], or None when none was made), then exactly one of `on_done` (images
    [n, 3, H, W] in [-1, 1]) or `on_error`."""

    id: str
    model: str
    prompt: str
    negative_prompt: str
    n: int
    seed: int
    size: int
    settings: dict  # sampler, steps, guidance (and optional schedule, rescale, cache)
    on_start: Callable[[], None] = lambda: None
    on_progress: Callable[[int, int, Tensor | None], None] = lambda step, steps, preview: None
    on_done: Callable[[Tensor], None] = lambda images: None
    on_error: Callable[[BaseException], None] = lambda error: None
    class_label: int | None = None  # a class-conditional model's class (the prompt is then empty)

    @property
    def rows(self) -> int:
        """Network rows one forward of this request takes (guidance doubles them)."""
        return self.n * (1 if float(self.settings.get("guidance", 2.0)) == 1 else 2)


@dataclass
class _Slot:
    work: Work
    task: greenlet.greenlet
    call: tuple | None = None  # (x, t, cond, cache) while parked at a network call; None once finished


class _SharedNet:
    """The stand-in network handed to one request's denoiser: the same call, answered by the shared forward."""

    def __init__(self, engine: Engine, net: torch.nn.Module, cache: torch.nn.Module | None = None):
        self.engine, self.net, self.cache = engine, net, cache

    def parameters(self):
        return self.net.parameters()

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return self.engine.loop_task.switch((x, t, cond, self.cache))  # park until the engine resumes us


class Engine:
    """Runs requests for named pipelines on one thread. `load` builds the pipelines there (a dict, or a function
    returning one). `max_rows` bounds the rows of one forward (a request is admitted only while its rows fit,
    or when nothing else runs); `max_active` bounds the requests sampled at once."""

    def __init__(self, load: dict[str, Pipeline] | Callable[[], dict[str, Pipeline]], *, max_rows: int = 64,
                 max_active: int | None = None, precision: str = "fp32"):  # fmt: skip
        self._load = load if callable(load) else (lambda: load)
        self.pipes: dict[str, Pipeline] = {}
        self.max_rows, self.max_active, self.precision = max_rows, max_active, precision
        self.queue: collections.deque[Work] = collections.deque()
        self.active: list[_Slot] = []
        self.cv = threading.Condition()  # guards `queue`, `active` and `cancels` between threads
        self.cancels: set[str] = set()
        self.stopped = False
        self.forwards = 0  # network calls made, and rows they carried (for benchmarks)
        self.rows_done = 0
        self.loop_task: greenlet.greenlet | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="inkwash-engine", daemon=True)

    # --- the public side (any thread) ---------------------------------------------------------------

    def start(self) -> Engine:
        """Start the thread and wait for the models; a loading error is raised here."""
        self.thread.start()
        atexit.register(self.stop)  # end the requests' greenlets before the interpreter goes
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop between two forwards; running requests end with Cancelled, queued ones are left alone."""
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def submit(self, work: Work) -> None:
        if work.model not in self.pipes:
            raise KeyError(f"model {work.model!r} is not loaded")
        with self.cv:
            self.queue.append(work)
            self.cv.notify_all()

    def cancel(self, work_id: str) -> bool:
        """Drop a queued request, or stop a running one before its next network call. True if it was found."""
        with self.cv:
            for w in self.queue:
                if w.id == work_id:
                    self.queue.remove(w)
                    w.on_error(Cancelled())
                    return True
            if any(s.work.id == work_id for s in self.active):
                self.cancels.add(work_id)
                self.cv.notify_all()
                return True
        return False

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        return len(self.active)

    def idle(self) -> bool:
        with self.cv:
            return not self.queue and not self.active

    # --- the engine's thread ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.pipes = dict(self._load())
            self.autocasts = {name: autocast_for(self.precision, p.device) for name, p in self.pipes.items()}
        except BaseException as e:  # noqa: B036 - handed to start()
            self.load_error = e
            return
        finally:
            self.ready.set()
        self.loop_task = greenlet.getcurrent()
        with torch.inference_mode():
            self._loop()

    def _run(self, w: Work) -> None:
        """A request's whole life, as a greenlet: prepare, sample (parking at every network call), report."""
        try:
            pipe = self.pipes[w.model]
            shared = _SharedNet(self, pipe.net)
            run = pipe.prepare(w.prompt, negative_prompt=w.negative_prompt, n=w.n, seed=w.seed, size=w.size,
                               net=shared, class_label=w.class_label, **w.settings)  # fmt: skip
            shared.cache = make_cache(pipe.net, run.settings.cache)  # this request's own
            images = run(self._progress(w, run))
            w.on_done(images)
        except BaseException as e:  # noqa: B036 - a request's failure must never stop the engine
            try:
                w.on_error(e)
            except Exception:
                traceback.print_exc()

    @staticmethod
    def _progress(w: Work, run) -> Callable:
        """The sampler's callback: step counts, and a preview image of the first image's x0 estimate (for a latent
        model decoded by its autoencoder at most 4 times a second, and always at the last step; else None)."""
        last = [float("-inf")]

        def progress(i: int, steps: int, x: Tensor, x0: Tensor) -> None:
            preview = None
            if run.vae is None:
                preview = x0[0]
            elif time.monotonic() - last[0] >= PREVIEW_EVERY_S or i + 1 == steps:
                preview, last[0] = run.to_images(x0[:1])[0], time.monotonic()
            w.on_progress(i + 1, steps, preview)

        return progress

    def _resume(self, slot: _Slot, value: Tensor | None = None, error: BaseException | None = None) -> None:
        """Run one request until it parks at its next network call or finishes."""
        if error is not None:
            call = slot.task.throw(error)
        else:
            call = slot.task.switch() if value is None else slot.task.switch(value)
        slot.call = None if slot.task.dead else call

    def _admit(self) -> None:
        with self.cv:
            rows, new = sum(s.work.rows for s in self.active), []
            while self.queue and (self.max_active is None or len(self.active) < self.max_active):
                w = self.queue[0]
                if self.active and rows + w.rows > self.max_rows:
                    break
                self.queue.popleft()
                new.append(_Slot(w, greenlet.greenlet(lambda w=w: self._run(w))))
                self.active.append(new[-1])
                rows += w.rows
        for slot in new:
            slot.work.on_start()
            self._resume(slot)

    def _loop(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.stopped or self.queue or self.active)
                if self.stopped:
                    break
                cancels, self.cancels = self.cancels, set()
            self._admit()
            for s in self.active:
                if s.call is not None and s.work.id in cancels:
                    self._resume(s, error=Cancelled())
            self._drop_finished()
            if self.active:
                self._forward(self.active)
                self._drop_finished()
        for s in self.active:  # stopping: running requests end here (a server keeps their jobs queued)
            if s.call is not None:
                self._resume(s, error=Cancelled())
        self._drop_finished()

    def _drop_finished(self) -> None:
        with self.cv:
            self.active = [s for s in self.active if s.call is not None]

    def _forward(self, batch: list[_Slot]) -> None:
        """One network forward per model and input shape over all parked requests (a cached request: its own);
        then each resumes."""
        groups: dict[tuple, list[_Slot]] = {}
        for s in batch:
            x, _, cond, cache = s.call
            key = (s.work.model, tuple(x.shape[1:]), x.dtype, tuple(sorted(cond)), None if cache is None else id(s))
            groups.setdefault(key, []).append(s)
        for (model, *_), slots in groups.items():
            xs, ts, conds, caches = zip(*(s.call for s in slots))
            net = caches[0] if caches[0] is not None else self.pipes[model].net
            try:
                with self.autocasts[model]():
                    out = net(torch.cat(xs), torch.cat(ts), **cat_cond(*conds))
            except Exception as e:  # a bad forward fails only these requests
                for s in slots:
                    self._resume(s, error=e)
                continue
            self.forwards += 1
            self.rows_done += out.shape[0]
            for s, part in zip(slots, out.split([x.shape[0] for x in xs])):
                self._resume(s, part)


def wait_idle(engine: Engine, timeout: float = 60.0) -> bool:
    """True once nothing is queued or running (for tests and orderly shutdown)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if engine.idle():
            return True
        time.sleep(0.01)
    return False
