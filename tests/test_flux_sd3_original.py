"""Original single-file layouts of FLUX.1 (Black Forest Labs) and SD3 (Stability): tiny random checkpoints in each
schema, loaded by inkwash and, independently, by diffusers' own single-file converters into
FluxTransformer2DModel / SD3Transformer2DModel; outputs agree within 1e-5 (fp32). Full-size key lists (fixtures)
are fully mapped, with the published parameter counts.

The schemas below are written from the published layouts (BFL's `flux/model.py` + `modules/layers.py`,
Stability's `mmditx.py`), not from inkwash's converter."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

from inkwash.errors import UserError
from inkwash.formats.diffusers_flux import flux_config_to_diffusers, sd3_config_to_diffusers
from inkwash.formats.flux_original import (
    flux_config_from_original,
    flux_from_original,
    flux_state_dict_from_original,
    flux_state_dict_to_original,
    is_flux_original,
)
from inkwash.formats.sd3_original import (
    is_sd3_original,
    sd3_config_from_original,
    sd3_from_original,
    sd3_state_dict_from_original,
    sd3_state_dict_to_original,
    split_sd3_file,
)
from inkwash.models.mmdit import PRESETS

FIXTURES = Path(__file__).parent / "fixtures"
TINY = PRESETS["mmdit-tiny"]  # hidden 32, 2 heads of 16, context 24, pooled 12, axes (4, 6, 6)
FLUX_TINY = dataclasses.replace(TINY, depth=2, depth_single=2)
SD3_TINY = dataclasses.replace(TINY, depth=3, depth_single=0, axes_dim=(), pos_embed_max_size=8, qk_norm=False)


# ---------------------------------------------------------------------------- the published schemas


def _linear(name: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}


def flux_schema(hidden, heads, depth, depth_single, c_in=64, context=4096, y=768, guidance=True, mlp=4.0):
    """BFL Flux: img_in, time_in/vector_in/guidance_in MLPEmbedders (in_layer, out_layer), txt_in, DoubleStreamBlocks
    (img_mod.lin, img_attn.qkv/norm.query_norm.scale/norm.key_norm.scale/proj, img_mlp.0/.2, same for txt),
    SingleStreamBlocks (linear1, linear2, norm.*_norm.scale, modulation.lin), LastLayer (linear, adaLN_modulation.1)."""
    C, D, M = hidden, hidden // heads, int(hidden * mlp)
    s = _linear("img_in", C, c_in) | _linear("txt_in", C, context)
    embedders = [("time_in", 256), ("vector_in", y)] + ([("guidance_in", 256)] if guidance else [])
    for name, width in embedders:
        s |= _linear(f"{name}.in_layer", C, width) | _linear(f"{name}.out_layer", C, C)
    for i in range(depth):
        for st in ("img", "txt"):
            b = f"double_blocks.{i}.{st}"
            s |= _linear(f"{b}_mod.lin", 6 * C, C) | _linear(f"{b}_attn.qkv", 3 * C, C)
            s |= {f"{b}_attn.norm.query_norm.scale": (D,), f"{b}_attn.norm.key_norm.scale": (D,)}
            s |= _linear(f"{b}_attn.proj", C, C) | _linear(f"{b}_mlp.0", M, C) | _linear(f"{b}_mlp.2", C, M)
    for i in range(depth_single):
        b = f"single_blocks.{i}"
        s |= _linear(f"{b}.linear1", 3 * C + M, C) | _linear(f"{b}.linear2", C, C + M)
        s |= {f"{b}.norm.query_norm.scale": (D,), f"{b}.norm.key_norm.scale": (D,)}
        s |= _linear(f"{b}.modulation.lin", 3 * C, C)
    return s | _linear("final_layer.linear", c_in, C) | _linear("final_layer.adaLN_modulation.1", 2 * C, C)


def sd3_schema(hidden, depth, pos_side, c_in=16, patch=2, context=4096, y=2048, mlp=4.0, qk_norm_dim=0):
    """Stability MMDiTX: x_embedder.proj (conv), pos_embed [1, S, C], t_embedder.mlp.0/.2, y_embedder.mlp.0/.2,
    context_embedder, joint_blocks.N.{x_block, context_block} (attn.qkv, attn.proj, attn.ln_q/ln_k with QK-norm,
    adaLN_modulation.1, mlp.fc1/fc2; the last context block is pre-only: qkv and a 2C modulation), final_layer."""
    C, M = hidden, int(hidden * mlp)
    s = {"x_embedder.proj.weight": (C, c_in, patch, patch), "x_embedder.proj.bias": (C,)}
    s |= {"pos_embed": (1, pos_side * pos_side, C)}
    s |= _linear("t_embedder.mlp.0", C, 256) | _linear("t_embedder.mlp.2", C, C)
    s |= _linear("y_embedder.mlp.0", C, y) | _linear("y_embedder.mlp.2", C, C)
    s |= _linear("context_embedder", C, context)
    for i in range(depth):
        for blk in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{blk}"
            pre_only = blk == "context_block" and i == depth - 1
            s |= _linear(f"{b}.attn.qkv", 3 * C, C) | _linear(f"{b}.adaLN_modulation.1", (2 if pre_only else 6) * C, C)
            if qk_norm_dim:
                s |= {f"{b}.attn.ln_q.weight": (qk_norm_dim,), f"{b}.attn.ln_k.weight": (qk_norm_dim,)}
            if not pre_only:
                s |= _linear(f"{b}.attn.proj", C, C) | _linear(f"{b}.mlp.fc1", M, C) | _linear(f"{b}.mlp.fc2", C, M)
    s |= _linear("final_layer.linear", patch * patch * c_in, C)
    return s | _linear("final_layer.adaLN_modulation.1", 2 * C, C)


def _random(schema: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in schema.items():
        norm = k.endswith(("_norm.scale", "ln_q.weight", "ln_k.weight"))  # RMSNorm scales around 1
        out[k] = torch.randn(shape, generator=g) * 0.1 + (1.0 if norm else 0.0)
    return out


def _flux_tiny_sd(guidance: bool):
    c = FLUX_TINY
    return _random(flux_schema(c.hidden_size, c.num_heads, c.depth, c.depth_single, c_in=c.in_channels * 4,
                               context=c.context_dim, y=c.y_dim, guidance=guidance))  # fmt: skip


def _sd3_tiny_sd(qk_norm: bool):
    c = SD3_TINY
    return _random(sd3_schema(c.hidden_size, c.depth, c.pos_embed_max_size, c_in=c.in_channels,
                              context=c.context_dim, y=c.y_dim, qk_norm_dim=c.head_dim if qk_norm else 0))  # fmt: skip


# ---------------------------------------------------------------------------- diffusers' converters (the oracle)


def _diffusers_flux_converter():
    """diffusers' FLUX single-file converter, whose single-block split assumes FLUX.1's width (3072): the one
    constant is read from the checkpoint instead so the same code runs at a tiny width."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1
    src = src.replace("inner_dim = 3072", 'inner_dim = checkpoint["img_in.weight"].shape[0]')
    namespace = dict(vars(sfu))
    exec(compile(src, sfu.__file__, "exec"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def _flux_inputs(cfg, H=8, W=12, L=5, B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    return x, torch.randn(B, L, cfg.context_dim, generator=g), torch.randn(B, cfg.y_dim, generator=g)


def _pack(x):  # FluxPipeline._pack_latents
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def _unpack(x, H, W):  # FluxPipeline._unpack_latents, in latent units
    B, _, C4 = x.shape
    return x.view(B, H // 2, W // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, H, W)


def _image_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


@pytest.mark.parametrize("guidance,prefix", [(True, ""), (False, "model.diffusion_model.")])
def test_flux_original_matches_diffusers_single_file(guidance, prefix):
    diffusers = pytest.importorskip("diffusers")
    sd = {prefix + k: v for k, v in _flux_tiny_sd(guidance).items()}
    assert is_flux_original(sd.keys()) and not is_sd3_original(sd.keys())
    ours = flux_from_original(dict(sd), axes_dim=FLUX_TINY.axes_dim).eval()
    assert ours.cfg == dataclasses.replace(FLUX_TINY, guidance_embed=guidance)
    theirs = diffusers.FluxTransformer2DModel(**flux_config_to_diffusers(ours.cfg)).eval()
    converted = _diffusers_flux_converter()(dict(sd))
    theirs.load_state_dict(converted, strict=True)

    x, ctx, y = _flux_inputs(ours.cfg)
    H, W = x.shape[-2:]
    t, g = torch.tensor([125.0, 875.0]), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        ref = theirs(_pack(x), ctx, y, t / 1000, img_ids=_image_ids(H // 2, W // 2), txt_ids=torch.zeros(5, 3),
                     guidance=g if guidance else None).sample  # fmt: skip
        ref = _unpack(ref, H, W)
        out = ours(x, t, context=ctx, y=y, guidance=g if guidance else None)
    assert ref.abs().max() > 1e-2
    diff = (out - ref).abs().max().item()
    print(f"FLUX original guidance={guidance}: max abs diff {diff:.3g}")
    assert diff < 1e-5
    back = flux_state_dict_to_original(ours.state_dict(), ours.cfg)  # and back, bit for bit
    bare = {k[len(prefix) :]: v for k, v in sd.items()}
    assert back.keys() == bare.keys() and all(torch.equal(back[k], bare[k]) for k in bare)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_sd3_original_matches_diffusers_single_file(qk_norm):
    diffusers = pytest.importorskip("diffusers")
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    sd = {"model.diffusion_model." + k: v for k, v in _sd3_tiny_sd(qk_norm).items()}
    assert is_sd3_original(sd.keys()) and not is_flux_original(sd.keys())
    heads = None if qk_norm else SD3_TINY.num_heads  # without QK-norm scales the head count is not in the file
    ours = sd3_from_original(dict(sd), num_heads=heads).eval()
    assert ours.cfg == dataclasses.replace(SD3_TINY, qk_norm=qk_norm)
    theirs = diffusers.SD3Transformer2DModel(**sd3_config_to_diffusers(ours.cfg, sample_size=8)).eval()
    theirs.load_state_dict(sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(sd)), strict=True)

    x, ctx, y = _flux_inputs(ours.cfg, H=8, W=12)
    t = torch.tensor([3.5, 871.0])
    with torch.no_grad():
        ref = theirs(x, ctx, y, t).sample
        out = ours(x, t, context=ctx, y=y)
    assert ref.abs().max() > 1e-2
    diff = (out - ref).abs().max().item()
    print(f"SD3 original qk_norm={qk_norm}: max abs diff {diff:.3g}")
    assert diff < 1e-5
    back = sd3_state_dict_to_original(ours.state_dict(), ours.cfg)
    bare = _sd3_tiny_sd(qk_norm)
    assert back.keys() == bare.keys() and all(torch.equal(back[k], bare[k]) for k in bare)


def test_unmatched_and_missing_keys_are_listed_in_one_error():
    sd = _flux_tiny_sd(True)
    sd["double_blocks.0.img_attn.lora_up.weight"] = torch.zeros(1)
    del sd["single_blocks.1.linear2.bias"]
    cfg = flux_config_from_original(sd, axes_dim=FLUX_TINY.axes_dim)
    with pytest.raises(UserError, match=r"unmatched keys \['double_blocks\.0\.img_attn\.lora_up\.weight'\].*"
                                        r"missing keys \['single_blocks\.1\.linear2\.bias'\]"):  # fmt: skip
        flux_state_dict_from_original(sd, cfg)
    sd3 = _sd3_tiny_sd(False)
    sd3["joint_blocks.0.x_block.attn2.qkv.weight"] = torch.zeros(1)  # SD3.5 Medium's extra attention
    with pytest.raises(UserError, match=r"unmatched keys \['joint_blocks\.0\.x_block\.attn2\.qkv\.weight'\]"):
        sd3_state_dict_from_original(sd3, sd3_config_from_original(sd3, num_heads=2))
    with pytest.raises(UserError, match="give axes_dim"):
        flux_config_from_original(_flux_tiny_sd(False))
    with pytest.raises(UserError, match="no 'img_in.weight'"):
        flux_from_original({"foo": torch.zeros(1)})


def test_sd3_file_is_split_into_parts_and_stray_keys_are_refused():
    sd = {"model.diffusion_model.pos_embed": torch.zeros(1), "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}
    sd |= {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}
    parts = split_sd3_file(sd)
    assert parts.keys() == {"transformer", "vae", "clip_l"}
    assert list(parts["clip_l"]) == ["text_model.final_layer_norm.weight"]
    with pytest.raises(UserError, match=r"no known prefix \['cond_stage_model\.x'\]"):
        split_sd3_file(sd | {"cond_stage_model.x": torch.zeros(1)})


# ---------------------------------------------------------------------------- full size, on the meta device


def _fixture(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((FIXTURES / f"{name}-original-keys.json").read_text()).items()}


@pytest.mark.parametrize("name,tensors,count", [("flux-dev", 780, 11_901_408_320), ("sd3-medium", 491, 2_028_328_000)])
def test_full_size_key_lists_are_fully_mapped(name, tensors, count):
    keys = _fixture(name)
    schema = flux_schema(3072, 24, 19, 38) if name == "flux-dev" else sd3_schema(1536, 24, 192)
    assert keys == schema and len(keys) == tensors  # the fixture is the published layout written out
    table = keys.pop("pos_embed", None)  # SD3's fixed position table is a buffer, not a parameter
    assert sum(torch.Size(s).numel() for s in keys.values()) == count  # the published parameter count
    sd = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    if table is not None:
        sd["pos_embed"] = torch.empty(table, device="meta")
    model = flux_from_original(sd) if name == "flux-dev" else sd3_from_original(sd)
    assert model.cfg == PRESETS[name]
    assert sum(p.numel() for p in model.parameters()) == count


# ---------------------------------------------------------------------------- whole files: family, text, generate


def _clip_model(hidden: int, projection: int, seed: int, with_projection: bool):
    import transformers
    from sd_tiny import BOS, EOS, VOCAB

    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      projection_dim=projection, bos_token_id=BOS, eos_token_id=EOS,
                                      pad_token_id=EOS)  # fmt: skip
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(cfg).eval()


def _t5_model(d_model: int, seed: int):
    import transformers

    cfg = transformers.T5Config(vocab_size=32, d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.T5EncoderModel(cfg).eval()


def _t5_tokenizer(folder):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t = transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                     extra_ids=0)  # fmt: skip
    t.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _parts(folder, sd3: bool, seed: int = 10):
    """A folder in the diffusers repository layout with tiny towers (and, for FLUX, an autoencoder)."""
    from sd_tiny import write_tokenizer

    from inkwash.text.clip import load_tokenizer

    towers = [_clip_model(8, 6, seed, True), _clip_model(8, 6, seed + 1, True)] if sd3 else [
        _clip_model(12, 12, seed, False)]  # fmt: skip
    towers.append(_t5_model(24, seed + 2))
    toks = []
    for i, model in enumerate(towers):
        suffix = "" if i == 0 else f"_{i + 1}"
        model.save_pretrained(folder / f"text_encoder{suffix}")
        if i == len(towers) - 1:
            toks.append(_t5_tokenizer(folder / f"tokenizer{suffix}"))
        else:
            toks.append(load_tokenizer(write_tokenizer(folder / f"tokenizer{suffix}")))
            toks[-1].model_max_length = 77  # as the published tokenizer_config.json files say
    if not sd3:
        vae = diffusers_vae()
        vae.save_pretrained(folder / "vae")
    return towers, toks


def diffusers_vae():
    import diffusers

    torch.manual_seed(3)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                                   norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                                   scaling_factor=0.3611, shift_factor=0.1159,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2).eval()  # fmt: skip


PROMPTS = ["a red circle", "blue"]


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_file_loads_with_family_defaults_and_generates(tmp_path, guidance, capsys):
    pytest.importorskip("diffusers")
    from PIL import Image
    from safetensors.torch import save_file

    from inkwash.cli import main
    from inkwash.formats import single_file

    c = FLUX_TINY  # one 128-wide head, so FLUX.1's RoPE split (16, 56, 56) applies
    schema = flux_schema(128, 1, 1, 1, c_in=c.in_channels * 4, context=c.context_dim, y=c.y_dim, guidance=guidance)
    path = tmp_path / "flux1.safetensors"
    save_file(_random(schema), path)
    with pytest.raises(UserError, match=r"needs its text encoders .* text_encoder/ and tokenizer/ \(clip-l\), "
                                        r"text_encoder_2/ and tokenizer_2/ \(t5\)"):  # fmt: skip
        single_file.load(path)
    _parts(tmp_path, sd3=False)  # beside the model file: found without an option
    loaded = single_file.load(path)
    name = "flux-dev" if guidance else "flux-schnell"
    assert loaded.family == name and loaded.net.cfg.axes_dim == (16, 56, 56) and loaded.prediction == "flow"
    steps, g = (28, 3.5) if guidance else (4, 1.0)
    assert loaded.sampling == {"sampler": "euler", "steps": steps, "guidance": g}
    assert loaded.process.dynamic_shift == guidance and loaded.process.shift == 1.0
    assert main(["generate", "a red circle", "--model", str(path), "--size", "16", "--steps", "2",
                 "-o", str(tmp_path / "out.png")]) == 0, capsys.readouterr().err  # fmt: skip
    params = Image.open(tmp_path / "out.png").text["parameters"]
    assert "Steps: 2" in params and ("Distilled CFG Scale: 3.5" in params) == guidance


def test_flux_text_conditioning_matches_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")

    from inkwash.formats import mmdit_files

    towers, toks = _parts(tmp_path, sd3=False)
    for name, length in [("flux-dev", 512), ("flux-schnell", 256)]:
        encoder = mmdit_files.text_encoder(mmdit_files.FAMILIES[name], tmp_path, {})
        pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=diffusers_vae(),
                                      text_encoder=towers[0], tokenizer=toks[0], text_encoder_2=towers[1],
                                      tokenizer_2=toks[1], transformer=None)  # fmt: skip
        with torch.no_grad():
            tokens, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=length)
            ours = encoder(PROMPTS)
        assert ours.tokens.shape == (2, length, 24) and ours.pooled.shape == (2, 12)
        assert tokens.abs().max() > 1e-2 and pooled.abs().max() > 1e-2
        assert (ours.tokens - tokens).abs().max() < 1e-5 and (ours.pooled - pooled).abs().max() < 1e-5


def test_sd3_file_with_text_encoders_inside_matches_diffusers_text_and_generates(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file
    from sd_tiny import ldm_vae_schema, random_tensors

    from inkwash.formats import single_file
    from inkwash.text.clip import load_tokenizer

    _parts(tmp_path / "parts", sd3=True, seed=10)  # the folder's CLIPs differ from the file's (seed 20)
    file_clips = [_clip_model(8, 6, 20, True), _clip_model(8, 6, 21, True)]
    sd = {"model.diffusion_model." + k: v for k, v in _sd3_tiny_sd(True).items()}  # QK-norm: the heads are known
    sd |= {"first_stage_model." + k: v for k, v in random_tensors(ldm_vae_schema((32, 32), 1, z=4)).items()}
    for name, model in zip(("clip_l", "clip_g"), file_clips):
        sd |= {f"text_encoders.{name}.transformer.{k}": v for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "sd3.safetensors")
    loaded = single_file.load(tmp_path / "sd3.safetensors", single_file.Options(text_encoders=tmp_path / "parts"))
    assert loaded.family == "sd3" and loaded.sampling == {"sampler": "euler", "steps": 28, "guidance": 7.0,
                                                          "schedule": "sd3"}  # fmt: skip
    assert loaded.process.shift == 3.0 and loaded.vae.cfg.scaling_factor == 1.5305
    t5 = _t5_model(24, 12)
    clip_l_tok, clip_g_tok = (load_tokenizer(tmp_path / "parts" / t) for t in ("tokenizer", "tokenizer_2"))
    clip_l_tok.model_max_length = clip_g_tok.model_max_length = 77
    clip_g_tok.pad_token = "!"  # SD3's tokenizer_2 pads with "!" (id 0)
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=diffusers_vae(), transformer=None,
        text_encoder=file_clips[0], tokenizer=clip_l_tok,
        text_encoder_2=file_clips[1], tokenizer_2=clip_g_tok, text_encoder_3=t5,
        tokenizer_3=_t5_tokenizer(tmp_path / "t5tok"),
    )  # fmt: skip
    with torch.no_grad():
        tokens, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
        ours = loaded.encoder(PROMPTS)
    assert ours.tokens.shape == tokens.shape == (2, 77 + 256, 24)
    assert (ours.tokens - tokens).abs().max() < 1e-5 and (ours.pooled - pooled).abs().max() < 1e-5
    from safetensors.torch import save_file as save

    from inkwash.cli import main

    q = "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q"  # a LoRA on SD3's T5, in the diffusers layout
    save({f"{q}.lora_A.weight": torch.ones(2, 24), f"{q}.lora_B.weight": torch.ones(16, 2)}, tmp_path / "t5.sft")
    argv = [
        "generate",
        "a red circle",
        "--model",
        str(tmp_path / "sd3.safetensors"),
        "--text-encoders",
        str(tmp_path / "parts"),
        "--size",
        "16",
        "--steps",
        "2",
        "--lora",
        str(tmp_path / "t5.sft"),
    ]
    assert main([*argv, "-o", str(tmp_path / "sd3.png")]) == 0
    assert "modifying 1 weights of the text_encoder_3" in capsys.readouterr().err
    assert (tmp_path / "sd3.png").is_file()


@pytest.mark.parametrize("guidance", [False, True])
def test_flux_file_generates_what_diffusers_flux_pipeline_generates(tmp_path, guidance):
    """End to end: a tiny FLUX.1 file + its parts folder through `inkwash.load(...).generate` and, independently,
    through diffusers' FluxPipeline (transformer from diffusers' single-file converter, the same noise): the same
    images within 1e-4."""
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    import inkwash
    from inkwash.text.clip import load_tokenizer

    c = FLUX_TINY
    original = _random(flux_schema(128, 1, 1, 1, c_in=c.in_channels * 4, context=c.context_dim, y=c.y_dim,
                                   guidance=guidance), seed=5)  # fmt: skip
    save_file(original, tmp_path / "flux1.safetensors")
    _parts(tmp_path, sd3=False)
    pipe = inkwash.load(tmp_path / "flux1.safetensors")
    ours = pipe.generate(PROMPTS, seed=7, size=16, steps=3)  # [-1, 1]

    theirs_net = diffusers.FluxTransformer2DModel(**flux_config_to_diffusers(pipe.net.cfg)).eval()
    theirs_net.load_state_dict(_diffusers_flux_converter()(dict(original)), strict=True)
    tok = load_tokenizer(tmp_path / "tokenizer")
    tok.model_max_length = 77
    shift = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096) if guidance else dict(shift=1.0, use_dynamic_shifting=False)  # fmt: skip
    reference = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**shift),
        vae=diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval(), tokenizer=tok,
        text_encoder_2=T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2").eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(tmp_path / "tokenizer_2"), transformer=theirs_net,
    )  # fmt: skip
    noise = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    from test_flux_sd3_original import _pack  # FluxPipeline takes packed latents

    with torch.no_grad():
        ref = reference(
            PROMPTS,
            height=16,
            width=16,
            num_inference_steps=3,
            guidance_scale=3.5 if guidance else 0.0,
            latents=_pack(noise),
            max_sequence_length=512 if guidance else 256,
            output_type="pt",
        ).images  # fmt: skip  [0, 1]
    diff = ((ours + 1) / 2 - ref).abs().max().item()
    print(f"FLUX {'dev' if guidance else 'schnell'} file end to end vs FluxPipeline: max abs diff {diff:.3g}")
    assert ref.std() > 1e-2 and diff < 1e-4


def test_sd3_file_generates_what_diffusers_sd3_pipeline_generates(tmp_path):
    """End to end with classifier-free guidance: a tiny SD3 file (transformer only) + parts folder (CLIP-L, CLIP-G,
    T5, autoencoder) through `inkwash.load(...).generate` and through diffusers' StableDiffusion3Pipeline
    (transformer from diffusers' single-file converter, the same noise): the same images within 1e-4."""
    diffusers = pytest.importorskip("diffusers")
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    import inkwash
    from inkwash.text.clip import load_tokenizer

    original = _sd3_tiny_sd(True)
    save_file({"model.diffusion_model." + k: v for k, v in original.items()}, tmp_path / "sd3.safetensors")
    _parts(tmp_path, sd3=True)
    diffusers_vae().save_pretrained(tmp_path / "vae")
    pipe = inkwash.load(tmp_path / "sd3.safetensors")
    assert pipe.sampling.guidance == 7.0
    ours = pipe.generate(PROMPTS, seed=3, size=16, steps=3, negative_prompt="blue")

    theirs_net = diffusers.SD3Transformer2DModel(**sd3_config_to_diffusers(pipe.net.cfg, sample_size=8)).eval()
    theirs_net.load_state_dict(sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(original)), strict=True)
    toks = [load_tokenizer(tmp_path / t) for t in ("tokenizer", "tokenizer_2")]
    toks[0].model_max_length = toks[1].model_max_length = 77
    toks[1].pad_token = "!"
    reference = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval(), transformer=theirs_net,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder").eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder_2").eval(),
        text_encoder_3=T5EncoderModel.from_pretrained(tmp_path / "text_encoder_3").eval(),
        tokenizer=toks[0], tokenizer_2=toks[1], tokenizer_3=AutoTokenizer.from_pretrained(tmp_path / "tokenizer_3"),
    )  # fmt: skip
    noise = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    with torch.no_grad():
        ref = reference(PROMPTS, negative_prompt="blue", height=16, width=16, num_inference_steps=3,
                        guidance_scale=7.0, latents=noise, output_type="pt").images  # fmt: skip
    diff = ((ours + 1) / 2 - ref).abs().max().item()
    print(f"SD3 file end to end vs StableDiffusion3Pipeline (CFG 7): max abs diff {diff:.3g}")
    assert ref.std() > 1e-2 and diff < 1e-4


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sd3_schedule_is_diffusers_sd3_spacing(steps):
    diffusers = pytest.importorskip("diffusers")
    from inkwash.diffusion import Flow
    from inkwash.sampling import make_times

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's scheduler_config.json
    sched.set_timesteps(steps)
    torch.testing.assert_close(make_times(Flow(shift=3.0), steps, "sd3").float(), sched.sigmas, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="static shift"):
        make_times(Flow(dynamic_shift=True), steps, "sd3")
