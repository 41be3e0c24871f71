"""Frozen CLIP text towers as Stable Diffusion reads them: OpenAI CLIP ViT-L/14 (SD 1.x, SDXL), OpenCLIP ViT-H/14
(SD 2.x) and ViT-bigG/14 (SDXL), run through transformers' CLIPTextModel built from a config we write, and the
CLIP BPE tokenizer from local files (vocab.json + merges.txt). Nothing is downloaded.

Owns the published text-tower configs, tokenisation (77 tokens, padded), and which hidden state and pooled
vector each family takes. Knows nothing of checkpoint key names (formats.ldm) or of the networks that read
the embedding.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from inkwash.errors import UserError
from inkwash.text.base import TextEmbedding, TextEncoder

TOKENIZER_ENV = "INKWASH_CLIP_TOKENIZER"  # a folder with vocab.json and merges.txt, for single-file checkpoints
CONTEXT_LENGTH = 77  # CLIP's positions: every SD family pads (and truncates) prompts to 77 tokens


# Published text towers, as transformers CLIPTextConfig keyword arguments.
# CLIP ViT-L/14: openai/clip-vit-large-patch14 config.json "text_config" (Radford et al. 2021); 123,060,480 params.
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407,
)  # fmt: skip
# OpenCLIP ViT-H/14 text tower (SD 2.x): open_clip's model_configs/ViT-H-14.json text_cfg (width 1024, heads 16,
# layers 24, embed_dim 1024, GELU). SD 2.x reads the penultimate layer, so diffusers' copy keeps 23 of the 24.
OPEN_CLIP_H = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1024, bos_token_id=49406, eos_token_id=49407,
)  # fmt: skip
# OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder, the refiner's only one): open_clip's ViT-bigG-14.json
# text_cfg (width 1280, heads 20, layers 32, embed_dim 1280); with its projection 694,659,840 parameters.
OPEN_CLIP_BIGG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406, eos_token_id=49407,
)  # fmt: skip
TOWERS = {"clip-l": CLIP_L, "open-clip-h": OPEN_CLIP_H, "open-clip-bigg": OPEN_CLIP_BIGG}


@dataclass(frozen=True)
class Reading:
    """How a family reads a text tower: which hidden state, whether the final LayerNorm is applied to it, which
    pooled vector, and the padding token id (OpenAI's tokenizer pads with end-of-text, open_clip's with 0)."""

    layer: str = "last"  # "last" or "penultimate" (SD 2.x, SDXL)
    final_norm: bool = True  # SDXL takes the penultimate state as it is
    projection: bool = False  # pooled = text_projection(pooled output) (SDXL's bigG), else the pooled output
    pad_id: int | None = None  # None: the tokenizer's end-of-text id


def text_config(tower: dict, **overrides):
    """A transformers CLIPTextConfig from one of the TOWERS dicts (overrides for tiny test towers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**tower, **overrides})


def build_text_model(config, projection: bool = False, device: str | torch.device = "meta") -> torch.nn.Module:
    """CLIPTextModel (or CLIPTextModelWithProjection) from a config, on the meta device by default: no memory
    is allocated until weights are assigned."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def fill_buffers(model: torch.nn.Module) -> torch.nn.Module:
    """Make the non-persistent buffers of a meta-built text model real after its weights were assigned (CLIP's
    `position_ids` = 0..L-1); any other buffer still on the meta device is an error."""
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        leaf = name.rpartition(".")[2]
        if leaf != "position_ids":
            raise RuntimeError(f"text model buffer {name} was not loaded")
        owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model


def hf_text_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical HF keys (`text_model.*`, `text_projection.weight`) -> the keys this transformers version's model
    has (CLIPTextModel dropped its `text_model.` wrapper in transformers 5.6; the projection model keeps it)."""
    if hasattr(model, "text_model"):
        return dict(sd)
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _probe_file(folder: Path) -> Path | None:
    """The folder if it holds a CLIP BPE tokenizer: vocab.json + merges.txt, or one tokenizer.json (as transformers 5
    saves it)."""
    pair = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return folder if pair or (folder / "tokenizer.json").is_file() else None


def _vocab_merges(folder: Path) -> tuple[dict, list]:
    """The BPE vocabulary and merges of a tokenizer folder; UserError for unreadable files."""
    try:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        else:
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            if model.get("type") != "BPE":
                raise UserError(f"{folder / 'tokenizer.json'} is not a BPE tokenizer")
            vocab = model["vocab"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{folder} holds an unreadable CLIP tokenizer ({e})") from None
    if any(len(m) != 2 for m in merges):
        raise UserError(f"{folder}: its BPE merges are not pairs")
    return vocab, merges


def find_tokenizer(explicit: str | os.PathLike | None, near: Path) -> Path:
    """The CLIP BPE tokenizer folder: `explicit`, else $INKWASH_CLIP_TOKENIZER, else a `tokenizer/` folder beside
    the checkpoint file; UserError saying how to give one otherwise (single files do not carry their tokenizer)."""
    candidates = [Path(explicit)] if explicit else []
    if not explicit and os.environ.get(TOKENIZER_ENV):
        candidates.append(Path(os.environ[TOKENIZER_ENV]))
    if not candidates:
        candidates.append(near.parent / "tokenizer")
    for c in candidates:
        found = _probe_file(c)
        if found:
            return found
    raise UserError(
        f"no CLIP tokenizer (vocab.json and merges.txt) found at {candidates[0]}; a single-file checkpoint does not "
        f"carry one: pass --tokenizer FOLDER or set {TOKENIZER_ENV} (the tokenizer/ folder of any SD 1.x/2.x/XL "
        "diffusers model will do)"
    )


def load_tokenizer(folder: str | os.PathLike):
    """transformers' CLIPTokenizer from a local folder with vocab.json and merges.txt, or tokenizer.json (BOS
    <|startoftext|>, EOS <|endoftext|>); offline. The pad token is the caller's business (see Reading.pad_id)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if _probe_file(folder) is None:
        raise UserError(f"{folder} is not a CLIP tokenizer folder (vocab.json and merges.txt, or tokenizer.json)")
    vocab, merges = _vocab_merges(folder)
    missing = [t for t in ("<|startoftext|>", "<|endoftext|>") if t not in vocab]
    if missing:
        raise UserError(f"the vocabulary in {folder} lacks CLIP's special tokens {missing}")
    return CLIPTokenizer(vocab=vocab, merges=merges)


class CLIPTextEncoder(TextEncoder):
    """A frozen CLIP text tower: prompts -> 77 token features (the padding included, all masked in: SD's U-Net
    attends to every position) and a pooled vector. Prompts longer than 77 tokens are cut, with a note on stderr
    (as diffusers does)."""

    trainable = False

    def __init__(self, model: torch.nn.Module, tokenizer, reading: Reading = Reading()):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.reading = reading
        cfg = model.config
        self.dim = cfg.hidden_size
        self.pooled_dim = cfg.projection_dim if reading.projection else cfg.hidden_size
        self.max_length = cfg.max_position_embeddings
        self.pad_id = tokenizer.eos_token_id if reading.pad_id is None else reading.pad_id
        if tokenizer.eos_token_id != cfg.eos_token_id:  # the pooled vector is read at the end-of-text token
            raise UserError(f"the CLIP tokenizer's end-of-text id {tokenizer.eos_token_id} is not the text model's "
                            f"({cfg.eos_token_id}): tokenizer and weights do not belong together")  # fmt: skip

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        return super().train(False)  # frozen: always in eval mode

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """[B, 77] ids: <|startoftext|> prompt <|endoftext|> then padding."""
        L = self.max_length
        ids = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        if any(len(s) > L for s in ids):
            print(f"inkwash: a prompt is longer than CLIP's {L} tokens; the rest is cut off.", file=sys.stderr)
            ids = [s if len(s) <= L else s[: L - 1] + [self.tokenizer.eos_token_id] for s in ids]
        return torch.tensor([s + [self.pad_id] * (L - len(s)) for s in ids], dtype=torch.long)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        r = self.reading
        text = getattr(self.model, "text_model", self.model)
        device = text.embeddings.token_embedding.weight.device
        ids = self.token_ids(prompts).to(device)
        out = self.model(input_ids=ids, output_hidden_states=r.layer == "penultimate")
        tokens = out.last_hidden_state if r.layer == "last" else out.hidden_states[-2]
        if r.layer != "last" and r.final_norm:
            tokens = text.final_layer_norm(tokens)
        pooled = out.text_embeds if r.projection else out.pooler_output
        mask = torch.ones(ids.shape, dtype=torch.bool, device=tokens.device)  # the model's, offloaded or not
        return TextEmbedding(tokens, mask, pooled)
