"""Text encoders: the shared interface, MiniLM against sentence-transformers, the cache, configs."""

import pytest
import torch

from inkwash.errors import UserError
from inkwash.text import CachedTextEncoder, TextEncoderConfig, build_text_encoder
from inkwash.text.simple import ClassLabelEncoder, NullEncoder
from inkwash.text.small import SmallTextEncoder, WordByteTokenizer

PROMPTS = ["a large red circle", "", "a red circle above a blue square on a white background", "two yellow stars"]


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


def check_embedding(enc, prompts):
    emb = enc(prompts)
    B = len(prompts)
    assert emb.tokens.shape[0] == B and emb.tokens.shape[2] == enc.dim
    assert emb.mask.shape == emb.tokens.shape[:2] and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (B, enc.pooled_dim)
    assert emb.mask.any(1).all(), "every prompt, even '', has at least one real token"
    assert emb.tokens.shape[1] <= enc.max_length
    assert (emb.tokens[~emb.mask] == 0).all(), "padding tokens are zero"
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()
    return emb


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from inkwash.text.minilm import minilm_path

    emb = check_embedding(minilm, PROMPTS)
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    ref = st.encode(PROMPTS, convert_to_tensor=True, normalize_embeddings=False)
    torch.testing.assert_close(emb.pooled, ref.cpu(), atol=1e-5, rtol=0)
    assert not minilm.training and not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training, "a frozen encoder stays in eval mode"


def test_minilm_pads_to_longest_and_truncates(minilm):
    emb = minilm(["a red circle", "a"])
    assert emb.tokens.shape[1] == int(emb.mask.sum(1).max())
    long = " ".join(["red circle"] * 40)
    assert minilm([long]).tokens.shape[1] == minilm.max_length
    strict = build_text_encoder(TextEncoderConfig(name="minilm", truncate=False))
    with pytest.raises(UserError, match="tokens long"):
        strict([long])


def test_small_encoder_interface_and_grad():
    torch.manual_seed(0)
    enc = build_text_encoder(TextEncoderConfig(name="small", dim=32, layers=2, heads=2, max_length=24))
    assert isinstance(enc, SmallTextEncoder) and enc.trainable
    emb = check_embedding(enc, PROMPTS)
    emb.pooled.sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0
    # padding does not change a prompt's encoding
    alone = enc(["a red circle"])
    n = alone.mask.sum()
    torch.testing.assert_close(enc(["a red circle", PROMPTS[2]]).tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=0)


def test_word_byte_tokenizer_deterministic_with_byte_fallback():
    tok = WordByteTokenizer(max_length=64)
    assert tok.encode("") == [1, 2]
    a = tok.encode("A Red circle, zorblax!")
    assert a == tok.encode("a red CIRCLE, zorblax!") and len(a) == 1 + 3 + 1 + 7 + 1 + 1
    ids, mask = tok(["a red circle", "x" * 100])
    assert ids.shape == (2, 64) and mask[0].sum() == 5 and ids[1, -1] == 2


def test_null_encoder_single_zero_token():
    enc = build_text_encoder(TextEncoderConfig(name="none", dim=16))
    assert isinstance(enc, NullEncoder)
    emb = check_embedding(enc, ["", "anything"])
    assert emb.tokens.shape == (2, 1, 16) and emb.mask.all() and (emb.tokens == 0).all()


def test_class_label_encoder():
    enc = build_text_encoder(TextEncoderConfig(name="class", labels=("cat", "dog"), dim=8))
    assert isinstance(enc, ClassLabelEncoder)
    emb = check_embedding(enc, ["cat", "dog", "", "cat"])
    torch.testing.assert_close(emb.tokens[0], emb.tokens[3])
    assert not torch.equal(emb.pooled[0], emb.pooled[2]), "'' has its own null embedding"
    with pytest.raises(UserError, match="'cat', 'dog'"):
        enc(["bird"])


def test_cache_returns_what_the_encoder_returns(minilm):
    cached = CachedTextEncoder(minilm)
    batches = [PROMPTS, ["two yellow stars", "a large red circle", "two yellow stars"], ["", "a green triangle"]]
    for prompts in batches:
        for _ in range(2):  # first call fills, second hits
            got, ref = cached(prompts), minilm(prompts)
            assert torch.equal(got.mask, ref.mask)
            torch.testing.assert_close(got.tokens, ref.tokens, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.pooled, ref.pooled, atol=1e-5, rtol=0)
    assert len(cached) == 5 and cached.hits > 0
    small = CachedTextEncoder(NullEncoder(4), max_entries=2)
    assert small(["a", "b", "c"]).tokens.shape == (3, 1, 4) and len(small) == 2
    with pytest.raises(ValueError):
        CachedTextEncoder(SmallTextEncoder(dim=16, layers=1, heads=2))


def test_config_round_trip_and_unknown_name():
    cfg = TextEncoderConfig(name="class", labels=("a", "b"), dim=12)
    assert TextEncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="minilm, small, none, class"):
        TextEncoderConfig(name="clip")
    with pytest.raises(UserError):
        TextEncoderConfig.from_dict({"name": "small", "width": 3})
