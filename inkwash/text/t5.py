"""The T5-XXL encoder (Raffel et al. 2020; SD3, FLUX and PixArt-α read its tokens), as a transformers config we write
from the published values: google/t5-v1_1-xxl's config.json (d_model 4096, d_ff 10240, 64 heads of 64, 24 layers,
gated-GELU feed-forward, vocabulary 32128). Nothing is downloaded. Knows nothing of checkpoint key names.
"""

from __future__ import annotations

import torch

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
