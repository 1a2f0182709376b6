"""BERT equals a plain NumPy transcription of its forward pass; padding never leaks."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import linen as nn
from scipy.special import erf

from lmjax.models.bert import SIZES, BertClassifier, BertConfig, BertPretrain

CONFIG = BertConfig(size="tiny", vocab_size=50, max_len=16, num_layers=2, embed_dim=32,
                    num_heads=4, dropout=0.0, attention_dropout=0.0)


def _layer_norm(x, p, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _reference(params, tokens, segments, positions, c: BertConfig):
    """Devlin et al.'s encoder and pretraining heads, written plainly in NumPy (float64)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    e = p["bert"]
    length = tokens.shape[1]
    x = (e["word"]["embedding"][tokens] + e["position"]["embedding"][:length]
         + e["segment"]["embedding"][segments])
    x = _layer_norm(x, e["embed_norm"])
    keep = (tokens != c.pad_id)[:, None, None, :]
    for i in range(c.num_layers):
        b = e[f"block{i}"]
        qkv = np.einsum("btd,dsnh->btsnh", x, b["attn"]["qkv"]["kernel"]) + b["attn"]["qkv"]["bias"]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(c.head_dim)
        scores = np.where(keep, scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y = np.einsum("bnqk,bknh->bqnh", w, v)
        y = np.einsum("bqnh,nhd->bqd", y, b["attn"]["out"]["kernel"]) + b["attn"]["out"]["bias"]
        x = _layer_norm(x + y, b["norm1"])
        h = _dense(_gelu(_dense(x, b["up"])), b["down"])
        x = _layer_norm(x + h, b["norm2"])
    pooled = np.tanh(_dense(x[:, 0], e["pooler"]))
    picked = np.take_along_axis(x, positions[..., None], axis=1)
    h = _layer_norm(_gelu(_dense(picked, p["mlm_transform"])), p["mlm_norm"])
    mlm = h @ e["word"]["embedding"][: c.vocab_size].T + p["mlm_bias"][: c.vocab_size]
    return mlm, _dense(pooled, p["nsp"])


def _batch(rng, batch=3, length=12, real=(12, 9, 5)):
    tokens = rng.integers(5, CONFIG.vocab_size, (batch, length))
    segments = np.zeros_like(tokens)
    for row, n in enumerate(real):
        tokens[row, n:] = CONFIG.pad_id
        segments[row, n // 2 : n] = 1
    positions = np.stack([rng.choice(n, 3, replace=False) for n in real])
    return tokens, segments, positions


def _params(model, *args):
    return nn.unbox(model.init(jax.random.key(0), *args)["params"])


@pytest.mark.parametrize("attention", ["auto", "xla", "reference"])
def test_pretrain_matches_plain_reference(attention):
    tokens, segments, positions = _batch(np.random.default_rng(0))
    model = BertPretrain(dataclasses.replace(CONFIG, attention=attention))
    params = _params(model, tokens, segments, positions)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls
        mlm, nsp = model.apply({"params": params}, tokens, segments, positions)
    assert mlm.shape == (3, 3, CONFIG.padded_vocab) and nsp.shape == (3, 2)
    want_mlm, want_nsp = _reference(params, tokens, segments, positions, CONFIG)
    np.testing.assert_allclose(mlm[..., : CONFIG.vocab_size], want_mlm, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(nsp, want_nsp, atol=2e-5, rtol=1e-5)
    assert np.all(np.asarray(mlm[..., CONFIG.vocab_size:]) < -1e30)  # padded vocab never wins


def test_decoder_is_tied_to_word_embeddings():
    """The only vocabulary-sized parameters are the word embeddings and the output bias."""
    tokens, segments, positions = _batch(np.random.default_rng(1))
    params = _params(BertPretrain(CONFIG), tokens, segments, positions)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    vocab_sized = sorted("/".join(str(k.key) for k in path) for path, leaf in flat
                         if CONFIG.padded_vocab in leaf.shape)
    assert vocab_sized == ["bert/word/embedding", "mlm_bias"]


@pytest.mark.parametrize("model_cls", [BertPretrain, BertClassifier])
def test_outputs_at_real_positions_ignore_extra_padding(model_cls):
    rng = np.random.default_rng(2)
    tokens, segments, positions = _batch(rng, length=10, real=(10, 7, 4))
    longer = np.pad(tokens, ((0, 0), (0, 6)), constant_values=CONFIG.pad_id)
    longer_segments = np.pad(segments, ((0, 0), (0, 6)))
    model = model_cls(CONFIG)
    if model_cls is BertPretrain:
        args, long_args = (tokens, segments, positions), (longer, longer_segments, positions)
    else:  # the classifier takes (tokens, mask, segments)
        args = (tokens, tokens != CONFIG.pad_id, segments)
        long_args = (longer, longer != CONFIG.pad_id, longer_segments)
    params = _params(model, *args)
    with jax.default_matmul_precision("highest"):
        short = model.apply({"params": params}, *args)
        long = model.apply({"params": params}, *long_args)
    for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(long), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # And the encoder's sequence output at every real position.
    from lmjax.models.bert import BertEncoder

    enc = BertEncoder(CONFIG)
    sub = {"params": params["bert"]}
    with jax.default_matmul_precision("highest"):
        seq_short, _ = enc.apply(sub, tokens, segments)
        seq_long, _ = enc.apply(sub, longer, longer_segments)
    real = tokens != CONFIG.pad_id
    np.testing.assert_allclose(np.asarray(seq_long)[:, :10][real], np.asarray(seq_short)[real],
                               atol=1e-5, rtol=1e-5)


def test_attention_dropout_applies_in_training_only():
    tokens, segments, _ = _batch(np.random.default_rng(3))
    model = BertClassifier(CONFIG)
    params = _params(model, tokens, None, segments)
    evaluated = model.apply({"params": params}, tokens, None, segments)
    dropping = BertClassifier(dataclasses.replace(CONFIG, attention_dropout=0.5))
    np.testing.assert_array_equal(
        dropping.apply({"params": params}, tokens, None, segments), evaluated)
    dropped = dropping.apply({"params": params}, tokens, None, segments, deterministic=False,
                             rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(dropped, evaluated)


def test_size_presets_follow_turc_et_al():
    want = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8),
            "medium": (8, 512, 8), "base": (12, 768, 12)}
    assert set(SIZES) == set(want)
    for name, (layers, width, heads) in want.items():
        c = BertConfig(size=name)
        assert (c.num_layers, c.embed_dim, c.num_heads) == (layers, width, heads)
    with pytest.raises(ValueError, match="unknown BERT size"):
        BertConfig(size="huge")
    params = jax.eval_shape(lambda: BertClassifier(BertConfig(size="base", vocab_size=30522,
                                                              max_len=512)).init(
        jax.random.key(0), np.zeros((1, 8), np.int32)))["params"]
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params)))
    # BERT-Base has about 110M parameters (vocabulary padded 30522 -> 30528 here).
    assert 108e6 < count < 111e6, count
