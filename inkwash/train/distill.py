"""Few-step distillation on the one training loop: LCM, progressive distillation and reflow.

Every method is a `Distiller`, a `Trainer` whose network starts as the teacher's and whose `loss` asks the
teacher for its target; the loop, checkpoints, exact resume, EMA and metrics are the trainer's own. A run
folder holds one trainer run per stage, the student as `model.safetensors` (a normal inkwash model file whose
`sampling` defaults are the distilled ones) and an evaluation gate (`gate.json`, `gate.md`).

- lcm: latent consistency distillation (Luo et al. 2023). The student gets a zero-initialised guidance-scale
  embedding (so it starts as the teacher), the target is the EMA network one skipping-step DDIM teacher step
  (k = n / ddim_steps timesteps, CFG at w ~ U[w_min, w_max]) further, with LCM's boundary condition.
- progressive: Salimans & Ho (2022): a student learns two DDIM steps of its teacher in one; stages halve the
  steps (start_steps -> ... -> end_steps), each initialised from the previous student. The first teacher runs
  classifier-free guidance at `guidance`, which the students fold in (Meng et al. 2023, stage two).
- reflow: Liu et al. (2022): teacher ODE pairs (noise z, sample x0) are stored on disk, then a Flow student
  (initialised from the teacher) learns straight paths x_t = (1 - t) x0 + t z; optionally one-step.

Knows the teacher only as a Pipeline (inkwash.load); knows no architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inkwash.diffusion import Denoiser, expand, from_x0_eps
from inkwash.errors import UserError
from inkwash.formats.checkpoint import file_sha256, load_state, read_meta, save_state
from inkwash.pipeline import Pipeline, text_cond
from inkwash.sampling import SAMPLERS, Guided, make_times
from inkwash.text import TextEncoder
from inkwash.train.ema import EMA
from inkwash.train.trainer import (
    MODEL_FILE,
    STATE_FILE,
    DataOrder,
    TrainConfig,
    Trainer,
    _run,
    generator_for,
    pick_device,
    seed_for,
)

METHODS = ("lcm", "progressive", "reflow")
SPEC_FILE = "distill.json"
DETERMINISTIC = ("ddim", "euler", "flow_euler", "heun", "dpmpp_2m")  # ODE samplers, for reproducible pairs
# TrainConfig options the teacher fixes: the student is the teacher's network in the teacher's space.
FROM_TEACHER = ("model", "process", "prediction", "text_encoder", "image_size", "vae", "init_from", "latent_cache")
# TrainConfig defaults per method (the user's options override them).
TRAIN_DEFAULTS = {
    "lcm": {"ema_decay": 0.95, "caption_dropout": 0.0, "lr": 1e-4, "steps": 1000},  # LCM's target EMA mu = 0.95
    "progressive": {"ema_decay": 0.0, "caption_dropout": 0.0, "lr": 1e-4, "steps": 500},  # per halving
    "reflow": {"ema_decay": 0.0, "caption_dropout": 0.1, "lr": 1e-4, "steps": 1000},  # dropout baked in pairs
}
# Options that may change when a distillation is resumed (the gate is run afresh).
RESUMABLE = frozenset({"gate_limit", "gate_fid", "gate_steps"})
TIMESTEP_SCALING = 10.0  # LCM's boundary condition sees network time x this: the `lcm` sampler's default

Tensor = torch.Tensor


@dataclass
class DistillConfig:
    """A distillation run: the method, the teacher file, the method's options and TrainConfig options (`train`)."""

    method: str = "lcm"  # lcm | progressive | reflow
    teacher: str = ""  # an inkwash model file
    # lcm
    w_min: float = 2.0  # guidance scales drawn for the teacher's CFG (inkwash's convention: u + w (c - u))
    w_max: float = 8.0
    ddim_steps: int = 50  # N: the teacher's skipping-step grid, k = n / N timesteps per step ("lcm" grid's 50)
    huber_c: float = 0.001  # pseudo-Huber constant on each element; 0 = L2
    guidance_embed_dim: int = 256  # Fourier features of w for the student; 0 = no embedding, w fixed at `guidance`
    # progressive
    start_steps: int = 32  # the first teacher's DDIM steps; each stage halves them
    end_steps: int = 1
    prediction: str = "v"  # the students' parametrisation (Salimans & Ho: v keeps one step well posed)
    schedule: str | None = None  # the time grid (None: trailing for VP, shift for Flow; they nest under halving)
    # reflow
    pairs: int = 1024  # teacher ODE pairs (noise, sample) made once and kept in pairs/
    pair_sampler: str = "dpmpp_2m"
    pair_steps: int = 25
    pair_batch: int = 16  # pairs per file in pairs/ (and per teacher batch)
    shift: float = 1.0  # the Flow student's time shift
    onestep_steps: int = 0  # > 0: a second stage that trains the student at t = 1 only (one-step)
    # all
    guidance: float | None = None  # the teacher's CFG scale (None: its own default); students run no CFG
    sample_steps: int | None = None  # the student's default steps (None: 4 lcm, end_steps, 2 reflow, 1 one-step)
    gate_limit: int = 4  # prompts per ShapesEval task in the end-of-run gate; 0 = no gate
    gate_fid: int = 200  # images for the gate's FID (0 = none)
    gate_steps: tuple[int, ...] = (1, 2, 4, 8)
    train: dict = field(default_factory=dict)  # TrainConfig options: lr, batch_size, steps, seed, output_dir, ...

    def __post_init__(self):
        self.gate_steps = tuple(self.gate_steps)
        self.train = dict(self.train)
        if self.method not in METHODS:
            raise UserError(f"Unknown distillation method {self.method!r}; valid: {', '.join(METHODS)}.")
        if not self.teacher:
            raise UserError("Distillation needs a teacher: give --teacher MODEL_FILE.")
        taken = sorted(set(self.train) & set(FROM_TEACHER))
        if taken:
            raise UserError(f"Options {taken} come from the teacher's model file and cannot be set for distillation.")
        if "sampling" in self.train:
            raise UserError("The student's sampling defaults come from the method; set sample_steps or guidance.")
        if not 0 <= self.w_min <= self.w_max:
            raise UserError(f"LCM guidance range needs 0 <= w_min <= w_max, got {self.w_min} and {self.w_max}.")
        for name in ("ddim_steps", "start_steps", "end_steps", "pairs", "pair_steps", "pair_batch"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise UserError(f"Distillation option {name} must be a positive integer, got {getattr(self, name)!r}.")
        ratio = self.start_steps // self.end_steps
        if self.start_steps % self.end_steps or ratio < 2 or ratio & (ratio - 1):
            raise UserError(f"Progressive distillation halves the steps, so start_steps / end_steps must be a power "
                            f"of two >= 2; got {self.start_steps} / {self.end_steps}.")  # fmt: skip
        if self.pair_sampler not in DETERMINISTIC:
            raise UserError(f"Reflow pairs need a deterministic ODE sampler ({', '.join(DETERMINISTIC)}), "
                            f"got {self.pair_sampler!r}.")  # fmt: skip
        if self.gate_limit < 0 or self.gate_fid < 0 or self.onestep_steps < 0:
            raise UserError("gate_limit, gate_fid and onestep_steps must be >= 0.")
        if any(not (isinstance(n, int) and n > 0) for n in self.gate_steps):
            raise UserError(f"gate_steps must be positive integers, got {list(self.gate_steps)}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        """Flat options: this class's fields, the rest TrainConfig's (unknown names: one UserError)."""
        own = {f.name for f in dataclasses.fields(cls)}
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        d = dict(d)
        train = dict(d.pop("train", {}))
        unknown = sorted(k for k in d if k not in own and k not in train_fields)
        if unknown:
            raise UserError(f"Unknown distillation options {unknown}; valid: the fields of DistillConfig and "
                            "TrainConfig.")  # fmt: skip
        train |= {k: d.pop(k) for k in list(d) if k not in own}
        try:
            return cls(**d, train=train)
        except TypeError as e:
            raise UserError(f"Invalid distillation options: {e}.") from None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def output_dir(self) -> Path:
        return Path(self.train.get("output_dir", f"runs/distill-{self.method}"))


# ---------------------------------------------------------------------------- the formulas


def coeffs(process, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """alpha(t), sigma(t) for per-sample times [B], broadcast against `like` in float32."""
    return tuple(expand(v, like).to(like.device, torch.float32) for v in process.alpha_sigma(t))


def ddim_step(process, x: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with eta = 0): x' = alpha' x0 + sigma' eps_hat."""
    a, s = coeffs(process, t, x)
    a_next, s_next = coeffs(process, t_next, x)
    return a_next * x0 + s_next * (x - a * x0) / s


def two_step_target(process, z: Tensor, z2: Tensor, t: Tensor, t2: Tensor) -> Tensor:
    """Salimans & Ho (2022), Alg. 2: the x_tilde whose one DDIM step from z_t lands on the teacher's z_t''
    after two steps: x_tilde = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha)."""
    a, s = coeffs(process, t, z)
    a2, s2 = coeffs(process, t2, z)
    r = s2 / s
    return (z2 - r * z) / (a2 - r * a)


def boundary(process, t: Tensor, like: Tensor, scaling: float, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """LCM's consistency boundary condition (c_skip, c_out) on c = network time x scaling, as the `lcm` sampler:
    c_skip = s_d^2 / (c^2 + s_d^2), c_out = c / sqrt(c^2 + s_d^2); at timestep 0 the model is the identity."""
    c = process.net_time(t) * scaling
    c_skip, c_out = sigma_data**2 / (c**2 + sigma_data**2), c / (c**2 + sigma_data**2) ** 0.5
    return expand(c_skip, like).to(like.device, torch.float32), expand(c_out, like).to(like.device, torch.float32)


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """Per-sample mean of sqrt(d^2 + c^2) - c (Song & Dhariwal 2023; LCM's loss), or of d^2 when c = 0."""
    per = diff**2 if c == 0 else torch.sqrt(diff**2 + c**2) - c
    return per.mean(dim=tuple(range(1, diff.dim())))


# ---------------------------------------------------------------------------- the teacher


def load_teacher(path: str | os.PathLike, device: str | torch.device = "cpu") -> Pipeline:
    """The teacher's pipeline, frozen; a UserError sentence for a missing file or one that is no diffusion model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Teacher file {path} does not exist.")
    meta = read_meta(path)  # UserError for a file that is not safetensors, or not inkwash's
    if "process" not in meta or "model" not in meta:
        raise UserError(f"Teacher file {path} is not an inkwash diffusion model (an autoencoder file?).")
    pipe = Pipeline.from_file(path, device)
    pipe.net.requires_grad_(False)
    pipe.encoder.requires_grad_(False)
    return pipe


@dataclass
class Stage:
    """One trainer run of a distillation: its folder, teacher, kind and the student's sampling defaults."""

    name: str
    teacher: Path
    kind: str  # lcm | progressive | reflow | onestep
    sampling: dict
    guidance: float = 1.0  # the teacher's CFG scale in this stage (1 = none)
    student_steps: int = 0  # progressive: the student's DDIM steps in this stage


class Distiller(Trainer):
    """A Trainer whose network starts as the teacher's and whose loss is the method's (see the module's doc)."""

    def __init__(self, cfg: TrainConfig, spec: DistillConfig, stage: Stage, pairs: PairStore | None = None,
                 teacher: Pipeline | None = None):  # fmt: skip
        """`teacher`: the stage's teacher already loaded (else it is loaded from `stage.teacher`)."""
        self.spec, self.stage = spec, stage
        self.teacher = teacher if teacher is not None else load_teacher(stage.teacher)
        super().__init__(cfg)
        self.teacher.to(self.device)
        self.teacher_denoiser = Denoiser(self.teacher.net, self.teacher.process, self.teacher.prediction,
                                         getattr(self.teacher.model_cfg, "learn_sigma", False))  # fmt: skip
        self._init_student()
        self.target_net, self._target_updates = None, -1
        if stage.kind == "progressive":
            self.times = self._progressive_times()
        if pairs is not None:  # reflow: the loop reads (x0 | z) pairs instead of the data set
            self.dataset, self.order = pairs, DataOrder(len(pairs), cfg.seed)

    # -- set-up

    def model_config(self, encoder: TextEncoder):
        """The teacher's network; LCM adds the guidance-scale embedding."""
        mcfg = self.teacher.model_cfg
        if self.stage.kind == "lcm" and self.spec.guidance_embed_dim:
            if not hasattr(mcfg, "guidance_embed_dim"):
                raise UserError(f"LCM's guidance-scale embedding is built for U-Nets; this teacher is a "
                                f"{type(mcfg).__name__} (set guidance_embed_dim 0 to fold a fixed scale).")  # fmt: skip
            mcfg = dataclasses.replace(mcfg, guidance_embed_dim=self.spec.guidance_embed_dim)
        return mcfg

    @torch.no_grad()
    def _init_student(self) -> None:
        """Start from the teacher's weights (the new guidance embedding keeps its zero initialisation)."""
        missing, unexpected = self.net.load_state_dict(self.teacher.net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("guidance_in.") for k in missing):
            raise UserError(f"The teacher's weights do not fit the student: missing {missing[:4]}, unexpected "
                            f"{unexpected[:4]}.")  # fmt: skip
        if self.trainable_text:
            self.encoder.load_state_dict(self.teacher.encoder.state_dict())
        if self.ema is not None:
            self.ema = EMA(self.net, self.cfg.ema_decay)

    def _progressive_times(self) -> Tensor:
        """The teacher's 2N-step grid; its even entries must be the student's N-step grid (the grid nests)."""
        n = self.stage.student_steps
        teacher = make_times(self.process, 2 * n, self.spec.schedule)
        student = make_times(self.process, n, self.spec.schedule)
        if not torch.allclose(teacher[::2], student, atol=1e-6):
            raise UserError(
                f"The {self.spec.schedule!r} schedule does not nest under halving (its {n}-step grid is "
                f"not every other time of its {2 * n}-step grid); use trailing (VP) or shift (Flow)."
            )
        return teacher

    def _latents(self, x: Tensor, k: int) -> Tensor:
        """Reflow pairs are already in the model's space (latents for a latent teacher)."""
        return x if self.stage.kind in ("reflow", "onestep") else super()._latents(x, k)

    def model_meta(self) -> dict[str, Any]:
        meta = super().model_meta()
        st = self.stage
        meta["distill"] = {"method": self.spec.method, "stage": st.name, "kind": st.kind,
                           "teacher_sha256": file_sha256(st.teacher), "teacher_guidance": st.guidance}  # fmt: skip
        return meta

    # -- the teacher's side

    def _teacher_cond(self, captions: list[str], cond: dict) -> tuple[dict, dict]:
        """The teacher's own text conditioning (cond, uncond ""), micro-conditions shared with the student's."""
        t = self.teacher
        c = text_cond(t.encoder(captions), t.model_cfg)
        u = text_cond(t.encoder([""] * len(captions)), t.model_cfg)
        for key in ("micro",):
            if key in cond:
                c[key] = u[key] = cond[key]
        return c, u

    def guided_teacher(self, captions: list[str], cond: dict, scale) -> Guided:
        c, u = self._teacher_cond(captions, cond)
        return Guided(self.teacher_denoiser, c, u, scale)

    def _target(self) -> Denoiser:
        """LCM's target network: the EMA of the student (refreshed after each update), else the student itself."""
        if self.ema is None:
            return self.denoiser
        if self.target_net is None:
            self.target_net = copy.deepcopy(self.net).requires_grad_(False)
        if self._target_updates != self.ema.num_updates:
            self.ema.copy_to(self.target_net)
            self._target_updates = self.ema.num_updates
        return Denoiser(self.target_net, self.process, self.cfg.prediction, self.denoiser.learn_sigma)

    # -- the losses

    def loss(self, x0: Tensor, cond: dict, k: int, captions: list[str]) -> tuple[Tensor, Tensor]:
        kind = self.stage.kind
        g = generator_for(self.cfg.seed, kind, self.step, k)
        if kind == "lcm":
            return self._lcm_loss(x0.float(), cond, captions, g)
        if kind == "progressive":
            return self._progressive_loss(x0.float(), cond, captions, g)
        return self._reflow_loss(x0.float(), cond, g)

    def consistency(self, den: Denoiser, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        """f(x, t) = c_skip x + c_out x0_hat(x, t): the consistency function in x0 space (LCM eq. 9)."""
        c_skip, c_out = boundary(self.process, t, x, TIMESTEP_SCALING)
        return c_skip * x + c_out * den(x, t, **cond)

    def _lcm_loss(self, x0: Tensor, cond: dict, captions: list[str], g) -> tuple[Tensor, Tensor]:
        """LCM Alg. 1: x_{t_{n+k}} from data, one skipping-step DDIM teacher step with CFG at w, then
        d(f_student(x_{t_{n+k}}, w), f_EMA(x_hat_{t_n}, w))."""
        spec, proc, b = self.spec, self.process, x0.shape[0]
        skip = proc.n // spec.ddim_steps
        n = torch.randint(0, spec.ddim_steps, (b,), generator=g)
        t = ((n + 1) * skip - 1).to(torch.float64)  # the "lcm" grid's timesteps
        t_prev = (t - skip).clamp(min=0)  # timestep 0, where the boundary condition makes f the identity
        w = spec.w_min + (spec.w_max - spec.w_min) * torch.rand(b, generator=g, dtype=torch.float64)
        if not spec.guidance_embed_dim:
            w = torch.full((b,), self.stage.guidance, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0.device)
        a, s = coeffs(proc, t, x0)
        x_t = a * x0 + s * eps
        student_cond = dict(cond)
        if spec.guidance_embed_dim:
            student_cond["guidance"] = w.to(x0.device, torch.float32)
        pred = self.consistency(self.denoiser, x_t, t, student_cond)
        with torch.no_grad():
            x0_teacher = self.guided_teacher(captions, cond, w.float())(x_t, t)
            x_prev = ddim_step(proc, x_t, x0_teacher, t, t_prev)
            target = self.consistency(self._target(), x_prev, t_prev, student_cond)
        return pseudo_huber(pred.float() - target.float(), spec.huber_c), t

    def _progressive_loss(self, x0: Tensor, cond: dict, captions: list[str], g) -> tuple[Tensor, Tensor]:
        """Salimans & Ho Alg. 2: two DDIM teacher steps t -> t' -> t'' give x_tilde; the student regresses its
        own parametrisation of x_tilde at z_t (v: the target v_tilde = alpha eps_tilde - sigma x_tilde)."""
        proc, b, T = self.process, x0.shape[0], self.times
        i = torch.randint(0, self.stage.student_steps, (b,), generator=g)
        t, t1, t2 = T[2 * i], T[2 * i + 1], T[2 * i + 2]
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0.device)
        a, s = coeffs(proc, t, x0)
        z = a * x0 + s * eps
        with torch.no_grad():
            teacher = self.guided_teacher(captions, cond, self.stage.guidance)
            z1 = ddim_step(proc, z, teacher(z, t), t, t1)
            z2 = ddim_step(proc, z1, teacher(z1, t1), t1, t2)
            x_tilde = two_step_target(proc, z, z2, t, t2)
            target = from_x0_eps(x_tilde, (z - a * x_tilde) / s, a, s, self.cfg.prediction)
        out = self.denoiser.raw(z, t, **cond).float()
        return ((out - target) ** 2).mean(dim=tuple(range(1, x0.dim()))), t

    def _reflow_loss(self, pair: Tensor, cond: dict, g) -> tuple[Tensor, Tensor]:
        """Rectified flow on teacher pairs (Liu et al. 2022, eq. 1): x_t = (1 - t) x0 + t z, target u = z - x0
        (in the student's parametrisation); the one-step stage trains at t = 1 only."""
        proc, c = self.process, self.channels
        x0, z = pair[:, :c], pair[:, c:]
        b = x0.shape[0]
        if self.stage.kind == "onestep":
            t = torch.full((b,), proc.t_max, dtype=torch.float64)
        else:
            t = proc.t_from_u(self.time_sampler.draw_u(b, g, proc))
        a, s = coeffs(proc, t, x0)
        target = from_x0_eps(x0, z, a, s, self.cfg.prediction)
        out = self.denoiser.raw(a * x0 + s * z, t, **cond).float()
        return ((out - target) ** 2).mean(dim=tuple(range(1, x0.dim()))), t


# ---------------------------------------------------------------------------- reflow pairs


class PairStore:
    """Teacher ODE pairs on disk: file i of `folder` holds pairs i * batch ... (noise z, sample x0, caption).

    A file is written atomically once its batch is sampled, so an interrupted generation resumes at the first
    missing file. `batch(indices)` gives the trainer (x0 | z) stacked on channels [B, 2C, H, W] and captions.
    """

    def __init__(self, folder: Path, count: int, batch: int):
        self.folder, self.count, self.per_file = Path(folder), count, batch
        self._x: Tensor | None = None
        self._captions: list[str] = []

    def path(self, i: int) -> Path:
        return self.folder / f"pairs-{i:05d}.safetensors"

    @property
    def files(self) -> int:
        return math.ceil(self.count / self.per_file)

    def generate(self, teacher: Pipeline, captions: list[str], settings: dict, seed: int, progress: bool = True):
        """Sample the missing files: pair j starts from noise seeded seed_for(seed, "pair", j)."""
        from tqdm.auto import tqdm

        identity = {"teacher_sha256": file_sha256(teacher.source), **settings, "seed": seed, "batch": self.per_file}
        self.folder.mkdir(parents=True, exist_ok=True)
        ident = self.folder / "identity.json"
        if ident.is_file() and json.loads(ident.read_text()) != identity:
            raise UserError(f"{self.folder} holds pairs made with other settings; delete it or use another output_dir.")
        ident.write_text(json.dumps(identity, indent=1) + "\n")
        todo = [i for i in range(self.files) if not self.path(i).is_file()]
        with tqdm(total=self.files, initial=self.files - len(todo), desc="reflow pairs", disable=not progress) as bar:
            for i in todo:
                idx = range(i * self.per_file, min((i + 1) * self.per_file, self.count))
                caps = [captions[j] for j in idx]
                noise, x0 = sample_pairs(teacher, caps, [seed_for(seed, "pair", j) for j in idx], settings)
                meta = {"captions": caps, "first": idx[0]}
                save_state(self.path(i), {"pairs": {"noise": noise.cpu(), "x0": x0.cpu()}}, meta)
                bar.update(1)

    def _load(self) -> None:
        xs, caps = [], []
        for i in range(self.files):
            if not self.path(i).is_file():
                raise UserError(f"Reflow pair file {self.path(i)} is missing; run the distillation again to make it.")
            meta, groups = load_state(self.path(i))
            xs.append(torch.cat([groups["pairs"]["x0"], groups["pairs"]["noise"]], dim=1))
            caps += meta["captions"]
        self._x, self._captions = torch.cat(xs), caps

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: list[int]) -> tuple[Tensor, list[str], None]:
        if self._x is None:
            self._load()
        return self._x[indices], [self._captions[i] for i in indices], None


@torch.no_grad()
def sample_pairs(teacher: Pipeline, captions: list[str], seeds: list[int], settings: dict) -> tuple[Tensor, Tensor]:
    """(noise z, the teacher's ODE sample x0) in the model's space (latents for a latent model, not decoded)."""
    run = teacher.prepare(captions, seed=seeds, **settings)
    x0 = SAMPLERS[run.settings.sampler](run.model, run.x, run.times, process=run.process, generator=None)
    return run.x, x0


# ---------------------------------------------------------------------------- the run


def _stages(spec: DistillConfig, teacher_meta: dict) -> list[Stage]:
    out, teacher = spec.output_dir, Path(spec.teacher)
    w = float(teacher_meta.get("sampling", {}).get("guidance", 1.0) if spec.guidance is None else spec.guidance)
    if spec.method == "lcm":
        steps = spec.sample_steps or 4
        w_default = min(max(w, spec.w_min), spec.w_max) if spec.guidance_embed_dim else 1.0
        sampling = {"sampler": "lcm", "steps": steps, "guidance": w_default, "schedule": "lcm"}
        return [Stage("lcm", teacher, "lcm", sampling, guidance=w)]
    if spec.method == "progressive":
        stages, n = [], spec.start_steps // 2
        while n >= spec.end_steps:
            steps = spec.sample_steps if n == spec.end_steps and spec.sample_steps else n
            sampling = {"sampler": "ddim", "steps": steps, "guidance": 1.0, "schedule": spec.schedule}
            stages.append(Stage(f"stage-{n:03d}", teacher, "progressive", sampling, w if not stages else 1.0, n))
            teacher, n = out / f"stage-{n:03d}" / MODEL_FILE, n // 2
        return stages
    steps = spec.sample_steps or (1 if spec.onestep_steps else 2)
    sampling = {"sampler": "euler", "steps": steps, "guidance": 1.0, "schedule": "shift"}
    stages = [Stage("reflow", teacher, "reflow", sampling, guidance=w)]
    if spec.onestep_steps:
        stages.append(Stage("onestep", out / "reflow" / MODEL_FILE, "onestep", sampling, guidance=w))
    return stages


def _train_config(spec: DistillConfig, stage: Stage, teacher_meta: dict, teacher_path: Path) -> TrainConfig:
    """The stage's TrainConfig: the teacher's network and space, the method's defaults, the user's options."""
    d = {**TRAIN_DEFAULTS[spec.method], "sample_prompts": (), **spec.train}
    if stage.kind in ("reflow", "onestep"):
        d["caption_dropout"] = 0.0  # the pairs already hold unconditional samples
        process, prediction = {"kind": "flow", "shift": spec.shift}, "flow"
    elif stage.kind == "progressive":
        process, prediction = teacher_meta["process"], spec.prediction
    else:
        process, prediction = teacher_meta["process"], teacher_meta["prediction"]
    d |= {
        "model": teacher_meta["model"], "process": process, "prediction": prediction,
        "text_encoder": teacher_meta["text_encoder"], "image_size": teacher_meta["image_size"],
        "vae": str(teacher_path) if "vae" in teacher_meta else None, "sampling": stage.sampling,
        "output_dir": str(spec.output_dir / stage.name),
    }  # fmt: skip
    if stage.kind == "onestep":
        d["steps"] = spec.onestep_steps
    return TrainConfig.from_dict(d)


def _check_teacher(spec: DistillConfig, meta: dict) -> None:
    """Method-specific refusals, one sentence each."""
    kind = meta["process"].get("kind")
    if spec.method == "lcm" and kind != "vp":
        raise UserError(f"LCM distillation steps over discrete timesteps and needs a VP teacher; this one is "
                        f"{kind!r} (try --method reflow).")  # fmt: skip
    if meta["model"].get("guidance_embed_dim") or meta["model"].get("guidance_embed"):
        raise UserError("The teacher is already guidance-distilled; distil a model that runs classifier-free guidance.")


def _stage_done(stage_dir: Path, steps: int) -> bool:
    path = stage_dir / MODEL_FILE
    return path.is_file() and read_meta(path).get("train_args", {}).get("step") == steps


def _check_spec(spec: DistillConfig, resume: bool) -> None:
    """Write the run's options, or on resume refuse options that would change its numbers."""
    path = spec.output_dir / SPEC_FILE
    now = spec.to_dict()
    if resume:
        if not path.is_file():
            raise UserError(f"Nothing to resume: {path} does not exist (distil without --resume to start).")
        saved = json.loads(path.read_text())
        keep = {"steps", "output_dir", "log_every", "checkpoint_every", "sample_every", "eval_every", "device"}
        changed = sorted(k for k in now if k not in RESUMABLE and k != "train" and saved.get(k) != now[k])
        changed += sorted(f"train.{k}" for k in set(now["train"]) | set(saved["train"])
                          if k not in keep and saved["train"].get(k) != now["train"].get(k))  # fmt: skip
        if changed:
            raise UserError(f"Cannot resume {spec.output_dir}: these options differ from the saved run: {changed}.")
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=1) + "\n")


def distill(spec: DistillConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Run every stage of `spec` (resuming exactly with `resume`), write the student as output_dir/model.safetensors
    and run the evaluation gate; returns the student's path."""
    teacher_path = Path(spec.teacher)
    device = pick_device(spec.train.get("device", "auto"))
    teacher = load_teacher(teacher_path, device)  # refuses a missing or foreign file with one sentence
    meta = teacher.meta
    _check_teacher(spec, meta)
    _check_spec(spec, resume)
    out = spec.output_dir
    pairs = None
    for stage in _stages(spec, meta):
        cfg = _train_config(spec, stage, meta, teacher_path)
        stage_dir = Path(cfg.output_dir)
        if resume and _stage_done(stage_dir, cfg.steps):
            continue
        if stage.kind == "reflow" or (stage.kind == "onestep" and pairs is None):
            pairs = _reflow_pairs(spec, teacher, cfg, stage, progress)
        loaded = teacher if stage.teacher == teacher_path else None
        tr = Distiller(cfg, spec, stage, pairs if stage.kind in ("reflow", "onestep") else None, loaded)
        _run(tr, resume=resume and (stage_dir / STATE_FILE).is_file(), max_steps=None)
    final = out / MODEL_FILE
    tmp = out / f".{MODEL_FILE}.tmp"
    shutil.copyfile(Path(cfg.output_dir) / MODEL_FILE, tmp)
    os.replace(tmp, final)
    if spec.gate_limit:
        gate(final, teacher_path, spec, device=device, progress=progress)
    return final


def _reflow_pairs(spec: DistillConfig, teacher: Pipeline, cfg: TrainConfig, stage: Stage, progress: bool):
    """Make (or complete) the stored teacher pairs: captions of the data set's first `pairs` items, each
    replaced by "" with probability caption_dropout (so the student learns unconditional paths too)."""
    from inkwash.train.trainer import build_dataset, load_batch

    caption_dropout = {**TRAIN_DEFAULTS["reflow"], **spec.train}["caption_dropout"]
    ds = build_dataset(cfg.dataset, cfg.image_size, cfg.seed, **cfg.dataset_args)
    _, captions = load_batch(ds, [j % len(ds) for j in range(spec.pairs)])
    drop = torch.rand(spec.pairs, generator=generator_for(cfg.seed, "pair-caption")).tolist()
    captions = ["" if d < caption_dropout else c for c, d in zip(captions, drop)]
    settings = {"sampler": spec.pair_sampler, "steps": spec.pair_steps, "guidance": stage.guidance}
    store = PairStore(spec.output_dir / "pairs", spec.pairs, spec.pair_batch)
    store.generate(teacher, captions, settings, cfg.seed, progress)
    return store


# ---------------------------------------------------------------------------- the evaluation gate


def student_for_steps(run: Path, method: str, steps: int) -> tuple[str, Path]:
    """(name, file) of the student a run trained for sampling in `steps` steps: progressive's stage-N student
    where that stage exists (each halving's student is made for its own step count, as Salimans & Ho report
    them), reflow's student before the one-step stage for more than one step; otherwise the run's student."""
    run = Path(run)
    stage = run / f"stage-{steps:03d}" / MODEL_FILE
    if method == "progressive" and stage.is_file():
        return f"stage-{steps:03d}", stage
    reflowed = run / "reflow" / MODEL_FILE
    if method == "reflow" and steps > 1 and (run / "onestep").is_dir() and reflowed.is_file():
        return "reflow", reflowed
    return "student", run / MODEL_FILE


def gate(student: Path, teacher: Path, spec: DistillConfig, device: torch.device | str = "cpu",
         progress: bool = False) -> dict:  # fmt: skip
    """ShapesEval (gate_limit prompts per task, one image each) and FID (gate_fid images) of the student at each
    of gate_steps (`student_for_steps`: progressive's stage students at their own steps) next to the teacher at its
    own setting; written as gate.json and gate.md, printed as a table."""
    from inkwash.eval.runner import EvalConfig, evaluate
    from inkwash.pipeline import load

    out = spec.output_dir / "gate"
    seed = int(spec.train.get("seed", 0))
    common = dict(per_prompt=1, limit=spec.gate_limit, fid_images=spec.gate_fid, seed=seed)
    rows = []
    runs = [("teacher", load(teacher, device), None)]
    for n in spec.gate_steps:
        name, path = student_for_steps(student.parent, spec.method, n)
        runs.append((name, load(student if name == "student" else path, device), n))
    for name, pipe, steps in runs:
        s = pipe.settings(steps=steps)
        folder = out / (name if steps is None else f"student-{steps}")
        if folder.exists():
            shutil.rmtree(folder)  # a gate always measures the current files
        result = evaluate(pipe, folder, EvalConfig(steps=steps, **common), progress=progress, report=False)
        rows.append({
            "model": name, "sampler": s.sampler, "steps": s.steps, "schedule": s.schedule, "guidance": s.guidance,
            "scores": {k: v["mean"] for k, v in result["scores"].items()},
            "fid": None if not result["fid"] else result["fid"]["fid"],
            "seconds_per_image": result["timing"]["seconds_per_image"],
        })  # fmt: skip
    report = {"method": spec.method, "teacher": str(teacher), "student": str(student), "limit": spec.gate_limit,
              "fid_images": spec.gate_fid, "rows": rows}  # fmt: skip
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    (spec.output_dir / "gate.json").write_text(json.dumps(report, indent=1) + "\n")
    table = gate_table(rows)
    (spec.output_dir / "gate.md").write_text(table + "\n")
    print(table)
    return report


def gate_table(rows: list[dict]) -> str:
    """A markdown table: one row per (model, steps), ShapesEval scores in percent, FID where measured."""
    tasks = list(rows[0]["scores"]) if rows else []
    head = ["model", "sampler", "steps", "guidance", *tasks, "FID", "s/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["sampler"], str(r["steps"]), f"{r['guidance']:g}"]
        cells += [f"{100 * r['scores'][t]:.1f}" for t in tasks]
        cells += ["-" if r["fid"] is None else f"{r['fid']:.2f}", f"{r['seconds_per_image']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
