"""The compiled LSTM and GRU CPU kernels (lmjax/kernels/rnn_cpu.cc): they build, the
layers use them where the config's `kernel` field selects them, and they equal the plain
`lax.scan` differentiated by JAX."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import kernels
from lmjax.kernels import rnn_cpu
from lmjax.models import rnn
from lmjax.parallel import make_mesh


def test_kernel_builds_and_registers():
    assert rnn_cpu.unavailable_reason() is None


def _inputs(cell, time=13, batch=37, hidden=37, seed=0):
    """37 rows: several parts of rows, so several threads; 37 hidden units: whole vectors
    (16 floats with AVX-512, 8 with AVX2) and a ragged tail in every row, and gate
    columns past the last whole vector in every product."""
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
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_scan_equals_plain_scan(cell, reverse, masked):
    _check_against_plain_scan(cell, reverse, masked)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_scan_equals_plain_scan_whole_panels(cell, masked):
    """72 hidden units: whole panels of four vectors of W_h (and of W_h^T, which the
    backward kernels pack from W_h) besides the columns past them. Outputs within
    float32's 1e-5: at this width the kernel's GRU and XLA's float32 scan are each about
    1e-6 from a float64 scan, so they can differ by twice that."""
    _check_against_plain_scan(cell, False, masked, hidden=72, out_atol=1e-5)


def _check_against_plain_scan(cell, reverse, masked, hidden=37, out_atol=1e-6):
    args, resets, mask, weights = _inputs(cell, hidden=hidden)
    mask = mask if masked else None

    def loss(scan, *args):
        outs, final = scan(reverse, *args)
        h, c = final if cell == "lstm" else (final, final)
        return jnp.sum(outs * weights) + jnp.sum(h * jnp.cos(c))

    def ours(reverse, *args):
        return kernels.recurrence(cell, reverse, *args, resets, mask)

    def plain(reverse, *args):
        return rnn.xla_recurrence(cell, reverse, 1, *args, resets, mask)

    grad_fn = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3)))
    hlo = grad_fn.lower(*args).as_text()
    assert all(name in hlo for name in KERNELS[cell])
    for a, b in zip(jax.tree.leaves(ours(reverse, *args)), jax.tree.leaves(plain(reverse, *args)),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=out_atol, rtol=0)
    want = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(jax.tree.leaves(grad_fn(*args)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_kernel_sharded_equals_one_device(cell):
    """On a data=4 x tensor=2 mesh each device runs the kernel on its own 9 of 36 rows:
    outputs and gradients equal the one-device call."""
    args, resets, mask, weights = _inputs(cell, batch=36)

    def loss(*args):
        outs, final = kernels.recurrence(cell, False, *args, resets, mask)
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


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_gradients_auto_equal_xla(cell):
    """The whole LM's loss and gradients with kernel='auto' (the kernels, here) equal those
    with kernel='xla' (JAX's own autodiff of the scan); 37 hidden units: ragged panels
    everywhere."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 23, size=(9, 11)), jnp.int32)
    resets = jnp.asarray(rng.random((9, 11)) < 0.1)
    config = rnn.RNNConfig(cell=cell, vocab_size=23, embed_dim=24, hidden_dim=37, num_layers=2)
    params = rnn.RNNLM(config).init(jax.random.key(0), tokens)["params"]
    carry = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                         config.zero_carry(9))
    results = {}
    for kernel in ("auto", "xla"):
        model = rnn.RNNLM(dataclasses.replace(config, kernel=kernel))

        def loss(p, model=model):
            logits, new = model.apply({"params": p}, tokens, carry, resets)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 3]) + sum(
                jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(new))

        fn = jax.jit(jax.value_and_grad(loss))
        assert (KERNELS[cell][1] in fn.lower(params).as_text()) == (kernel == "auto")
        results[kernel] = fn(params)
    for a, b in zip(*map(jax.tree.leaves, (results["auto"], results["xla"])), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_bilstm_kernel_gradients_equal_xla():
    """The kernels with padding and time reversed (the BiLSTM classifier's layers)."""
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(7, 10, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(10)[None] < rng.integers(3, 11, size=(7, 1)))
    weights = jnp.asarray(rng.normal(size=(7, 10, 74)), jnp.float32)
    params = rnn.BiLayer("lstm", 37).init(jax.random.key(0), xs, mask)["params"]
    results = {}
    for kernel in ("cpu", "xla"):
        layer = rnn.BiLayer("lstm", 37, kernel=kernel)

        def loss(p, xs, layer=layer):
            return jnp.sum(layer.apply({"params": p}, xs, mask) * weights)

        results[kernel] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)
    for a, b in zip(*map(jax.tree.leaves, (results["cpu"], results["xla"])), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_failed_build_names_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LMJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="compiling .*rnn_cpu.cc failed"):
        rnn_cpu.build()
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_lm_losses_equal_xla_and_sharded():
    """The LM's per-token losses (given targets) and their gradients with the kernels
    equal those of the XLA scan, on one device and on a data=4 x tensor=2 mesh (each
    device runs the kernels on its own rows)."""
    rng = np.random.default_rng(0)
    tokens, targets = (jnp.asarray(rng.integers(0, 23, size=(8, 11)), jnp.int32)
                       for _ in range(2))
    weights = jnp.asarray(rng.random((8, 11)), jnp.float32)
    fns = {}
    for kernel in ("cpu", "xla"):
        model = rnn.RNNLM(rnn.RNNConfig(cell="lstm", vocab_size=23, embed_dim=24,
                                        hidden_dim=37, num_layers=2, kernel=kernel))

        def loss(p, model=model):
            losses, _ = model.apply({"params": p}, tokens, targets=targets)
            return jnp.sum(losses * weights)

        fns[kernel] = jax.value_and_grad(loss)
    params = model.init(jax.random.key(0), tokens)["params"]
    got = jax.jit(fns["cpu"])(params)
    want = jax.jit(fns["xla"])(params)
    with jax.set_mesh(make_mesh(4, 1, 2)):
        sharded = jax.jit(fns["cpu"])
        assert KERNELS["lstm"][1] in sharded.lower(params).compile().as_text()
        sharded = sharded(params)
    for a, b, c in zip(*map(jax.tree.leaves, (got, want, sharded)), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(c, a, atol=1e-5, rtol=1e-5)


def test_cpu_kernel_where_unusable_names_the_reason():
    """kernel='cpu' raises, naming the reason, where the kernels cannot run (bfloat16
    operands, an Elman cell); kernel='auto' runs XLA's scan there."""
    args, resets, mask, _ = _inputs("lstm", time=3, batch=2, hidden=8)
    args = jax.tree.map(lambda x: x.astype(jnp.bfloat16), args)
    with pytest.raises(RuntimeError, match="kernel='cpu'.*float32 operands, not bfloat16"):
        rnn.recurrence("lstm", False, 1, "cpu", *args, resets, mask)
    hlo = jax.jit(lambda *a: rnn.recurrence("lstm", False, 1, "auto", *a, resets, mask)).lower(
        *args).as_text()
    assert "lmjax_LstmForward" not in hlo and "while" in hlo
    xs = jnp.ones((2, 3, 4), jnp.float32)
    with pytest.raises(RuntimeError, match="no CPU kernel for 'rnn' cells"):
        rnn.RecurrentLayer("rnn", 8, kernel="cpu").init(jax.random.key(0), xs)


def test_cpu_kernel_that_cannot_build_names_the_build_error(monkeypatch):
    reason = "compiling rnn_cpu.cc failed: no such compiler"
    monkeypatch.setattr(rnn_cpu, "unavailable_reason", lambda: reason)
    x = jnp.ones((2, 3), jnp.float32)
    assert not kernels.use_cpu("auto", "lstm", x)
    with pytest.raises(RuntimeError, match=f"cannot run: {reason}"):
        kernels.use_cpu("cpu", "lstm", x)


@pytest.mark.parametrize("config", [rnn.RNNConfig, rnn.BiLSTMConfig])
def test_invalid_kernel_names_the_field_and_choices(config):
    name = config.__name__
    with pytest.raises(ValueError, match=f"{name}.kernel = 'gpu' .*'auto', 'xla', 'cpu'"):
        config(kernel="gpu")
