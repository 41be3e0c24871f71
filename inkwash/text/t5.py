"""The T5-XXL encoder (Raffel et al. 2020; SD3, FLUX and PixArt-α read its tokens), as a transformers config we write
from the published values: google/t5-v1_1-xxl's config.json (d_model 4096, d_ff 10240, 64 heads of 64, 24 layers,
gated-GELU feed-forward, vocabulary 32128); T5 token features; and the text conditioning of FLUX.1 and SD3 built
from CLIP and T5 towers. Nothing is downloaded. Knows nothing of checkpoint key names.

How FLUX and SD3 read their text encoders (as their reference code and diffusers' pipelines do):
- FLUX.1: T5-XXL's last hidden states at every one of `max_length` positions (512 for dev, 256 for schnell), the
  padding included and not masked; the pooled vector is CLIP-L's pooled output (final layer norm at end-of-text).
- SD3: CLIP-L and CLIP-G penultimate hidden states (no final norm) side by side (768 + 1280 = 2048 features),
  zero-padded to T5's 4096, followed along the sequence by T5-XXL's 256 positions (zeros when T5 is left out);
  the pooled vector is both CLIPs' projected text embeddings (768 + 1280).
The transformers models and tokenizers are handed in (loaded from local folders by `formats`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from inkwash.text.base import TextEmbedding, TextEncoder

# T5 v1.1 XXL, encoder only: 4,762,310,656 parameters (T5EncoderModel).
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    is_encoder_decoder=False, use_cache=False,
)  # fmt: skip


def t5_config(**overrides):
    """A transformers T5Config from T5_XXL (overrides for tiny test encoders)."""
    from transformers import T5Config

    return T5Config(**{**T5_XXL, **overrides})


def build_t5_encoder(config, device: str | torch.device = "meta") -> torch.nn.Module:
    """T5EncoderModel from a config, on the meta device by default (no memory until weights are assigned)."""
    from transformers import T5EncoderModel

    with torch.device(device):
        return T5EncoderModel(config)


class T5TextEncoder(TextEncoder):
    """A frozen T5 encoder: prompts -> [B, max_length, d_model] last hidden states, padded with the tokenizer's pad
    token and every position kept (mask all True); pooled is empty. Longer prompts are cut, with a note."""

    trainable = False

    def __init__(self, model: nn.Module, tokenizer, max_length: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim, self.pooled_dim, self.max_length = model.config.d_model, 0, max_length

    def train(self, mode: bool = True) -> T5TextEncoder:
        return super().train(False)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        n = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        if max(n) > self.max_length:
            print(f"inkwash: a prompt is longer than T5's {self.max_length} tokens; the rest is cut off.",
                  file=sys.stderr)  # fmt: skip
        out = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")  # fmt: skip
        return out["input_ids"]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        device = next(self.model.parameters()).device
        ids = self.token_ids(prompts).to(device)
        tokens = self.model(input_ids=ids).last_hidden_state  # [B, L, d_model]
        mask = torch.ones(ids.shape, dtype=torch.bool, device=device)
        return TextEmbedding(tokens, mask, tokens.new_zeros(ids.shape[0], 0))


class FluxTextEncoder(TextEncoder):
    """FLUX.1: T5 tokens [B, L, 4096] and CLIP-L's pooled vector [B, 768]."""

    trainable = False

    def __init__(self, clip: TextEncoder, t5: T5TextEncoder):
        super().__init__()
        self.clip, self.t5 = clip, t5
        self.dim, self.pooled_dim, self.max_length = t5.dim, clip.pooled_dim, t5.max_length

    @property
    def towers(self) -> list[TextEncoder]:
        """In diffusers' order (text_encoder, text_encoder_2): what LoRA files address."""
        return [self.clip, self.t5]

    def forward(self, prompts: list[str]) -> TextEmbedding:
        t5 = self.t5(prompts)
        return TextEmbedding(t5.tokens, t5.mask, self.clip(prompts).pooled.to(t5.tokens.dtype))


class SD3TextEncoder(TextEncoder):
    """SD3: [CLIP-L | CLIP-G features, zero-padded to T5's width ; T5 tokens] along the sequence, and the two CLIPs'
    pooled vectors side by side. Without T5 (`t5=None`), its part is zeros of `t5_shape` (positions, width)."""

    trainable = False

    def __init__(self, clip_l: TextEncoder, clip_g: TextEncoder, t5: T5TextEncoder | None,
                 t5_shape: tuple[int, int] = (77, 4096)):  # fmt: skip
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.t5_shape = (t5.max_length, t5.dim) if t5 is not None else t5_shape
        self.dim = self.t5_shape[1]
        self.pooled_dim = clip_l.pooled_dim + clip_g.pooled_dim
        self.max_length = clip_l.max_length + self.t5_shape[0]

    @property
    def towers(self) -> list[TextEncoder]:
        """In diffusers' order (text_encoder, _2, _3): what LoRA files address."""
        return [self.clip_l, self.clip_g] + ([self.t5] if self.t5 is not None else [])

    def forward(self, prompts: list[str]) -> TextEmbedding:
        l, g = self.clip_l(prompts), self.clip_g(prompts)
        clip = torch.cat([l.tokens, g.tokens], dim=-1)  # [B, 77, 2048]
        clip = nn.functional.pad(clip, (0, self.dim - clip.shape[-1]))  # [B, 77, 4096]
        if self.t5 is not None:
            t5 = self.t5(prompts).tokens.to(clip.dtype)
        else:
            t5 = clip.new_zeros(len(prompts), *self.t5_shape)
        tokens = torch.cat([clip, t5], dim=1)  # [B, 77 + L, 4096]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TextEmbedding(tokens, mask, torch.cat([l.pooled, g.pooled], dim=-1))
