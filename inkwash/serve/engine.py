"""Step-level continuous batching: every request keeps its own sampler, all requests share each network forward.

Each admitted request runs the ordinary sampler (`Pipeline.prepare` + `SamplingRun`) in a thread of its own,
with a stand-in for the network: calling it hands (x, t, conditioning) to the engine and waits. The engine
thread waits until every running request is either waiting at such a call or finished, concatenates all the
waiting inputs (padding token sequences), runs the real network once, and hands each request its rows. So
requests with different prompts, seeds, guidance, samplers and step counts join and leave between any two
network calls, as LLM servers do for tokens, and no sampler needs to know (Heun's two calls per step and
DPM-Solver's history work unchanged). `max_active=1` is the plain server: one request at a time.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..pipeline import Pipeline, autocast_for
from ..sampling import cat_cond

Tensor = torch.Tensor


class Cancelled(Exception):
    """Raised inside a request's sampler thread when the request was cancelled."""


@dataclass
class Work:
    """One request for the engine. Callbacks run on the request's thread; `on_start` when it is admitted."""

    id: str
    prompt: str
    negative_prompt: str
    n: int
    seed: int
    size: int
    settings: dict  # sampler, steps, guidance (and optional schedule, rescale)
    on_start: Callable[[], None] = lambda: None
    on_progress: Callable[[int, int, Tensor], None] = lambda step, steps, x0: None
    on_done: Callable[[Tensor], None] = lambda images: None
    on_error: Callable[[BaseException], None] = lambda error: None

    @property
    def rows(self) -> int:
        """Network rows one forward of this request takes (guidance doubles them)."""
        return self.n * (1 if float(self.settings.get("guidance", 2.0)) == 1 else 2)


@dataclass
class _Slot:
    work: Work
    state: str = "computing"  # computing -> waiting (a network call is pending) -> ... -> done
    call: tuple | None = None
    result: Tensor | None = None
    cancelled: bool = False
    error: BaseException | None = None  # a failed shared forward
    ready: threading.Event = field(default_factory=threading.Event)


class _SharedNet:
    """The stand-in network handed to one request's denoiser: the same call, answered by the shared forward."""

    def __init__(self, engine: Engine, slot: _Slot):
        self.engine, self.slot = engine, slot

    def parameters(self):
        return self.engine.pipe.net.parameters()

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return self.engine._call(self.slot, x, t, cond)


class Engine:
    """Runs requests for one pipeline. `max_rows` bounds the rows of one network forward (a request is admitted
    only while its rows fit, or when nothing else runs); `max_active` bounds requests sampled at once."""

    def __init__(self, pipe: Pipeline, *, max_rows: int = 64, max_active: int | None = None, precision="fp32"):
        self.pipe, self.max_rows, self.max_active = pipe, max_rows, max_active
        self.autocast = autocast_for(precision, pipe.device)
        self.queue: collections.deque[Work] = collections.deque()
        self.active: list[_Slot] = []
        self.cv = threading.Condition()
        self.text_lock = threading.Lock()  # tokenizers are not safe to share between threads
        self.stopped = False
        self.forwards = 0  # network calls made, and rows they carried (for benchmarks)
        self.rows_done = 0
        self.thread = threading.Thread(target=self._loop, name=f"engine-{pipe.name}", daemon=True)

    # --- the public side ----------------------------------------------------------------------------

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self.cv:
            self.stopped = True
            for slot in self.active:
                slot.cancelled = True
                slot.ready.set()
            self.cv.notify_all()
        self.thread.join(timeout)

    def submit(self, work: Work) -> None:
        with self.cv:
            self.queue.append(work)
            self.cv.notify_all()

    def cancel(self, work_id: str) -> bool:
        """Drop a queued request, or stop a running one at its next network call. True if it was found."""
        with self.cv:
            for w in self.queue:
                if w.id == work_id:
                    self.queue.remove(w)
                    w.on_error(Cancelled())
                    return True
            for slot in self.active:
                if slot.work.id == work_id:
                    slot.cancelled = True
                    slot.ready.set()
                    self.cv.notify_all()
                    return True
        return False

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        return len(self.active)

    # --- the request's side (its own thread) --------------------------------------------------------

    def _call(self, slot: _Slot, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        with self.cv:
            if slot.cancelled:
                raise Cancelled()
            slot.call, slot.result, slot.state = (x, t, cond), None, "waiting"
            slot.ready.clear()
            self.cv.notify_all()
        slot.ready.wait()
        if slot.error is not None:
            raise slot.error
        if slot.cancelled or slot.result is None:
            raise Cancelled()
        return slot.result

    def _run(self, slot: _Slot) -> None:
        w = slot.work
        try:
            with torch.inference_mode():
                with self.text_lock:
                    run = self.pipe.prepare(w.prompt, negative_prompt=w.negative_prompt, n=w.n, seed=w.seed,
                                            size=w.size, net=_SharedNet(self, slot), **w.settings)  # fmt: skip
                images = run(lambda i, steps, x, x0: w.on_progress(i + 1, steps, x0[0]))
            w.on_done(images)
        except BaseException as e:  # noqa: B036 - a request's failure must never stop the engine
            w.on_error(e)
        finally:
            with self.cv:
                slot.state = "done"
                self.cv.notify_all()

    # --- the engine's side --------------------------------------------------------------------------

    def _admit(self) -> None:
        rows = sum(s.work.rows for s in self.active)
        while self.queue and (self.max_active is None or len(self.active) < self.max_active):
            w = self.queue[0]
            if self.active and rows + w.rows > self.max_rows:
                break
            self.queue.popleft()
            slot = _Slot(w)
            self.active.append(slot)
            rows += w.rows
            w.on_start()
            threading.Thread(target=self._run, args=(slot,), name=f"job-{w.id[:8]}", daemon=True).start()

    def _settled(self) -> bool:
        return self.stopped or (bool(self.active) and all(s.state != "computing" for s in self.active))

    def _loop(self) -> None:
        while True:
            with self.cv:
                self.active = [s for s in self.active if s.state != "done"]
                self._admit()
                self.cv.wait_for(lambda: self._settled() or (not self.active and self.queue))
                if self.stopped:
                    return
                self.active = [s for s in self.active if s.state != "done"]
                batch = [s for s in self.active if s.state == "waiting"]
                for s in batch:
                    s.state = "computing"
            for s in [s for s in batch if s.cancelled]:
                s.ready.set()
            batch = [s for s in batch if not s.cancelled]
            if batch:
                self._forward(batch)

    def _forward(self, batch: list[_Slot]) -> None:
        """One network forward per input shape over all waiting requests; each gets its own rows back."""
        groups: dict[tuple, list[_Slot]] = {}
        for s in batch:
            x, _, cond = s.call
            groups.setdefault((tuple(x.shape[1:]), x.dtype, tuple(sorted(cond))), []).append(s)
        for slots in groups.values():
            try:
                xs, ts, conds = zip(*(s.call for s in slots))
                with torch.inference_mode(), self.autocast():
                    out = self.pipe.net(torch.cat(xs), torch.cat(ts), **cat_cond(*conds))
                self.forwards += 1
                self.rows_done += out.shape[0]
                for s, part in zip(slots, out.split([x.shape[0] for x in xs])):
                    s.result = part
            except Exception as e:  # a bad forward fails only these requests
                for s in slots:
                    s.result, s.error = None, e
            for s in slots:
                s.call = None
                s.ready.set()


def wait_idle(engine: Engine, timeout: float = 60.0) -> bool:
    """True once nothing is queued or running (for tests and orderly shutdown)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with engine.cv:
            if not engine.queue and not engine.active:
                return True
        time.sleep(0.01)
    return False
