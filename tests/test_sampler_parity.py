"""Oracle: our samplers against diffusers' schedulers, same model function, same noise.

A fixed deterministic "network" f(x, t) drives both sides. diffusers keeps Euler-family states on the
variance-exploding scale x / alpha; we keep x on the process's own scale, so states are compared after
converting theirs. Every intermediate state and the final sample must agree within TOL.
"""

import inspect
import math

import diffusers
import pytest
import torch
from torch import nn

from inkwash.diffusion import VP, Denoiser, Flow, flux_mu, from_x0_eps, shift_time
from inkwash.sampling import SAMPLERS, make_times

TOL = 2e-5  # float32 states on both sides; diffusers also keeps its sigma tables in float32
SHAPE = (2, 3, 8, 8)


def f(x: torch.Tensor, t: torch.Tensor, process, kind: str) -> torch.Tensor:
    """A fixed 'network': the exact denoiser of Gaussian data N(mu, s^2) plus a small nonlinear term,
    written as the output of prediction `kind`. VP times are rounded, as diffusers' DPM-Solver feeds
    Karras times rounded; the network is then a function of the rounded time on both sides."""
    t = t.double().reshape(-1)[0]
    t_proc = torch.round(t) if isinstance(process, VP) else t / 1000
    a, s = (v.float() for v in process.alpha_sigma(t_proc))
    mu = torch.linspace(-0.5, 0.5, x[0].numel()).reshape(x.shape[1:])
    sd = torch.linspace(0.5, 1.2, x[0].numel()).reshape(x.shape[1:])
    x0 = mu + a * sd**2 / (a**2 * sd**2 + s**2) * (x - a * mu) + 0.05 * torch.tanh(x) * torch.cos(t_proc * 3)
    return from_x0_eps(x0, (x - a * x0) / s, a, s, kind).float()


class FNet(nn.Module):
    def __init__(self, process, kind):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.process, self.kind = process, kind

    def forward(self, x, t, **_):
        return f(x, t, self.process, self.kind)


def z0(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_diffusers(sched, x, to_ours, process, kind):
    """Run diffusers' loop; returns the list of states converted to our scale (one per scheduler step)."""
    g = torch.Generator().manual_seed(123)
    states = []
    for i, t in enumerate(sched.timesteps):
        xin = sched.scale_model_input(x, t) if hasattr(type(sched), "scale_model_input") else x
        kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
        out = f(xin, torch.as_tensor(t), process, kind)
        x = sched.step(out, t, x, **kw).prev_sample
        states.append(to_ours(x, i))
    return states


def run_ours(name, process, prediction, x, times, **opts):
    den = Denoiser(FNet(process, prediction), process, prediction)
    states = []
    SAMPLERS[name](
        lambda x, t: den(x, t),
        x,
        times,
        process=process,
        generator=torch.Generator().manual_seed(123),
        callback=lambda i, n, x, x0: states.append(x),
        **opts,
    )
    return states


def assert_close(ours, theirs):
    assert len(ours) == len(theirs)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    assert worst <= TOL, f"max |ours - diffusers| = {worst:.2e}"


def sd_config(**kw):
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)


PRED = {"eps": "epsilon", "v": "v_prediction"}


def ve_to_vp(sched):
    """diffusers' Euler-family state after step i sits at sigmas[i+1] on the VE scale."""

    def conv(x, i):
        s = float(sched.sigmas[i + 1])
        return x / math.sqrt(1 + s * s)

    return conv


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim(prediction, spacing):
    sched = diffusers.DDIMScheduler(
        **sd_config(), prediction_type=PRED[prediction], timestep_spacing=spacing, steps_offset=1,
        set_alpha_to_one=True, clip_sample=False,
    )  # fmt: skip
    sched.set_timesteps(20)
    x = z0()
    theirs = run_diffusers(sched, x, lambda x, i: x, VP(), prediction)
    times = make_times(VP(), 20, spacing)
    assert torch.equal(times[:-1], sched.timesteps.double())
    assert_close(run_ours("ddim", VP(), prediction, x, times), theirs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("karras", [False, True])
def test_euler(prediction, karras):
    spacing = "linspace" if karras else "leading"
    sched = diffusers.EulerDiscreteScheduler(
        **sd_config(), prediction_type=PRED[prediction], timestep_spacing=spacing, steps_offset=1,
        use_karras_sigmas=karras,
    )  # fmt: skip
    sched.set_timesteps(15)
    x = z0() * sched.init_noise_sigma
    theirs = run_diffusers(sched, x, ve_to_vp(sched), VP(), prediction)
    times = make_times(VP(), 15, "karras" if karras else "leading")
    x_ours = x / math.sqrt(1 + float(sched.sigmas[0]) ** 2)
    assert_close(run_ours("euler", VP(), prediction, x_ours, times), theirs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_ancestral(prediction):
    sched = diffusers.EulerAncestralDiscreteScheduler(
        **sd_config(), prediction_type=PRED[prediction], timestep_spacing="trailing"
    )
    sched.set_timesteps(12)
    x = z0() * sched.init_noise_sigma
    theirs = run_diffusers(sched, x, ve_to_vp(sched), VP(), prediction)
    x_ours = x / math.sqrt(1 + float(sched.sigmas[0]) ** 2)
    assert_close(run_ours("euler_ancestral", VP(), prediction, x_ours, make_times(VP(), 12, "trailing")), theirs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("karras", [False, True])
def test_heun(prediction, karras):
    spacing = "linspace" if karras else "trailing"
    sched = diffusers.HeunDiscreteScheduler(
        **sd_config(), prediction_type=PRED[prediction], timestep_spacing=spacing, use_karras_sigmas=karras
    )
    sched.set_timesteps(10)
    x = z0() * sched.init_noise_sigma
    conv = ve_to_vp(sched)
    states = run_diffusers(sched, x, conv, VP(), prediction)
    # diffusers takes two scheduler steps per Heun step (predict, correct), one for the last Euler step.
    theirs = states[1::2] + [states[-1]]
    x_ours = x / math.sqrt(1 + float(sched.sigmas[0]) ** 2)
    assert_close(
        run_ours("heun", VP(), prediction, x_ours, make_times(VP(), 10, "karras" if karras else "trailing")),
        theirs,
    )


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m(prediction, karras, sde):
    sched = diffusers.DPMSolverMultistepScheduler(
        **sd_config(), prediction_type=PRED[prediction], algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        solver_order=2, use_karras_sigmas=karras, timestep_spacing="linspace",
    )  # fmt: skip
    sched.set_timesteps(12)
    x = z0()
    theirs = run_diffusers(sched, x, lambda x, i: x, VP(), prediction)
    if karras:
        times = make_times(VP(), 12, "karras")
    else:
        # diffusers' DPM "linspace" is linspace(0, 999, n + 1).round() without 0; the solver is what is tested
        times = torch.cat([sched.timesteps.double(), torch.tensor([VP().t_clean], dtype=torch.float64)])
    assert_close(run_ours("dpmpp_2m_sde" if sde else "dpmpp_2m", VP(), prediction, x, times), theirs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm(prediction):
    sched = diffusers.DDPMScheduler(**sd_config(), prediction_type=PRED[prediction], clip_sample=False)
    sched.set_timesteps(25)
    x = z0()
    theirs = run_diffusers(sched, x, lambda x, i: x, VP(), prediction)
    times = make_times(VP(), 25, "leading", offset=0)
    assert torch.equal(times[:-1], sched.timesteps.double())
    assert_close(run_ours("ddpm", VP(), prediction, x, times), theirs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_lcm(prediction):
    sched = diffusers.LCMScheduler(**sd_config(), prediction_type=PRED[prediction])
    sched.set_timesteps(4)
    x = z0()
    theirs = run_diffusers(sched, x, lambda x, i: x, VP(), prediction)
    times = make_times(VP(), 4, "lcm")
    assert torch.equal(times[:-1], sched.timesteps.double())
    assert_close(run_ours("lcm", VP(), prediction, x, times), theirs)


@pytest.mark.parametrize("dynamic", [False, True])
def test_flow_euler(dynamic):
    if dynamic:
        seq_len = 1024
        sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        sched.set_timesteps(10, mu=flux_mu(seq_len))
        process, opts = Flow(dynamic_shift=True), {"seq_len": seq_len, "t_last": 1e-3}
    else:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(10)
        # diffusers spaces from its already-shifted smallest sigma, then shifts again; we take its end point
        process, opts = Flow(shift=3.0), {"t_last": float(shift_time(1e-3, 3.0))}
    x = z0()
    theirs = run_diffusers(sched, x, lambda x, i: x, process, "flow")
    times = make_times(process, 10, "shift", **opts)
    assert torch.allclose(times[:-1] * 1000, sched.timesteps.double(), atol=1e-3)
    assert_close(run_ours("flow_euler", process, "flow", x, times), theirs)
