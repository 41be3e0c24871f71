"""The training loop under DDP (2 CPU processes, gloo) matches one process with the same global batch.

One process with grad_accum=2 and two processes with grad_accum=1 see the same chunks of the same
global batch with the same noise (both are seeded per chunk, see trainer.py), so they compute the same
mathematical update; only floating-point summation order differs (DDP's all-reduce sums two partial
gradients where one process accumulates them in place). Those differences are a few float32 ulps of
the gradients (~1e-7 relative). AdamW's update m / (sqrt(v) + eps) is smooth in the gradient except
where a gradient entry is ~eps in size, which these tiny, non-zero-initialised runs do not hit; over a
few steps at lr 1e-3 the weights agree to ~1e-8, so 1e-6 absolute leaves a wide margin while still
catching any real mismatch (a wrong slice, missing all-reduce or a doubled batch moves weights by
~lr = 1e-3).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from inkwash.formats.checkpoint import load_state
from inkwash.models.registry import config_to_dict, get_preset
from inkwash.train.trainer import TrainConfig, train

TINY_NET = {**config_to_dict(get_preset("unet-tiny")), "model_channels": 16, "num_heads": 2}
TINY_TEXT = {"name": "small", "dim": 16, "layers": 1, "heads": 2, "max_length": 24}


def _config(out: str, grad_accum: int) -> TrainConfig:
    return TrainConfig(
        model=TINY_NET,
        text_encoder=TINY_TEXT,  # trainable: a second DDP module
        image_size=32,
        batch_size=2,
        grad_accum=grad_accum,
        steps=3,
        lr=1e-3,
        warmup_steps=1,
        ema_decay=0.9,
        caption_dropout=0.5,
        output_dir=out,
        log_every=1,
        sample_prompts=(),
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    train(_config(out, grad_accum=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(run_dir) -> dict[str, torch.Tensor]:
    _, groups = load_state(run_dir / "state.safetensors")
    return {f"{g}.{k}": v for g, sd in groups.items() if g != "rng" for k, v in sd.items()}


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    mp.start_processes(_worker, args=(2, _free_port(), str(ddp_dir)), nprocs=2, join=True, start_method="spawn")
    assert sorted(p.name for p in ddp_dir.iterdir()) == ["metrics.jsonl", "model.safetensors", "state.safetensors"]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_config(str(single_dir), grad_accum=2))
    finally:
        torch.set_num_threads(before)

    a, b = _tensors(ddp_dir), _tensors(single_dir)
    assert a.keys() == b.keys()
    moved = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("model."))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ddp_meta = load_state(ddp_dir / "state.safetensors")[0]
    assert ddp_meta["world_size"] == 2 and ddp_meta["data_position"] == 3 * 4
    assert moved < 1e-6
