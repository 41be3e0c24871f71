"""CompVis / Stability single-file layouts of Stable Diffusion 1.x, 2.x and SDXL -> inkwash networks.

Owns every original (LDM / SGM) key name: the U-Net under `model.diffusion_model.`, the KL autoencoder under
`first_stage_model.`, and the text towers (`cond_stage_model.transformer.` = OpenAI CLIP in transformers' names,
SD 1.x; `cond_stage_model.model.` = OpenCLIP with fused in_proj attention, SD 2.x; `conditioner.embedders.N.`,
SDXL). The layouts are written from the original code (CompVis/stable-diffusion `openaimodel.py` and `model.py`,
Stability-AI/generative-models `sgm/`, mlfoundations/open_clip `transformer.py`), not from diffusers: diffusers'
own conversion is the test oracle.

Shapes decide a network's config (channels, levels, blocks, transformer depth, widths), so the same code reads a
full-size file and a tiny test one; what shapes cannot say (heads, latent scale) comes from the family. Every key
is accounted for: an unmatched key or a missing one raises UserError listing them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from inkwash.errors import UserError
from inkwash.models.unet import UNetConfig
from inkwash.models.vae import VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
Shapes = Mapping[str, tuple[int, ...]]  # key -> shape: what detection and config inference read (no tensors)

# The DDPM schedule CompVis' LatentDiffusion registers as buffers beside the weights (ldm/models/diffusion/ddpm.py
# register_schedule); derived from `betas`, which is checked against the process inkwash samples with.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
)  # fmt: skip


def report(what: str, unmatched: list[str], missing: list[str]) -> None:
    """One UserError naming (up to 12 of each) the keys nothing took and the keys nothing gave."""
    if not unmatched and not missing:
        return
    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} unmatched keys {sorted(unmatched)[:12]}")
    if missing:
        parts.append(f"{len(missing)} missing keys {sorted(missing)[:12]}")
    raise UserError(f"{what}: " + " and ".join(parts))


def under(sd: Mapping, prefix: str) -> dict:
    """The entries under `prefix`, with it removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := rx.match(k))})


# --------------------------------------------------------------------------------------------------- U-Net


def unet_config_from_ldm(shapes: Shapes, *, num_heads: int = 0, head_dim: int = 0, micro_conditions: int = 0,
                         micro_embed_dim: int = 256) -> UNetConfig:  # fmt: skip
    """UNetConfig of an `openaimodel.UNetModel` state dict (keys without `model.diffusion_model.`), read from its
    shapes. Heads are not in the shapes: SD 1.x has 8 per block (`num_heads`), SD 2.x and SDXL 64 channels each
    (`head_dim`). SDXL's `label_emb` takes the pooled text and `micro_conditions` Fourier-embedded scalars."""
    keys = set(shapes)
    if "input_blocks.0.0.weight" not in keys:
        raise UserError("the U-Net has no input_blocks.0.0 (conv_in) weight: not an LDM U-Net")
    mc, in_ch = shapes["input_blocks.0.0.weight"][:2]
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in keys]
    n = (downs[0] if downs else len(blocks)) - 1  # ResBlocks per level
    levels = len(downs) + 1
    if n < 1 or blocks != list(range(levels * (n + 1))):
        raise UserError(f"the U-Net's input_blocks {blocks} do not form levels of equal size")
    first = [1 + i * (n + 1) for i in range(levels)]  # each level's first ResBlock
    chans = [shapes[f"input_blocks.{b}.0.out_layers.3.weight"][0] for b in first]
    attention = [i for i, b in enumerate(first) if f"input_blocks.{b}.1.norm.weight" in keys]

    def depth(prefix: str) -> int:
        return len(_indices(keys, re.escape(prefix) + r"\.transformer_blocks\.(\d+)\."))

    mid_attention = "middle_block.1.norm.weight" in keys
    mid_depth = depth("middle_block.1") if mid_attention else 1
    depths = [depth(f"input_blocks.{b}.1") if i in attention else 1 for i, b in enumerate(first)]
    if levels - 1 not in attention:
        depths[-1] = mid_depth  # the mid block's transformer takes the deepest level's depth
    if mid_depth != depths[-1]:
        raise UserError(f"the U-Net's mid transformer has {mid_depth} blocks, its deepest level {depths[-1]}")
    attn_depths = {depths[i] for i in attention} | {mid_depth}
    transformer_depth = attn_depths.pop() if len(attn_depths) == 1 else tuple(depths)
    to_k = sorted(k for k in keys if k.endswith("attn2.to_k.weight"))
    context_dim = shapes[to_k[0]][1] if to_k else 0
    y_dim = 0
    if "label_emb.0.0.weight" in keys:
        y_dim = shapes["label_emb.0.0.weight"][1] - micro_conditions * micro_embed_dim
        if y_dim <= 0:
            raise UserError(f"the U-Net's label_emb takes {y_dim + micro_conditions * micro_embed_dim} inputs, too few "
                            f"for {micro_conditions} micro-conditions")  # fmt: skip
    try:
        return UNetConfig(
            in_channels=in_ch, out_channels=shapes["out.2.weight"][0], model_channels=mc,
            channel_mult=tuple(c // mc for c in chans), num_res_blocks=n, attention_levels=tuple(attention),
            num_heads=max(1, chans[0] // head_dim) if head_dim else num_heads or 8, head_dim=head_dim,
            transformer_depth=transformer_depth, context_dim=context_dim,
            y_dim=y_dim, micro_conditions=micro_conditions if y_dim else 0, micro_embed_dim=micro_embed_dim,
            mid_attention=mid_attention,
        )  # fmt: skip
    except (ValueError, KeyError) as e:
        raise UserError(f"the U-Net's shapes do not describe a Stable Diffusion U-Net ({e})") from None


def _unet_modules(cfg: UNetConfig) -> dict[str, tuple[str, str]]:
    """LDM module prefix -> (inkwash prefix, kind): kind "res" (ResBlock), "attn" (SpatialTransformer) or "plain"."""
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    m = {
        "time_embed.0": ("time_embed.fc1", "plain"), "time_embed.2": ("time_embed.fc2", "plain"),
        "label_emb.0.0": ("y_embed.fc1", "plain"), "label_emb.0.2": ("y_embed.fc2", "plain"),
        "input_blocks.0.0": ("conv_in", "plain"), "out.0": ("norm_out", "plain"), "out.2": ("conv_out", "plain"),
        "middle_block.0": ("mid.res.0", "res"),
    }  # fmt: skip
    if cfg.mid_attention:
        m["middle_block.1"] = ("mid_attn", "attn")
        m["middle_block.2"] = ("mid.res.1", "res")
    for i in range(levels):
        for j in range(n):
            b = 1 + i * (n + 1) + j
            m[f"input_blocks.{b}.0"] = (f"down.{i}.res.{j}", "res")
            m[f"input_blocks.{b}.1"] = (f"down.{i}.attn.{j}", "attn")
        m[f"input_blocks.{1 + i * (n + 1) + n}.0.op"] = (f"down.{i}.resample.conv", "plain")
    for u in range(levels):  # deepest level first, as inkwash's `up`
        attn = (levels - 1 - u) in cfg.attention_levels
        for j in range(n + 1):
            b = u * (n + 1) + j
            m[f"output_blocks.{b}.0"] = (f"up.{u}.res.{j}", "res")
            m[f"output_blocks.{b}.1"] = (f"up.{u}.attn.{j}", "attn")
        m[f"output_blocks.{u * (n + 1) + n}.{2 if attn else 1}.conv"] = (f"up.{u}.resample.conv", "plain")
    return m


_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "emb_proj", "out_layers.0": "norm2",
        "out_layers.3": "conv2", "skip_connection": "skip"}  # fmt: skip
_ATTN = [  # inside a SpatialTransformer, after `transformer_blocks.K.` -> `blocks.K.`
    (r"attn1\.to_out\.0\.", "attn1.out."), (r"attn2\.to_out\.0\.", "attn2.out."),
    (r"ff\.net\.0\.proj\.", "ff.proj."), (r"ff\.net\.2\.", "ff.out."),
]  # fmt: skip
_ATTN_PARAM = re.compile(  # every other parameter of a SpatialTransformer
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2))"
    r"\.(weight|bias)"
)
_QKV = {"attn1.to_q": ("attn1.qkv", 0), "attn1.to_k": ("attn1.qkv", 1), "attn1.to_v": ("attn1.qkv", 2),
        "attn2.to_q": ("attn2.q", 0), "attn2.to_k": ("attn2.kv", 0), "attn2.to_v": ("attn2.kv", 1)}  # fmt: skip
_FUSED_PARTS = {"attn1.qkv": 3, "attn2.q": 1, "attn2.kv": 2}


def _split(key: str, table: Mapping) -> tuple[str, str] | None:
    """(module prefix in `table`, the rest) for the longest known prefix of a key."""
    parts = key.split(".")
    for cut in range(min(4, len(parts) - 1), 1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return prefix, ".".join(parts[cut:])
    return None


def _join_fused(fused: dict[str, list], out: dict[str, torch.Tensor], parts_name: str) -> list[str]:
    """Concatenate each fused projection's parts into `out` (rows in order); the keys that lack a part."""
    missing = []
    for key, parts in fused.items():
        if any(p is None for p in parts):
            missing.append(f"{key} ({parts_name})")
        else:
            out[key] = torch.cat(parts, dim=0)
    return missing


def unet_from_ldm(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """An LDM U-Net state dict (without `model.diffusion_model.`) -> inkwash UNet's: q/k/v fused, 1x1-conv
    projections as linear. UserError listing unmatched and missing keys."""
    table = _unet_modules(cfg)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}  # inkwash key -> parts in order
    unmatched = []
    for key, value in sd.items():
        hit = _split(key, table)
        if hit is None:
            unmatched.append(key)
            continue
        (ours, kind), rest = table[hit[0]], hit[1]
        if kind == "res":
            head, _, param = rest.rpartition(".")
            if head not in _RES:
                unmatched.append(key)
                continue
            rest = f"{_RES[head]}.{param}"
        elif kind == "attn":
            m = re.fullmatch(r"transformer_blocks\.(\d+)\.(attn[12]\.to_[qkv])\.weight", rest)
            if m:
                name, index = _QKV[m[2]]
                parts = fused.setdefault(f"{ours}.blocks.{m[1]}.{name}.weight", [None] * _FUSED_PARTS[name])
                parts[index] = value
                continue
            if not _ATTN_PARAM.fullmatch(rest):
                unmatched.append(key)
                continue
            rest = re.sub(r"^transformer_blocks\.", "blocks.", rest)
            for pattern, repl in _ATTN:
                rest = re.sub(pattern, repl, rest)
            if re.fullmatch(r"proj_(in|out)\.weight", rest) and value.dim() == 4:  # SD 1.x: 1x1 conv
                value = value.flatten(1)
        out[f"{ours}.{rest}"] = value
    report("the U-Net in this checkpoint", unmatched, _join_fused(fused, out, "a part of the fused projection"))
    return out


# --------------------------------------------------------------------------------------------------- VAE


def vae_config_from_ldm(shapes: Shapes, scaling_factor: float, shift_factor: float = 0.0) -> VAEConfig:
    """VAEConfig of an `ldm.modules.diffusionmodules.model` autoencoder (keys without `first_stage_model.`)."""
    keys = set(shapes)
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    if "encoder.conv_in.weight" not in keys or not levels:
        raise UserError("the autoencoder has no encoder.conv_in / encoder.down blocks: not an LDM autoencoder")
    chans = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels)
    layers = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    return VAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
        channels=chans, layers_per_block=layers, latent_channels=shapes["decoder.conv_in.weight"][1],
        mid_attention="encoder.mid.attn_1.q.weight" in keys, use_quant_conv="quant_conv.weight" in keys,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )  # fmt: skip


_VAE_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "skip"}


def _vae_rename(key: str, levels: int) -> tuple[str, int | None] | None:
    """LDM autoencoder key -> (inkwash key, q/k/v index for the fused mid attention or None); None if unknown."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m and m[5] in _VAE_RES and (m[1], m[2]) in (("encoder", "down"), ("decoder", "up")):
        i = int(m[3]) if m[2] == "down" else levels - 1 - int(m[3])  # LDM's decoder.up.0 is the full-size level
        return f"{m[1]}.{m[2]}.{i}.res.{m[4]}.{_VAE_RES[m[5]]}.{m[6]}", None
    m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(?:downsample|upsample)\.conv\.(weight|bias)", key)
    if m:
        i = int(m[2]) if m[1] == "encoder.down" else levels - 1 - int(m[2])
        return f"{m[1]}.{i}.resample.conv.{m[3]}", None
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)", key)
    if m:
        side, block, name, param = m.groups()
        if block != "attn_1":
            return (f"{side}.mid.{'res1' if block == 'block_1' else 'res2'}.{_VAE_RES[name]}.{param}", None) if (
                name in _VAE_RES) else None  # fmt: skip
        if name in ("q", "k", "v"):
            return f"{side}.mid.attn.qkv.{param}", "qkv".index(name)
        renamed = {"norm": "norm", "proj_out": "out"}.get(name)
        return (f"{side}.mid.attn.{renamed}.{param}", None) if renamed else None
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias)", key)
    if m or re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
        return key, None
    return None


def vae_from_ldm(sd: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """An LDM autoencoder state dict (without `first_stage_model.`) -> inkwash VAE's (mid attention's 1x1-conv
    q, k, v fused into one linear qkv; its proj_out as linear)."""
    levels = len(cfg.channels)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    unmatched = []
    for key, value in sd.items():
        hit = _vae_rename(key, levels)
        if hit is None:
            unmatched.append(key)
            continue
        new, index = hit
        if ".mid.attn." in new and value.dim() == 4:  # 1x1 convs -> linear
            value = value.flatten(1)
        if index is None:
            out[new] = value
        else:
            fused.setdefault(new, [None] * 3)[index] = value
    report("the autoencoder in this checkpoint", unmatched, _join_fused(fused, out, "q, k and v"))
    return out


# --------------------------------------------------------------------------------------------------- text towers


def clip_from_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP as SD 1.x / SDXL store it (transformers' CLIPTextModel keys under `transformer.`, stripped by
    the caller) -> canonical transformers keys (`text_model.*`). Files from transformers < 4.20 lack the
    `text_model.` level; the `position_ids` buffer some files carry is checked (0..76) and dropped."""
    out = {}
    for key, value in sd.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        if key == "text_model.embeddings.position_ids":
            if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                raise UserError("the CLIP text encoder's position_ids are not 0, 1, 2, ...: not a CLIP text model")
            continue
        out[key] = value
    return out


_OPEN_CLIP = [  # (open_clip name, transformers name), with `{i}` a layer index
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.weight", "text_model.final_layer_norm.weight"),
    ("ln_final.bias", "text_model.final_layer_norm.bias"),
] + [
    (f"transformer.resblocks.{{i}}.{a}.{p}", f"text_model.encoder.layers.{{i}}.{b}.{p}")
    for a, b in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
    for p in ("weight", "bias")
]  # fmt: skip
_OPEN_CLIP_RX = [(re.compile(re.escape(a).replace(r"\{i\}", r"(\d+)")), b) for a, b in _OPEN_CLIP]


def open_clip_from_ldm(sd: Mapping[str, torch.Tensor], projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower (open_clip `transformer.py`; keys under `model.`, stripped by the caller) ->
    canonical transformers keys. The fused `in_proj` attention is split into q, k, v; `text_projection` (x @ P)
    becomes the Linear weight P^T when the family uses it (SDXL), and is the only key, with CLIP's contrastive
    `logit_scale`, that a family that pools no text (SD 2.x) leaves unread."""
    out, unmatched = {}, []
    for key, value in sd.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
            continue
        if key == "text_projection":
            if projection:
                out["text_projection.weight"] = value.t()
            continue
        if key == "logit_scale":
            continue
        for rx, template in _OPEN_CLIP_RX:
            mm = rx.fullmatch(key)
            if mm:
                out[template.replace("{i}", mm[1]) if mm.groups() else template] = value
                break
        else:
            unmatched.append(key)
    report("the OpenCLIP text encoder in this checkpoint", unmatched, [])
    return out


CLIP_HEAD_WIDTH = 64  # every published CLIP text tower (ViT-L 768/12, ViT-H 1024/16, bigG 1280/20) has 64-wide heads


def open_clip_shapes(shapes: Shapes) -> dict:
    """CLIPTextConfig overrides read from an OpenCLIP text tower's shapes (width, layers, vocab, positions)."""
    width = shapes["token_embedding.weight"][1]
    return dict(
        vocab_size=shapes["token_embedding.weight"][0], hidden_size=width,
        num_attention_heads=width // CLIP_HEAD_WIDTH,
        intermediate_size=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
        num_hidden_layers=len(_indices(shapes, r"transformer\.resblocks\.(\d+)\.")),
        max_position_embeddings=shapes["positional_embedding"][0],
        projection_dim=shapes["text_projection"][1] if "text_projection" in shapes else width,
    )  # fmt: skip


def clip_shapes(shapes: Shapes) -> dict:
    """CLIPTextConfig overrides read from an OpenAI CLIP text model's shapes (keys with or without `text_model.`)."""
    s = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    width = s["embeddings.token_embedding.weight"][1]
    return dict(
        vocab_size=s["embeddings.token_embedding.weight"][0], hidden_size=width,
        num_attention_heads=width // CLIP_HEAD_WIDTH,
        intermediate_size=s["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(_indices(s, r"encoder\.layers\.(\d+)\.")),
        max_position_embeddings=s["embeddings.position_embedding.weight"][0],
    )  # fmt: skip


def check_schedule(sd: Mapping[str, torch.Tensor], betas: torch.Tensor) -> None:
    """The DDPM buffers a CompVis checkpoint may carry must describe the schedule inkwash samples with."""
    if "betas" in sd and not torch.allclose(sd["betas"].double(), betas, rtol=1e-4, atol=1e-7):
        raise UserError("this checkpoint's noise schedule (its `betas`) is not Stable Diffusion's scaled-linear "
                        "0.00085..0.012 over 1000 steps, which inkwash would sample it with")  # fmt: skip
