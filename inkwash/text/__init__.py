"""inkwash.text: text encoders behind one interface (`TextEncoder` -> `TextEmbedding`) and their config.

Knows nothing of networks that consume embeddings, nor of noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from inkwash.config import dataclass_from_dict
from inkwash.errors import UserError
from inkwash.text.base import TextEmbedding, TextEncoder
from inkwash.text.cache import CachedTextEncoder

ENCODER_NAMES = ("minilm", "small", "none", "class", "dual")


@dataclass
class TextEncoderConfig:
    """Which text encoder to build, and its knobs. Fields a given encoder does not use are ignored by it.

    minilm: max_length, truncate.  small: dim, layers, heads, max_length, truncate.
    none: dim.  class: labels, dim.  dual: encoders (configs of two or more), combine, pooled (see dual.py).
    """

    name: str = "minilm"
    max_length: int = 32
    truncate: bool = True
    dim: int = 256
    layers: int = 4
    heads: int = 4
    labels: tuple[str, ...] = field(default_factory=tuple)
    encoders: tuple[TextEncoderConfig, ...] = field(default_factory=tuple)
    combine: str = "features"
    pooled: str = "last"

    def __post_init__(self) -> None:
        if self.name not in ENCODER_NAMES:
            valid = ", ".join(ENCODER_NAMES)
            raise UserError(f"Unknown text encoder {self.name!r}; valid ones are {valid}.")
        self.labels = tuple(self.labels)
        self.encoders = tuple(
            e if isinstance(e, TextEncoderConfig) else TextEncoderConfig(name=e) if isinstance(e, str)
            else TextEncoderConfig.from_dict(dict(e)) for e in self.encoders
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["encoders"] = [e.to_dict() for e in self.encoders]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextEncoderConfig:
        return dataclass_from_dict(cls, d, "text encoder")


def build_text_encoder(cfg: TextEncoderConfig | str) -> TextEncoder:
    """Build the encoder a config names (a bare name uses that encoder's defaults)."""
    if isinstance(cfg, str):
        cfg = TextEncoderConfig(name=cfg)
    if cfg.name == "minilm":
        from inkwash.text.minilm import MiniLMEncoder

        return MiniLMEncoder(max_length=cfg.max_length, truncate=cfg.truncate)
    if cfg.name == "small":
        from inkwash.text.small import SmallTextEncoder

        return SmallTextEncoder(cfg.dim, cfg.layers, cfg.heads, cfg.max_length, cfg.truncate)
    if cfg.name == "dual":
        from inkwash.text.dual import DualTextEncoder

        return DualTextEncoder([build_text_encoder(e) for e in cfg.encoders], cfg.combine, cfg.pooled)
    from inkwash.text.simple import ClassLabelEncoder, NullEncoder

    if cfg.name == "none":
        return NullEncoder(cfg.dim)
    return ClassLabelEncoder(cfg.labels, cfg.dim)


__all__ = [
    "ENCODER_NAMES",
    "CachedTextEncoder",
    "TextEmbedding",
    "TextEncoder",
    "TextEncoderConfig",
    "build_text_encoder",
]
