"""The GPT equals a plain JAX transcription of nanoGPT's forward pass, and is causal."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy.special import erf

from lmjax.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=65, block_size=16, num_layers=2, num_heads=4, embed_dim=32)


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _reference_logits(params, tokens, c: GPTConfig) -> np.ndarray:
    """nanoGPT's model.py forward, written out with numpy-like jnp ops."""
    p = jax.tree.map(np.asarray, params)
    length = tokens.shape[1]
    x = p["wte"]["embedding"][tokens] + p["wpe"][:length]
    mask = np.tril(np.ones((length, length), bool))
    for i in range(c.num_layers):
        b = p[f"block{i}"]
        h = _layer_norm(x, b["norm1"])
        qkv = np.einsum("btd,dsnh->btsnh", h, b["attn"]["qkv"]["kernel"]) + b["attn"]["qkv"]["bias"]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (batch, length, heads, head_dim)
        scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(c.head_dim)
        scores = np.where(mask, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        y = np.einsum("bnqk,bknh->bqnh", weights, v)
        x = x + np.einsum("bqnh,nhd->bqd", y, b["attn"]["out"]["kernel"]) + b["attn"]["out"]["bias"]
        h = _layer_norm(x, b["norm2"])
        up = h @ b["mlp"]["up"]["kernel"] + b["mlp"]["up"]["bias"]
        gelu = 0.5 * up * (1 + erf(up / np.sqrt(2)))  # exact GELU, as torch.nn.GELU()
        x = x + gelu @ b["mlp"]["down"]["kernel"] + b["mlp"]["down"]["bias"]
    x = _layer_norm(x, p["norm_f"])
    return x @ p["wte"]["embedding"][: c.vocab_size].T


def _init(config, tokens):
    params = GPT(config).init(jax.random.key(0), tokens)["params"]
    return nn.unbox(params)


def test_matches_plain_reference():
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, CONFIG.block_size))
    params = _init(CONFIG, tokens)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls
        logits = GPT(CONFIG).apply({"params": params}, tokens)
    assert logits.shape == (3, CONFIG.block_size, CONFIG.padded_vocab)
    want = _reference_logits(params, tokens, CONFIG)
    np.testing.assert_allclose(logits[..., : CONFIG.vocab_size], want, atol=1e-5, rtol=1e-5)
    # Padded vocabulary entries can never be predicted.
    assert np.all(np.asarray(logits[..., CONFIG.vocab_size :]) < -1e30)


@pytest.mark.parametrize("options", [
    {}, {"position": "rope"}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}, {"use_bias": False},
    {"remat": True}, {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False},
    {"scan_layers": True}, {"scan_layers": True, "remat": True}, {"attention": "reference"},
])
def test_causal(options):
    """Changing a future token never changes an earlier position's logits."""
    config = dataclasses.replace(CONFIG, **options)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, config.block_size))
    params = _init(config, tokens)
    changed = tokens.copy()
    changed[:, 10:] = (changed[:, 10:] + 1) % config.vocab_size
    a = GPT(config).apply({"params": params}, tokens)
    b = GPT(config).apply({"params": params}, changed)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_bf16_compute_keeps_fp32_params():
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    tokens = np.zeros((1, 8), np.int32)
    params = _init(config, tokens)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    logits = GPT(config).apply({"params": params}, tokens)
    reference = GPT(CONFIG).apply({"params": params}, tokens)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits[..., :65], reference[..., :65], atol=0.1)


def test_every_parameter_has_logical_axes():
    boxed = jax.eval_shape(lambda: GPT(CONFIG).init(jax.random.key(0), np.zeros((1, 8), int)))
    for leaf in jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned)
        assert len(leaf.names) == leaf.value.ndim


def test_bad_config_errors():
    with pytest.raises(ValueError, match="num_heads"):
        GPTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="block_size"):
        GPT(CONFIG).init(jax.random.key(0), np.zeros((1, 17), np.int32))
