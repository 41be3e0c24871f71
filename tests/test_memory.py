"""Memory: weight storage precision (bf16, fp16, fp8 with scales), model and sequential offload (placement checked on
the CPU with the meta device standing in for a GPU), tiled VAE decode/encode (diffusers' tiling as the oracle)."""

import dataclasses
import sys

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inkwash.accel.offload import (
    FP8,
    ModelOffload,
    SequentialOffload,
    _owners,
    cast_storage,
    fp8_weights,
    quantize_fp8,
    weight_bytes,
)
from inkwash.cli import main
from inkwash.data.shapes import ShapesDataset
from inkwash.diffusion import VP
from inkwash.errors import UserError
from inkwash.formats.diffusers_vae import vae_from_diffusers
from inkwash.models.registry import build_model, get_preset
from inkwash.models.vae import VAE, VAEConfig
from inkwash.pipeline import ASSETS, Pipeline, Sampling, load, load_vae
from inkwash.text import TextEncoderConfig, build_text_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.1)
    return module


def tiny_latent_pipe() -> Pipeline:
    """Text encoder, U-Net and VAE, every weight random: a latent pipeline with all three components."""
    torch.manual_seed(0)
    enc = build_text_encoder(TextEncoderConfig(name="small", dim=32, layers=1, heads=2))
    cfg = dataclasses.replace(get_preset("unet-tiny"), in_channels=4, out_channels=4, context_dim=32)
    net = _randomise(build_model(cfg))
    net.conv_out.weight.data.mul_(0.3)
    vae = _randomise(VAE(VAEConfig(channels=(8, 16), layers_per_block=1, latent_channels=4, norm_groups=4)))
    return Pipeline(net.eval(), cfg, VP(), "x0", enc.eval(), 16, 4, Sampling(steps=2, guidance=2.0), vae=vae.eval())


# --- fp8 storage -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["channel", "tensor"])
def test_fp8_maps_the_largest_magnitude_to_448_and_rounds_to_3_mantissa_bits(scale):
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-4, 1, 16)[:, None, None, None]  # channels of very different size
    q, s = quantize_fp8(w, scale)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert s.shape == ((16, 1, 1, 1) if scale == "channel" else (1, 1, 1, 1))
    top = q.float().abs().amax(dim=(1, 2, 3) if scale == "channel" else None)
    assert torch.all(top == 448)
    # e4m3: 3 mantissa bits, so a normal value rounds within 2^-4 of itself; subnormals are spaced 2^-9 apart
    err = (q.float() * s - w).abs()
    assert torch.all(err <= w.abs() / 16 + s * 2.0**-10 + 1e-12)
    if scale == "channel":  # the small channels keep their precision only with their own scale
        q1, s1 = quantize_fp8(w, "tensor")
        shared = (q1.float() * s1 - w).abs()
        rel = lambda e: (e[:4] / w[:4].abs()).mean()  # noqa: E731  channels 1e-5 to 1e-4 of the largest
        assert rel(err) < 0.04 and rel(shared) > 0.2


def test_fp8_layers_compute_with_their_dequantized_weight_and_keep_no_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 5), nn.LayerNorm(5))
    x = torch.randn(2, 3, 4, 4)
    ref = model(x)
    conv_w, lin_w = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    assert fp8_weights(model) == 2
    assert "weight" not in dict(model.named_parameters()) and model[0].weight.device.type == "meta"
    assert model[3].weight.dtype == torch.float32  # the norm is not converted
    deq = [m.weight_fp8.float() * m.weight_scale for m in (model[0], model[2])]
    want = model[3](F.linear(F.conv2d(x, deq[0], model[0].bias, padding=1).flatten(1), deq[1], model[2].bias))
    out = model(x)
    assert torch.equal(out, want)
    assert model[0].weight.is_meta and model[2].weight.is_meta  # the upcast copy is dropped
    assert model[2].weight.dtype == torch.float32 and model[2].weight.shape == lin_w.shape  # a placeholder
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.1)
    assert (deq[0] - conv_w).abs().max() < conv_w.abs().max() / 16 and (deq[1] - lin_w).abs().max() < lin_w.abs().max()
    assert weight_bytes(model) < weight_bytes(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8 * 16, 5))) / 3


def test_fp8_upcasts_to_the_autocast_precision():
    lin = nn.Linear(4, 4)
    fp8_weights(lin)
    seen = []
    lin.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))  # runs after the upcast hook
    lin(torch.randn(1, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(torch.randn(1, 4)).dtype == torch.bfloat16
    assert seen == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype, atol", [("bf16", 0.1), ("fp16", 0.02), ("fp8", 0.15)])
def test_storage_precisions_generate_nearly_the_fp32_images_in_less_memory(dtype, atol):
    pipe = tiny_latent_pipe()
    ref = pipe.generate("a red circle", seed=1)
    before = {name: weight_bytes(m) for name, m in pipe.components().items()}
    pipe.set_memory(dtype=dtype)
    out = pipe.generate("a red circle", seed=1)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().mean() < atol / 4 and (out - ref).abs().max() < 4 * atol
    after = {name: weight_bytes(m) for name, m in pipe.components().items()}
    if dtype == "fp8":  # Linear and Conv weights at 1 byte; the VAE keeps fp32
        assert after["denoiser"] < 0.3 * before["denoiser"] and after["vae"] == before["vae"]
    else:
        assert after == {k: v // 2 for k, v in before.items()}
        assert next(pipe.net.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def test_weight_dtype_and_precision_must_agree():
    pipe = tiny_latent_pipe().set_memory(dtype="fp16")
    with pytest.raises(UserError, match="fp16 weights compute in fp16"):
        pipe.generate("a red circle", precision="bf16")
    with pytest.raises(UserError, match="already stored in fp16"):
        pipe.set_memory(dtype="bf16")
    with pytest.raises(UserError, match="unknown weight dtype"):
        tiny_latent_pipe().set_memory(dtype="int4")
    bf = tiny_latent_pipe().set_memory(dtype="fp8")
    assert bf.generate("a red circle", precision="bf16").dtype == torch.float32  # fp8 under bf16 autocast: fine


# --- offload: where every weight is, while each component runs ------------------------------------------------


def _where(pipe: Pipeline) -> dict[str, set[str]]:
    return {name: {t.device.type for t in [*m.parameters(), *m.buffers()]} for name, m in pipe.components().items()}


def test_model_offload_puts_one_component_at_a_time_on_the_device():
    pipe = tiny_latent_pipe()
    pipe.set_memory(offload_mode="model", device="meta")  # meta: a device with no memory, standing in for a GPU
    assert _where(pipe) == {"text_encoder": {"cpu"}, "denoiser": {"cpu"}, "vae": {"cpu"}}
    seen, first = [], set()

    def record(m, name):  # each module's first call (checking every call is slow)
        if id(m) not in first:
            first.add(id(m))
            seen.append((name, _where(pipe)))

    for name, module in pipe.components().items():
        for m in module.modules():  # registered after the offload's hooks, so these see the placement in force
            m.register_forward_pre_hook(lambda m, _, name=name: record(m, name))
    out = pipe.generate("a red circle", n=2)
    assert out.device.type == "meta" and out.shape == (2, 3, 16, 16)
    order = [name for i, (name, _) in enumerate(seen) if i == 0 or seen[i - 1][0] != name]
    assert order == ["text_encoder", "denoiser", "vae"]  # once each: cond and uncond encoded before sampling
    for name, where in seen:
        assert where == {k: {"meta" if k == name else "cpu"} for k in where}
    assert _where(pipe) == {"text_encoder": {"cpu"}, "denoiser": {"cpu"}, "vae": {"cpu"}}  # released after the call


def test_sequential_offload_puts_only_the_running_modules_weights_on_the_device():
    pipe = tiny_latent_pipe()
    pipe.set_memory(offload_mode="sequential", device="meta")
    owners = [m for c in pipe.components().values() for m in _owners(c)]
    running, checks = [], []

    def on_device(m):
        return {t.device.type for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]} == {"meta"}

    first = set()

    def pre(m, *_):
        running.append(m)
        if id(m) not in first:  # each module's first call (checking every call is slow)
            first.add(id(m))
            checks.append({id(o) for o in owners if on_device(o)} == {id(r) for r in running})

    def post(*_):
        running.pop()

    for m in owners:  # after the offload's own hooks: its pre-hook loads first, its post-hook unloads first
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    out = pipe.generate("a red circle")
    assert out.device.type == "meta" and out.shape == (1, 3, 16, 16)
    unused = {id(m) for m in [*pipe.vae.encoder.modules(), pipe.vae.quant_conv]}  # generating only decodes
    assert len(checks) == len([o for o in owners if id(o) not in unused]) and all(checks)  # each alone on the device
    assert not running and not any(on_device(o) for o in owners)


@pytest.mark.parametrize("mode", ["model", "sequential"])
@pytest.mark.parametrize("dtype", ["fp32", "fp8"])
def test_offload_changes_no_image(mode, dtype):
    ref = tiny_latent_pipe().set_memory(dtype=dtype).generate("a blue square", n=2, seed=3)
    pipe = tiny_latent_pipe().set_memory(dtype=dtype, offload_mode=mode, device="cpu")
    assert torch.equal(pipe.generate("a blue square", n=2, seed=3), ref)
    pipe.set_memory(offload_mode="none")  # hooks off again: still the same
    assert torch.equal(pipe.generate("a blue square", n=2, seed=3), ref)


def test_sequential_offload_with_fp8_on_meta_upcasts_on_the_device():
    lin = nn.Linear(4, 4)
    fp8_weights(lin)
    SequentialOffload([lin], "meta")
    seen = []
    lin.register_forward_pre_hook(lambda m, a: seen.append((m.weight.device.type, m.weight_fp8.device.type)))
    assert lin(torch.randn(2, 4)).device.type == "meta"  # the CPU input was moved
    assert seen == [("meta", "meta")] and lin.weight_fp8.device.type == "cpu"


def test_model_offload_release_and_remove():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    off = ModelOffload({"a": a, "b": b}, "meta")
    a(torch.zeros(1, 2, device="meta"))
    assert off.active == "a" and a.weight.device.type == "meta" and b.weight.device.type == "cpu"
    b(torch.zeros(1, 2, device="meta"))
    assert off.active == "b" and a.weight.device.type == "cpu"
    c = nn.Linear(2, 2)
    other = ModelOffload({"c": c}, "meta")  # another pipeline's (a refiner's) placement on the same device
    c(torch.zeros(1, 2, device="meta"))
    assert other.active == "c" and off.active is None and b.weight.device.type == "cpu"
    off.remove()
    assert off.active is None and b.weight.device.type == "cpu"
    a(torch.zeros(1, 2))  # no hooks left
    assert a.weight.device.type == "cpu"


# --- VAE tiling ---------------------------------------------------------------------------------------------------


def _diffusers_vae():
    sys.path.insert(0, str(ASSETS.parents[1] / "tests"))
    from test_vae import _theirs

    theirs = _theirs("f2-l1-z4-quant")
    theirs.enable_tiling()
    theirs.tile_sample_min_size, theirs.tile_latent_min_size = 32, 16
    return vae_from_diffusers(dict(theirs.config), theirs.state_dict()).eval(), theirs


@torch.no_grad()
@pytest.mark.parametrize("hw", [(24, 28), (17, 33), (16, 16)])
def test_diffusers_tiling_decodes_and_encodes_as_diffusers_does(hw):
    ours, theirs = _diffusers_vae()
    assert isinstance(theirs, diffusers.AutoencoderKL)
    torch.manual_seed(1)
    z = torch.randn(1, 4, *hw)
    want = theirs.decode(z).sample
    got = ours.decode_latent(ours.to_latent(z), tile=16, tiling="diffusers")
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x = torch.randn(1, 3, 2 * hw[0], 2 * hw[1])
    mean = theirs.encode(x).latent_dist.mean
    got = ours.from_latent(ours.encode_latent(x, tile=32, tiling="diffusers"))
    torch.testing.assert_close(got, mean, atol=1e-5, rtol=1e-5)
    if max(hw) > 16:  # tiling really happened: the untiled decode differs
        assert (ours.decode(z) - want).abs().max() > 1e-3


@torch.no_grad()
def test_tiled_decode_of_a_trained_vae_is_close_to_the_untiled_one():
    vae = load_vae(ASSETS / "shapes-vae-f4.safetensors")
    x, _, _ = ShapesDataset(size=96, seed=3).batch([0])
    latent = vae.encode_latent(x)  # [1, 4, 24, 24]
    full = vae.decode_latent(latent).clamp(-1, 1)

    def psnr(a, b):
        return 10 * torch.log10(4 / (a.clamp(-1, 1) - b).pow(2).mean())

    assert psnr(full, x) > 36  # the autoencoder's own error, for scale
    for tiling in ("ramps", "diffusers"):  # 64 px tiles and their seams
        assert psnr(vae.decode_latent(latent, tile=16, tiling=tiling), full) > 40
        assert psnr(vae.decode_latent(vae.encode_latent(x, tile=64, tiling=tiling)), full) > 40
    with pytest.raises(UserError, match="unknown VAE tiling"):
        vae.decode_latent(latent, tile=16, tiling="checkerboard")


def test_pipeline_tiles_its_decode_and_refuses_tiling_without_a_vae(lively_model_file):
    pipe = tiny_latent_pipe()
    calls = []
    pipe.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape[-2:])))
    full = pipe.generate("a red circle", size=32)
    pipe.set_memory(vae_tile=8)
    tiled = pipe.generate("a red circle", size=32)
    assert calls[0] == (16, 16) and set(calls[1:]) == {(8, 8)} and len(calls) == 1 + 9  # starts 0, 6, 8 per side
    assert tiled.shape == full.shape and (tiled - full).abs().mean() < 0.2
    with pytest.raises(UserError, match="no autoencoder"):
        load(lively_model_file).set_memory(vae_tile=8)


# --- CLI ------------------------------------------------------------------------------------------------------


def test_cli_generates_with_memory_options(tmp_path, lively_model_file, capsys):
    out = tmp_path / "a.png"
    base = ["generate", "a red circle", "--model", str(lively_model_file), "--steps", "2"]
    assert main([*base, "-o", str(out)]) == 0
    ref = out.read_bytes()
    assert main([*base, "--offload", "sequential", "-o", str(out)]) == 0
    assert out.read_bytes() == ref
    assert main([*base, "--dtype", "bf16", "--offload", "model", "-o", str(tmp_path / "b.png")]) == 0
    capsys.readouterr()
    assert main([*base, "--dtype", "fp16", "--precision", "bf16"]) == 2
    assert "fp16 weights compute in fp16" in capsys.readouterr().err.lower()
    assert main([*base, "--vae-tiling"]) == 2
    assert "no autoencoder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert main([*base, "--device", "tpu9"]) == 2
    assert "is not available here" in capsys.readouterr().err


def test_cast_storage_keeps_integer_buffers():
    m = nn.Module()
    m.lin = nn.Linear(2, 2)
    m.register_buffer("ids", torch.arange(3))
    cast_storage(m, "bf16")
    assert m.lin.weight.dtype == torch.bfloat16 and m.ids.dtype == torch.int64


# --- benchmarks/bench_memory.py: the meta-device tracer --------------------------------------------------------


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    module = sys.modules.setdefault("bench_memory", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def test_the_meta_tracer_counts_live_storages_at_their_peak():
    bench = _bench()
    with torch.no_grad(), bench.LivePeak() as peak:
        a = torch.zeros(1000, device="meta")  # 4,000 bytes
        b = a * 2  # 8,000 live
        del a
        c = b.view(10, 100).t()  # a view: nothing new
        d = c + 1  # 8,000 live again (b, d)
        del b, c, d
        e = torch.zeros(500, dtype=torch.bfloat16, device="meta")  # 1,000
        e.add_(1)  # in place: nothing new
    assert peak.peak == 8000 and sum(n for _, n in peak.refs.values()) == 1000
    q = torch.zeros(2, 4, 64, 8, device="meta")
    with bench.fused_attention(), bench.LivePeak() as fused:
        F.scaled_dot_product_attention(q, q, q)
    with bench.LivePeak() as math:  # the meta device's own path stores the 64 x 64 scores
        F.scaled_dot_product_attention(q, q, q)
    assert fused.peak == q.numel() * 4 < 2 * 4 * 64 * 64 * 4 <= math.peak


def test_estimates_of_a_tiny_family_add_up():
    bench = _bench()
    fam = bench.Family("mmdit-tiny", "vae-shapes-f4", (), 32, 8)
    rows = {(r["dtype"], r["offload"], r["tile"]): r for r in bench.estimate(fam)}
    full, bf16 = rows[("fp32", "none", None)], rows[("bf16", "none", None)]
    assert bf16["weights"] * 2 == full["weights"] and full["peak"] == full["weights"] + full["activations"]
    assert rows[("bf16", "model", None)]["resident"] < bf16["weights"]
    assert rows[("bf16", "sequential", None)]["resident"] < rows[("bf16", "model", None)]["resident"]


@pytest.mark.parametrize("preset", ["unet-tiny", "dit-tiny", "pixart-tiny", "mmdit-tiny", "vae-shapes-f4"])
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_every_architecture_runs_offloaded_to_another_device(preset, mode):
    """No network reads a weight outside the module that owns it, or makes tensors on its weights' device: run on
    the meta device from CPU weights, any such read would mix devices and fail."""
    from inkwash.pipeline import example_inputs

    cfg = get_preset(preset)
    net = build_model(cfg).eval()
    fp8_weights(net)  # and the fp8 upcast happens on the device too
    place = ModelOffload({"net": net}, "meta") if mode == "model" else SequentialOffload([net], "meta")
    with torch.no_grad():
        if preset.startswith("vae"):
            out = net.decode_latent(torch.zeros(1, cfg.latent_channels, 8, 8, device="meta"))
        else:
            out = net(**example_inputs(cfg, getattr(cfg, "sample_size", 0) or 8, device="meta"))
    assert out.device.type == "meta"
    place.release()
    assert {t.device.type for t in [*net.parameters(), *net.buffers()]} == {"cpu"}


def test_the_benchmark_builds_the_published_sizes():
    bench = _bench()
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in bench.text_encoder(n).parameters()) for n in ("clip-l", "clip-g", "t5-xxl")}
        sdxl = sum(p.numel() for p in build_model(get_preset("sdxl-base")).parameters())
    assert counts == {"clip-l": 123_060_480, "clip-g": 694_659_840, "t5-xxl": 4_762_310_656}
    assert sdxl == 2_567_463_684
