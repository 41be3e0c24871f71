"""Contract tests for inkwash's checkpoint files (formats/checkpoint.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from inkwash.errors import UserError
from inkwash.formats.checkpoint import (
    flatten_optimizer_state,
    load_model_file,
    load_state,
    read_meta,
    save_model,
    save_state,
    strip_prefix,
    unflatten_optimizer_state,
)

META = {
    "model": {"arch": "unet", "channels": 8},
    "process": {"kind": "vp"},
    "prediction": "eps",
    "text_encoder": {"kind": "none"},
    "image_size": 16,
    "channels": 3,
    "sampling": {"sampler": "euler", "steps": 20, "guidance": 4.0, "schedule": "uniform"},
    "train_args": {"lr": 1e-3},
}


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(4, dtype=torch.bfloat16)}


def test_model_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    te = {"emb": torch.ones(2, 2)}
    save_model(path, {"model": _weights(), "text_encoder": te}, META)
    meta = read_meta(path)
    assert meta["format"] == "inkwash" and meta["version"] == 1
    assert {k: meta[k] for k in META} == META
    meta2, tensors = load_model_file(path)
    assert meta2 == meta
    assert sorted(tensors) == ["model.b", "model.w", "text_encoder.emb"]
    model = strip_prefix(tensors, "model")
    for k, v in _weights().items():
        assert torch.equal(model[k], v) and model[k].dtype == v.dtype
    assert torch.equal(strip_prefix(tensors, "text_encoder.")["emb"], te["emb"])


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(4, 4)
    save_model(tmp_path / "m.safetensors", {"model": {"a": w, "b": w, "c": w[:2]}}, META)
    _, t = load_model_file(tmp_path / "m.safetensors")
    assert torch.equal(t["model.a"], w) and torch.equal(t["model.b"], w) and torch.equal(t["model.c"], w[:2])


def test_save_is_atomic_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_model(path, {"model": _weights()}, META)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        save_model(path, {"model": {"w": torch.ones(1)}}, META)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("reader", [read_meta, load_model_file, load_state])
def test_missing_file(tmp_path, reader):
    with pytest.raises(UserError, match="does not exist") as e:
        reader(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)


@pytest.mark.parametrize("reader", [read_meta, load_model_file])
def test_corrupt_file(tmp_path, reader):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(UserError, match="bad.safetensors"):
        reader(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, {"model": {"w": torch.randn(64, 64)}}, META)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="m.safetensors"):
        load_model_file(path)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(UserError, match="without inkwash metadata"):
        read_meta(path)


def test_state_file_is_not_a_model_file(tmp_path):
    path = tmp_path / "state.safetensors"
    save_state(path, {"model": _weights()}, {"step": 3})
    with pytest.raises(UserError, match="not an inkwash model file"):
        read_meta(path)
    with pytest.raises(UserError, match="training-state"):
        load_state(_model_file(tmp_path))


def _model_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, {"model": _weights()}, META)
    return path


def test_optimizer_state_round_trip(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        net(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    json.dumps(meta)  # must be JSON-able
    rng = torch.Generator().manual_seed(1).get_state()
    save_state(tmp_path / "s.safetensors", {"optim": tensors, "rng": {"torch": rng}}, {"optim": meta})
    smeta, groups = load_state(tmp_path / "s.safetensors")
    restored = unflatten_optimizer_state(groups["optim"], smeta["optim"])
    assert torch.equal(groups["rng"]["torch"], rng)

    net2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.5)
    opt2.load_state_dict(restored)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-2
    x = torch.randn(5, 3)
    for n, o in ((net, opt), (net2, opt2)):
        n(x).square().mean().backward()
        o.step()
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
