"""Step caching (inkwash.accel.cache): First-Block Cache and TeaCache on DiT / PixArt / MMDiT, DeepCache on the U-Net.

Threshold 0 and interval 1 change nothing (bit for bit, under every sampler); large thresholds skip exactly as
counted; caches reset between generations; classifier-free guidance rows keep their own cache; and the
First-Block Cache makes the same decisions and outputs as diffusers' `apply_first_block_cache` on the same weights;
TeaCache decides as TeaCache4FLUX's loop does from the modulated input that attention really sees.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inkwash.accel.cache import (
    FLUX_RESCALE,
    DeepCache,
    FirstBlockCache,
    TeaCache,
    check_cache,
    flux_shaped,
    parse_cache,
    with_step_cache,
)
from inkwash.cli import main
from inkwash.diffusion import VP, Denoiser, Flow
from inkwash.errors import UserError
from inkwash.models.registry import build_model, get_preset
from inkwash.pipeline import Pipeline, Sampling, load
from inkwash.sampling import SAMPLERS, Guided, make_times
from inkwash.text import TextEncoderConfig, build_text_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = TextEncoderConfig.from_dict({"name": "small", "dim": 16, "layers": 1, "heads": 2, "max_length": 24})
NETS = {  # tiny networks, every weight random so every path matters
    "dit": dataclasses.replace(get_preset("dit-tiny"), depth=3, y_dim=16),
    "pixart": dataclasses.replace(get_preset("pixart-tiny"), depth=3, context_dim=16),
    "mmdit": dataclasses.replace(
        get_preset("mmdit-tiny"), in_channels=3, out_channels=3, depth=2, depth_single=2, context_dim=16, y_dim=16
    ),  # fmt: skip
    "unet": dataclasses.replace(get_preset("unet-tiny"), context_dim=16),
}


def lively(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.05))
    return net.eval()


def net_and_cond(arch: str, B: int = 2, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    cfg = NETS[arch]
    g = torch.Generator().manual_seed(seed + 1)
    cond = {}
    if getattr(cfg, "context_dim", 0):
        cond["context"] = torch.randn(B, 5, cfg.context_dim, generator=g)
        cond["context_mask"] = torch.tensor([[True] * 5, [True] * 3 + [False] * 2] * (B // 2) + [[True] * 5] * (B % 2))
    if getattr(cfg, "y_dim", 0):
        cond["y"] = torch.randn(B, cfg.y_dim, generator=g)
    return lively(build_model(cfg), seed), cond


def noise(B: int = 2, side: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randn(B, 3, side, side, generator=torch.Generator().manual_seed(seed))


def sample(den: Denoiser, cond: dict, uncond: dict | None, sampler: str = "euler", steps: int = 6, process=None):
    process = process or den.process
    times = make_times(process, steps, None)
    x = process.init_noise((cond_rows(cond), 3, 8, 8), torch.Generator().manual_seed(5), times[0])
    model = Guided(den, cond, uncond, scale=3.0)
    with torch.no_grad():
        return SAMPLERS[sampler](model, x, times, process=process, generator=torch.Generator().manual_seed(7))


def cond_rows(cond: dict) -> int:
    return next(iter(cond.values())).shape[0]


def halves(cond: dict) -> tuple[dict, dict]:
    """Two prompts' conditioning, and another two as the unconditional input."""
    return {k: v[:2] for k, v in cond.items()}, {k: v[2:] for k, v in cond.items()}


# ---------------------------------------------------------------------------- parsing and refusals


def test_parse_gives_canonical_specs_and_one_clear_error():
    assert str(parse_cache("fbcache:0.080")) == "fbcache:0.08"
    assert str(parse_cache(" FBCache:1e-1 ")) == "fbcache:0.1"
    assert str(parse_cache("deepcache:3")) == "deepcache:3" and parse_cache("deepcache:3").branch == 1
    assert str(parse_cache("deepcache:3:0")) == "deepcache:3:0"
    assert str(parse_cache("TeaCache:0.250")) == "teacache:0.25" and parse_cache("teacache:0.25").threshold == 0.25
    assert parse_cache(None) is None and parse_cache("") is None and parse_cache("none") is None
    bad = ["fbcache", "fbcache:-1", "fbcache:x", "deepcache:0", "deepcache:2.5", "teacache", "tea:0.1", "deepcache:3:"]
    for text in bad:
        with pytest.raises(UserError, match="not a step cache inkwash knows: use fbcache:THRESHOLD or teacache"):
            parse_cache(text)


def test_a_cache_for_another_architecture_is_refused():
    unet, _ = net_and_cond("unet")
    dit, _ = net_and_cond("dit")
    with pytest.raises(UserError, match="fbcache needs a transformer .* not a UNet"):
        check_cache(unet, "fbcache:0.1")
    with pytest.raises(UserError, match="teacache needs a transformer .* not a UNet"):
        check_cache(unet, "teacache:0.1")
    with pytest.raises(UserError, match="deepcache needs a U-Net, not a DiT"):
        check_cache(dit, "deepcache:2")
    with pytest.raises(UserError, match="deepcache branch 9 is deeper than this U-Net's 3 down blocks"):
        check_cache(unet, "deepcache:2:9")
    with pytest.raises(UserError, match="fbcache needs a transformer"):  # the server's stand-in network too
        with_step_cache(Denoiser(lambda x, t, **c: x, VP()), "fbcache:0.1")


# ---------------------------------------------------------------------------- no-op settings are exact


@pytest.mark.parametrize(
    "arch, spec",
    [("dit", "fbcache:0"), ("pixart", "fbcache:0"), ("mmdit", "fbcache:0"), ("unet", "deepcache:1"),
     ("dit", "teacache:0"), ("pixart", "teacache:0"), ("mmdit", "teacache:0")],
)  # fmt: skip
def test_threshold_zero_and_interval_one_are_bit_identical(arch, spec):
    net, cond = net_and_cond(arch, B=4)
    c, u = halves(cond)
    den = Denoiser(net, VP(), "eps")
    ref = sample(den, c, u)
    cached = with_step_cache(den, spec)
    out = sample(cached, c, u)
    assert torch.equal(out, ref)
    assert cached.net.log == [4] * 6  # every call ran every row (cond + uncond) through the whole network
    assert not hasattr(net, "view") and type(net).forward is type(cached.net.net).forward  # the net is untouched


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_is_unchanged_by_a_no_op_cache_and_runs_with_a_real_one(sampler):
    process = Flow() if sampler == "flow_euler" else VP()
    cases = [
        ("dit", "fbcache:5", "fbcache:0"),
        ("unet", "deepcache:2", "deepcache:1"),
        ("pixart", "teacache:5", "teacache:0"),
    ]
    for arch, spec, no_op in cases:
        net, cond = net_and_cond(arch, B=4)
        c, u = halves(cond)
        den = Denoiser(net, process, "flow" if sampler == "flow_euler" else "eps")
        ref = sample(den, c, u, sampler, steps=4)
        assert torch.equal(sample(with_step_cache(den, no_op), c, u, sampler, steps=4), ref)
        cached = with_step_cache(den, spec)
        out = sample(cached, c, u, sampler, steps=4)
        calls = 8 if sampler == "heun" else 4  # Heun evaluates twice per step (not after the last)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert len(cached.net.log) in (calls, calls - 1) and cached.net.full_rows < 4 * len(cached.net.log)


# ---------------------------------------------------------------------------- skipping is what it says


@pytest.mark.parametrize("arch", ["dit", "pixart", "mmdit"])
def test_fbcache_skips_when_the_first_block_barely_moves(arch):
    net, cond = net_and_cond(arch)
    cache = FirstBlockCache(net, threshold=1e9)
    last = net.single_blocks[-1] if arch == "mmdit" else net.blocks[-1]
    runs = []
    last.register_forward_hook(lambda *a: runs.append(1))
    x, t = noise(), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        full = net(x, t, **cond)
        out = [cache(x + 0.1 * k * noise(seed=k), t - 10 * k, **cond) for k in range(5)]
        again = cache(x + 0.4 * noise(seed=4), t - 40, **cond)  # same input as the last call: nothing to add
    assert cache.log == [2, 0, 0, 0, 0, 0] and len(runs) == 2  # net(...) once, the cache's first call once
    assert torch.equal(out[0], full)
    assert (out[1] - out[0]).abs().max() > 1e-3  # skipped calls still follow the input through the first block
    assert torch.allclose(again, out[4], atol=1e-6)


def test_fbcache_decides_per_row_from_the_change_since_the_last_full_call():
    net, cond = net_and_cond("dit")
    x, t, thr = noise(), torch.tensor([500.0, 500.0]), 0.05
    probe = {}
    net.blocks[0].register_forward_hook(lambda m, a, out: probe.update(r=(out - a[0]).flatten(1)))
    cache = FirstBlockCache(net, threshold=thr)
    expected = []
    with torch.no_grad():
        cache(x, t, **cond)
        ref = probe["r"]
        for k in range(1, 6):  # row 0 drifts slowly, row 1 fast
            step = torch.stack([0.01 * k * noise(seed=9)[0], 0.3 * k * noise(seed=9)[1]])
            cache(x + step, t, **cond)
            change = (probe["r"] - ref).abs().mean(1) / ref.abs().mean(1)  # against each row's last full call
            rows = change >= thr
            expected.append(int(rows.sum()))
            ref = torch.where(rows[:, None], probe["r"], ref)
    assert cache.log[1:] == expected and 1 in expected  # mixed calls: one row skips while the other computes


@pytest.mark.parametrize("arch", ["dit", "pixart", "mmdit"])
def test_teacache_sums_the_change_of_what_attention_sees_and_then_skips_every_block(arch):
    """TeaCache4FLUX's loop, per row, in numpy, on the modulated input captured where the first block's attention
    (MMDiT: the image stream's QKV projection) receives it in an uncached run; with FLUX's polynomial on the MMDiT."""
    net, cond = net_and_cond(arch)
    seen, x0, eps = [], noise(seed=1), noise(seed=2)
    receiver = net.double_blocks[0].img_attn.qkv if arch == "mmdit" else net.blocks[0].attn
    receiver.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    speed = torch.tensor([0.01, 0.08])[:, None, None, None]  # row 0 drifts slowly, row 1 fast
    calls = [(x0 + (1 - speed * k) * eps, torch.tensor([500.0, 500.0])) for k in range(10)]  # t fixed: see _trajectory
    with torch.no_grad():
        ref = [net(x, t, **cond) for x, t in calls]
    poly = np.poly1d(FLUX_RESCALE if arch == "mmdit" else [1.0, 0.0])
    rel = [((m - p).abs().mean((1, 2)) / p.abs().mean((1, 2))).double().numpy() for p, m in zip(seen, seen[1:])]
    thr = float(np.median(np.concatenate([poly(r) for r in rel]))) * 2.5
    expected, acc = [np.array([True, True])], np.zeros(2)
    for r in rel:
        acc = acc + poly(r)
        expected.append(acc >= thr)
        acc[expected[-1]] = 0.0
    cache = TeaCache(net, thr)
    if arch == "mmdit":
        assert cache.rescale is None and not flux_shaped(net)  # a tiny MMDiT gets the raw change by default
        cache.rescale = FLUX_RESCALE
    last = net.single_blocks[-1] if arch == "mmdit" else net.blocks[-1]
    runs = []
    last.register_forward_hook(lambda m, a, out: runs.append(out.shape[0]))
    with torch.no_grad():
        outs = [cache(x, t, **cond) for x, t in calls]
    assert cache.log == [int(e.sum()) for e in expected]
    assert runs == [n for n in cache.log if n]  # the last block ran for exactly those rows
    assert 1 in cache.log and 0 in cache.log  # mixed calls and whole skips both happen
    for out, r, e in zip(outs, ref, expected):
        assert torch.allclose(out[e], r[e], atol=1e-5)  # computed rows are the network's output
        assert not torch.allclose(out[~e], r[~e], atol=1e-4) if (~e).any() else True  # skipped ones are not


@pytest.mark.parametrize("arch, spec", [("mmdit", "fbcache:0.03"), ("dit", "teacache:0.05")])
def test_a_compiled_transformer_keeps_its_blocks_compiled_under_a_cache(arch, spec):
    """--fast compiles the network; a cache runs it block by block, so it compiles each block (same backend) and
    decides and computes as on the plain network, mixed calls (a smaller batch of rows) included."""
    from torch._dynamo.eval_frame import OptimizedModule

    from inkwash.accel.cache import make_cache
    from inkwash.accel.fast import Plan, apply

    net, cond = net_and_cond(arch)
    plain = make_cache(net, spec)
    compiled = make_cache(apply(net, Plan(compile=True), backend="aot_eager"), spec)
    chain = compiled.view.double_blocks[0] if arch == "mmdit" else compiled.view.blocks[0]
    blocks = [chain.first, *(chain.singles if arch == "mmdit" else chain.rest_blocks)]
    plain_chain = plain.view.double_blocks[0] if arch == "mmdit" else plain.view.blocks[0]
    assert all(isinstance(b, OptimizedModule) for b in blocks) and not isinstance(plain_chain.first, OptimizedModule)
    x0, eps = noise(seed=1), noise(seed=2)
    speed = torch.tensor([0.01, 0.08])[:, None, None, None]
    with torch.no_grad():
        for k in range(8):
            x, t = x0 + (1 - speed * k) * eps, torch.tensor([500.0, 500.0])
            assert torch.allclose(compiled(x, t, **cond), plain(x, t, **cond), atol=1e-5)
    assert compiled.log == plain.log and 1 in plain.log and 0 < sum(plain.log) < 16


def test_flux_models_get_teacaches_flux_polynomial():
    with torch.device("meta"):
        meta = build_model(get_preset("flux-schnell"))
    assert flux_shaped(meta) and TeaCache(meta, 0.25).rescale == FLUX_RESCALE
    assert np.poly1d(FLUX_RESCALE)(0.1) == pytest.approx(0.2068475, abs=1e-6)  # 498.65e-4 - 283.78e-3 + 55.86e-2 - ...


def test_deepcache_runs_the_deep_part_every_interval_and_reuses_it_exactly():
    net, cond = net_and_cond("unet")
    cache = DeepCache(net, interval=3, branch=1)
    mid = []
    net.mid.res[0].register_forward_hook(lambda *a: mid.append(1))
    x, t = noise(), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        full = net(x, t, **cond)
        first = cache(x, t, **cond)
        same = cache(x, t, **cond)  # a shallow call on the very input of the full one: the same numbers
        moved = [cache(x + 0.1 * k * noise(seed=k), t - k, **cond) for k in range(1, 6)]
    assert torch.equal(first, full) and torch.equal(same, full)
    assert cache.log == [2, 0, 0, 2, 0, 0, 2] and len(mid) == 1 + 3
    assert (moved[0] - full).abs().max() > 1e-5  # the shallow branch does follow the input
    shallow = DeepCache(net, interval=2, branch=0)
    with torch.no_grad():
        shallow(x, t, **cond)
        assert torch.equal(shallow(x, t, **cond), full)  # branch 0: only the input conv and the last up block


# ---------------------------------------------------------------------------- resets and guidance


def test_the_cache_resets_between_generations():
    net, cond = net_and_cond("dit", B=4)
    c, u = halves(cond)
    cached = with_step_cache(Denoiser(net, VP(), "eps"), "fbcache:1")
    first = sample(cached, c, u, steps=8)
    log = list(cached.net.log)
    second = sample(cached, c, u, steps=8)  # the same wrapper again: noise goes back up, so the cache resets
    assert torch.equal(first, second) and cached.net.log == log and len(log) == 8 and 0 < sum(log) < 32
    with torch.no_grad():
        cached.net(noise(B=2), torch.tensor([10.0, 10.0]), **c)  # another batch shape: reset too
    assert cached.net.log == [2]


def test_guided_rows_keep_their_own_cache():
    """cond and uncond rows in one batched forward give what two separate caches (one per half) give."""
    net, cond = net_and_cond("mmdit", B=4)
    c, u = halves(cond)
    den = Denoiser(net, Flow(), "flow")
    batched = with_step_cache(den, "fbcache:1")
    out = sample(batched, c, u, "flow_euler", steps=8)
    parts = [with_step_cache(den, "fbcache:1") for _ in range(2)]

    class TwoCaches:  # the guided denoiser's interface, each half through its own cache
        process, prediction = den.process, den.prediction

        def raw(self, x, t, **both):
            xc, xu = x.chunk(2)
            tc, tu = (t, t) if t.dim() == 0 else t.chunk(2)
            return torch.cat([parts[0].raw(xc, tc, **c), parts[1].raw(xu, tu, **u)])

    ref = sample(TwoCaches(), c, u, "flow_euler", steps=8, process=den.process)
    assert torch.allclose(out, ref, atol=1e-5)
    per_half = [a + b for a, b in zip(parts[0].net.log, parts[1].net.log)]
    assert batched.net.log == per_half and 0 < sum(per_half) < 4 * 8


# ---------------------------------------------------------------------------- pipeline and CLI


def tiny_pipeline(arch: str) -> Pipeline:
    encoder = build_text_encoder(TEXT).eval()
    cfg = NETS[arch]
    return Pipeline(lively(build_model(cfg)), cfg, VP(), "eps", encoder, 8, 3, Sampling(steps=4, guidance=3.0), "t")


def test_pipeline_option_records_and_validates_the_cache():
    pipe = tiny_pipeline("dit")
    ref = pipe.generate(["a red circle", "a blue square"], seed=1)
    assert torch.equal(pipe.generate(["a red circle", "a blue square"], seed=1, cache="fbcache:0"), ref)
    a = pipe.generate(["a red circle", "a blue square"], seed=1, cache="fbcache:0.5")
    b = pipe.generate(["a red circle", "a blue square"], seed=1, cache="fbcache:0.5")
    assert torch.equal(a, b)  # a fresh cache per run
    img = pipe("a red circle", cache="fbcache:0.50")[0]
    assert ", Cache: fbcache:0.5," in img.info["parameters"]
    assert "Cache" not in pipe("a red circle")[0].info["parameters"]
    with pytest.raises(UserError, match="deepcache needs a U-Net"):
        pipe.generate("a red circle", cache="deepcache:2")


def test_cli_takes_cache_and_refuses_a_bad_one(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle", "--steps", "3", "--cache", "deepcache:2", "-o", str(out)]) == 0
    from PIL import Image

    assert "Cache: deepcache:2" in Image.open(out).info["parameters"]
    capsys.readouterr()
    assert main(["generate", "a red circle", "--cache", "fbcache:0.1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inkwash: error: Fbcache needs a transformer") and err.count("\n") == 1
    assert main(["generate", "a red circle", "--cache", "deepcache", "-o", str(out)]) == 2
    assert "is not a step cache inkwash knows" in capsys.readouterr().err


def test_eval_records_the_cache_in_the_run_identity(tmp_path):
    import json

    from inkwash.eval.runner import EvalConfig, evaluate

    pipe = load()
    cfg = EvalConfig(steps=2, per_prompt=1, tasks=("single_object",), limit=1, fid_images=0, cache="deepcache:2")
    evaluate(pipe, tmp_path / "run", cfg, progress=False, report=False)
    assert json.loads((tmp_path / "run" / "identity.json").read_text())["cache"] == "deepcache:2"
    with pytest.raises(UserError, match="other settings \\(cache\\)"):
        evaluate(pipe, tmp_path / "run", dataclasses.replace(cfg, cache="deepcache:3"), progress=False, report=False)


# ---------------------------------------------------------------------------- diffusers as the oracle

diffusers = pytest.importorskip("diffusers")
hooks = pytest.importorskip("diffusers.hooks")


def _with_fbc(model, threshold: float):
    hooks.apply_first_block_cache(model, hooks.FirstBlockCacheConfig(threshold=threshold))
    return model


def _run(model, calls) -> list[torch.Tensor]:
    """diffusers' model through a list of calls, in one cache context (one generation's conditional calls)."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context  # what CacheMixin.cache_context does

    _set_cache_context(model, CacheContext("cond"))
    try:
        with torch.no_grad():
            return [call(model) for call in calls]
    finally:
        _set_cache_context(model, None)


def _trajectory(n: int, x0: torch.Tensor, t0: float, seed: int = 11) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A sampling-like sequence of inputs: noise shrinking towards x0 in uneven steps. The time stays put: a
    network with random weights reacts to any change of t as much as to a new image."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    levels = [1.0, 0.97, 0.95, 0.9, 0.88, 0.8, 0.78, 0.6, 0.58, 0.3][:n]
    return [(x0 + s * eps, torch.tensor([t0])) for s in levels]


def _diffusers_dit():
    from inkwash.formats import diffusers_dit as conv

    torch.manual_seed(0)
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        sample_size=8,
        num_embeds_ada_norm=10,
    )
    lively(theirs)
    sd = theirs.state_dict()  # diffusers keeps a copy of the time and class embedders per block: tie them
    with torch.no_grad():
        for k, v in sd.items():
            if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                v.copy_(sd["transformer_blocks.0." + k.split(".", 2)[2]])
    return theirs, conv.dit_from_diffusers(dict(theirs.config), theirs.state_dict()).eval()


@pytest.mark.parametrize("threshold", [0.05, 0.2])
def test_fbcache_matches_diffusers_on_dit(threshold):
    theirs, ours = _diffusers_dit()
    label = torch.tensor([3])
    steps = _trajectory(10, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), 900.0)
    tail = []
    theirs.transformer_blocks[-1].attn1.register_forward_hook(lambda *a: tail.append(1))
    ref = _run(_with_fbc(theirs, threshold), [lambda m, x=x, t=t: m(x, t, class_labels=label).sample
                                              for x, t in steps])  # fmt: skip
    cache = FirstBlockCache(ours, threshold)
    with torch.no_grad():
        out = [cache(x, t, y=label) for x, t in steps]
    print(f"threshold {threshold}: ours computed {cache.log}, diffusers ran the tail {len(tail)} times")
    assert sum(cache.log) == len(tail) and 1 < len(tail) < len(steps)
    assert max((a - b).abs().max().item() for a, b in zip(out, ref)) < 1e-4


def test_fbcache_matches_diffusers_on_flux():
    from inkwash.formats.diffusers_flux import flux_config_to_diffusers, flux_from_diffusers

    cfg = dataclasses.replace(get_preset("mmdit-tiny"), depth=2, depth_single=2)
    torch.manual_seed(0)
    theirs = lively(diffusers.FluxTransformer2DModel(**flux_config_to_diffusers(cfg)))
    ours = flux_from_diffusers(dict(theirs.config), theirs.state_dict()).eval()
    g = torch.Generator().manual_seed(4)
    ctx, y = torch.randn(1, 5, cfg.context_dim, generator=g), torch.randn(1, cfg.y_dim, generator=g)
    ids = torch.zeros(4, 4, 3)
    ids[..., 1] += torch.arange(4)[:, None]
    ids[..., 2] += torch.arange(4)[None, :]
    steps = _trajectory(10, torch.randn(1, 4, 8, 8, generator=g), 1000.0)

    def pack(x):  # diffusers' FluxPipeline._pack_latents
        return x.view(1, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 16)

    def unpack(x):
        return x.view(1, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 4, 8, 8)

    def call(x, t):
        return lambda m: unpack(
            m(pack(x), ctx, y, t / 1000, img_ids=ids.reshape(16, 3), txt_ids=torch.zeros(5, 3)).sample
        )

    tail = []
    theirs.single_transformer_blocks[-1].proj_out.register_forward_hook(lambda *a: tail.append(1))
    ref = _run(_with_fbc(theirs, 0.05), [call(x, t) for x, t in steps])
    cache = FirstBlockCache(ours, 0.05)
    with torch.no_grad():
        out = [cache(x, t, context=ctx, y=y) for x, t in steps]
    print(f"ours computed {cache.log}, diffusers ran the tail {len(tail)} times")
    assert sum(cache.log) == len(tail) and 1 < len(tail) < len(steps)
    assert max((a - b).abs().max().item() for a, b in zip(out, ref)) < 1e-4
