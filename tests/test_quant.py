"""int8 weight-only quantisation: per-output-channel symmetric, error within half a step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lmjax.models import GPT, GPTConfig
from lmjax.models.transformer import stack_layers
from lmjax.serve import quant
from lmjax.serve.generate import Decoder
from lmjax.train.tasks import LMTask

CONFIG = GPTConfig(vocab_size=65, block_size=32, num_layers=2, num_heads=4, embed_dim=64)


@pytest.fixture(scope="module")
def model_params():
    model = GPT(CONFIG)
    init = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))))
    return model, jax.device_get(init(jax.random.key(0))["params"])


def test_quantize_array_per_output_channel():
    w = np.random.default_rng(0).normal(size=(6, 3, 4)).astype(np.float32)
    w[:, 1, 2] *= 100  # one loud output channel must not coarsen the others
    q = quant.quantize_array(w, (0,))
    assert q.values.dtype == jnp.int8 and q.scale.shape == (1, 3, 4)
    np.testing.assert_allclose(np.asarray(q.scale)[0], np.abs(w).max(0) / 127, rtol=1e-6)
    err = np.abs(np.asarray(q.dequantize()) - w)
    assert np.all(err <= np.asarray(q.scale) / 2 + 1e-7)
    assert np.abs(np.asarray(q.values)).max() == 127


def test_which_parameters_are_quantised(model_params):
    _, params = model_params
    qparams = quant.quantize(params)
    b = qparams["block0"]
    assert isinstance(b["attn"]["qkv"]["kernel"], quant.QTensor)
    assert b["attn"]["qkv"]["kernel"].scale.shape == (1, 3, 4, 16)
    assert b["attn"]["out"]["kernel"].scale.shape == (1, 1, 64)
    assert b["mlp"]["down"]["kernel"].scale.shape == (1, 64)
    assert qparams["wte"]["embedding"].scale.shape == (128, 1)  # one per vocabulary row
    assert isinstance(qparams["wpe"], quant.QTensor)
    assert not isinstance(b["attn"]["qkv"]["bias"], quant.QTensor)
    assert not isinstance(b["norm1"]["scale"], quant.QTensor)
    # bytes: int8 values plus float32 scales; everything else float32
    expect = 0
    for leaf in jax.tree.leaves(qparams):
        expect += leaf.size * leaf.dtype.itemsize
    assert quant.nbytes(qparams) == expect
    assert quant.nbytes(qparams) < 0.3 * quant.nbytes(params)
    # a float32 tree passes through dequantize unchanged
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, params, quant.dequantize(params)))


def test_int8_decoding_is_close_and_uses_the_dequantised_weights(model_params):
    model, params = model_params
    qparams = quant.quantize(params)
    tokens = np.random.default_rng(1).integers(0, 65, (2, 16)).astype(np.int32)
    apply = jax.jit(lambda p, t: model.apply({"params": quant.dequantize(p)}, t))
    full_fp32, full_int8 = apply(params, tokens), apply(qparams, tokens)
    decoder = Decoder(model, prepare=quant.dequantize)
    logits, _ = decoder.prefill(qparams, decoder.new_cache(2), 0, tokens,
                                np.zeros(2, np.int32), np.array([16, 16], np.int32))
    np.testing.assert_allclose(logits[:, :65], full_int8[:, -1, :65], atol=1e-5, rtol=0)
    diff = np.abs(np.asarray(full_int8 - full_fp32)[..., :65]).max()
    assert 0 < diff < 0.05


def test_report_fields(model_params):
    model, params = model_params
    rng = np.random.default_rng(2)
    batches = [{"inputs": rng.integers(0, 65, (2, 32)), "targets": rng.integers(0, 65, (2, 32))}]
    r = quant.report(LMTask(CONFIG), params, batches)
    assert r["bytes_ratio"] == r["int8_bytes"] / r["fp32_bytes"] < 0.3
    assert abs(r["loss_change_relative"]) < 0.01
    assert r["fp32_eval_loss"] == pytest.approx(np.log(65), rel=0.05)  # untrained


def test_scanned_layers_keep_one_scale_per_layer(model_params):
    """Quantising the stacked (scan_layers) parameters equals quantising each layer."""
    _, params = model_params
    stacked = quant.dequantize(quant.quantize(stack_layers(params, CONFIG.num_layers)))
    per_layer = stack_layers(quant.dequantize(quant.quantize(params)), CONFIG.num_layers)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(per_layer), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
