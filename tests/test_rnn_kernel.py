"""The compiled LSTM and GRU CPU kernels (lmjax/kernels/rnn_cpu.cc): they build, the
layers use them, and they equal the plain `lax.scan` differentiated by JAX, as do the XLA
fallbacks."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.kernels import rnn_cpu
from lmjax.models import rnn
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


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_scan_equals_plain_scan_whole_panels(cell, masked):
    """72 hidden units: one whole 64-column panel of W_h (and of W_h^T, which the backward
    kernels pack from W_h) besides a ragged tail. Outputs within float32's 1e-5: at this
    width the kernel's GRU and XLA's float32 scan are each about 1e-6 from a float64 scan,
    so they can differ by twice that."""
    _check_against_plain_scan(cell, True, False, masked, hidden=72, out_atol=1e-5)


def _check_against_plain_scan(cell, kernel, reverse, masked, hidden=40, out_atol=1e-6):
    args, resets, mask, weights = _inputs(cell, hidden=hidden)
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


@pytest.mark.parametrize("shape", [
    (50, 50, 128, 128, 512, 65),  # char-rnn: whole 64-column panels, two threads
    (50, 50, 128, 0, 65, 65),  # the head's 65 columns: one panel, rows split over threads
    (7, 3, 40, 24, 160, 11),  # 2 panels and a 32-column tail
    (4, 3, 6, 0, 70, 9),  # one input; 6 tail columns
    (3, 2, 5, 3, 48, 0),  # no whole panel; no table
], ids=str)
def test_gradient_sums_equal_numpy(shape):
    """Products with up to two inputs, the column sums and the table scatter-add (ids
    past the table clamped, as XLA's gather clamps them) equal float64 NumPy within the
    bound on float32 summation of `rows` terms: rows * 2^-24 * the sum of |terms|."""
    time, batch, m1, m2, n, vocab = shape
    rng = np.random.default_rng(n)
    d, a1, a2 = (rng.normal(size=(time, batch, k)).astype(np.float32) for k in (n, m1, m2))
    inputs = [a1, a2] if m2 else [a1]
    ids = rng.integers(-2, vocab + 2, size=(time, batch)) if vocab else None
    products, sums, table = jax.jit(
        lambda d, *a: rnn_cpu.gradient_sums(d, a, None if ids is None else jnp.asarray(ids),
                                            vocab))(d, *inputs)
    rows = time * batch
    flat = d.reshape(rows, n).astype(np.float64)

    def check(got, want, magnitude):
        np.testing.assert_array_less(np.abs(got - want), (rows + 1) * 2.0 ** -24 * magnitude
                                     + 1e-30)

    for got, a in zip(products, inputs, strict=True):
        a = a.reshape(rows, -1).astype(np.float64)
        check(got, a.T @ flat, np.abs(a).T @ np.abs(flat))
    check(sums, flat.sum(0), np.abs(flat).sum(0))
    if vocab:
        want, magnitude = np.zeros((vocab, n)), np.zeros((vocab, n))
        np.add.at(want, np.clip(ids.reshape(-1), 0, vocab - 1), flat)
        np.add.at(magnitude, np.clip(ids.reshape(-1), 0, vocab - 1), np.abs(flat))
        check(table, want, magnitude)
    else:
        assert table is None


@pytest.mark.parametrize("shape", [
    (50, 50, 128, 512),  # char-rnn's projection: ten 256-row chunks, whole panels
    (50, 50, 512, 128),  # and its input gradient: k over four panel rows of 128
    (7, 3, 200, 90),  # 21 rows, one chunk; k past a panel; a 16-column and a 10-column tail
    (30, 9, 5, 7),  # 270 rows over two chunks; no whole panel
], ids=str)
@pytest.mark.parametrize("transposed", [False, True])
def test_matmul_equals_numpy(shape, transposed):
    """The kernel's product, with B given as it is or as its transpose, equals float64
    NumPy within the bound on float32 summation of k terms."""
    time, batch, k, n = shape
    rng = np.random.default_rng(k + n)
    a = rng.normal(size=(time, batch, k)).astype(np.float32)
    b = rng.normal(size=(k, n)).astype(np.float32)
    got = jax.jit(lambda a, b: rnn_cpu.matmul(a, b, transposed))(a, b.T if transposed else b)
    assert got.shape == (time, batch, n)
    want = a.astype(np.float64) @ b
    bound = (k + 1) * 2.0 ** -24 * (np.abs(a).astype(np.float64) @ np.abs(b))
    np.testing.assert_array_less(np.abs(got - want), bound)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_lm_gradients_equal_xla(cell):
    """The whole LM's loss and gradients with the kernels (kernel_lstm, the projection and
    lookup gradients, the time-major head) equal the XLA path's (JAX's own autodiff of
    the projection, lookup and head); 40 hidden units: ragged panels everywhere."""
    config = rnn.RNNConfig(cell=cell, vocab_size=23, embed_dim=24, hidden_dim=40,
                           num_layers=2)
    model = rnn.RNNLM(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 23, size=(9, 11)), jnp.int32)
    resets = jnp.asarray(rng.random((9, 11)) < 0.1)
    params = model.init(jax.random.key(0), tokens)["params"]
    carry = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                         config.zero_carry(9))

    def loss(p):
        logits, new = model.apply({"params": p}, tokens, carry, resets)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3]) + sum(
            jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(new))

    fn = jax.jit(jax.value_and_grad(loss))
    assert "lmjax_GradientSums" in fn.lower(params).as_text()
    got = fn(params)
    with rnn_cpu.disabled():
        want = jax.jit(jax.value_and_grad(loss))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_bilstm_kernel_gradients_equal_xla():
    """kernel_lstm with padding and time reversed (the BiLSTM classifier's layers)."""
    layer = rnn.BiLayer("lstm", 40)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(7, 10, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(10)[None] < rng.integers(3, 11, size=(7, 1)))
    params = layer.init(jax.random.key(0), xs, mask)["params"]
    weights = jnp.asarray(rng.normal(size=(7, 10, 80)), jnp.float32)

    def loss(p, xs):
        return jnp.sum(layer.apply({"params": p}, xs, mask) * weights)

    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)
    with rnn_cpu.disabled():
        want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_failed_build_names_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LMJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="compiling .*rnn_cpu.cc failed"):
        rnn_cpu.build()
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


@pytest.mark.parametrize("shape", [
    (50, 50, 128, 65),  # char-rnn: 65 symbols (one column past a multiple of 16)
    (7, 9, 40, 23),  # 63 rows: one chunk, not a multiple of 16 features
    (3, 45, 24, 130),  # 135 rows over three chunks; vocab past two 64-column panels
    (2, 3, 16, 16),  # a whole vector of symbols, no padding
], ids=str)
def test_softmax_xent_equals_numpy(shape):
    """The fused head's per-token losses and the gradients of sum(g * losses) equal
    float64 NumPy. Logits of scale ~50 make some probabilities underflow, a target's
    included: its loss stays finite and exact (log-sum-exp, not log of a probability)."""
    time, batch, features, vocab = shape
    rng = np.random.default_rng(vocab)
    x = rng.normal(size=(time, batch, features)).astype(np.float32)
    w = (rng.normal(size=(features, vocab)) * 50 / np.sqrt(features)).astype(np.float32)
    b = rng.normal(size=vocab).astype(np.float32)
    targets = rng.integers(0, vocab, size=(time, batch))
    g = rng.random((time, batch)).astype(np.float32)
    z = x.astype(np.float64) @ w + b
    targets[0, 0] = z[0, 0].argmin()  # whose probability underflows float32
    losses, probs = jax.jit(rnn_cpu.softmax_xent)(x, w, b, targets)
    dx, dw, db = jax.jit(rnn_cpu.softmax_xent_grads)(x, w, probs, targets, g)

    top = z.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(z - top).sum(-1))
    want_losses = lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]
    p = np.exp(z - lse[..., None])
    d = g[..., None] * (p - np.eye(vocab)[targets])
    assert np.isfinite(losses).all() and want_losses[0, 0] > 104  # e^-104 < float32's least
    # Bounds: each float32 logit is off by at most (features + 2) 2^-24 (|x| |w| + |b|);
    # a loss by twice its row's worst logit, a probability p by p times that (exp turns
    # an error in z into a relative one) plus a few ulps; each gradient by the sum of
    # |x| or |w| times the error in d = g (p - onehot), plus its float32 sum of `terms`.
    z_err = (features + 2) * 2.0 ** -24 * (np.abs(x) @ np.abs(w) + np.abs(b))
    row_err = 2 * z_err.max(-1)
    np.testing.assert_array_less(np.abs(losses - want_losses),
                                 row_err + 1e-6 * np.abs(want_losses))
    p_err = p * (row_err[..., None] + 1e-6)
    np.testing.assert_array_less(np.abs(probs - p), p_err + 1e-30)
    rows = time * batch
    flat_x, flat_d = x.reshape(rows, -1).astype(np.float64), d.reshape(rows, -1)
    d_err = (g[..., None] * p_err).reshape(rows, -1)

    def check(got, want, magnitude, from_d, terms):
        np.testing.assert_array_less(np.abs(got - want),
                                     from_d + (terms + 8) * 2.0 ** -24 * magnitude + 1e-30)

    abs_x = np.abs(flat_x)
    check(dw, flat_x.T @ flat_d, abs_x.T @ np.abs(flat_d), abs_x.T @ d_err, rows)
    check(db, flat_d.sum(0), np.abs(flat_d).sum(0), d_err.sum(0), rows)
    check(dx, d @ w.T, np.abs(d) @ np.abs(w.T), (d_err @ np.abs(w.T)).reshape(dx.shape), vocab)


def test_softmax_xent_propagates_nan():
    """A NaN in the head's input makes the loss NaN (the trainer stops on it)."""
    x = np.ones((2, 3, 16), np.float32)
    x[1, 2, 5] = np.nan
    losses, _ = jax.jit(rnn_cpu.softmax_xent)(x, np.ones((16, 20), np.float32),
                                              np.zeros(20, np.float32), np.zeros((2, 3), int))
    assert np.isnan(losses[1, 2]) and np.isfinite(np.delete(np.asarray(losses).ravel(), 5)).all()


def test_lm_losses_equal_xla_and_sharded():
    """The LM's per-token losses from the fused head (given targets) and their gradients
    equal the XLA path's logits and optax cross-entropy, on one device and on a data=4 x
    tensor=2 mesh (each device runs the head's kernels on its own rows)."""
    config = rnn.RNNConfig(cell="lstm", vocab_size=23, embed_dim=24, hidden_dim=40,
                           num_layers=2)
    model = rnn.RNNLM(config)
    rng = np.random.default_rng(0)
    tokens, targets = (jnp.asarray(rng.integers(0, 23, size=(8, 11)), jnp.int32)
                       for _ in range(2))
    params = model.init(jax.random.key(0), tokens)["params"]
    weights = jnp.asarray(rng.random((8, 11)), jnp.float32)

    def loss(p):
        losses, _ = model.apply({"params": p}, tokens, targets=targets)
        return jnp.sum(losses * weights)

    fn = jax.value_and_grad(loss)
    assert "lmjax_SoftmaxXentBackward" in jax.jit(fn).lower(params).as_text()
    got = jax.jit(fn)(params)
    with rnn_cpu.disabled():
        want = jax.jit(fn)(params)
    with jax.set_mesh(make_mesh(4, 1, 2)):
        sharded = jax.jit(fn)(params)
    for a, b, c in zip(*map(jax.tree.leaves, (got, want, sharded)), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(c, a, atol=1e-5, rtol=1e-5)
