"""Export to diffusers folders: a tiny inkwash model of each kind (U-Net, SDXL-style U-Net, DiT, PixArt-α, FLUX and
SD3 MMDiT, each latent with its autoencoder; an autoencoder file alone) is written with `inkwash export-diffusers`,
loaded with diffusers' own from_pretrained, and gives our outputs within 1e-5 (fp32)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from inkwash.cli import main
from inkwash.errors import UserError
from inkwash.formats.checkpoint import save_model
from inkwash.formats.diffusers_dit import dit_config_from_diffusers, pixart_config_from_diffusers
from inkwash.formats.diffusers_unet import unet_config_from_diffusers
from inkwash.formats.diffusers_vae import config_from_diffusers_vae
from inkwash.formats.export import export_diffusers
from inkwash.models.mmdit import PRESETS
from inkwash.models.registry import build_model, config_to_dict

diffusers = pytest.importorskip("diffusers")

VAE_CFG = dataclasses.replace(
    config_from_diffusers_vae(dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                                   norm_num_groups=4)), scaling_factor=0.7, shift_factor=0.1)  # fmt: skip
UNET = dict(in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=24, block_out_channels=(32, 64),
            layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))  # fmt: skip
LCM = UNET | dict(time_cond_proj_dim=16)  # an LCM student: the guidance scale is an input (time_embedding.cond_proj)
SDXL = UNET | dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=60)
TINY = PRESETS["mmdit-tiny"]
FLOW = {"kind": "flow", "shift": 3.0}
VP = {"kind": "vp", "schedule": "scaled_linear", "n": 1000, "beta_start": 0.00085, "beta_end": 0.012}
KINDS = {  # name: (our config, process, prediction, component, diffusers class)
    "unet": (unet_config_from_diffusers(UNET), VP, "eps", "unet", "UNet2DConditionModel"),
    "unet-lcm": (unet_config_from_diffusers(LCM), VP, "eps", "unet", "UNet2DConditionModel"),
    "unet-sdxl": (unet_config_from_diffusers(SDXL), VP, "v", "unet", "UNet2DConditionModel"),
    "dit": (dit_config_from_diffusers(dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, num_embeds_ada_norm=10)),
            VP, "eps", "transformer", "DiTTransformer2DModel"),
    "pixart": (pixart_config_from_diffusers(dict(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                                 out_channels=8, num_layers=2, cross_attention_dim=24,
                                                 caption_channels=20, sample_size=8)),
               VP, "eps", "transformer", "PixArtTransformer2DModel"),
    "flux": (dataclasses.replace(TINY, depth=2, depth_single=2, guidance_embed=True), FLOW, "flow", "transformer",
             "FluxTransformer2DModel"),
    "sd3": (dataclasses.replace(TINY, depth=2, depth_single=0, axes_dim=(), pos_embed_max_size=8, qk_norm=False),
            FLOW, "flow", "transformer", "SD3Transformer2DModel"),
}  # fmt: skip


def _random(module, seed=0, std=0.1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, std)
    return module.eval()


def _file(tmp_path, kind):
    cfg, process, prediction, _, _ = KINDS[kind]
    net, vae = _random(build_model(cfg)), _random(build_model(VAE_CFG), seed=1)
    meta = {"model": config_to_dict(cfg), "vae": config_to_dict(VAE_CFG), "process": process,
            "prediction": prediction, "image_size": 16, "text_encoder": {"name": "none"}}  # fmt: skip
    return save_model(tmp_path / f"{kind}.safetensors", {"model": net.state_dict(), "vae": vae.state_dict()}, meta), net


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 875.0])
    ctx = torch.randn(2, 5, getattr(cfg, "context_dim", 0) or 1, generator=g)
    y = torch.randn(2, cfg.y_dim, generator=g) if getattr(cfg, "y_dim", 0) else None
    return x, t, ctx, y


def _theirs_output(kind, theirs, x, t, ctx, y):
    if kind == "unet":
        return theirs(x, t, ctx).sample
    if kind == "unet-lcm":
        from diffusers import LatentConsistencyModelPipeline as Lcm

        w = torch.tensor([5.0, 2.0])  # inkwash's scale; diffusers' pipeline embeds w - 1
        return theirs(x, t, ctx, timestep_cond=Lcm.get_guidance_scale_embedding(None, w - 1, 16)).sample
    if kind == "unet-sdxl":
        micro = torch.tensor([[64.0, 48, 0, 8, 32, 32], [1024, 1024, 16, 0, 32, 32]])
        return theirs(x, t, ctx, added_cond_kwargs={"text_embeds": y, "time_ids": micro}).sample
    if kind == "dit":
        return theirs(x, t, class_labels=torch.tensor([3, 10])).sample
    if kind == "pixart":
        return theirs(x, ctx, t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    if kind == "sd3":
        return theirs(x, ctx, y, t).sample
    from test_flux_sd3_original import _image_ids, _pack, _unpack  # FLUX packs latents outside its transformer

    out = theirs(_pack(x), ctx, y, t / 1000, img_ids=_image_ids(4, 4), txt_ids=torch.zeros(5, 3),
                 guidance=torch.tensor([3.5, 1.0])).sample  # fmt: skip
    return _unpack(out, 8, 8)


def _ours_output(kind, net, x, t, ctx, y):
    if kind == "unet-sdxl":
        micro = torch.tensor([[64.0, 48, 0, 8, 32, 32], [1024, 1024, 16, 0, 32, 32]])
        return net(x, t, context=ctx, y=y, micro=micro)
    if kind == "dit":
        return net(x, t, y=torch.tensor([3, 10]))
    if kind == "unet-lcm":
        return net(x, t, context=ctx, guidance=torch.tensor([5.0, 2.0]))
    if kind == "flux":
        return net(x, t, context=ctx, y=y, guidance=torch.tensor([3.5, 1.0]))
    return net(x, t, context=ctx, y=y)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_exported_model_loads_in_diffusers_and_matches(tmp_path, kind):
    path, net = _file(tmp_path, kind)
    _, process, prediction, component, cls = KINDS[kind]
    index = export_diffusers(path, tmp_path / "out")
    assert index[component] == ["diffusers", cls] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert json.loads((tmp_path / "out" / "model_index.json").read_text()) == index
    theirs = getattr(diffusers, cls).from_pretrained(tmp_path / "out", subfolder=component).eval()
    x, t, ctx, y = _inputs(net.cfg)
    with torch.no_grad():
        ref, out = _theirs_output(kind, theirs, x, t, ctx, y), _ours_output(kind, net, x, t, ctx, y)
    assert ref.abs().max() > 1e-2
    diff = (out - ref).abs().max().item()
    print(f"export {kind}: max abs diff {diff:.3g}")
    assert diff < 1e-5

    sched = getattr(diffusers, index["scheduler"][1]).from_pretrained(tmp_path / "out", subfolder="scheduler")
    if process["kind"] == "vp":
        from inkwash.diffusion.process import process_from_dict

        ours_abar = process_from_dict(process).alpha_sigma(torch.arange(1000.0))[0] ** 2
        torch.testing.assert_close(sched.alphas_cumprod.double(), ours_abar.double(), atol=1e-6, rtol=1e-5)
        assert sched.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[prediction]
    else:
        assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting


def test_autoencoder_file_exports_as_autoencoderkl(tmp_path, capsys):
    vae = _random(build_model(VAE_CFG), seed=1, std=0.05)
    path = save_model(tmp_path / "vae.safetensors", {"vae": vae.state_dict()}, {"vae": config_to_dict(VAE_CFG)})
    assert main(["export-diffusers", str(path), "-o", str(tmp_path / "vae")]) == 0
    assert "AutoencoderKL" in capsys.readouterr().out
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == 0.7 and theirs.config.shift_factor == 0.1
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        post, ref = vae.encode(x), theirs.encode(x).latent_dist
        z = post.mode()
        for a, b in [(z, ref.mode()), (vae.decode(z), theirs.decode(z).sample)]:
            assert b.abs().max() > 1e-2 and (a - b).abs().max() < 1e-5


def test_export_mistakes_are_one_sentence(tmp_path, capsys):
    path, _ = _file(tmp_path, "unet")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export-diffusers", str(path), "-o", str(tmp_path / "full")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["export-diffusers", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "o")]) == 2
    cfg = dataclasses.replace(KINDS["dit"][0], mlp_ratio=2.0)  # diffusers' DiT has mlp_ratio 4 built in
    bad = save_model(tmp_path / "bad.safetensors", {"model": build_model(cfg).state_dict()},
                     {"model": config_to_dict(cfg), "process": VP, "prediction": "eps", "image_size": 8})  # fmt: skip
    with pytest.raises(UserError, match="mlp_ratio"):
        export_diffusers(bad, tmp_path / "bad")


def test_exported_flux_folder_with_text_encoders_generates_the_same_in_both(tmp_path):
    """Round trip of a whole pipeline: an inkwash FLUX model exported, given text towers (CLIP-L, T5), is loaded by
    diffusers' FluxPipeline.from_pretrained and by inkwash.load: the same images from the same noise."""
    from sd_tiny import write_tokenizer
    from test_flux_sd3_original import PROMPTS, _clip_model, _pack, _t5_model, _t5_tokenizer

    import inkwash

    path, _ = _file(tmp_path, "flux")
    out = tmp_path / "out"
    export_diffusers(path, out)

    _clip_model(12, 12, 10, False).save_pretrained(out / "text_encoder")
    _t5_model(24, 12).save_pretrained(out / "text_encoder_2")
    write_tokenizer(out / "tokenizer")
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    _t5_tokenizer(out / "tokenizer_2")
    index = json.loads((out / "model_index.json").read_text())
    index |= {
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
    }
    (out / "model_index.json").write_text(json.dumps(index))

    pipe = inkwash.load(out)
    assert pipe.sampling.steps == 28 and pipe.sampling.guidance == 3.5  # FLUX dev: a guidance-embedded transformer
    ours = pipe.generate(PROMPTS, seed=7, size=16, steps=2)
    theirs = diffusers.FluxPipeline.from_pretrained(out)
    noise = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    with torch.no_grad():
        ref = theirs(PROMPTS, height=16, width=16, num_inference_steps=2, guidance_scale=3.5, latents=_pack(noise),
                     max_sequence_length=512, output_type="pt").images  # fmt: skip
    diff = ((ours + 1) / 2 - ref).abs().max().item()
    print(f"exported FLUX folder, inkwash.load vs FluxPipeline.from_pretrained: max abs diff {diff:.3g}")
    assert ref.std() > 1e-2 and diff < 1e-4
