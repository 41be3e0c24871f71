"""Write tests/fixtures/sd15-original-keys.json: every tensor name and shape of a Stable Diffusion 1.5 single file
(v1-5-pruned-emaonly layout: U-Net, autoencoder, CLIP ViT-L/14 text model, the DDPM schedule buffers).

The names come from the key schema in tests/sd_tiny.py (written from CompVis' openaimodel.py / model.py) at SD 1.5's
published sizes; before writing, diffusers' own single-file converters must map them exactly, name for name and
shape for shape, onto diffusers' full-size UNet2DConditionModel, AutoencoderKL and transformers' CLIPTextModel built
from the published configs (on the meta device). Run: python scripts/sd15_key_fixture.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import sd_tiny  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "sd15-original-keys.json"
SCHEDULE = (  # CompVis LatentDiffusion.register_schedule
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip


def schema() -> dict[str, tuple[int, ...]]:
    s = {"model.diffusion_model." + k: v for k, v in sd_tiny.ldm_unet_schema(
        320, (1, 2, 4, 4), 2, (0, 1, 2), (1, 1, 1, 1), 768, linear=False).items()}  # fmt: skip
    s.update({"first_stage_model." + k: v for k, v in sd_tiny.ldm_vae_schema((128, 256, 512, 512), 2).items()})
    clip = sd_tiny.clip_schema(768, 12, vocab=49408)
    for k, v in clip.items():  # CLIP's MLP is 4x wide (the tiny schema uses 2x)
        if ".mlp.fc1." in k:
            v = (3072,) + v[1:]
        elif k.endswith(".mlp.fc2.weight"):
            v = (768, 3072)
        s["cond_stage_model.transformer." + k] = v
    s["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    s.update({k: (1000,) for k in SCHEDULE})
    return s


def check_with_diffusers(s: dict) -> None:
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils as sfu

    from inkwash.text.clip import CLIP_L

    meta = {k: torch.empty(v, device="meta") for k, v in s.items()}
    unet_cfg = dict(cross_attention_dim=768)
    vae_cfg = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)  # fmt: skip
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_cfg)
        vae = diffusers.AutoencoderKL(**vae_cfg)
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L))  # openai/clip-vit-large-patch14
    pairs = [
        (unet, sfu.convert_ldm_unet_checkpoint(meta, {**unet_cfg, "layers_per_block": 2})),
        (vae, sfu.convert_ldm_vae_checkpoint(meta, vae_cfg)),
        (clip, {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(meta).items()
                if k.startswith("text_model.") and not k.endswith("position_ids")}),
    ]  # fmt: skip
    for model, converted in pairs:
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted.items()}
        assert own == got, (type(model).__name__, sorted(set(own) ^ set(got))[:5])


if __name__ == "__main__":
    s = schema()
    check_with_diffusers(s)
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(list(v))}" for k, v in s.items())
    OUT.write_text("{\n" + lines + "\n}\n")
    print(f"{OUT}: {len(s)} tensors, {sum(torch.Size(v).numel() for v in s.values()):,} numbers")
