"""Typed configs from plain dicts (JSON in checkpoints and recipes), with one clear error for a bad key."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    """Build `cls` from `d`; unknown keys or invalid values raise UserError naming `what`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown {what} options {unknown}; valid ones are {sorted(known)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid {what}: {e}") from None
