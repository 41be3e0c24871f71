"""LoRA: PEFT adapters on diffusers' own models (U-Net, FLUX and SD3 transformers) and on a transformers CLIP text
encoder, saved with diffusers' save_lora_weights, merged into inkwash's converted models: outputs agree with the
adapted diffusers / transformers models within 1e-5 (fp32). kohya files (written from sd-scripts' naming) agree
with a merge done by hand before diffusers' own single-file conversion. Unmerge restores the weights; unmatched keys
are listed in one error."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from inkwash.errors import UserError
from inkwash.formats.diffusers_flux import (
    flux_config_to_diffusers,
    flux_from_diffusers,
    sd3_config_to_diffusers,
    sd3_from_diffusers,
)
from inkwash.formats.diffusers_unet import unet_from_diffusers
from inkwash.formats.flux_original import flux_from_original
from inkwash.formats.lora import load_lora, parse_lora, resolve_lora
from inkwash.models.mmdit import PRESETS

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402

TINY = PRESETS["mmdit-tiny"]
UNET = dict(sample_size=16, in_channels=3, out_channels=3, norm_num_groups=8, cross_attention_dim=24,
            block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), transformer_layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True)  # fmt: skip


def _perturb(model, std=0.1):
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        norm = name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight"))
        torch.nn.init.normal_(p, mean=1.0 if norm else 0.0, std=std)


def _adapt(model, targets, r=4, alpha=8.0, seed=1):
    """A PEFT LoRA with random (non-zero) A and B on `targets` (PEFT's own injection, as diffusers' add_adapter)."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    peft.inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _save(tmp_path, pipeline_cls, component, model, name="lora.safetensors"):
    metadata = {f"{component}_lora_adapter_metadata": model.peft_config["default"].to_dict()}
    pipeline_cls.save_lora_weights(tmp_path, weight_name=name, **{f"{component}_lora_layers":
                                   get_peft_model_state_dict(model)}, **metadata)  # fmt: skip
    return tmp_path / name


def _close(out, ref, what):
    assert ref.abs().max() > 1e-2
    diff = (out - ref).abs().max().item()
    print(f"{what}: max abs diff {diff:.3g}")
    assert diff < 1e-5, diff


# ---------------------------------------------------------------------------- U-Net


def _unet_pair():
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**UNET).eval()
    _perturb(theirs, 0.05)
    ours = unet_from_diffusers(dict(theirs.config), {k: v.clone() for k, v in theirs.state_dict().items()}).eval()
    return ours, theirs


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "time_emb_proj"]  # fmt: skip


def _unet_run(model, diffusers_side: bool):
    g = torch.Generator().manual_seed(2)
    x, ctx, t = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 5, 24, generator=g), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        return model(x, t, ctx).sample if diffusers_side else model(x, t, context=ctx)


def test_unet_peft_lora_matches_diffusers_and_unmerges(tmp_path):
    ours, theirs = _unet_pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    path = _save(tmp_path, diffusers.StableDiffusionPipeline, "unet", _adapt(theirs, UNET_TARGETS))
    lora = load_lora(path, {"net": ours})
    lora.merge(1.0)
    _close(_unet_run(ours, False), _unet_run(theirs, True), "U-Net PEFT LoRA")
    report = lora.report()
    n_peft = sum(1 for k in get_peft_model_state_dict(theirs) if k.endswith("lora_A.weight"))
    assert report["layers"] == n_peft and "down.1.attn.0.blocks.0.attn1.qkv.weight" in report["modified"]["net"]
    lora.unmerge()
    worst = max((ours.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    print(f"U-Net unmerge: max abs change {worst:.3g}")
    assert worst < 1e-6
    assert "weights of the network" in lora.summary()


def test_unet_kohya_lora_and_scale(tmp_path):
    ours, theirs = _unet_pair()
    _adapt(theirs, UNET_TARGETS, r=4, alpha=2.0)
    diffusers.utils.scale_lora_layers(theirs, 0.5)
    kohya = {}  # sd-scripts: lora_unet_ + diffusers' module path with dots as underscores
    for k, v in get_peft_model_state_dict(theirs).items():
        module, part = k.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v
        kohya[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    load_lora(tmp_path / "kohya.safetensors", {"net": ours}).merge(0.5)
    _close(_unet_run(ours, False), _unet_run(theirs, True), "U-Net kohya LoRA, scale 0.5")


# ---------------------------------------------------------------------------- MMDiT (FLUX, SD3)


def _flux_inputs(cfg, H=8, W=12, L=5, B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    return x, torch.randn(B, L, cfg.context_dim, generator=g), torch.randn(B, cfg.y_dim, generator=g)


def _flux_theirs(model, x, ctx, y, t, g):
    from test_flux_sd3_original import _image_ids, _pack, _unpack

    H, W = x.shape[-2:]
    out = model(_pack(x), ctx, y, t / 1000, img_ids=_image_ids(H // 2, W // 2), txt_ids=torch.zeros(ctx.shape[1], 3),
                guidance=g).sample  # fmt: skip
    return _unpack(out, H, W)


FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear",
                "x_embedder", "context_embedder", "ff.net.0.proj", "ff_context.net.2", "linear_1"]  # fmt: skip


def test_flux_peft_lora_matches_diffusers(tmp_path):
    cfg = dataclasses.replace(TINY, depth=2, depth_single=2, guidance_embed=True)
    torch.manual_seed(0)
    theirs = diffusers.FluxTransformer2DModel(**flux_config_to_diffusers(cfg)).eval()
    _perturb(theirs)
    ours = flux_from_diffusers(dict(theirs.config), {k: v.clone() for k, v in theirs.state_dict().items()}).eval()
    path = _save(tmp_path, diffusers.FluxPipeline, "transformer", _adapt(theirs, FLUX_TARGETS))
    load_lora(path, {"net": ours}).merge()
    x, ctx, y = _flux_inputs(cfg)
    t, g = torch.tensor([125.0, 875.0]), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        _close(ours(x, t, context=ctx, y=y, guidance=g), _flux_theirs(theirs, x, ctx, y, t, g), "FLUX PEFT LoRA")


def test_sd3_peft_lora_matches_diffusers(tmp_path):
    cfg = dataclasses.replace(TINY, depth=3, depth_single=0, axes_dim=(), pos_embed_max_size=8, qk_norm=False)
    torch.manual_seed(0)
    theirs = diffusers.SD3Transformer2DModel(**sd3_config_to_diffusers(cfg, sample_size=8)).eval()
    _perturb(theirs)
    ours = sd3_from_diffusers(dict(theirs.config), {k: v.clone() for k, v in theirs.state_dict().items()}).eval()
    targets = ["to_q", "to_k", "add_v_proj", "to_out.0", "proj_out", "norm1_context.linear", "norm_out.linear",
               "pos_embed.proj", "ff.net.2"]  # fmt: skip
    path = _save(tmp_path, diffusers.StableDiffusion3Pipeline, "transformer", _adapt(theirs, targets))
    load_lora(path, {"net": ours}).merge()
    x, ctx, y = _flux_inputs(cfg)
    t = torch.tensor([3.5, 871.0])
    with torch.no_grad():
        _close(ours(x, t, context=ctx, y=y), theirs(x, ctx, y, t).sample, "SD3 PEFT LoRA")


def test_flux_kohya_lora_matches_a_merge_before_diffusers_conversion(tmp_path):
    """kohya FLUX LoRAs name BFL modules (fused qkv, linear1): merged by hand into the original weights, then
    converted by diffusers' single-file converter, the model must equal ours with the LoRA merged."""
    from test_flux_sd3_original import FLUX_TINY, _diffusers_flux_converter, _flux_tiny_sd

    original = _flux_tiny_sd(True)
    g, r, alpha = torch.Generator().manual_seed(3), 4, 2.0
    modules = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.1.linear1", "img_in",
               "single_blocks.0.modulation.lin", "final_layer.adaLN_modulation.1", "guidance_in.in_layer"]  # fmt: skip
    kohya, merged = {}, dict(original)
    for m in modules:
        w = original[f"{m}.weight"]
        down, up = torch.randn(r, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], r, generator=g) * 0.1
        stem = "lora_unet_" + m.replace(".", "_")
        kohya |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
        merged[f"{m}.weight"] = w + alpha / r * up @ down
    save_file(kohya, tmp_path / "flux-kohya.safetensors")

    ours = flux_from_original({k: v.clone() for k, v in original.items()}, axes_dim=FLUX_TINY.axes_dim).eval()
    lora = load_lora(tmp_path / "flux-kohya.safetensors", {"net": ours}).merge()
    assert lora.report()["layers"] == len(modules)
    theirs = diffusers.FluxTransformer2DModel(**flux_config_to_diffusers(ours.cfg)).eval()
    theirs.load_state_dict(_diffusers_flux_converter()(merged), strict=True)
    x, ctx, y = _flux_inputs(ours.cfg)
    t, gs = torch.tensor([125.0, 875.0]), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        _close(ours(x, t, context=ctx, y=y, guidance=gs), _flux_theirs(theirs, x, ctx, y, t, gs), "FLUX kohya LoRA")


# ---------------------------------------------------------------------------- text encoders


def _clip():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    return transformers.CLIPTextModel(cfg).eval(), transformers.CLIPTextModel(cfg).eval()


@pytest.mark.parametrize("kohya", [False, True])
def test_text_encoder_lora_matches_peft(tmp_path, kohya):
    theirs, ours = _clip()
    ours.load_state_dict(theirs.state_dict())
    _adapt(theirs, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], alpha=4.0)
    sd = get_peft_model_state_dict(theirs)
    if kohya:
        tensors = {}
        for k, v in sd.items():
            module, part = k.rsplit(".lora_", 1)
            stem = "lora_te_" + module.replace(".", "_")
            tensors |= {
                f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight": v,
                f"{stem}.alpha": torch.tensor(4.0),
            }
        save_file(tensors, tmp_path / "te.safetensors")
        path = tmp_path / "te.safetensors"
    else:
        path = _save(tmp_path, diffusers.StableDiffusionPipeline, "text_encoder", theirs)
    lora = load_lora(path, {"text_encoder": ours}).merge()
    assert len(lora.report()["modified"]["text_encoder"]) == 2 * 6
    ids = torch.tensor([[0, 5, 9, 17, 3, 1], [0, 4, 4, 8, 2, 1]])
    with torch.no_grad():
        _close(ours(ids).last_hidden_state, theirs(ids).last_hidden_state, f"CLIP text encoder LoRA kohya={kohya}")


# ---------------------------------------------------------------------------- errors


def test_unmatched_keys_are_listed_never_ignored(tmp_path):
    ours, _ = _unet_pair()
    good = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{good}.lora_A.weight": torch.zeros(4, 64), f"{good}.lora_B.weight": torch.zeros(64, 4)}
    tensors |= {"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 8),
                "unet.no_such_block.to_q.lora_B.weight": torch.zeros(8, 4),
                "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(1),
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 8),
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 4)}  # fmt: skip
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=r"3 LoRA keys match nothing") as e:
        load_lora(tmp_path / "bad.safetensors", {"net": ours})
    msg = str(e.value)
    assert "unet.no_such_block.to_q" in msg and "hada_w1_a" in msg and "(no text_encoder to apply it to)" in msg
    layers, unknown = parse_lora({f"{good}.lora_A.weight": torch.zeros(4, 64)})
    assert not layers and unknown == [f"unet.{good[5:]} (no lora_up weight)"]
    with pytest.raises(UserError, match="does not fit"):
        resolve_lora(parse_lora({f"{good}.lora_A.weight": torch.zeros(4, 63),
                                 f"{good}.lora_B.weight": torch.zeros(64, 4)})[0], {"net": ours})  # fmt: skip
    with pytest.raises(UserError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors", {"net": ours})
    lora = load_lora(_save_simple(tmp_path, good), {"net": ours}).merge()
    with pytest.raises(UserError, match="already merged"):
        lora.merge()


def _save_simple(tmp_path, module):
    path = tmp_path / "one.safetensors"
    save_file({f"{module}.lora_A.weight": torch.ones(2, 64), f"{module}.lora_B.weight": torch.ones(64, 2)}, path)
    return path


# ---------------------------------------------------------------------------- the CLI


def test_generate_with_lora_files_and_scales(lively_model_file, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from inkwash.cli import main
    from inkwash.pipeline import load

    net = load(lively_model_file).net
    g = torch.Generator().manual_seed(0)
    kohya = {}
    for name, p in net.named_parameters():  # the tiny U-Net's self-attention values, in sd-scripts' naming
        if name.endswith("attn1.qkv.weight") and not name.startswith("mid"):
            stem = (
                "lora_unet_"
                + name.replace("down.", "down_blocks.")
                .replace("up.", "up_blocks.")
                .replace(".attn.", ".attentions.")
                .replace(".blocks.", ".transformer_blocks.")[: -len(".qkv.weight")]
            )
            stem = stem.replace(".", "_") + "_to_v"
            c = p.shape[1]
            kohya |= {f"{stem}.lora_down.weight": torch.randn(2, c, generator=g),
                      f"{stem}.lora_up.weight": torch.randn(c, 2, generator=g)}  # fmt: skip
    assert kohya
    save_file(kohya, tmp_path / "style.safetensors")
    base = ["generate", "a red circle", "--model", str(lively_model_file), "--steps", "2"]

    def image(*extra):
        out = tmp_path / f"img{len(list(tmp_path.iterdir()))}.png"
        code = main([*base, "-o", str(out), *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return torch.from_numpy(np.array(Image.open(out))).float(), captured.err

    plain, _ = image()
    zero, _ = image("--lora", f"{tmp_path / 'style.safetensors'}:0")
    styled, err = image("--lora", str(tmp_path / "style.safetensors"), "--lora", f"{tmp_path / 'style.safetensors'}:-1")
    assert torch.equal(plain, zero)
    assert (styled - plain).abs().max() <= 1  # +1 then -1: the same weights again, to float rounding
    strong, err = image("--lora", f"{tmp_path / 'style.safetensors'}:2.5")
    assert (strong - plain).abs().max() > 10 and f"{len(kohya) // 2} layers matched" in err
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1),
               "lora_unet_nowhere.lora_up.weight": torch.zeros(1, 1)}, tmp_path / "bad.safetensors")  # fmt: skip
    assert main([*base, "--lora", str(tmp_path / "bad.safetensors")]) == 2
    assert "1 LoRA keys match nothing in this model: ['lora_unet_nowhere']" in capsys.readouterr().err
