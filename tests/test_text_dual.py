"""Two text encoders combined, as SDXL (features side by side, the last encoder's pooled vector) and SD3
(sequences one after the other, pooled vectors concatenated) do."""

from __future__ import annotations

import pytest
import torch
from test_trainer import TINY_NET

from inkwash.errors import UserError
from inkwash.formats.checkpoint import load_model_file
from inkwash.pipeline import Pipeline
from inkwash.text import TextEncoderConfig, build_text_encoder
from inkwash.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_A = {"name": "small", "dim": 16, "layers": 1, "heads": 2, "max_length": 12}
SMALL_B = {"name": "small", "dim": 24, "layers": 1, "heads": 2, "max_length": 20}
PROMPTS = ["a red circle", "two small blue squares on the left of a star"]


def dual(**kw):
    torch.manual_seed(0)
    return build_text_encoder(TextEncoderConfig(name="dual", encoders=(SMALL_A, SMALL_B), **kw)).eval()


def parts(enc):
    return [e(PROMPTS) for e in enc.encoders]


def test_features_side_by_side_and_the_last_pooled_vector():
    enc = dual()
    out, (a, b) = enc(PROMPTS), parts(enc)
    L = max(a.tokens.shape[1], b.tokens.shape[1])
    assert enc.dim == 40 and enc.pooled_dim == 24 and out.tokens.shape == (2, L, 40)
    assert torch.equal(out.tokens[:, : a.tokens.shape[1], :16], a.tokens)
    assert torch.equal(out.tokens[:, : b.tokens.shape[1], 16:], b.tokens)
    assert (out.tokens[:, a.tokens.shape[1] :, :16] == 0).all()
    assert torch.equal(out.pooled, b.pooled)
    assert torch.equal(out.mask[:, : a.mask.shape[1]], a.mask | out.mask[:, : a.mask.shape[1]])


def test_sequences_one_after_the_other_and_pooled_vectors_concatenated():
    enc = dual(combine="sequence", pooled="concat")
    out, (a, b) = enc(PROMPTS), parts(enc)
    La = a.tokens.shape[1]
    assert enc.dim == 24 and enc.pooled_dim == 40
    assert out.tokens.shape == (2, La + b.tokens.shape[1], 24)
    assert torch.equal(out.tokens[:, :La, :16], a.tokens) and (out.tokens[:, :La, 16:] == 0).all()
    assert torch.equal(out.tokens[:, La:], b.tokens) and torch.equal(out.mask, torch.cat([a.mask, b.mask], 1))
    assert torch.equal(out.pooled, torch.cat([a.pooled, b.pooled], -1))


def test_only_trainable_encoders_are_trained_and_saved(monkeypatch):
    from inkwash.text.simple import NullEncoder

    frozen = NullEncoder(8)
    frozen.trainable = False
    frozen.register_parameter("w", torch.nn.Parameter(torch.ones(3)))
    from inkwash.text.dual import DualTextEncoder
    from inkwash.text.small import SmallTextEncoder

    enc = DualTextEncoder([frozen, SmallTextEncoder(16, 1, 2, 12)]).train()
    enc.requires_grad_(True)
    assert not frozen.w.requires_grad and not frozen.training
    assert all(p.requires_grad for p in enc.encoders[1].parameters())
    sd = enc.state_dict()
    assert sd and all(k.startswith("encoders.1.") for k in sd)
    enc.load_state_dict(sd)  # the frozen part is not asked for
    with pytest.raises(RuntimeError, match="do not fit"):
        enc.load_state_dict({k: v for k, v in list(sd.items())[1:]})


def test_a_model_trains_and_samples_with_two_encoders(tmp_path):
    text = {"name": "dual", "encoders": [SMALL_A, SMALL_B], "combine": "sequence", "pooled": "concat"}
    net = {**TINY_NET, "y_dim": 1}  # fitted to the encoder's widths: context 24, pooled 40
    path = train(TrainConfig(model=net, text_encoder=text, image_size=32, batch_size=2, steps=2,
                             output_dir=str(tmp_path / "run"), sample_prompts=()))  # fmt: skip
    meta, tensors = load_model_file(path)
    assert meta["model"]["context_dim"] == 24 and meta["model"]["y_dim"] == 40
    assert meta["text_encoder"]["encoders"][1]["dim"] == 24
    pipe = Pipeline.from_file(path)
    assert pipe.generate(["a red circle", "a star"], steps=2).shape == (2, 3, 32, 32)
    with pytest.raises(UserError, match="unknown text combine"):
        build_text_encoder(TextEncoderConfig(name="dual", encoders=(SMALL_A, SMALL_B), combine="zip"))
    with pytest.raises(UserError, match="at least two encoders"):
        build_text_encoder(TextEncoderConfig(name="dual", encoders=(SMALL_A,)))
