"""Using checkpoints made elsewhere: `inkwash generate --model sd.safetensors` end to end on tiny random SD files,
the family's sampling defaults, SDXL's empty-negative zeros and refiner conditions, base + refiner."""

from __future__ import annotations

import pytest
import sd_tiny
import torch
from PIL import Image

import inkwash
from inkwash.cli import main
from inkwash.errors import UserError
from inkwash.pipeline import Pipeline


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return sd_tiny.write_family(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL base and a refiner sharing its autoencoder (as the published pair does)."""
    folder = tmp_path_factory.mktemp("sdxl")
    base = sd_tiny.write_family(folder / "base", "sdxl-base", seed=1)
    from safetensors.torch import load_file

    vae = {k: v for k, v in load_file(str(base)).items() if k.startswith("first_stage_model.")}
    refiner = sd_tiny.write_family(folder / "refiner", "sdxl-refiner", seed=2, extra=vae)
    return base, refiner


def test_generate_cli_end_to_end(sd1, tmp_path, one_thread, capsys):
    out = tmp_path / "img.png"
    rc = main(["generate", "a red circle", "--model", str(sd1), "--steps", "2", "--size", "64", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    img = Image.open(out)
    assert img.size == (64, 64)
    params = img.info["parameters"]
    assert "Steps: 2, Sampler: ddim, Schedule type: leading, CFG scale: 7.5" in params
    assert "Model: tiny-sd1" in params


def test_family_defaults(sd1, sdxl):
    pipe = inkwash.load(sd1)
    s = pipe.sampling
    assert (s.sampler, s.steps, s.guidance, s.schedule, pipe.image_size) == ("ddim", 50, 7.5, "leading", 512)
    assert (pipe.prediction, pipe.latent_factor, pipe.channels) == ("eps", 2, 4)  # the tiny VAE has 2 levels
    assert pipe.meta["format"] == "sd1"
    base = inkwash.load(sdxl[0])
    s = base.sampling
    assert (s.sampler, s.steps, s.guidance, base.image_size) == ("euler", 50, 5.0, 1024)
    assert base.zero_empty_negative and not inkwash.load(sdxl[1]).zero_empty_negative


def test_sd2_prediction_default_and_override(tmp_path):
    path = sd_tiny.write_family(tmp_path, "sd2")
    assert inkwash.load(path).prediction == "v"  # SD 2.x 768-v
    assert inkwash.load(path, prediction="eps").prediction == "eps"  # its 512 px base models
    with pytest.raises(UserError, match="prediction"):
        inkwash.load(path, prediction="x0")


def test_sdxl_conditions(sdxl):
    base, refiner = (Pipeline.from_file(p) for p in sdxl)
    s = base.settings()
    cond, uncond = base.conditions(["a red circle"], "", None, s, 64)
    assert cond["context"].abs().sum() > 0
    assert torch.count_nonzero(uncond["context"]) == 0 and torch.count_nonzero(uncond["y"]) == 0
    _, uncond = base.conditions(["a red circle"], "blue", None, s, 64)
    assert torch.count_nonzero(uncond["context"]) > 0
    run = refiner.prepare("a red circle", size=64, steps=2, original_size=96)
    micro_c, micro_u = run.model.cond["micro"], run.model.uncond["micro"]
    assert micro_c.tolist() == [[96.0, 96.0, 0.0, 0.0, 6.0]] and micro_u.tolist() == [[96.0, 96.0, 0.0, 0.0, 2.5]]


def test_base_and_refiner_cli(sdxl, tmp_path, one_thread, capsys):
    base, refiner = sdxl
    out = tmp_path / "xl.png"
    rc = main(["generate", "a red circle", "--model", str(base), "--refiner", str(refiner), "--steps", "2", "--size",
               "32", "--handoff", "0.5", "-o", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.5" in Image.open(out).info["parameters"]


def test_cli_errors_are_one_sentence(tmp_path, capsys):
    (tmp_path / "m.safetensors").write_bytes(b"nope")
    assert main(["generate", "x", "--model", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inkwash: error:") and "Traceback" not in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ diffusers folders


def _tiny_pipeline(kind: str, tmp):
    """A tiny diffusers StableDiffusion(XL)Pipeline built by diffusers itself and saved with save_pretrained."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tok_dir = sd_tiny.write_tokenizer(tmp / "tok")

    def tokenizer(pad="<|endoftext|>"):
        return transformers.CLIPTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"),
                                          pad_token=pad, model_max_length=77)  # fmt: skip

    def clip(width, projection=False):
        cfg = transformers.CLIPTextConfig(
            vocab_size=sd_tiny.VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=32,
            bos_token_id=sd_tiny.BOS, eos_token_id=sd_tiny.EOS,
        )  # fmt: skip
        model = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(cfg)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        return model.eval()

    vae = diffusers.AutoencoderKL(**sd_tiny.DIFFUSERS_VAE, sample_size=16).eval()
    if kind == "sd":
        unet = diffusers.UNet2DConditionModel(sample_size=8, **sd_tiny.TINY["sd1"]["diffusers_unet"]).eval()
        sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        steps_offset=1, clip_sample=False, set_alpha_to_one=False)  # fmt: skip
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=clip(64), tokenizer=tokenizer(), unet=unet,
                                                 scheduler=sched, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)  # fmt: skip
    else:
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=192,
            transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        ).eval()  # fmt: skip
        sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")  # fmt: skip
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=clip(64), text_encoder_2=clip(128, True),
                                                   tokenizer=tokenizer(), tokenizer_2=tokenizer("!"), unet=unet,
                                                   scheduler=sched)  # fmt: skip
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    pipe.save_pretrained(tmp / kind, safe_serialization=True)
    return pipe, tmp / kind


PROMPTS = ["a red circle", "blue"]


def test_diffusers_sd_folder(tmp_path, one_thread):
    theirs, folder = _tiny_pipeline("sd", tmp_path)
    pipe = inkwash.load(folder)
    s = pipe.sampling
    assert (s.sampler, s.steps, s.guidance, s.schedule, pipe.image_size, pipe.prediction) == (
        "ddim",
        50,
        7.5,
        "leading",
        16,
        "eps",
    )
    with torch.no_grad():
        cond, uncond = theirs.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
        emb = pipe.encoder(PROMPTS)
        torch.testing.assert_close(emb.tokens, cond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.encoder([""] * 2).tokens, uncond, atol=1e-5, rtol=1e-5)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 20.0])
        torch.testing.assert_close(pipe.net(x, t, context=cond), theirs.unet(x, t, cond).sample, atol=1e-5, rtol=1e-5)
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(pipe.vae.decode(z), theirs.vae.decode(z).sample, atol=1e-5, rtol=1e-5)
    assert pipe("a red circle", steps=2, size=16)[0].size == (16, 16)


def test_diffusers_sdxl_folder(tmp_path, one_thread):
    theirs, folder = _tiny_pipeline("sdxl", tmp_path)
    # micro_embed_dim comes from the folder's unet config (8 here; 256 in SDXL)
    pipe = Pipeline.from_file(folder)
    assert (pipe.sampling.sampler, pipe.sampling.guidance, pipe.zero_empty_negative) == ("euler", 5.0, True)
    with torch.no_grad():
        cond, uncond, pooled, neg_pooled = theirs.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                                do_classifier_free_guidance=True)  # fmt: skip
        emb = pipe.encoder(PROMPTS)
        torch.testing.assert_close(emb.tokens, cond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(emb.pooled, pooled, atol=1e-5, rtol=1e-5)
        ours_c, ours_u = pipe.conditions(PROMPTS, "", None, pipe.settings(), 16)
        assert (
            torch.count_nonzero(uncond) == torch.count_nonzero(ours_u["context"]) == 0
        )  # force_zeros_for_empty_prompt
        assert torch.count_nonzero(neg_pooled) == torch.count_nonzero(ours_u["y"]) == 0
    assert pipe("a red circle", steps=2, size=16)[0].size == (16, 16)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without model_index.json"):
        inkwash.load(tmp_path / "empty")
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text('{"_class_name": "SomeOtherPipeline"}')
    with pytest.raises(UserError, match="SomeOtherPipeline folder; inkwash loads"):
        inkwash.load(tmp_path / "flux")


def test_sd_folder_samples_as_diffusers_does(tmp_path, one_thread):
    """The whole chain (text, guidance 7.5, DDIM with SD's leading spacing, U-Net) against diffusers'
    StableDiffusionPipeline from the same starting latents. diffusers' DDIM is given set_alpha_to_one=True: with SD's
    False its last step stops at timestep 0's noise level, where inkwash (like k-diffusion) ends at the clean image."""
    diffusers = pytest.importorskip("diffusers")
    theirs, folder = _tiny_pipeline("sd", tmp_path)
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config, set_alpha_to_one=True)
    pipe = inkwash.load(folder)
    run = pipe.prepare("a red circle", seed=3, steps=4, size=16)
    from inkwash.sampling import SAMPLERS

    with torch.no_grad():
        ours = SAMPLERS[run.settings.sampler](run.model, run.x, run.times, process=run.process)
        ref = theirs("a red circle", num_inference_steps=4, guidance_scale=7.5, latents=run.x.clone(),
                     output_type="latent").images  # fmt: skip
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
