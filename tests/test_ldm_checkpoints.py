"""Stable Diffusion 1.x / 2.x / SDXL single files: tiny random checkpoints in the original key layouts
(tests/sd_tiny.py) load in inkwash and, independently, through diffusers' own single-file conversion; U-Net,
autoencoder and text encoders give the same numbers within 1e-5 (fp32). Published sizes are counted on the meta
device."""

from __future__ import annotations

import pytest
import sd_tiny
import torch

from inkwash.errors import UserError
from inkwash.formats import ldm, single_file

diffusers = pytest.importorskip("diffusers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
transformers = pytest.importorskip("transformers")

FAMILIES = ("sd1", "sd2", "sdxl-base", "sdxl-refiner")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    return {f: sd_tiny.write_family(folder / f, f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def loaded(files):
    torch.set_num_threads(1)
    return {f: single_file.load(p) for f, p in files.items()}


def _checkpoint(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """Agree within tol relative to the output's scale (outputs of random nets are O(1) to O(10))."""
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_detects_family(files, family):
    assert single_file.detect(files[family]) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_matches_diffusers_conversion(files, loaded, family, one_thread):
    config = dict(sample_size=8, in_channels=4, out_channels=4, **sd_tiny.TINY[family]["diffusers_unet"])
    converted = sfu.convert_ldm_unet_checkpoint(_checkpoint(files[family]), config)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(converted, strict=True)
    ours = loaded[family]
    cfg = ours.model_cfg
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 10.0])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    kw, added = {}, None
    if cfg.micro_conditions:
        y = torch.randn(2, cfg.y_dim, generator=g)
        micro = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024][: cfg.micro_conditions]] * 2)
        kw, added = {"y": y, "micro": micro}, {"text_embeds": y, "time_ids": micro}
    with torch.no_grad():
        a = ours.net(x, t, context=ctx, **kw)
        b = theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    _close(a, b)


@pytest.mark.parametrize("family", ["sd1", "sdxl-base"])
def test_vae_matches_diffusers_conversion(files, loaded, family, one_thread):
    config = dict(sd_tiny.DIFFUSERS_VAE)
    converted = sfu.convert_ldm_vae_checkpoint(_checkpoint(files[family]), config)
    theirs = diffusers.AutoencoderKL(**config).eval()
    theirs.load_state_dict(converted, strict=True)
    ours = loaded[family].vae
    g = torch.Generator().manual_seed(4)
    img, z = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        _close(ours.encode(img).mean, theirs.encode(img).latent_dist.mean)
        _close(ours.decode(z), theirs.decode(z).sample)
    assert ours.cfg.scaling_factor == (0.13025 if family.startswith("sdxl") else 0.18215)


def _hf_clip(config_kw: dict, state: dict, projection: bool = False):
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(transformers.CLIPTextConfig(**config_kw)).eval()
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    return model, result


def _tiny_clip_config(width: int, layers: int, embed: int = 0) -> dict:
    return dict(
        vocab_size=sd_tiny.VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=embed or width,
        hidden_act="quick_gelu" if not embed else "gelu", bos_token_id=sd_tiny.BOS, eos_token_id=sd_tiny.EOS,
    )  # fmt: skip


PROMPTS = ["a red circle", "blue", ""]


def test_sd1_text_matches_diffusers(files, loaded):
    """SD 1.x: CLIP ViT-L's last hidden state (final LayerNorm applied), prompts padded with end-of-text to 77."""
    state = sfu.convert_ldm_clip_checkpoint(_checkpoint(files["sd1"]))
    state = {k: v for k, v in state.items() if not k.startswith(("model.", "first_stage_model.", "betas", "alphas"))}
    theirs, result = _hf_clip(_tiny_clip_config(64, 2), state)
    assert not result.missing_keys
    enc = loaded["sd1"].encoder
    tok = transformers.CLIPTokenizer(vocab=str(files["sd1"].parent / "tokenizer/vocab.json"),
                                     merges=str(files["sd1"].parent / "tokenizer/merges.txt"))  # fmt: skip
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(enc.token_ids(PROMPTS), ids)
    with torch.no_grad():
        _close(enc(PROMPTS).tokens, theirs(ids).last_hidden_state)


def test_sd2_text_matches_diffusers(files, loaded):
    """SD 2.x: OpenCLIP ViT-H's penultimate layer with the final LayerNorm == diffusers' copy without the last layer;
    open_clip pads with 0."""
    ckpt = _checkpoint(files["sd2"])
    theirs, _ = _hf_clip(_tiny_clip_config(128, 2, 128), {})  # diffusers' SD 2 text encoder: one layer fewer
    state = sfu.convert_open_clip_checkpoint(theirs, ckpt, prefix="cond_stage_model.model.")
    state = {k: v for k, v in state.items() if ".layers.2." not in k and k != "text_projection.weight"}
    theirs, result = _hf_clip(_tiny_clip_config(128, 2, 128), state)
    assert not result.missing_keys and not result.unexpected_keys
    enc = loaded["sd2"].encoder
    ids = enc.token_ids(PROMPTS)
    end = int((ids[0] == sd_tiny.EOS).nonzero()[0])
    assert end > 2 and (ids[0, end + 1 :] == 0).all()  # <bos> a red ... <eos> 0 0 ...
    with torch.no_grad():
        _close(enc(PROMPTS).tokens, theirs(ids).last_hidden_state)


@pytest.mark.parametrize("family", ["sdxl-base", "sdxl-refiner"])
def test_sdxl_text_matches_diffusers(files, loaded, family):
    """SDXL: both towers' penultimate hidden states (no final LayerNorm) side by side; bigG's projected pooled
    output, as StableDiffusionXLPipeline.encode_prompt reads them."""
    ckpt = _checkpoint(files[family])
    prefix = "conditioner.embedders.1.model." if family == "sdxl-base" else "conditioner.embedders.0.model."
    shell, _ = _hf_clip(_tiny_clip_config(128, 3, 40), {}, projection=True)
    big, result = _hf_clip(_tiny_clip_config(128, 3, 40), sfu.convert_open_clip_checkpoint(shell, ckpt, prefix),
                           projection=True)  # fmt: skip
    assert not result.missing_keys
    enc = loaded[family].encoder
    emb = enc(PROMPTS)
    ids_g = (enc.encoders[-1] if family == "sdxl-base" else enc).token_ids(PROMPTS)
    with torch.no_grad():
        out = big(ids_g, output_hidden_states=True)
        features = [out.hidden_states[-2]]
        if family == "sdxl-base":
            state = sfu.convert_ldm_clip_checkpoint(ckpt)
            state = {k: v for k, v in state.items() if k.startswith("text_model.")}
            small, result = _hf_clip(_tiny_clip_config(64, 2), state)
            assert not result.missing_keys
            ids_l = enc.encoders[0].token_ids(PROMPTS)
            features.insert(0, small(ids_l, output_hidden_states=True).hidden_states[-2])
        _close(emb.tokens, torch.cat(features, dim=-1))
        _close(emb.pooled, out.text_embeds)


# ------------------------------------------------------------------------------------------ errors


def test_unmatched_and_missing_keys_are_listed(tmp_path):
    extra = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.rogue.weight": torch.zeros(2)}
    path = sd_tiny.write_family(tmp_path / "a", "sd1", extra=extra)
    with pytest.raises(UserError, match=r"unmatched keys \['input_blocks.1.1.transformer_blocks.0.attn1.rogue"):
        single_file.load(path)
    path = sd_tiny.write_family(tmp_path / "b", "sd1", drop=("model.diffusion_model.out.2.bias",))
    with pytest.raises(UserError, match=r"missing \['conv_out.bias'\]"):
        single_file.load(path)
    path = sd_tiny.write_family(tmp_path / "c", "sd1", extra={"model_ema.decay": torch.tensor(0.9999)})
    with pytest.raises(UserError, match=r"unmatched keys \['model_ema.decay'\]"):
        single_file.load(path)
    to_v = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"
    path = sd_tiny.write_family(tmp_path / "d", "sd1", drop=(to_v,))
    with pytest.raises(UserError, match="missing keys.*attn1.qkv.weight"):
        single_file.load(path)


def test_wrong_schedule_and_unknown_files_are_refused(tmp_path):
    path = sd_tiny.write_family(tmp_path / "a", "sd1", extra={"betas": torch.linspace(1e-4, 0.02, 1000)})
    with pytest.raises(UserError, match="noise schedule"):
        single_file.load(path)
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="not a checkpoint inkwash recognises"):
        single_file.load(tmp_path / "x.safetensors")
    unet = {k: v for k, v in sd_tiny.random_tensors(sd_tiny.family_schema("sd1")).items() if k.startswith(ldm.UNET)}
    for name, part in (("u.safetensors", unet), ("bare.safetensors", ldm.under(unet, ldm.UNET))):
        save_file(part, str(tmp_path / name))
        with pytest.raises(UserError, match="U-Net without its text encoder"):
            single_file.load(tmp_path / name)
    (tmp_path / "y.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="never unpickles"):
        single_file.load(tmp_path / "y.ckpt")
    (tmp_path / "z.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="is corrupt or not a safetensors file"):
        single_file.load(tmp_path / "z.safetensors")


def test_missing_tokenizer_is_one_clear_error(tmp_path, monkeypatch):
    import shutil

    path = sd_tiny.write_family(tmp_path, "sd1")
    shutil.rmtree(tmp_path / "tokenizer")
    monkeypatch.delenv("INKWASH_CLIP_TOKENIZER", raising=False)
    with pytest.raises(UserError, match="no CLIP tokenizer"):
        single_file.load(path)
    sd_tiny.write_tokenizer(tmp_path / "elsewhere")
    assert single_file.load(path, single_file.Options(tokenizer=tmp_path / "elsewhere")).family == "sd1"
    monkeypatch.setenv("INKWASH_CLIP_TOKENIZER", str(tmp_path / "elsewhere"))
    assert single_file.load(path).family == "sd1"


def test_detection_list_is_open_for_more_formats():
    names = [f.name for f in single_file.FORMATS]
    assert names[:4] == list(FAMILIES)
    fmt = single_file.Format("test-only", lambda s: "magic" in s, lambda p, s, o: None)
    single_file.register_format(fmt, before="sd1")
    try:
        assert single_file.FORMATS[0] is fmt
        with pytest.raises(ValueError):
            single_file.register_format(fmt)
    finally:
        single_file.FORMATS.remove(fmt)


def test_config_inference_reads_shapes():
    schema = sd_tiny.ldm_unet_schema(
        mc=64, mult=(1, 2, 4), n=2, attention=(1, 2), depths=(1, 2, 10), ctx=96, linear=True
    )
    cfg = ldm.unet_config_from_ldm(schema, head_dim=64)
    assert (cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels) == ((1, 2, 4), 2, (1, 2))
    assert cfg.transformer_depth == (1, 2, 10) and cfg.context_dim == 96


# ------------------------------------------------------------------------------------------ published sizes

# diffusers' unet/config.json of each published model (the oracle's side), as far as it differs from the defaults.
_PUBLISHED_UNETS = {
    "sd15": dict(cross_attention_dim=768),
    "sd21": dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True),
    "sdxl-base": dict(
        block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
        transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
    "sdxl-refiner": dict(
        block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24], cross_attention_dim=1280,
        transformer_layers_per_block=4, use_linear_projection=True,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560,
    ),
}  # fmt: skip
_PUBLISHED_COUNTS = {
    "sd15": 859_520_964,
    "sd21": 865_910_724,
    "sdxl-base": 2_567_463_684,
    "sdxl-refiner": 2_259_526_660,
}


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(_PUBLISHED_UNETS))
def test_unet_presets_have_the_published_sizes(name):
    from inkwash.models.registry import build_model, get_preset

    with torch.device("meta"):
        ours = build_model(get_preset(name))
        theirs = diffusers.UNet2DConditionModel(**_PUBLISHED_UNETS[name])
    assert _count(ours) == _count(theirs) == _PUBLISHED_COUNTS[name]
    assert set(ours.state_dict()) == set(ldm.unet_from_ldm(_meta_ldm_unet(get_preset(name)), get_preset(name)))


def _meta_ldm_unet(cfg) -> dict:
    """The LDM key schema of a preset (tests/sd_tiny.py) as meta tensors: every key must map onto the preset."""
    depths = [cfg.depth(i) for i in range(len(cfg.channel_mult))]
    adm = cfg.y_dim + cfg.micro_conditions * cfg.micro_embed_dim if cfg.y_dim else 0
    schema = sd_tiny.ldm_unet_schema(cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels,
                                     depths, cfg.context_dim, linear=cfg.head_dim > 0, adm=adm)  # fmt: skip
    return {k: torch.empty(s, device="meta") for k, s in schema.items()}


def test_autoencoder_presets_have_the_published_size():
    from inkwash.models.registry import build_model, get_preset

    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        )  # fmt: skip
        for name, scale in (("vae-sd", 0.18215), ("vae-sdxl", 0.13025)):
            ours = build_model(get_preset(name))
            assert _count(ours) == _count(theirs) == 83_653_863 and ours.cfg.scaling_factor == scale


def test_text_towers_have_the_published_sizes():
    from inkwash.text.clip import TOWERS, build_text_model, text_config
    from inkwash.text.t5 import build_t5_encoder, t5_config

    assert _count(build_text_model(text_config(TOWERS["clip-l"]))) == 123_060_480  # CLIP ViT-L/14 text
    # OpenCLIP ViT-H/14 text tower with its projection (SD 2.x keeps all 24 layers in the file, reads 23)
    assert _count(build_text_model(text_config(TOWERS["open-clip-h"]), projection=True)) == 354_032_640
    assert _count(build_text_model(text_config(TOWERS["open-clip-h"], num_hidden_layers=23))) == 340_387_840
    assert _count(build_text_model(text_config(TOWERS["open-clip-bigg"]), projection=True)) == 694_659_840
    assert _count(build_t5_encoder(t5_config())) == 4_762_310_656  # T5 v1.1 XXL encoder


def test_full_size_sd15_file_maps_every_key():
    """tests/fixtures/sd15-original-keys.json (scripts/sd15_key_fixture.py: SD 1.5's 1,143 tensors, checked there
    against diffusers' converters and full-size models) maps key for key onto inkwash's sd15, vae-sd and CLIP-L."""
    import json
    from pathlib import Path

    from inkwash.formats.checkpoint import load_exact
    from inkwash.models.registry import build_model, get_preset
    from inkwash.text.clip import TOWERS, build_text_model, hf_text_keys, text_config

    shapes = {
        k: tuple(v)
        for k, v in json.loads((Path(__file__).parent / "fixtures/sd15-original-keys.json").read_text()).items()
    }
    assert len(shapes) == 1143 and single_file._format_of(Path("sd15"), shapes).name == "sd1"
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    fam = single_file.families()["sd1"]
    cfg = ldm.unet_config_from_ldm(ldm.under(shapes, ldm.UNET), **fam.heads)
    assert cfg == get_preset("sd15")
    vae_cfg = ldm.vae_config_from_ldm(ldm.under(shapes, ldm.VAE), fam.vae_scale)
    assert vae_cfg == get_preset("vae-sd")
    with torch.device("meta"):
        load_exact(build_model(cfg), ldm.unet_from_ldm(ldm.under(meta, ldm.UNET), cfg), "U-Net", assign=True)
        load_exact(build_model(vae_cfg), ldm.vae_from_ldm(ldm.under(meta, ldm.VAE), vae_cfg), "VAE", assign=True)
    text = build_text_model(text_config(TOWERS["clip-l"]))
    hf = ldm.clip_from_ldm({k: torch.arange(77)[None] if k.endswith("position_ids") else v
                            for k, v in ldm.under(meta, "cond_stage_model.transformer.").items()})  # fmt: skip
    load_exact(text, hf_text_keys(text, hf), "CLIP", assign=True)
    rest = [k for k in shapes if not k.startswith((ldm.UNET, ldm.VAE, "cond_stage_model."))]
    assert sorted(rest) == sorted(k for k in ldm.SCHEDULE_BUFFERS if k != "logvar")
