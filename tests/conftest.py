"""Shared fixtures; `gpu`-marked tests skip cleanly where CUDA is absent."""

import dataclasses
import socket

import pytest
import torch

from inkwash.diffusion import VP
from inkwash.formats.checkpoint import save_model
from inkwash.models.registry import build_model, config_to_dict, get_preset
from inkwash.text import TextEncoderConfig, build_text_encoder


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny nets are fastest single-threaded, and far slower when threads contend for a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """A tiny untrained text-to-image model file, written as the trainer writes them."""
    torch.manual_seed(0)
    text_cfg = TextEncoderConfig(name="small", dim=32, layers=1, heads=2)
    encoder = build_text_encoder(text_cfg)
    cfg = dataclasses.replace(get_preset("unet-tiny"), context_dim=encoder.dim)
    net = build_model(cfg)
    meta = {
        "model": config_to_dict(cfg), "process": VP().to_dict(), "prediction": "eps",
        "text_encoder": text_cfg.to_dict(), "image_size": 16, "channels": 3,
        "sampling": {"sampler": "euler", "steps": 3, "guidance": 2.0, "schedule": None}, "train_args": {},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_model(path, {"model": net.state_dict(), "text_encoder": encoder.state_dict()}, meta)
    return path


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for servers started by tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
