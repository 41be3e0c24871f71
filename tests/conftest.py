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
    """A tiny untrained text-to-image model file, written as the trainer writes them. Its zero-initialised
    output layers make the network's output exactly 0: use `lively_model_file` where that matters."""
    return _tiny_model_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", lively=False)


@pytest.fixture(scope="session")
def lively_model_file(tmp_path_factory):
    """The tiny model with every weight drawn at random, so its output depends on x, t and the text: what a
    test needs to see rows of a batch mixed up. It predicts x0, so its images stay in range rather than
    saturate as a random eps estimate makes them."""
    return _tiny_model_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", lively=True)


@pytest.fixture(scope="session")
def distilled_model_file(tmp_path_factory):
    """The lively tiny model with LCM's guidance-scale embedding: guidance-distilled (no CFG; the network takes
    the scale), sampled with the `lcm` sampler in 2 steps by default, as `inkwash distill --method lcm` writes."""
    sampling = {"sampler": "lcm", "steps": 2, "guidance": 4.0, "schedule": "lcm"}
    path = tmp_path_factory.mktemp("m") / "tiny-lcm.safetensors"
    return _tiny_model_file(path, lively=True, guidance_embed_dim=16, sampling=sampling)


@pytest.fixture(scope="session")
def class_model_file(tmp_path_factory):
    """A tiny class-conditional DiT (10 classes, no text encoder, pixels, 16 px), random weights everywhere, 3
    steps with guidance 2 by default: what the server and studio get for an ImageNet-style model."""
    from inkwash.models.dit import DiTConfig

    cfg = DiTConfig(in_channels=3, out_channels=3, hidden_size=32, depth=1, num_heads=2, sample_size=16,
                    num_classes=10)  # fmt: skip
    torch.manual_seed(0)
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    meta = {"model": config_to_dict(cfg), "process": {"kind": "vp"}, "prediction": "eps", "image_size": 16,
            "text_encoder": {"name": "none"}, "sampling": {"steps": 3, "guidance": 2.0}}  # fmt: skip
    return save_model(tmp_path_factory.mktemp("m") / "classes.safetensors", {"model": net.state_dict()}, meta)


def _tiny_model_file(path, lively: bool, guidance_embed_dim: int = 0, sampling: dict | None = None):
    torch.manual_seed(0)
    text_cfg = TextEncoderConfig(name="small", dim=32, layers=1, heads=2)
    encoder = build_text_encoder(text_cfg)
    cfg = dataclasses.replace(get_preset("unet-tiny"), context_dim=encoder.dim, guidance_embed_dim=guidance_embed_dim)
    net = build_model(cfg)
    meta = {
        "model": config_to_dict(cfg), "process": VP().to_dict(), "prediction": "x0" if lively else "eps",
        "text_encoder": text_cfg.to_dict(), "image_size": 16, "channels": 3,
        "sampling": sampling or {"sampler": "euler", "steps": 3, "guidance": 2.0, "schedule": None}, "train_args": {},
    }  # fmt: skip
    if lively:
        with torch.no_grad():
            for name, p in net.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, p[0].numel() ** -0.5)
                elif "norm" in name and name.endswith("weight"):
                    p.normal_(1, 0.1)
                else:
                    p.normal_(0, 0.1)
            net.conv_out.weight.mul_(0.3)  # x0 estimates well inside [-1, 1]
    save_model(path, {"model": net.state_dict(), "text_encoder": encoder.state_dict()}, meta)
    return path


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for servers started by tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
