"""The training loop on tiny configs: files written, exact resume, divergence handling, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_model_file, load_state, strip_prefix
from inkwash.models.registry import build_model, config_from_dict, config_to_dict, get_preset
from inkwash.text import TextEncoderConfig, build_text_encoder
from inkwash.train import trainer as T
from inkwash.train.trainer import DataOrder, TrainConfig, TrainingDiverged, train

# ~120k parameters: the unet-tiny preset at half width.
TINY_NET = {**config_to_dict(get_preset("unet-tiny")), "model_channels": 16, "num_heads": 2}
TINY_TEXT = {"name": "small", "dim": 16, "layers": 1, "heads": 2, "max_length": 24}


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py


def tiny(tmp_path, **kw) -> TrainConfig:
    args = dict(
        model=TINY_NET,
        text_encoder=TINY_TEXT,
        image_size=32,
        batch_size=2,
        steps=4,
        lr=2e-3,
        warmup_steps=2,
        ema_decay=0.9,
        caption_dropout=0.3,
        output_dir=str(tmp_path / "run"),
        log_every=1,
        sample_prompts=(),
    )
    return TrainConfig(**{**args, **kw})


def weights(run_dir) -> dict[str, torch.Tensor]:
    """Everything that determines the continuation of a run: raw, EMA, text encoder, optimizer."""
    _, groups = load_state(run_dir / "state.safetensors")
    return {f"{g}.{k}": v for g, sd in groups.items() if g != "rng" for k, v in sd.items()}


def test_train_writes_a_loadable_model(tmp_path):
    cfg = tiny(tmp_path, steps=2, sample_prompts=("a red circle", ""), sampling={"sampler": "euler", "steps": 2})
    path = train(cfg)
    assert path == tmp_path / "run" / "model.safetensors"
    meta, tensors = load_model_file(path)
    assert meta["format"] == "inkwash" and meta["version"] == 1
    assert meta["prediction"] == "eps" and meta["process"]["kind"] == "vp"
    assert meta["image_size"] == 32 and meta["channels"] == 3 and meta["train_args"]["lr"] == 2e-3
    assert meta["sampling"]["sampler"] == "euler"

    net = build_model(config_from_dict(meta["model"]))
    net.load_state_dict(strip_prefix(tensors, "model"))  # strict: every key present
    enc = build_text_encoder(TextEncoderConfig.from_dict(meta["text_encoder"]))
    enc.load_state_dict(strip_prefix(tensors, "text_encoder"))
    _, groups = load_state(tmp_path / "run" / "state.safetensors")
    for k, v in groups["ema"].items():  # the model file ships the EMA weights
        assert torch.equal(tensors[f"model.{k}"], v)
    assert not all(torch.equal(groups["ema"][k], groups["model"][k]) for k in groups["model"])

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert lines[0]["lr"] == pytest.approx(1e-3) and lines[1]["lr"] == pytest.approx(2e-3)  # warm-up
    assert len(lines[0]["loss_by_t"]) == T.LOSS_BINS and lines[0]["images_per_s"] > 0
    assert (tmp_path / "run" / "samples_0000002.png").is_file()


def test_resume_after_a_kill_is_bit_identical(tmp_path, monkeypatch):
    straight = tiny(tmp_path / "a", grad_accum=2)
    train(straight)

    # Same run, killed during step 4 with the last checkpoint at step 2, then resumed.
    resumed = tiny(tmp_path / "b", grad_accum=2, checkpoint_every=2)
    real_step = T.Trainer.train_step

    def killed(self, bins):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, bins)

    monkeypatch.setattr(T.Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train(resumed)
    monkeypatch.setattr(T.Trainer, "train_step", real_step)
    assert load_state(tmp_path / "b" / "run" / "state.safetensors")[0]["step"] == 2
    train(resumed, resume=True)

    a, b = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    metrics = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics] == [1, 2, 3, 4]  # step 3's first try was dropped


def test_max_steps_then_resume_matches_straight_run(tmp_path):
    kw = dict(text_encoder={"name": "none", "dim": 16}, process={"kind": "flow", "shift": 3.0}, prediction="flow")
    kw |= dict(time_sampling="logit_normal", min_snr_gamma=5.0, offset_noise=0.1, ema_decay=0.0)
    train(tiny(tmp_path / "a", steps=2, **kw))
    train(tiny(tmp_path / "b", steps=2, **kw), max_steps=1)
    train(tiny(tmp_path / "b", steps=2, **kw), resume=True)
    a, b = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys() and not any(k.startswith("text_encoder.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _, tensors = load_model_file(tmp_path / "a" / "run" / "model.safetensors")
    assert not any(k.startswith("text_encoder.") for k in tensors)  # frozen encoders are not saved


def test_bf16_autocast_trains(tmp_path):
    path = train(tiny(tmp_path, steps=1, precision="bf16"))
    _, tensors = load_model_file(path)
    assert all(v.dtype == torch.float32 and v.isfinite().all() for v in tensors.values())


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, steps=3, checkpoint_every=1)
    real_loss = T.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kw):
        loss, t = real_loss(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), t

    monkeypatch.setattr(T, "diffusion_loss", poisoned)
    real_save = T.Trainer.save
    snapshots = {}

    def save_and_snapshot(self):
        path = real_save(self)
        snapshots["model"] = path.read_bytes()
        snapshots["state"] = (path.parent / "state.safetensors").read_bytes()
        return path

    monkeypatch.setattr(T.Trainer, "save", save_and_snapshot)
    with pytest.raises(TrainingDiverged, match="step 2") as e:
        train(cfg)
    assert isinstance(e.value, UserError)
    model_file = tmp_path / "run" / "model.safetensors"
    assert model_file.read_bytes() == snapshots["model"]
    assert (tmp_path / "run" / "state.safetensors").read_bytes() == snapshots["state"]
    meta, tensors = load_model_file(model_file)
    assert meta["train_args"]["step"] == 1 and all(v.isfinite().all() for v in tensors.values())


def test_huge_lr_diverges_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"Training diverged at step \d+"):
        train(tiny(tmp_path, steps=6, lr=1e30, warmup_steps=0, grad_clip=0.0))


def test_resume_refuses_a_different_run(tmp_path):
    with pytest.raises(UserError, match="Nothing to resume"):
        train(tiny(tmp_path, steps=1), resume=True)
    train(tiny(tmp_path, steps=1))
    with pytest.raises(UserError, match="lr"):
        train(tiny(tmp_path, steps=2, lr=1e-2), resume=True)
    train(tiny(tmp_path, steps=2, log_every=5), resume=True)  # log interval and steps may change


@pytest.mark.parametrize(
    "bad",
    [dict(batch_size=0), dict(lr=0.0), dict(ema_decay=1.0), dict(precision="fp8"), dict(caption_dropout=2.0)],
)
def test_bad_options_are_user_errors(tmp_path, bad):
    with pytest.raises(UserError):
        tiny(tmp_path, **bad)


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="unknown training options"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(10, seed=3)
    first = order.indices(0, 10)
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert DataOrder(10, seed=3).indices(7, 6) == first[7:] + DataOrder(10, seed=3).indices(10, 3)
    assert sorted(order.indices(10, 10)) == list(range(10)) and order.indices(10, 10) != first
    assert DataOrder(2**31, seed=0).indices(5, 3) == [5, 6, 7]  # unbounded procedural data: index order


def test_ema_update_rule():
    from inkwash.train.ema import EMA

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.75)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(4, 2))  # moves BatchNorm's running stats and counter (buffers)
    ema.update(net)
    for name, p in net.named_parameters():
        torch.testing.assert_close(ema.shadow[name], 0.75 * start[name] + 0.25 * p.detach())
    assert torch.equal(ema.shadow["1.num_batches_tracked"], net.state_dict()["1.num_batches_tracked"])
    copy = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema.copy_to(copy)
    assert torch.equal(copy[0].weight, ema.shadow["0.weight"]) and ema.num_updates == 1


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decay_after_warm_up(tmp_path, decay):
    cfg = tiny(tmp_path, steps=11, lr=1.0, warmup_steps=2, lr_decay=decay, lr_final=0.1)
    lrs = [T.lr_at(cfg, s) for s in range(11)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # non-increasing after warm-up
    mid = 0.1 + 0.9 * (0.5 if decay == "linear" else 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[6] == pytest.approx(mid)
    assert [T.lr_at(tiny(tmp_path, steps=11, lr=1.0, warmup_steps=2), s) for s in range(11)][2:] == [1.0] * 9
    with pytest.raises(UserError, match="lr_decay"):
        tiny(tmp_path, lr_decay="step")
    with pytest.raises(UserError, match="lr_final"):
        tiny(tmp_path, lr_final=2.0)


def test_data_workers_and_dataset_args_give_the_same_run(tmp_path):
    kw = dict(text_encoder={"name": "none", "dim": 16}, steps=2, grad_accum=2, dataset_args={"omit_colour": 0.5})
    train(tiny(tmp_path / "a", **kw))
    train(tiny(tmp_path / "b", data_workers=2, text_cache_entries=3, **kw))
    train(tiny(tmp_path / "n", text_cache_entries=0, **kw))  # no text cache
    a, b, n = (weights(tmp_path / d / "run") for d in ("a", "b", "n"))
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], n[k]), k
    tr = T.Trainer(tiny(tmp_path / "c", **kw))
    assert tr.dataset.variants.omit_colour == 0.5 and isinstance(tr.encoder, T.CachedTextEncoder)
    assert not isinstance(T.Trainer(tiny(tmp_path / "c", text_cache_entries=0, **kw)).encoder, T.CachedTextEncoder)
    with pytest.raises(UserError, match="Unknown Shapes option"):
        T.Trainer(tiny(tmp_path / "c", dataset_args={"omit_shape": 0.5}))


def test_resume_accepts_a_run_saved_before_newer_options(tmp_path):
    from inkwash.formats.checkpoint import save_state

    cfg = tiny(tmp_path, steps=1, text_encoder={"name": "none", "dim": 16})
    train(cfg)
    meta, groups = load_state(tmp_path / "run" / "state.safetensors")
    for k in ("dataset_args", "lr_decay", "lr_final", "data_workers", "text_cache_entries"):
        del meta["train_args"][k]  # as written before these options existed
    save_state(tmp_path / "run" / "state.safetensors", groups, meta)
    train(TrainConfig(**{**cfg.__dict__, "steps": 2}), resume=True)


def test_init_from_starts_at_the_given_weights_and_refuses_another_network(tmp_path):
    base = train(tiny(tmp_path / "base", steps=2, ema_decay=0.0))
    _, base_tensors = load_model_file(base)
    tr = T.Trainer(tiny(tmp_path / "ft", init_from=str(base), lr=1e-9, ema_decay=0.0))
    for k, v in strip_prefix(base_tensors, "model").items():  # network and trainable text encoder both start there
        assert torch.equal(tr.net.state_dict()[k], v), k
    for k, v in strip_prefix(base_tensors, "text_encoder").items():
        assert torch.equal(tr.encoder.state_dict()[k], v), k
    fresh = T.Trainer(tiny(tmp_path / "fresh", ema_decay=0.0))
    assert not all(torch.equal(fresh.net.state_dict()[k], v) for k, v in strip_prefix(base_tensors, "model").items())
    with pytest.raises(UserError, match="different network"):
        T.Trainer(tiny(tmp_path / "x", init_from=str(base), model={**TINY_NET, "model_channels": 24}))
    with pytest.raises(UserError, match="does not exist"):
        T.Trainer(tiny(tmp_path / "y", init_from=str(tmp_path / "missing.safetensors")))
