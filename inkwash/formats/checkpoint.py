"""inkwash's own checkpoint files: one safetensors model file, one safetensors training-state file.

A model file holds the network weights under `model.` (EMA weights when EMA is on) and a trainable
text encoder's under `text_encoder.`; its metadata key `"inkwash"` is JSON describing how to rebuild
and sample it (model config, process, prediction, text encoder, image size, sampling defaults,
training args). A state file holds what `train(resume=True)` needs: raw and EMA weights, optimizer
state flattened into tensors, step, data position and RNG states, with scalars in JSON metadata.

Saves are atomic (temp file in the same folder, fsync, rename). Nothing here unpickles. This module
knows file layouts only: not networks, noise or the training loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as _st_save

from inkwash.errors import UserError

FORMAT = "inkwash"
VERSION = 1
META_KEY = "inkwash"  # safetensors metadata key holding our JSON
STATE_FORMAT = "inkwash-train-state"
MODEL_PREFIX = "model."
TEXT_ENCODER_PREFIX = "text_encoder."


# ---------------------------------------------------------------------------- low-level I/O


def _flatten(state_dicts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"model": {"w": T}} -> {"model.w": T}, detached, on CPU, contiguous and never sharing storage."""
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # storage pointers already written
    for prefix, sd in state_dicts.items():
        for name, t in sd.items():
            key = f"{prefix}.{name}"
            if key in flat:
                raise ValueError(f"duplicate checkpoint key {key!r}")
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                if t.untyped_storage().data_ptr() in seen:
                    t = t.clone()  # tied weights: safetensors refuses shared storage
                seen.add(t.untyped_storage().data_ptr())
            flat[key] = t
    return flat


def _atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that `path` is either the old file or the complete new one, never a torn mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def _save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    path = Path(path)
    _atomic_write(path, _st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)}))
    return path


def _read_raw_meta(path: Path) -> dict[str, Any]:
    """The JSON under our metadata key; UserError for a missing, corrupt or foreign file."""
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"Checkpoint {path} is not a readable safetensors file ({e}).") from None
    if raw is None:
        raise UserError(f"Checkpoint {path} is a safetensors file without inkwash metadata.")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"Checkpoint {path} has corrupt inkwash metadata (not JSON).") from None
    if not isinstance(meta, dict):
        raise UserError(f"Checkpoint {path} has corrupt inkwash metadata (not a JSON object).")
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"Checkpoint {path} is corrupt: its tensors cannot be read ({e}).") from None


# ---------------------------------------------------------------------------- model files


def save_model(path: str | os.PathLike, state_dicts: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
    """Atomically write a model file: `state_dicts` maps prefix ("model", "text_encoder", "vae") -> state dict.

    `meta` is the inkwash JSON (model, process, prediction, text_encoder, image_size, channels, sampling,
    train_args; "vae" for a latent model or an autoencoder file); "format" and "version" are filled in.
    A diffusion model file has "model" (and "vae" when it is latent); an autoencoder file has "vae" alone.
    """
    if "model" not in state_dicts and "vae" not in state_dicts:
        raise ValueError("a model file needs a 'model' or a 'vae' state dict")
    unknown = set(state_dicts) - {"model", "text_encoder", "vae"}
    if unknown:
        raise ValueError(f"unknown checkpoint prefixes {sorted(unknown)}; use 'model', 'text_encoder' and 'vae'")
    return _save(path, _flatten(state_dicts), {**meta, "format": FORMAT, "version": VERSION})


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The inkwash metadata of a model file, without reading its tensors."""
    path = Path(path)
    meta = _read_raw_meta(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"Checkpoint {path} is not an inkwash model file (format {meta.get('format')!r}).")
    if meta.get("version") != VERSION:
        raise UserError(
            f"Checkpoint {path} has inkwash format version {meta.get('version')!r}; "
            f"this inkwash reads version {VERSION}."
        )
    return meta


def load_model_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of a model file; tensors keep their `model.` / `text_encoder.` prefixes."""
    meta = read_meta(path)
    return meta, _load_tensors(Path(path))


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """First 16 hex digits of a file's sha256 (None for no path): identifies a model or autoencoder file."""
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_exact(module: torch.nn.Module, sd: dict, what: str, *, assign: bool = False) -> torch.nn.Module:
    """Load a state dict whose keys must be exactly the module's; one UserError sentence naming the missing and
    unexpected keys, or the mismatched shape. `what` names the weights ("diffusers VAE weights", ...)."""
    own = module.state_dict().keys()
    missing, unexpected = sorted(own - sd.keys()), sorted(sd.keys() - own)
    if missing or unexpected:
        raise UserError(f"{what} do not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
    try:
        module.load_state_dict(sd, assign=assign)
    except RuntimeError as e:
        raise UserError(f"{what} have the wrong shape: {str(e).splitlines()[-1].strip()}") from None
    return module


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict under `prefix` ("model" or "model."), with the prefix removed."""
    prefix = prefix if prefix.endswith(".") else prefix + "."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------- optimizer state


def flatten_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors keyed `<param>.<name>`, JSON-able rest). Lossless."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in osd["state"].items():
        for name, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    tuple_keys = sorted({k for g in osd["param_groups"] for k, v in g.items() if isinstance(v, tuple)})
    return tensors, {"param_groups": groups, "scalars": scalars, "tuple_keys": tuple_keys}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    for pid, vals in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(vals)
    tuple_keys = set(meta.get("tuple_keys", []))
    groups = [{k: (tuple(v) if k in tuple_keys else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------- training state


def save_state(path: str | os.PathLike, state_dicts: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
    """Atomically write a training-state file: prefixes of your choosing ("model", "ema", "optim", ...)."""
    return _save(path, _flatten(state_dicts), {**meta, "format": STATE_FORMAT, "version": VERSION})


def load_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(meta, {prefix: state dict}) of a training-state file."""
    path = Path(path)
    meta = _read_raw_meta(path)
    if meta.get("format") != STATE_FORMAT or meta.get("version") != VERSION:
        raise UserError(
            f"Checkpoint {path} is not an inkwash training-state file "
            f"(format {meta.get('format')!r}, version {meta.get('version')!r})."
        )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in _load_tensors(path).items():
        prefix, name = key.split(".", 1)
        groups.setdefault(prefix, {})[name] = t
    return meta, groups
