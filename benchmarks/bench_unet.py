"""Benchmark: inkwash UNet vs diffusers UNet2DConditionModel, same config and weights, on this machine.

Prints images/s for an AdamW training step (fwd+bwd) and seconds for 20-step DDIM sampling, with ratios.
Usage: python benchmarks/bench_unet.py [--preset unet-s] [--batch 8] [--size 32] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_pair(preset: str, seed: int = 0):
    """(ours, theirs): an inkwash UNet and a diffusers UNet2DConditionModel holding identical weights."""
    from diffusers import UNet2DConditionModel

    from inkwash.formats.diffusers_unet import unet_config_to_diffusers, unet_from_diffusers
    from inkwash.models.registry import get_preset

    torch.manual_seed(seed)
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(get_preset(preset)))
    for p in theirs.parameters():  # diffusers zero-inits nothing we care about; make every path non-trivial
        torch.nn.init.normal_(p, std=0.02)
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}  # no shared storage: both get trained
    ours = unet_from_diffusers(dict(theirs.config), sd)
    return ours, theirs


def inputs(cfg, batch: int, size: int, tokens: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    mask = torch.arange(tokens)[None] < torch.randint(4, tokens + 1, (batch, 1), generator=g)
    return x, t, context, mask


def call(model, x, t, context, mask):
    if hasattr(model, "cfg"):
        return model(x, t, context=context, context_mask=mask)
    return model(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample


def train_step_times(models, batch, steps: int) -> list[list[float]]:
    """Seconds per AdamW step (eps-MSE against a fixed random target) for each model, alternating models
    step by step so background load on a shared machine hits both alike; the first step is a warm-up."""
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
    target = torch.randn_like(batch[0])
    times = [[] for _ in models]
    for i in range(steps + 1):
        for m, opt, ts in zip(models, opts, times):
            m.train()
            start = time.perf_counter()
            loss = torch.nn.functional.mse_loss(call(m, *batch), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:
                ts.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def sample_time(model, batch, steps: int = 20) -> float:
    """Seconds for a 20-step deterministic DDIM loop (diffusers side drives its DDIMScheduler; same math)."""
    from diffusers import DDIMScheduler

    model.eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=True)  # pixel space: x0 in [-1, 1]
    sched.set_timesteps(steps)
    abar = sched.alphas_cumprod.double()
    x, _, context, mask = batch
    start = time.perf_counter()
    if hasattr(model, "cfg"):
        times = sched.timesteps.tolist() + [None]
        for t, t_next in zip(times[:-1], times[1:]):
            a, a_next = abar[t], (abar[t_next] if t_next is not None else torch.tensor(1.0, dtype=torch.float64))
            eps = model(x, torch.full((x.shape[0],), float(t)), context=context, context_mask=mask)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            x = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps).float()
    else:
        for t in sched.timesteps:
            eps = call(model, x, t.expand(x.shape[0]), context, mask)
            x = sched.step(eps, t, x).prev_sample
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ours, theirs = build_pair(args.preset)
    batch = inputs(ours.cfg, args.batch, args.size)
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"preset {args.preset} ({n_params / 1e6:.2f}M params), batch {args.batch} x {args.size}px, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median train step, best of {args.rounds} samplings"
    )
    step_times = train_step_times((ours, theirs), batch, args.train_steps)
    train = [args.batch / statistics.median(ts) for ts in step_times]
    sample = [sample_time(m, batch) for m in (ours, theirs)]
    for _ in range(args.rounds - 1):  # alternate the models, keep each one's best
        sample = [min(s, sample_time(m, batch)) for s, m in zip(sample, (ours, theirs))]
    print(f"{'metric':<38}{'inkwash':>10}{'diffusers':>11}{'speed-up':>10}")
    rows = [("train step (img/s, higher is better)", *train, train[0] / train[1])]
    rows += [("sample 20 steps (s, lower is better)", *sample, sample[1] / sample[0])]
    for name, a, b, speedup in rows:
        print(f"{name:<38}{a:>10.2f}{b:>11.2f}{speedup:>9.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="unet-s")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=0)
    main(p.parse_args())
