"""Tiny Stable Diffusion checkpoints in the original single-file key layouts, for tests (no real weights).

The key schemas are written here from the original code, independently of inkwash's converter:
CompVis/stable-diffusion `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel: input_blocks, middle_block,
output_blocks, ResBlock in_layers/emb_layers/out_layers, SpatialTransformer) and `model.py` (Encoder/Decoder: down/up
blocks, mid block_1/attn_1/block_2, nin_shortcut), OpenAI CLIP as transformers names it (SD 1.x), and open_clip's
text transformer (resblocks with fused in_proj attention, SD 2.x / SDXL). Each builder also returns the matching
diffusers config, written from the published model_index layouts at tiny sizes, for diffusers' own conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# ------------------------------------------------------------------------------------------ tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("b", "l"), ("bl", "u"), ("blu", "e</w>")]


def write_tokenizer(folder: Path) -> Path:
    """A tiny CLIP BPE tokenizer (vocab.json, merges.txt) in CLIP's format: every byte with and without </w>,
    a few merges, then <|startoftext|> and <|endoftext|> last (so end-of-text has the largest id, as in CLIP)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return folder


VOCAB = 256 * 2 + len(MERGES) + 2
BOS, EOS = VOCAB - 2, VOCAB - 1

# ------------------------------------------------------------------------------------------ U-Net schema


def _res(p: str, ci: int, co: int, emb: int) -> dict:
    s = {f"{p}.in_layers.0.weight": (ci,), f"{p}.in_layers.0.bias": (ci,),
         f"{p}.in_layers.2.weight": (co, ci, 3, 3), f"{p}.in_layers.2.bias": (co,),
         f"{p}.emb_layers.1.weight": (co, emb), f"{p}.emb_layers.1.bias": (co,),
         f"{p}.out_layers.0.weight": (co,), f"{p}.out_layers.0.bias": (co,),
         f"{p}.out_layers.3.weight": (co, co, 3, 3), f"{p}.out_layers.3.bias": (co,)}  # fmt: skip
    if ci != co:
        s.update({f"{p}.skip_connection.weight": (co, ci, 1, 1), f"{p}.skip_connection.bias": (co,)})
    return s


def _transformer(p: str, c: int, depth: int, ctx: int, linear: bool) -> dict:
    proj = (c, c) if linear else (c, c, 1, 1)
    s = {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.proj_in.weight": proj, f"{p}.proj_in.bias": (c,),
         f"{p}.proj_out.weight": proj, f"{p}.proj_out.bias": (c,)}  # fmt: skip
    for k in range(depth):
        b = f"{p}.transformer_blocks.{k}"
        s.update({f"{b}.attn1.to_q.weight": (c, c), f"{b}.attn1.to_k.weight": (c, c), f"{b}.attn1.to_v.weight": (c, c),
                  f"{b}.attn1.to_out.0.weight": (c, c), f"{b}.attn1.to_out.0.bias": (c,),
                  f"{b}.ff.net.0.proj.weight": (8 * c, c), f"{b}.ff.net.0.proj.bias": (8 * c,),
                  f"{b}.ff.net.2.weight": (c, 4 * c), f"{b}.ff.net.2.bias": (c,),
                  f"{b}.attn2.to_q.weight": (c, c), f"{b}.attn2.to_k.weight": (c, ctx),
                  f"{b}.attn2.to_v.weight": (c, ctx), f"{b}.attn2.to_out.0.weight": (c, c),
                  f"{b}.attn2.to_out.0.bias": (c,)})  # fmt: skip
        for n in (1, 2, 3):
            s.update({f"{b}.norm{n}.weight": (c,), f"{b}.norm{n}.bias": (c,)})
    return s


def ldm_unet_schema(mc, mult, n, attention, depths, ctx, linear, in_ch=4, out_ch=4, adm=0) -> dict:
    """openaimodel.UNetModel's state-dict key -> shape (without `model.diffusion_model.`). `depths`: transformer
    blocks per level (the middle block takes the last)."""
    emb = 4 * mc
    s = {"time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,), "time_embed.2.weight": (emb, emb),
         "time_embed.2.bias": (emb,), "input_blocks.0.0.weight": (mc, in_ch, 3, 3),
         "input_blocks.0.0.bias": (mc,)}  # fmt: skip
    if adm:
        s.update({"label_emb.0.0.weight": (emb, adm), "label_emb.0.0.bias": (emb,), "label_emb.0.2.weight": (emb, emb),
                  "label_emb.0.2.bias": (emb,)})  # fmt: skip
    chans, b, ch, skips = [mc * m for m in mult], 1, mc, [mc]
    for i, co in enumerate(chans):
        for _ in range(n):
            s.update(_res(f"input_blocks.{b}.0", ch, co, emb))
            ch = co
            if i in attention:
                s.update(_transformer(f"input_blocks.{b}.1", ch, depths[i], ctx, linear))
            skips.append(ch)
            b += 1
        if i < len(chans) - 1:
            s.update({f"input_blocks.{b}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{b}.0.op.bias": (ch,)})
            skips.append(ch)
            b += 1
    s.update(_res("middle_block.0", ch, ch, emb))
    s.update(_transformer("middle_block.1", ch, depths[-1], ctx, linear))
    s.update(_res("middle_block.2", ch, ch, emb))
    b = 0
    for i in reversed(range(len(chans))):
        co = chans[i]
        for j in range(n + 1):
            s.update(_res(f"output_blocks.{b}.0", ch + skips.pop(), co, emb))
            ch = co
            at = 1
            if i in attention:
                s.update(_transformer(f"output_blocks.{b}.1", ch, depths[i], ctx, linear))
                at = 2
            if i > 0 and j == n:
                s.update(
                    {f"output_blocks.{b}.{at}.conv.weight": (ch, ch, 3, 3), f"output_blocks.{b}.{at}.conv.bias": (ch,)}
                )
            b += 1
    s.update({"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.weight": (out_ch, ch, 3, 3), "out.2.bias": (out_ch,)})
    return s


# ------------------------------------------------------------------------------------------ VAE schema


def _vres(p: str, ci: int, co: int) -> dict:
    s = {f"{p}.norm1.weight": (ci,), f"{p}.norm1.bias": (ci,), f"{p}.conv1.weight": (co, ci, 3, 3),
         f"{p}.conv1.bias": (co,), f"{p}.norm2.weight": (co,), f"{p}.norm2.bias": (co,),
         f"{p}.conv2.weight": (co, co, 3, 3), f"{p}.conv2.bias": (co,)}  # fmt: skip
    if ci != co:
        s.update({f"{p}.nin_shortcut.weight": (co, ci, 1, 1), f"{p}.nin_shortcut.bias": (co,)})
    return s


def _vmid(p: str, c: int) -> dict:
    s = {**_vres(f"{p}.block_1", c, c), **_vres(f"{p}.block_2", c, c)}
    s.update({f"{p}.attn_1.norm.weight": (c,), f"{p}.attn_1.norm.bias": (c,)})
    for name in ("q", "k", "v", "proj_out"):
        s.update({f"{p}.attn_1.{name}.weight": (c, c, 1, 1), f"{p}.attn_1.{name}.bias": (c,)})
    return s


def ldm_vae_schema(chans, n, z=4) -> dict:
    """ldm Encoder/Decoder (AutoencoderKL) key -> shape, without `first_stage_model.`."""
    s = {"encoder.conv_in.weight": (chans[0], 3, 3, 3), "encoder.conv_in.bias": (chans[0],)}
    ch = chans[0]
    for i, co in enumerate(chans):
        for j in range(n):
            s.update(_vres(f"encoder.down.{i}.block.{j}", ch, co))
            ch = co
        if i < len(chans) - 1:
            s.update(
                {
                    f"encoder.down.{i}.downsample.conv.weight": (ch, ch, 3, 3),
                    f"encoder.down.{i}.downsample.conv.bias": (ch,),
                }
            )
    s.update(_vmid("encoder.mid", ch))
    s.update({"encoder.norm_out.weight": (ch,), "encoder.norm_out.bias": (ch,),
              "encoder.conv_out.weight": (2 * z, ch, 3, 3), "encoder.conv_out.bias": (2 * z,),
              "quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,),
              "post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,),
              "decoder.conv_in.weight": (chans[-1], z, 3, 3), "decoder.conv_in.bias": (chans[-1],)})  # fmt: skip
    ch = chans[-1]
    s.update(_vmid("decoder.mid", ch))
    for i in reversed(range(len(chans))):  # decoder.up.0 is the full-resolution level
        co = chans[i]
        for j in range(n + 1):
            s.update(_vres(f"decoder.up.{i}.block.{j}", ch, co))
            ch = co
        if i > 0:
            s.update(
                {f"decoder.up.{i}.upsample.conv.weight": (ch, ch, 3, 3), f"decoder.up.{i}.upsample.conv.bias": (ch,)}
            )
    s.update({"decoder.norm_out.weight": (ch,), "decoder.norm_out.bias": (ch,),
              "decoder.conv_out.weight": (3, ch, 3, 3), "decoder.conv_out.bias": (3,)})  # fmt: skip
    return s


# ------------------------------------------------------------------------------------------ text schemas


def clip_schema(width: int, layers: int, vocab: int = VOCAB, positions: int = 77) -> dict:
    """OpenAI CLIP's text model in transformers' names (as SD 1.x stores it under cond_stage_model.transformer.)."""
    s = {"text_model.embeddings.token_embedding.weight": (vocab, width),
         "text_model.embeddings.position_embedding.weight": (positions, width),
         "text_model.final_layer_norm.weight": (width,), "text_model.final_layer_norm.bias": (width,)}  # fmt: skip
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s.update({f"{p}.self_attn.{proj}.weight": (width, width), f"{p}.self_attn.{proj}.bias": (width,)})
        s.update({f"{p}.layer_norm1.weight": (width,), f"{p}.layer_norm1.bias": (width,),
                  f"{p}.layer_norm2.weight": (width,), f"{p}.layer_norm2.bias": (width,),
                  f"{p}.mlp.fc1.weight": (2 * width, width), f"{p}.mlp.fc1.bias": (2 * width,),
                  f"{p}.mlp.fc2.weight": (width, 2 * width), f"{p}.mlp.fc2.bias": (width,)})  # fmt: skip
    return s


def open_clip_schema(width: int, layers: int, embed: int, vocab: int = VOCAB, positions: int = 77) -> dict:
    """open_clip's text transformer (SD 2.x: cond_stage_model.model.; SDXL: conditioner.embedders.N.model.)."""
    s = {"token_embedding.weight": (vocab, width), "positional_embedding": (positions, width),
         "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, embed),
         "logit_scale": ()}  # fmt: skip
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        s.update({f"{p}.ln_1.weight": (width,), f"{p}.ln_1.bias": (width,),
                  f"{p}.attn.in_proj_weight": (3 * width, width), f"{p}.attn.in_proj_bias": (3 * width,),
                  f"{p}.attn.out_proj.weight": (width, width), f"{p}.attn.out_proj.bias": (width,),
                  f"{p}.ln_2.weight": (width,), f"{p}.ln_2.bias": (width,),
                  f"{p}.mlp.c_fc.weight": (2 * width, width), f"{p}.mlp.c_fc.bias": (2 * width,),
                  f"{p}.mlp.c_proj.weight": (width, 2 * width), f"{p}.mlp.c_proj.bias": (width,)})  # fmt: skip
    return s


# ------------------------------------------------------------------------------------------ tiny families

SCALED_LINEAR_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2

# Diffusers configs of the same tiny networks (written from the published SD 1.5 / 2.1 / SDXL unet/config.json with
# the sizes shrunk): the oracle's side.
TINY = {
    "sd1": dict(
        unet=dict(mc=32, mult=(1, 2), n=1, attention=(0,), depths=(1, 1), ctx=64, linear=False),
        diffusers_unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=64,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        texts={"cond_stage_model.transformer.": ("clip", 64, 2, 0)},
    ),
    "sd2": dict(
        unet=dict(mc=64, mult=(1, 2), n=1, attention=(0, 1), depths=(1, 1), ctx=128, linear=True),
        diffusers_unet=dict(
            block_out_channels=(64, 128),
            layers_per_block=1,
            attention_head_dim=(1, 2),
            cross_attention_dim=128,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            use_linear_projection=True,
        ),
        texts={"cond_stage_model.model.": ("open_clip", 128, 3, 128)},
    ),
    "sdxl-base": dict(
        unet=dict(
            mc=64, mult=(1, 2, 2), n=1, attention=(1, 2), depths=(1, 1, 2), ctx=192, linear=True, adm=40 + 6 * 256
        ),
        diffusers_unet=dict(
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            attention_head_dim=(1, 2, 2),
            cross_attention_dim=192,
            transformer_layers_per_block=(1, 1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=40 + 6 * 256,
        ),
        texts={
            "conditioner.embedders.0.transformer.": ("clip", 64, 2, 0),
            "conditioner.embedders.1.model.": ("open_clip", 128, 3, 40),
        },
    ),
    "sdxl-refiner": dict(
        unet=dict(mc=64, mult=(1, 2, 2), n=1, attention=(1,), depths=(1, 2, 2), ctx=128, linear=True, adm=40 + 5 * 256),
        diffusers_unet=dict(
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            attention_head_dim=(1, 2, 2),
            cross_attention_dim=128,
            transformer_layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=40 + 5 * 256,
        ),
        texts={"conditioner.embedders.0.model.": ("open_clip", 128, 3, 40)},
    ),
}
TINY_VAE = dict(chans=(32, 64), n=1)
DIFFUSERS_VAE = dict(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)  # fmt: skip


def family_schema(family: str) -> dict:
    """Full key -> shape of a tiny single file of `family`."""
    spec = TINY[family]
    s = {"model.diffusion_model." + k: v for k, v in ldm_unet_schema(**spec["unet"]).items()}
    s.update({"first_stage_model." + k: v for k, v in ldm_vae_schema(**TINY_VAE).items()})
    for prefix, (kind, width, layers, embed) in spec["texts"].items():
        part = clip_schema(width, layers) if kind == "clip" else open_clip_schema(width, layers, embed)
        s.update({prefix + k: v for k, v in part.items()})
    return s


def random_tensors(schema: dict, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in schema.items():
        if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "ln_1.weight", "ln_2.weight",
                       "ln_final.weight", "layer_norm1.weight", "layer_norm2.weight", "norm_out.weight",
                       "in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):  # fmt: skip
            out[k] = 1 + std * torch.randn(shape, generator=g)
        elif k.endswith("positional_embedding") or "position_embedding" in k or "token_embedding" in k:
            out[k] = 0.5 * torch.randn(shape, generator=g)
        else:
            out[k] = std * torch.randn(shape, generator=g) / max(1, (shape[1] if len(shape) > 1 else 1)) ** 0.25
    return out


def write_family(folder: Path, family: str, seed: int = 0, extra: dict | None = None, drop: tuple = ()) -> Path:
    """A tiny single file of `family` (with SD's schedule buffers, as CompVis files have) and a tokenizer/ beside it."""
    sd = random_tensors(family_schema(family), seed)
    sd["betas"] = SCALED_LINEAR_BETAS.float()
    sd["alphas_cumprod"] = torch.cumprod(1 - SCALED_LINEAR_BETAS, 0).float()
    for k in drop:
        del sd[k]
    sd.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer")
    path = folder / f"tiny-{family}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
