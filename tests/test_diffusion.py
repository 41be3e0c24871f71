"""The spine's small contracts: prediction conversions, grids, losses, guidance."""

import math

import diffusers
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from inkwash.diffusion import EDM, PREDICTIONS, VP, Denoiser, Flow, TimeSampler, diffusion_loss, from_x0_eps, to_x0_eps
from inkwash.diffusion.process import process_from_dict
from inkwash.errors import UserError
from inkwash.sampling import GRIDS, Guided, make_times


@settings(max_examples=50, deadline=None)
@given(a=st.floats(0.05, 1.0), s=st.floats(0.05, 3.0), kind=st.sampled_from(PREDICTIONS))
def test_prediction_round_trip(a, s, kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    a, s = torch.tensor(a, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    x = a * x0 + s * eps
    out = from_x0_eps(x0, eps, a, s, kind)
    x0_b, eps_b = to_x0_eps(out, x, a, s, kind)
    assert torch.allclose(x0_b, x0, atol=1e-9) and torch.allclose(eps_b, eps, atol=1e-9)


def test_vp_tables_match_diffusers():
    for schedule, name in [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]:
        ours = VP(schedule=schedule, beta_start=0.00085, beta_end=0.012)
        theirs = diffusers.DDPMScheduler(beta_schedule=name, beta_start=0.00085, beta_end=0.012)
        assert torch.allclose(ours.alphas_cumprod.float(), theirs.alphas_cumprod, atol=1e-6)


@pytest.mark.parametrize("process", [VP(), VP(schedule="cosine"), Flow(shift=3.0), EDM()])
def test_ratio_inverse(process):
    t = process.t_from_u(torch.linspace(0.01, 0.99, 50))
    assert torch.allclose(process.t_from_ratio(process.ratio(t)), t, atol=1e-6)


@pytest.mark.parametrize("process", [VP(), Flow(shift=3.0), Flow(dynamic_shift=True), EDM()])
def test_every_grid_has_steps_plus_one_values_ending_clean(process):
    for name in GRIDS:
        opts = {"seq_len": 1024} if isinstance(process, Flow) and process.dynamic_shift and name == "shift" else {}
        try:
            t = make_times(process, 8, name, **opts)
        except UserError:
            continue  # a grid that does not apply to this process says so in one sentence
        assert len(t) == 9 and t[-1] == process.t_clean
        r = process.ratio(t)
        assert (r[1:] <= r[:-1]).all(), f"{name} is not decreasing in noise"


def test_process_round_trips_through_dict():
    for p in [VP(schedule="cosine"), Flow(shift=3.0, dynamic_shift=True), EDM(sigma_max=10.0)]:
        assert process_from_dict(p.to_dict()) == p


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, context=None, context_mask=None, y=None):
        out = self.w * x + 0.001 * t.reshape(-1, 1, 1, 1)
        return out if context is None else out + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_min_snr_weight_equals_x0_space_weighting(kind):
    """min-SNR-gamma on any target equals min(SNR, gamma) times the x0-space error (Hang et al. 2023)."""
    process, gamma = VP(), 5.0
    den = Denoiser(Lin(), process, kind)
    x0 = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    loss, t = diffusion_loss(den, x0, generator=torch.Generator().manual_seed(2), min_snr_gamma=gamma)
    g = torch.Generator().manual_seed(2)
    _ = TimeSampler().draw_u(16, g)
    eps = torch.randn(x0.shape, generator=g)
    a, s = (v.float().reshape(-1, 1, 1, 1) for v in process.alpha_sigma(t))
    x0_hat = den(a * x0 + s * eps, t)
    snr = (a / s).reshape(-1) ** 2
    expected = snr.clamp(max=gamma) * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected, rtol=1e-3)


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    u = TimeSampler("logit_normal").draw_u(20000, g)
    assert abs(u.mean() - 0.5) < 0.01 and 0.18 < u.std() < 0.23  # sigmoid(N(0,1)): std about 0.21
    shifted = TimeSampler("shifted").draw_u(20000, g, Flow(shift=3.0))
    assert abs(shifted.mean() - 0.5) > 0.1  # shift 3 pushes times toward noise
    with pytest.raises(UserError):
        TimeSampler("sometimes")


def test_time_sampling_shift_applies_to_any_method_and_follows_a_dynamic_process():
    from inkwash.diffusion.process import shift_time

    def draw(sampler, *args):
        return sampler.draw_u(64, torch.Generator().manual_seed(1), *args)

    plain = draw(TimeSampler("logit_normal"))
    assert torch.allclose(draw(TimeSampler("logit_normal", shift=3.0)), shift_time(plain, 3.0))
    flux = Flow(dynamic_shift=True)
    for tokens in (256, 1024, 4096):  # FLUX's mu: 0.5 at 256 tokens to 1.15 at 4096
        s = flux.shift_for(tokens)
        assert torch.allclose(draw(TimeSampler("logit_normal", shift="process"), flux, tokens), shift_time(plain, s))
    assert flux.shift_for(256) == pytest.approx(math.exp(0.5)) and flux.shift_for(4096) == pytest.approx(math.exp(1.15))
    assert torch.equal(draw(TimeSampler("logit_normal", shift="process"), VP()), plain)  # VP has no shift
    with pytest.raises(UserError, match="token count"):
        draw(TimeSampler(shift="process"), flux)
    with pytest.raises(UserError, match="positive number"):
        TimeSampler(shift=-1.0)


def test_guidance_is_one_batched_forward_and_matches_diffusers_rescale():
    calls = []
    net = Lin()
    inner = net.forward
    net.forward = lambda *a, **k: calls.append(a[0].shape[0]) or inner(*a, **k)
    process = VP()
    den = Denoiser(net, process, "v")
    cond = {"context": torch.ones(2, 3, 4), "context_mask": torch.ones(2, 3, dtype=torch.bool)}
    uncond = {"context": torch.zeros(2, 1, 4), "context_mask": torch.ones(2, 1, dtype=torch.bool)}
    x, t = torch.randn(2, 3, 4, 4), torch.tensor(500.0)
    x0 = Guided(den, cond, uncond, scale=7.5, rescale=0.7)(x, t)
    assert calls == [4]
    out_c, out_u = den.raw(x, t, **cond), den.raw(x, t, **uncond)
    cfg = out_u + 7.5 * (out_c - out_u)
    expected_out = rescale_noise_cfg(cfg, out_c, guidance_rescale=0.7)
    a, s = (v.float() for v in process.alpha_sigma(t))
    assert torch.allclose(x0, to_x0_eps(expected_out, x, a, s, "v")[0], atol=1e-5)
    assert torch.allclose(Guided(den, cond, uncond, scale=1.0)(x, t), den(x, t, **cond))
