"""layers.dot_product_attention, shared by GPT and BERT: every implementation computes
the plain reference, attention dropout drops what it says, and choices that cannot run
here fail with a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models import GPT, BertPretrain, GPTConfig, layers
from lmjax.models.bert import BertConfig

ON_CPU = jax.default_backend() == "cpu"
# What runs on every backend; "cudnn" needs an NVIDIA GPU and half precision.
PORTABLE = ["auto", "xla", "reference"]


def _qkv(seed: int, batch=2, length=7, heads=3, head_dim=8):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
            for _ in range(3)]


def _padding_mask(batch=2, length=7):
    """BERT's mask: (batch, 1, 1, keys), the last keys of row 1 hidden."""
    real = np.ones((batch, length), bool)
    real[1, 4:] = False
    return jnp.asarray(real[:, None, None, :])


def _numpy_attention(q, k, v, visible):
    """softmax(q k^T / sqrt(d)) v in float64, hidden keys excluded."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknh->bqnh", weights, v)


MASKINGS = {
    "causal": lambda length: ({"causal": True}, np.tril(np.ones((length, length), bool))),
    "padding": lambda length: ({"mask": _padding_mask(length=length)},
                               np.asarray(_padding_mask(length=length))),
}


@pytest.mark.parametrize("masking", MASKINGS)
def test_reference_equals_numpy(masking):
    q, k, v = _qkv(0)
    kwargs, visible = MASKINGS[masking](q.shape[1])
    with jax.default_matmul_precision("highest"):
        got = layers.reference_attention(q, k, v, **kwargs)
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, visible), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("implementation", PORTABLE)
def test_implementations_equal_reference(implementation, masking):
    """Forward and gradients (w.r.t. q, k and v) equal the reference's, float32."""
    q, k, v = _qkv(1)
    kwargs, _ = MASKINGS[masking](q.shape[1])
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * cotangent)

    run = lambda q, k, v: layers.dot_product_attention(  # noqa: E731
        q, k, v, implementation=implementation, **kwargs)
    reference = lambda q, k, v: layers.reference_attention(q, k, v, **kwargs)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        got = run(q, k, v)
        want = reference(q, k, v)
        got_grads = jax.grad(lambda *a: loss(run, *a), argnums=(0, 1, 2))(q, k, v)
        want_grads = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def _dropped_probabilities(rate: float, causal: bool, implementation="auto", seed=0):
    """The attention probabilities after dropout, read off the output: with q = k = 0 the
    scores are all equal, and with v[s] = one-hot(s) output row t is probability row t.

    Returns (dropped, undropped): (batch, heads, length, length) each.
    """
    batch, length, heads = 4, 32, 4
    q = jnp.zeros((batch, length, heads, length))
    eye = jnp.eye(length)[None, :, None, :]  # (1, keys, 1, head_dim = keys)
    v = jnp.broadcast_to(eye, (batch, length, heads, length))
    out = layers.dot_product_attention(q, q, v, causal=causal, implementation=implementation,
                                       dropout_rate=rate, dropout_rng=jax.random.key(seed))
    visible = np.tril(np.ones((length, length), bool)) if causal else np.ones((length,) * 2)
    undropped = visible / visible.sum(-1, keepdims=True)  # uniform over visible keys
    dropped = np.asarray(out).transpose(0, 2, 1, 3)  # (batch, heads, queries, keys)
    return dropped, np.broadcast_to(undropped, dropped.shape)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_zeroes_a_fraction_rate_and_rescales_the_rest(rate, causal):
    dropped, undropped = _dropped_probabilities(rate, causal)
    visible = undropped > 0
    zeroed = (dropped == 0) & visible
    n = int(visible.sum())
    # Each visible probability is zeroed independently with probability `rate`: the
    # zeroed count is Binomial(n, rate), so its fraction lies within 5 standard
    # deviations sqrt(rate (1 - rate) / n) of `rate` but with probability < 1e-6.
    bound = 5 * np.sqrt(rate * (1 - rate) / n)
    assert abs(zeroed.sum() / n - rate) < bound, (zeroed.sum() / n, rate, bound)
    kept = visible & ~zeroed
    np.testing.assert_allclose(dropped[kept], undropped[kept] / (1 - rate), rtol=1e-6)
    assert np.all(dropped[~visible] == 0)  # hidden keys stay hidden


def test_without_rng_there_is_no_dropout():
    """Evaluation passes no dropout rng: the output is the undropped attention."""
    q, k, v = _qkv(3)
    with jax.default_matmul_precision("highest"):
        plain = layers.dot_product_attention(q, k, v, causal=True)
        for implementation in PORTABLE:
            evaluated = layers.dot_product_attention(q, k, v, causal=True, dropout_rate=0.5,
                                                     implementation=implementation)
            np.testing.assert_allclose(evaluated, plain, atol=1e-6, rtol=1e-6)


def test_xla_choice_drops_through_the_reference():
    """jax's XLA attention has no dropout: "xla" and "auto" run the reference while
    dropout is active, so the same rng drops the same probabilities."""
    q, k, v = _qkv(4)
    outs = [layers.dot_product_attention(q, k, v, causal=True, implementation=impl,
                                         dropout_rate=0.3, dropout_rng=jax.random.key(5))
            for impl in PORTABLE]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    undropped = layers.dot_product_attention(q, k, v, causal=True)
    assert not np.allclose(outs[0], undropped)


@pytest.mark.skipif(not ON_CPU, reason="the CPU's error")
def test_cudnn_on_cpu_names_the_backend_and_the_alternatives():
    q, k, v = _qkv(6)
    with pytest.raises(ValueError, match="attention='cudnn'.*'cpu'.*'auto', 'xla' or 'reference'"):
        layers.dot_product_attention(q, k, v, causal=True, implementation="cudnn")
    model = GPT(GPTConfig(vocab_size=65, block_size=8, num_layers=1, num_heads=2,
                          embed_dim=16, attention="cudnn"))
    with pytest.raises(ValueError, match="attention='cudnn'"):
        model.init(jax.random.key(0), np.zeros((1, 8), np.int32))


def test_resolution_on_an_nvidia_gpu(monkeypatch):
    """Which implementation each choice runs where cuDNN is available."""
    monkeypatch.setattr(layers, "_on_nvidia_gpu", lambda: True)
    bf16, f32 = jnp.bfloat16, jnp.float32
    resolve = layers.resolve_attention
    assert resolve("auto", bf16, 64, dropout=False, masked=False) == "cudnn"
    assert resolve("auto", bf16, 64, dropout=True, masked=False) == "reference"
    assert resolve("auto", bf16, 64, dropout=False, masked=True) == "xla"
    assert resolve("auto", bf16, 12, dropout=False, masked=False) == "xla"  # head_dim % 8
    assert resolve("auto", f32, 64, dropout=False, masked=False) == "xla"
    assert resolve("xla", bf16, 64, dropout=False, masked=False) == "xla"
    assert resolve("xla", bf16, 64, dropout=True, masked=False) == "reference"
    assert resolve("cudnn", bf16, 64, dropout=False, masked=True) == "cudnn"
    with pytest.raises(ValueError, match="attention='cudnn' runs in bfloat16 or float16"):
        resolve("cudnn", f32, 64, dropout=False, masked=False)
    with pytest.raises(ValueError, match="attention='cudnn' cannot drop"):
        resolve("cudnn", bf16, 64, dropout=True, masked=False)


def test_resolution_without_cudnn(monkeypatch):
    monkeypatch.setattr(layers, "_on_nvidia_gpu", lambda: False)
    for dtype in (jnp.bfloat16, jnp.float32):
        assert layers.resolve_attention("auto", dtype, 64, False, False) == "xla"
        assert layers.resolve_attention("auto", dtype, 64, True, False) == "reference"
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        layers.resolve_attention("flash", jnp.float32, 64, False, False)
    with pytest.raises(ValueError, match="unknown attention"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="unknown attention"):
        BertConfig(attention="flash")


def _spy_on_attention(monkeypatch) -> list[tuple[float, bool]]:
    """Records (dropout_rate, whether an rng was given) of every attention call."""
    calls = []
    real = layers.dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((kwargs["dropout_rate"], kwargs["dropout_rng"] is not None))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(layers, "dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_models_drop_attention_in_training_only(monkeypatch, family):
    """GPT drops attention probabilities at its one dropout rate (nanoGPT), BERT at
    attention_dropout; neither in evaluation."""
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 40 + 1
    if family == "gpt":
        model = GPT(GPTConfig(vocab_size=65, block_size=8, num_layers=2, num_heads=2,
                              embed_dim=16, dropout=0.2))
    else:
        model = BertPretrain(BertConfig(vocab_size=50, max_len=8, num_layers=2, embed_dim=16,
                                        num_heads=2, dropout=0.1, attention_dropout=0.3))
    rate = 0.2 if family == "gpt" else 0.3
    params = model.init(jax.random.key(0), tokens)["params"]
    calls = _spy_on_attention(monkeypatch)
    model.apply({"params": params}, tokens, deterministic=True)
    assert calls == [(rate, False)] * 2
    calls.clear()
    model.apply({"params": params}, tokens, deterministic=False,
                rngs={"dropout": jax.random.key(1)})
    assert calls == [(rate, True)] * 2


def _exp_dtypes(jaxpr) -> list:
    """Dtypes of every exp in a jaxpr, nested jaxprs (softmax's custom_jvp) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "exp":
            found.append(eqn.outvars[0].aval.dtype)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _exp_dtypes(inner)
    return found


@pytest.mark.parametrize("implementation", PORTABLE)
def test_bf16_softmax_runs_in_float32(implementation):
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(7))
    for rng in (None, jax.random.key(0)):  # without and with dropout
        fn = lambda q, k, v, rng=rng: layers.dot_product_attention(  # noqa: E731
            q, k, v, causal=True, implementation=implementation, dropout_rate=0.1,
            dropout_rng=rng)
        assert fn(q, k, v).dtype == jnp.bfloat16
        assert set(_exp_dtypes(jax.make_jaxpr(fn)(q, k, v).jaxpr)) == {jnp.dtype("float32")}


def test_config_rejects_rates_outside_unit_interval():
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="attention_dropout"):
        BertConfig(attention_dropout=-0.1)
