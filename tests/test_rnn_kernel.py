"""The compiled LSTM and GRU CPU kernels (lmjax/models/rnn_cpu.cc): they build, the
layers use them, and they equal the plain `lax.scan` differentiated by JAX, as do the XLA
fallbacks."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models import rnn, rnn_cpu
from lmjax.parallel import make_mesh


def test_kernel_builds_and_registers():
    assert rnn_cpu.available(), "the LSTM CPU kernel did not build (see the logged error)"


def _inputs(cell, time=13, batch=37, hidden=40, seed=0):
    """37 rows: several parts of rows, so several threads; 40 hidden units: two 16-lane
    vectors and a ragged tail of 8 in every row."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    gates = rnn.CELLS[cell].gates
    w_h, b_h = normal(hidden, gates, hidden, scale=0.3), normal(gates, hidden, scale=0.3)
    gates_x = normal(time, batch, gates, hidden)
    carry = (normal(batch, hidden), normal(batch, hidden)) if cell == "lstm" else \
        normal(batch, hidden)
    resets = jnp.asarray(rng.random((time, batch)) < 0.15)
    mask = jnp.asarray(rng.random((time, batch)) < 0.8)
    weights = normal(time, batch, hidden)
    return (w_h, b_h, gates_x, carry), resets, mask, weights


KERNELS = {"lstm": ("lmjax_LstmForward", "lmjax_LstmBackward"),
           "gru": ("lmjax_GruForward", "lmjax_GruBackward")}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_scan_equals_plain_scan(cell, kernel, reverse, masked):
    with contextlib.nullcontext() if kernel else rnn_cpu.disabled():
        _check_against_plain_scan(cell, kernel, reverse, masked)


def _check_against_plain_scan(cell, kernel, reverse, masked):
    args, resets, mask, weights = _inputs(cell)
    mask = mask if masked else None

    def loss(scan, *args):
        outs, final = scan(reverse, *args)
        h, c = final if cell == "lstm" else (final, final)
        return jnp.sum(outs * weights) + jnp.sum(h * jnp.cos(c))

    def ours(reverse, *args):
        return rnn.recurrent_scan(cell, reverse, 1, *args, resets, mask)

    def plain(reverse, *args):
        every = jnp.ones(resets.shape, bool)
        return rnn.reference_scan(cell, reverse, 1, *args, resets,
                                  every if mask is None else mask)

    grad_fn = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3)))
    hlo = grad_fn.lower(*args).as_text()
    assert all(name in hlo for name in KERNELS[cell]) == kernel
    for a, b in zip(jax.tree.leaves(ours(reverse, *args)), jax.tree.leaves(plain(reverse, *args)),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    want = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(jax.tree.leaves(grad_fn(*args)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_kernel_sharded_equals_one_device(cell):
    """On a data=4 x tensor=2 mesh each device runs the kernel on its own 9 of 36 rows:
    outputs and gradients equal the one-device call."""
    args, resets, mask, weights = _inputs(cell, batch=36)

    def loss(*args):
        outs, final = rnn.recurrent_scan(cell, False, 1, *args, resets, mask)
        return jnp.sum(outs * weights) + sum(jnp.sum(x ** 2) for x in jax.tree.leaves(final))

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    want = jax.jit(fn)(*args)
    with jax.set_mesh(make_mesh(4, 1, 2)):
        sharded = jax.jit(fn)
        hlo = sharded.lower(*args).compile().as_text()
        got = sharded(*args)
    assert KERNELS[cell][1] in hlo
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_training_step_runs_the_kernel(cell):
    config = rnn.RNNConfig(cell=cell, vocab_size=11, embed_dim=8, hidden_dim=16, num_layers=2)
    model = rnn.RNNLM(config)
    tokens = jnp.zeros((4, 6), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens)[0].sum()))
    assert grad.lower(params).as_text().count(KERNELS[cell][1]) == 2  # one per layer


def test_failed_build_names_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LMJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="compiling .*rnn_cpu.cc failed"):
        rnn_cpu.build()
    assert list(tmp_path.iterdir()) == []  # no partial library left behind
