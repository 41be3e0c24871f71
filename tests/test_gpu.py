"""GPU checks (skipped without CUDA): a seed gives the same image on the GPU as on the CPU."""

import pytest
import torch

import inkwash


@pytest.mark.gpu
def test_same_seed_same_image_on_gpu_and_cpu(model_file):
    cpu = inkwash.load(model_file).generate("a red circle", seed=3)
    gpu = inkwash.load(model_file, device="cuda").generate("a red circle", seed=3)
    assert torch.allclose(cpu, gpu.cpu(), atol=2e-3)


@pytest.mark.gpu
def test_training_step_runs_in_bf16_on_gpu(tmp_path):
    from inkwash.train.trainer import TrainConfig, train

    cfg = TrainConfig(model="unet-tiny", text_encoder="small", image_size=16, batch_size=4, steps=2,
                      precision="bf16", device="cuda", output_dir=str(tmp_path), sample_prompts=())  # fmt: skip
    assert train(cfg).exists()
