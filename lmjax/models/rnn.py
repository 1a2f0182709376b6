"""Recurrent models: Elman RNN, LSTM and GRU cells, stacks, an LM and a BiLSTM-max classifier.

Speed on small CPUs comes from the layout, not from the cells' arithmetic:

* the input projections of all timesteps are one matrix product outside the time loop
  (`(batch, time, in) @ (in, gates, hidden)`, on the CPU in float32 the kernel's
  `rnn_cpu.matmul`), so the loop only does the recurrent product `h @ W_h`;
* the gates are fused: one `(hidden, gates, hidden)` kernel gives every gate at once;
* the loop is `jax.lax.scan` (`unroll` is configurable; on the 2-core CPU 1 was fastest);
* the LSTM has its own forward and backward passes (`lstm_scan`): XLA's CPU backend runs
  a loop body as a sequence of small kernels, and its time goes more to the number and
  shape of those kernels than to arithmetic. The forward pass applies sigmoid and tanh to
  the whole `(batch, 4 hidden)` gate array (a sigmoid on one gate's slice compiles to a
  slow loop), resets the carry by multiplying with a precomputed keep mask, skips the
  padding select when there is no mask, and saves the activations, so the backward pass
  evaluates no transcendental and does one matrix product per step;
* on the CPU, for float32, `lstm_scan` runs that same recurrence, forward and backward, in
  a compiled kernel called through XLA's FFI (lmjax/kernels/rnn_cpu.py), one call for the
  whole time loop; the `lax.scan` passes above are its fallback and reference. The GRU
  has the same kind of kernel (`gru_scan`), with the generic scan below as fallback;
* LSTM and Elman layers fed by a projection add b_i to the recurrence's bias rather than
  to every timestep's projection (the two only ever appear summed);
* on the CPU, the weight, bias and embedding-table gradients are sums over all timesteps
  of the gates' gradient, taken by a kernel in one pass over it (`rnn_cpu.gradient_sums`:
  an LSTM layer's input and recurrent weights, its bias and its lookup table together,
  in `kernel_lstm`); the LM's output layer runs time-major, so that no transpose sits
  between it and the recurrence.

Gate order and equations follow PyTorch's `nn.LSTM`/`nn.GRU` (see each cell's docstring),
so the NumPy reference in tests/test_rnn.py is a transcription of those documented
equations. Carries are pytrees whose leaves have the batch as leading axis, so the
trainer can shard and checkpoint them (lmjax/train/state.py).
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from lmjax.kernels import rnn_cpu
from lmjax.models import layers
from lmjax.models.classifiers import mlp_head
from lmjax.models.registry import MODELS

Array = jax.Array

# Logical names: kernels are (in, gate, hidden); the hidden axis is split over `tensor`
# (rule "mlp"), inputs over `fsdp` (rule "embed").
KERNEL_AXES = ("embed", None, "mlp")
BIAS_AXES = (None, "mlp")


def _recur(h: Array, w_h: Array, b_h: Array) -> Array:
    """h (batch, hidden) @ w_h (hidden, gates, hidden) + b_h -> (batch, gates, hidden), as
    one plain 2-D matrix product (the form XLA's CPU backend runs fastest)."""
    hidden, gates, out = w_h.shape
    return (h @ w_h.reshape(hidden, gates * out)).reshape(h.shape[0], gates, out) + b_h


# Each cell's nonlinear part: (carry, x-gates, h-gates) -> (new carry, output h), where
# x-gates = x W_i + b_i and h-gates = h W_h + b_h (both (batch, gates, hidden)).


def _lstm_cell(carry, gx, gh):
    """PyTorch nn.LSTM: i, f, g, o = x W_i + b_i + h W_h + b_h;
    c' = sigmoid(f) c + sigmoid(i) tanh(g); h' = sigmoid(o) tanh(c')."""
    _, c = carry
    z = gx + gh
    i, f, g, o = z[:, 0], z[:, 1], z[:, 2], z[:, 3]
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


def _gru_cell(h, gx, gh):
    """PyTorch nn.GRU: r = sigmoid(x W_ir + b_ir + h W_hr + b_hr), z likewise,
    n = tanh(x W_in + b_in + r (h W_hn + b_hn)), h' = (1 - z) n + z h."""
    r = jax.nn.sigmoid(gx[:, 0] + gh[:, 0])
    z = jax.nn.sigmoid(gx[:, 1] + gh[:, 1])
    n = jnp.tanh(gx[:, 2] + r * gh[:, 2])
    h = (1.0 - z) * n + z * h
    return h, h


def _elman_cell(h, gx, gh):
    """Elman RNN: h' = tanh(x W_i + b_i + h W_h + b_h)."""
    h = jnp.tanh(gx[:, 0] + gh[:, 0])
    return h, h


@dataclasses.dataclass(frozen=True)
class CellSpec:
    gates: int
    cell: Callable
    has_cell_state: bool

    def hidden(self, carry) -> Array:
        return carry[0] if self.has_cell_state else carry


CELLS = {
    "lstm": CellSpec(4, _lstm_cell, True),
    "gru": CellSpec(3, _gru_cell, False),
    "rnn": CellSpec(1, _elman_cell, False),
}


def zero_carry(cell: str, batch: int, hidden: int, dtype=jnp.float32):
    """The initial state of one layer: (h, c) for an LSTM, h otherwise; each (batch, hidden)."""
    h = jnp.zeros((batch, hidden), dtype)
    return (h, jnp.zeros_like(h)) if CELLS[cell].has_cell_state else h


def _project(xs: Array, w_i: Array) -> Array:
    """xs (batch, time, in) @ w_i (in, gates, hidden) -> (time, batch, gates, hidden):
    one 2-D product for all timesteps, time-major for the scan."""
    features, gates, hidden = w_i.shape
    xs = jnp.swapaxes(xs, 0, 1)
    w = w_i.reshape(features, gates * hidden)
    return _matmul(xs, w).reshape(*xs.shape[:2], gates, hidden)


def _matmul(xs, w):
    """xs (time, batch, in) @ w (in, out) as one 2-D product; on the CPU in float32 with
    `_product`'s weight gradient."""
    return _product(xs, w) if rnn_cpu.usable(xs, w) else _flat_matmul(xs, w)


def _flat_matmul(xs, w):
    return (xs.reshape(-1, xs.shape[-1]) @ w).reshape(*xs.shape[:-1], w.shape[-1])


@jax.custom_vjp
def _product(xs, w):
    """`_flat_matmul` in the CPU kernels (rnn_cpu.matmul), whose weight gradient comes
    from rnn_cpu.gradient_sums (XLA's CPU backend runs the x^T dy of its own gradient at
    two thirds of a plain product's speed)."""
    return rnn_cpu.matmul(xs, w)


def _product_fwd(xs, w):
    return rnn_cpu.matmul(xs, w), (xs, w)


def _product_bwd(residuals, d_out):
    xs, w = residuals
    return rnn_cpu.matmul(d_out, w, transposed=True), rnn_cpu.gradient_sums(d_out, [xs])[0][0]


_product.defvjp(_product_fwd, _product_bwd)


def _lookup(table, ids):
    """table (vocab, ...)[ids]; on the CPU in float32 the gradient is the kernel's
    rnn_cpu.gradient_sums (XLA's scatter-add first copies the gradient to a new layout)."""
    return _table_lookup(table, ids) if rnn_cpu.usable(table) else table[ids]


@jax.custom_vjp
def _table_lookup(table, ids):
    return table[ids]


def _table_lookup_fwd(table, ids):
    return table[ids], (table, ids)


def _table_lookup_bwd(residuals, d_out):
    table, ids = residuals
    d = d_out.reshape(*ids.shape, -1)
    return rnn_cpu.gradient_sums(d, ids=ids, vocab=table.shape[0])[2].reshape(table.shape), None


_table_lookup.defvjp(_table_lookup_fwd, _table_lookup_bwd)


def _select(flag: Array, new, old):
    """Per-row choice between two carries; flag: (batch,) bool."""
    return jax.tree.map(lambda a, b: jnp.where(flag[:, None], a, b), new, old)


def _masked_cell(spec: CellSpec, carry, gx, gh, mask):
    """The cell, keeping the carry where `mask` is False (padding)."""
    new, out = spec.cell(carry, gx, gh)
    return _select(mask, new, carry), out


def reference_scan(cell: str, reverse: bool, unroll: int, w_h, b_h, gates_x, carry, resets,
                   mask):
    """The recurrence as a plain `lax.scan`, differentiated by JAX (the tests' reference).

    gates_x: (time, batch, gates, hidden); resets, mask: (time, batch) bool.
    Returns (outputs (time, batch, hidden), final carry).
    """
    spec = CELLS[cell]

    def body(c, step):
        gx, reset, keep = step
        c = _select(reset, jax.tree.map(jnp.zeros_like, c), c)
        new, out = _masked_cell(spec, c, gx, _recur(spec.hidden(c), w_h, b_h), keep)
        return new, out

    carry, outs = jax.lax.scan(body, carry, (gates_x, resets, mask), reverse=reverse,
                               unroll=unroll)
    return outs, carry


def recurrent_scan(cell: str, reverse: bool, unroll: int, w_h, b_h, gates_x, carry, resets,
                   mask):
    """`reference_scan` with a hand-written backward pass that does one matrix product per
    step (dh_prev = dgh W_h^T) and the weight gradient as one product after the loop
    (dW_h = sum_t h_t^T dgh_t), where JAX's scan transpose would do two products and
    accumulate dW_h step by step. `mask` may be None (no padding); the LSTM has its own
    explicit pass (`lstm_scan`), and the GRU runs in the CPU kernel where it applies."""
    if cell == "lstm":
        return lstm_scan(reverse, unroll, w_h, b_h, gates_x, carry, resets, mask)
    if cell == "gru" and rnn_cpu.usable(w_h, b_h, gates_x, carry):
        return gru_scan(reverse, w_h, b_h, gates_x, carry, resets, mask)
    if mask is None:
        mask = jnp.ones(resets.shape, bool)
    return _cell_scan(cell, reverse, unroll, w_h, b_h, gates_x, carry, resets, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _cell_scan(cell, reverse, unroll, w_h, b_h, gates_x, carry, resets, mask):
    return reference_scan(cell, reverse, unroll, w_h, b_h, gates_x, carry, resets, mask)


def _scan_fwd(cell, reverse, unroll, w_h, b_h, gates_x, carry, resets, mask):
    spec = CELLS[cell]

    def body(c, step):
        gx, reset, keep = step
        c = _select(reset, jax.tree.map(jnp.zeros_like, c), c)
        gh = _recur(spec.hidden(c), w_h, b_h)
        new, out = _masked_cell(spec, c, gx, gh, keep)
        return new, (out, c, gh)  # residuals: the carry each step started from, h-gates

    final, (outs, starts, ghs) = jax.lax.scan(body, carry, (gates_x, resets, mask),
                                              reverse=reverse, unroll=unroll)
    return (outs, final), (w_h, starts, ghs, gates_x, resets, mask)


def _scan_bwd(cell, reverse, unroll, residuals, cotangents):
    spec = CELLS[cell]
    w_h, starts, ghs, gates_x, resets, mask = residuals
    d_outs, d_final = cotangents
    hidden, gates, out = w_h.shape
    w_t = w_h.reshape(hidden, gates * out).T  # (gates * hidden, hidden)

    def body(d_carry, step):
        c, gx, gh, reset, keep, d_out = step
        _, vjp = jax.vjp(lambda c_, gx_, gh_: _masked_cell(spec, c_, gx_, gh_, keep), c, gx, gh)
        d_c, d_gx, d_gh = vjp((d_carry, d_out))
        d_h = (d_gh.reshape(d_gh.shape[0], gates * out) @ w_t)  # through h @ W_h
        d_c = (d_c[0] + d_h, d_c[1]) if spec.has_cell_state else d_c + d_h
        d_c = _select(reset, jax.tree.map(jnp.zeros_like, d_c), d_c)  # reset cut the path
        return d_c, (d_gx, d_gh)

    d_carry, (d_gates_x, d_ghs) = jax.lax.scan(
        body, d_final, (starts, gates_x, ghs, resets, mask, d_outs), reverse=not reverse,
        unroll=unroll)
    h_starts = spec.hidden(starts)  # (time, batch, hidden): the h each step multiplied
    d_w_h = jnp.einsum("tbh,tbgk->hgk", h_starts, d_ghs)
    d_b_h = d_ghs.sum((0, 1))
    return d_w_h, d_b_h, d_gates_x, d_carry, None, None


_cell_scan.defvjp(_scan_fwd, _scan_bwd)


def _flat(w_h, b_h, gates_x, resets, mask):
    """The kernels' operands: w (hidden, gates hidden), b (gates hidden,), gx (time, batch,
    gates hidden; or a table (vocab, gates hidden)), keep (time, batch) float, 0 where the
    carry resets, and mask as float."""
    hidden, gates, _ = w_h.shape
    keep = (~resets).astype(gates_x.dtype)
    mask = None if mask is None else mask.astype(gates_x.dtype)
    return (w_h.reshape(hidden, gates * hidden), b_h.reshape(gates * hidden),
            gates_x.reshape(*gates_x.shape[:-2], gates * hidden), keep, mask)


def _weight_grads(h0s, d_gh):
    """d W_h = sum_t h0_t^T d gh_t as one product, and d b_h; d_gh (time, batch, gates
    hidden) -> ((hidden, gates, hidden), (gates, hidden)). On the CPU in float32 both come
    from one kernel pass (rnn_cpu.gradient_sums)."""
    time, batch, hidden = h0s.shape
    if rnn_cpu.usable(h0s, d_gh):
        (d_w_h,), d_b_h, _ = rnn_cpu.gradient_sums(d_gh, [h0s])
    else:
        flat = d_gh.reshape(time * batch, -1)
        d_w_h, d_b_h = h0s.reshape(time * batch, hidden).T @ flat, flat.sum(0)
    return d_w_h.reshape(hidden, -1, hidden), d_b_h.reshape(-1, hidden)


def _lstm_fwd(reverse, unroll, w_h, b_h, gates_x, carry, resets, mask, save=True, ids=None):
    """The LSTM recurrence; residuals: per step the activated gates (i, f, g, o), the
    carry the step started from, and tanh of the new cell state. Float32 on the CPU runs
    the compiled kernel (rnn_cpu.py), anything else the XLA scan below. With ids (time,
    batch), gates_x is a (vocab, gates, hidden) table the steps' projections are in."""
    w, b, gx, keep, mask = _flat(w_h, b_h, gates_x, resets, mask)
    if rnn_cpu.usable(gx, w, b, *carry):
        outs, final, residuals = rnn_cpu.forward(reverse, save, gx, w, b, *carry, keep, mask,
                                                 ids)
    else:
        gx = gx if ids is None else gx[ids]
        outs, final, residuals = _lstm_xla_fwd(reverse, unroll, gx, w, b, carry, keep, mask)
    return (outs, final), (w, *residuals, keep, mask)


def _lstm_xla_fwd(reverse, unroll, gx, w, b, carry, keep, mask):
    hidden = w.shape[0]
    is_g = (jnp.arange(4 * hidden) // hidden) == 2  # the cell-input gate: tanh

    def body(carry, step):
        h, c = carry
        gx_t, k, m = step
        h, c = h * k, c * k
        z = gx_t + (h @ w + b)
        # Both activations over all gates at once (slices of z make XLA's CPU loops slow).
        a = jnp.where(is_g, jnp.tanh(z), jax.nn.sigmoid(z))
        i, f, g, o = (a[:, j * hidden:(j + 1) * hidden] for j in range(4))
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        out = o * tc
        new = (out, c_new) if m is None else (jnp.where(m, out, h), jnp.where(m, c_new, c))
        return new, (out, a, h, c, tc)

    steps = (gx, keep[..., None], None if mask is None else mask[..., None] > 0)
    final, (outs, acts, h0s, c0s, tcs) = jax.lax.scan(body, carry, steps, reverse=reverse,
                                                      unroll=unroll)
    return outs, final, (acts, h0s, c0s, tcs)


def _lstm_bwd(reverse, unroll, residuals, cotangents):
    h0s = residuals[2]
    time, batch, hidden = h0s.shape
    dzs, d_carry = _lstm_dzs(reverse, unroll, residuals, cotangents)
    d_w_h, d_b_h = _weight_grads(h0s, dzs)
    return d_w_h, d_b_h, dzs.reshape(time, batch, 4, hidden), d_carry, None, None


def _lstm_dzs(reverse, unroll, residuals, cotangents):
    """The gradients of the pre-activation gates (time, batch, 4 hidden) and of the
    initial carry."""
    w, acts, h0s, c0s, tcs, keep, mask = residuals
    d_outs, (d_h, d_c) = cotangents
    if rnn_cpu.usable(w, acts, d_outs, d_h, d_c):
        return rnn_cpu.backward(reverse, acts, c0s, tcs, keep, mask, d_outs, w, d_h, d_c)
    return _lstm_xla_bwd(reverse, unroll, w, acts, c0s, tcs, keep, mask, d_outs, (d_h, d_c))


def _lstm_xla_bwd(reverse, unroll, w, acts, c0s, tcs, keep, mask, d_outs, d_carry):
    hidden = w.shape[0]
    dtype = acts.dtype
    p = jnp.concatenate([jnp.zeros((2 * hidden,), dtype), jnp.ones((hidden,), dtype),
                         jnp.zeros((hidden,), dtype)])
    q = 1 - p

    def body(d, step):
        d_h, d_c = d
        a, c0, tc, k, m, d_out = step
        i, f, g, o = (a[:, j * hidden:(j + 1) * hidden] for j in range(4))
        if m is None:  # no padding: the new carry is the cell's
            dh_new, dc_new, d_h, d_c = d_h + d_out, d_c, 0, 0
        else:  # padding keeps the old carry: its gradient passes through
            dh_new, dc_new = jnp.where(m, d_h, 0) + d_out, jnp.where(m, d_c, 0)
            d_h, d_c = jnp.where(m, 0, d_h), jnp.where(m, 0, d_c)
        dcc = dc_new + dh_new * o * (1 - tc * tc)
        d_a = jnp.concatenate([dcc * g, dcc * c0, dcc * i, dh_new * tc], axis=1)  # d(i,f,g,o)
        dz = d_a * (p + a * (q - a))  # through sigmoid (a - a^2) or tanh (1 - a^2)
        d_h0 = (dz @ w.T + d_h) * k
        d_c0 = (dcc * f + d_c) * k
        return (d_h0, d_c0), dz

    steps = (acts, c0s, tcs, keep[..., None], None if mask is None else mask[..., None] > 0,
             d_outs)
    d_carry, dzs = jax.lax.scan(body, d_carry, steps, reverse=not reverse, unroll=unroll)
    return dzs, d_carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def lstm_scan(reverse, unroll, w_h, b_h, gates_x, carry, resets, mask):
    """`reference_scan` for the LSTM with explicit forward and backward passes (see the
    module docstring); `mask` None means no padding."""
    return _lstm_fwd(reverse, unroll, w_h, b_h, gates_x, carry, resets, mask, save=False)[0]


lstm_scan.defvjp(_lstm_fwd, _lstm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def kernel_lstm(reverse, w_h, b_h, x, w_i, carry, resets, mask):
    """A whole LSTM layer in the CPU kernels (float32 on the CPU: check rnn_cpu.usable):
    its input projection (x (time, batch, in) with w_i (in, 4, hidden)) or lookup (x
    (time, batch) int32 ids into w_i, a (vocab, 4, hidden) table of projections), then
    `lstm_scan`'s recurrence. The backward pass takes every weight and bias gradient,
    the projection's or the table's included, from one pass over the gates' gradient
    (rnn_cpu.gradient_sums) instead of one XLA op each."""
    return _kernel_lstm_fwd(reverse, w_h, b_h, x, w_i, carry, resets, mask, save=False)[0]


def _kernel_lstm_fwd(reverse, w_h, b_h, x, w_i, carry, resets, mask, save=True):
    if jnp.issubdtype(x.dtype, jnp.integer):  # looked up in the kernel
        outs, residuals = _lstm_fwd(reverse, 1, w_h, b_h, w_i, carry, resets, mask, save, x)
    else:
        gates_x = rnn_cpu.matmul(x, w_i.reshape(w_i.shape[0], -1)).reshape(*x.shape[:2], 4, -1)
        outs, residuals = _lstm_fwd(reverse, 1, w_h, b_h, gates_x, carry, resets, mask, save)
    return outs, (residuals, x, w_i)


def _kernel_lstm_bwd(reverse, residuals, cotangents):
    residuals, x, w_i = residuals
    h0s = residuals[2]
    hidden = h0s.shape[-1]
    dzs, d_carry = _lstm_dzs(reverse, 1, residuals, cotangents)
    if jnp.issubdtype(x.dtype, jnp.integer):
        (d_w_h,), d_b, d_w_i = rnn_cpu.gradient_sums(dzs, [h0s], ids=x, vocab=w_i.shape[0])
        d_x = None
    else:
        (d_w_i, d_w_h), d_b, _ = rnn_cpu.gradient_sums(dzs, [x, h0s])
        d_x = rnn_cpu.matmul(dzs, w_i.reshape(w_i.shape[0], -1), transposed=True)
    return (d_w_h.reshape(hidden, 4, hidden), d_b.reshape(4, hidden), d_x,
            d_w_i.reshape(w_i.shape), d_carry, None, None)


kernel_lstm.defvjp(_kernel_lstm_fwd, _kernel_lstm_bwd)


def _gru_fwd(reverse, w_h, b_h, gates_x, carry, resets, mask, save=True):
    """The GRU recurrence in the CPU kernel; residuals: per step r, z, n, the h-gate of n
    and the h the step started from."""
    w, b, gx, keep, mask = _flat(w_h, b_h, gates_x, resets, mask)
    outs, h, residuals = rnn_cpu.gru_forward(reverse, save, gx, w, b, carry, keep, mask)
    return (outs, h), (w, *residuals, keep, mask)


def _gru_bwd(reverse, residuals, cotangents):
    w, acts, h0s, keep, mask = residuals
    d_outs, d_h = cotangents
    time, batch, hidden = h0s.shape
    d_gx, d_gh, d_h = rnn_cpu.gru_backward(reverse, acts, h0s, keep, mask, d_outs, w, d_h)
    d_w_h, d_b_h = _weight_grads(h0s, d_gh)
    return d_w_h, d_b_h, d_gx.reshape(time, batch, 3, hidden), d_h, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gru_scan(reverse, w_h, b_h, gates_x, carry, resets, mask):
    """`reference_scan` for the GRU, forward and backward in the CPU kernel (float32 on
    the CPU only: `recurrent_scan` checks `rnn_cpu.usable` first)."""
    return _gru_fwd(reverse, w_h, b_h, gates_x, carry, resets, mask, save=False)[0]


gru_scan.defvjp(_gru_fwd, _gru_bwd)


class RecurrentLayer(nn.Module):
    """One recurrent layer over a whole sequence.

    xs (batch, time, in) -> (outputs (batch, time, hidden), final carry). `resets`
    (batch, time) bool zeroes the carry *before* that step (a document starts there);
    `mask` (batch, time) bool keeps the carry unchanged at padding steps. With
    `reverse`, time runs backwards (the backward half of a bidirectional layer).
    """

    cell: str
    hidden: int
    unroll: int = 1
    reverse: bool = False
    forget_bias: float = 0.0  # added to the LSTM forget gate's initial bias

    @nn.compact
    def __call__(self, xs: Array, carry=None, resets: Array | None = None,
                 mask: Array | None = None, embedding: Array | None = None):
        """With `embedding` (vocab, in), xs are token ids (batch, time) and the inputs are
        their embeddings: the input projection becomes a lookup in embedding @ w_i + b_i,
        one (vocab, in) product instead of one (batch x time, in) product."""
        spec = CELLS[self.cell]
        batch, time = xs.shape[:2]
        inputs = xs if embedding is None else embedding
        features = inputs.shape[-1]
        std = 1.0 / self.hidden ** 0.5  # PyTorch's uniform(-1/sqrt(H), 1/sqrt(H)) scale
        uniform = nn.initializers.uniform(2 * std)
        w_i = self.param("w_i", nn.with_logical_partitioning(_shifted(uniform, std), KERNEL_AXES),
                         (features, spec.gates, self.hidden))
        w_h = self.param("w_h", nn.with_logical_partitioning(_shifted(uniform, std), KERNEL_AXES),
                         (self.hidden, spec.gates, self.hidden))
        b_i = self.param("b_i", nn.with_logical_partitioning(self._bias_init(), BIAS_AXES),
                         (spec.gates, self.hidden))
        b_h = self.param("b_h", layers.zeros(BIAS_AXES), (spec.gates, self.hidden))
        if carry is None:
            carry = zero_carry(self.cell, batch, self.hidden, inputs.dtype)
        resets = jnp.zeros((time, batch), bool) if resets is None else resets.T
        mask = None if mask is None else mask.T
        # All timesteps' input projections in one product: (time, batch, gates, hidden).
        table = None if embedding is None else _project(embedding[None], w_i)[:, 0] + b_i
        if self.cell == "lstm" and rnn_cpu.usable(inputs, w_i, w_h, *carry):
            if table is not None:  # the projections of the vocabulary, looked up in it
                x, w, bias = xs.T.astype(jnp.int32), table, b_h
            else:
                x, w, bias = jnp.swapaxes(xs, 0, 1), w_i, b_h + b_i
            outs, carry = kernel_lstm(self.reverse, w_h, bias, x, w, carry, resets, mask)
            return jnp.swapaxes(outs, 0, 1), carry
        bias = b_h
        if table is not None:  # (vocab, gates, hidden)
            gates_x = _lookup(table, xs.T.astype(jnp.int32))
        elif self.cell == "gru":  # GRU's b_h sits inside r * (h W_h + b_h): kept apart
            gates_x = _project(xs, w_i) + b_i
        else:  # b_i and b_h only ever appear summed: one pass less over gates_x each way
            gates_x, bias = _project(xs, w_i), b_h + b_i
        outs, carry = recurrent_scan(self.cell, self.reverse, self.unroll, w_h, bias, gates_x,
                                     carry, resets, mask)
        return jnp.swapaxes(outs, 0, 1), carry  # (batch, time, hidden)

    def _bias_init(self):
        forget_bias = self.forget_bias if self.cell == "lstm" else 0.0

        def init(key, shape, dtype=jnp.float32):
            del key
            return jnp.zeros(shape, dtype).at[1].set(forget_bias) if forget_bias else \
                jnp.zeros(shape, dtype)

        return init


def _shifted(uniform, std):
    """uniform(0, 2 std) - std: flax's uniform starts at 0."""

    def init(key, shape, dtype=jnp.float32):
        return uniform(key, shape, dtype) - std

    return init


@MODELS.register("RNNConfig")
@dataclasses.dataclass(frozen=True)
class RNNConfig:
    """A character/word LM: embedding -> stacked recurrent layers -> vocabulary logits.

    Dropout is Zaremba et al.'s: on the non-recurrent connections only (after the
    embedding, between layers and before the output layer), never on the carry.
    """

    cell: str = "lstm"  # "lstm", "gru" or "rnn" (Elman)
    vocab_size: int = 65
    embed_dim: int = 128
    hidden_dim: int = 128
    num_layers: int = 2
    dropout: float = 0.0
    block_size: int = 50  # truncated-BPTT length: tokens per row per batch
    unroll: int = 1  # scan unroll (speed only; on the 2-core CPU 1 was fastest)
    forget_bias: float = 1.0

    def module(self) -> nn.Module:
        return RNNLM(self)

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; use one of {sorted(CELLS)}")

    def zero_carry(self, batch: int) -> dict:
        """{'layer0': carry, ...}: the whole stack's initial state for `batch` rows."""
        return {f"layer{i}": zero_carry(self.cell, batch, self.hidden_dim)
                for i in range(self.num_layers)}


class RNNLM(nn.Module):
    """tokens (batch, time), carry, resets (batch, time) -> (logits (batch, time, vocab),
    carry); given targets (batch, time), (per-token cross-entropy (batch, time), carry)."""

    config: RNNConfig

    @nn.compact
    def __call__(self, tokens: Array, carry: dict | None = None, resets: Array | None = None,
                 deterministic: bool = True, targets: Array | None = None):
        c = self.config
        carry = carry if carry is not None else c.zero_carry(tokens.shape[0])
        embed = nn.Embed(c.vocab_size, c.embed_dim,
                         embedding_init=layers.init(0.1, ("vocab", "embed")), name="embed")
        # Without dropout on the embedded tokens, layer 0 looks its input projections up
        # in embedding @ w_i (same values, about a quarter fewer FLOPs per training step at
        # char-rnn's size).
        fold = deterministic or c.dropout == 0
        x = tokens if fold else nn.Dropout(c.dropout)(embed(tokens), deterministic=False)
        new_carry = {}
        for i in range(c.num_layers):
            name = f"layer{i}"
            x, new_carry[name] = RecurrentLayer(c.cell, c.hidden_dim, c.unroll,
                                                forget_bias=c.forget_bias, name=name)(
                x, carry[name], resets, embedding=embed.embedding if fold and i == 0 else None)
            x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
            x = layers.constrain(x, ("batch", "length", "act_mlp"))
        out = Head(c.vocab_size, name="head")(jnp.swapaxes(x, 0, 1), targets)
        return out.astype(jnp.float32), new_carry


class Head(nn.Module):
    """The output layer, fed time-major: x (time, batch, in) -> logits (batch, time,
    vocab), with layers.Dense's parameters (kernel (in, vocab), bias). Time-major, its
    input and its input's gradient need no transpose between it and the recurrence; its
    weight gradient is `_product`'s. Given targets (batch, time), it returns the
    per-token cross-entropy (batch, time) instead: on the CPU in float32 from the fused
    kernel of rnn_cpu.softmax_xent (the logits never leave it), else from the logits."""

    vocab: int

    @nn.compact
    def __call__(self, x: Array, targets: Array | None = None) -> Array:
        kernel = self.param("kernel", layers.init(0.05, ("embed", "vocab")),
                            (x.shape[-1], self.vocab)).astype(x.dtype)
        bias = self.param("bias", layers.zeros(("vocab",)), (self.vocab,)).astype(x.dtype)
        if targets is not None and rnn_cpu.usable(x, kernel, bias):
            return jnp.swapaxes(_softmax_xent(x, kernel, bias, jnp.swapaxes(targets, 0, 1)), 0, 1)
        logits = jnp.swapaxes(_matmul(x, kernel) + bias, 0, 1)
        if targets is None:
            return logits
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                               targets)


@jax.custom_vjp
def _softmax_xent(x, kernel, bias, targets):
    """Per-token cross-entropy (time, batch) of logits x kernel + bias, by the CPU kernel."""
    return rnn_cpu.softmax_xent(x, kernel, bias, targets)[0]


def _softmax_xent_fwd(x, kernel, bias, targets):
    losses, probs = rnn_cpu.softmax_xent(x, kernel, bias, targets)
    return losses, (x, kernel, probs, targets)


def _softmax_xent_bwd(residuals, g):
    x, kernel, probs, targets = residuals
    return (*rnn_cpu.softmax_xent_grads(x, kernel, probs, targets, g), None)


_softmax_xent.defvjp(_softmax_xent_fwd, _softmax_xent_bwd)


class BiLayer(nn.Module):
    """A bidirectional layer: forward and backward halves concatenated on features.

    xs (batch, time, in), mask (batch, time) -> (batch, time, 2 hidden). With padding at
    the end, the backward half reads each row's real tokens from last to first.
    """

    cell: str
    hidden: int
    unroll: int = 1
    forget_bias: float = 1.0

    @nn.compact
    def __call__(self, xs: Array, mask: Array | None = None) -> Array:
        args = dict(cell=self.cell, hidden=self.hidden, unroll=self.unroll,
                    forget_bias=self.forget_bias)
        fwd, _ = RecurrentLayer(**args, name="forward")(xs, mask=mask)
        bwd, _ = RecurrentLayer(**args, reverse=True, name="backward")(xs, mask=mask)
        return jnp.concatenate([fwd, bwd], axis=-1)


@MODELS.register("BiLSTMConfig")
@dataclasses.dataclass(frozen=True)
class BiLSTMConfig:
    """BiLSTM with max pooling over time and an MLP head (the GLUE baseline's encoder)."""

    vocab_size: int = 8000
    num_classes: int = 2
    cell: str = "lstm"
    embed_dim: int = 300
    hidden_dim: int = 256
    num_layers: int = 1
    mlp_dim: int = 512
    dropout: float = 0.3
    unroll: int = 1
    forget_bias: float = 1.0

    def module(self) -> nn.Module:
        return BiLSTMClassifier(self)


class BiLSTMClassifier(nn.Module):
    """tokens (batch, time), mask (batch, time) -> logits (batch, classes)."""

    config: BiLSTMConfig

    @nn.compact
    def __call__(self, tokens: Array, mask: Array, deterministic: bool = True) -> Array:
        c = self.config
        x = nn.Embed(c.vocab_size, c.embed_dim,
                     embedding_init=layers.init(0.1, ("vocab", "embed")), name="embed")(tokens)
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        for i in range(c.num_layers):
            x = BiLayer(c.cell, c.hidden_dim, c.unroll, c.forget_bias, name=f"bilayer{i}")(
                x, mask)
            if i + 1 < c.num_layers:
                x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        x = jnp.where(mask[..., None], x, -jnp.inf).max(axis=1)  # (batch, 2 hidden)
        return mlp_head(x, c.mlp_dim, c.num_classes, c.dropout, deterministic)
