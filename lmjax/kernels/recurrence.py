"""A recurrent layer's time loop in the CPU kernels (rnn_cpu.py), with its gradients.

`recurrence` takes what the plain `lax.scan` of lmjax/models/rnn.py takes (the input
gates of all timesteps, the recurrent weights, the carry, resets and padding) and gives
what it gives; JAX differentiates it through `custom_vjp`s whose backward passes are the
kernels' own. `use_cpu` decides, from a model's `kernel` setting, whether it applies.
"""

import functools

import jax
import jax.numpy as jnp

from lmjax.kernels import rnn_cpu

Array = jax.Array

# A model config's `kernel` field: "auto" runs the CPU kernels where they can run and
# XLA's scan elsewhere; "xla" always XLA's scan; "cpu" requires the kernels.
CHOICES = ("auto", "xla", "cpu")
CELLS = ("lstm", "gru")  # the cells that have a kernel


def check_choice(kernel: str, field: str) -> None:
    """Raises ValueError naming `field` unless `kernel` is one of CHOICES."""
    if kernel not in CHOICES:
        raise ValueError(f"{field} = {kernel!r} is not a kernel choice; use one of "
                         f"{', '.join(map(repr, CHOICES))}")


def why_not_cpu(cell: str, *arrays: Array) -> str | None:
    """Why the CPU kernels cannot run `cell` on these operands, or None when they can."""
    if cell not in CELLS:
        return f"there is no CPU kernel for {cell!r} cells (only for {' and '.join(CELLS)})"
    backend = jax.default_backend()
    if backend != "cpu":
        return f"the default JAX backend is {backend!r}, not 'cpu'"
    dtypes = sorted({str(a.dtype) for a in arrays if a.dtype != jnp.float32})
    if dtypes:
        return f"the kernels take float32 operands, not {', '.join(dtypes)}"
    return rnn_cpu.unavailable_reason()


def use_cpu(kernel: str, cell: str, *arrays: Array) -> bool:
    """Whether a layer set to `kernel` (one of CHOICES) runs its recurrence over these
    operands in the CPU kernels. With "cpu", raises RuntimeError saying why they cannot."""
    check_choice(kernel, "kernel")
    if kernel == "xla":
        return False
    reason = why_not_cpu(cell, *arrays)
    if reason is not None and kernel == "cpu":
        raise RuntimeError(f"kernel='cpu' asks for the RNN CPU kernels, but they cannot run: "
                           f"{reason}. Set the model config's kernel to 'auto' (XLA's scan "
                           "where the kernels cannot run) or 'xla'.")
    return reason is None


def recurrence(cell: str, reverse: bool, w_h: Array, b_h: Array, gates_x: Array, carry,
               resets: Array, mask: Array | None):
    """The LSTM's or GRU's recurrence in the CPU kernels (check `use_cpu` first).

    w_h (hidden, gates, hidden), b_h (gates, hidden); gates_x (time, batch, gates, hidden),
    the input projections with their bias; carry (h, c) for the LSTM, h for the GRU, each
    (batch, hidden); resets (time, batch) bool zeroes the carry before that step; mask
    (time, batch) bool keeps it at padding steps, None when there is no padding. Returns
    (outputs (time, batch, hidden), final carry).
    """
    scan = {"lstm": _lstm, "gru": _gru}[cell]
    return scan(reverse, w_h, b_h, gates_x, carry, resets, mask)


def _flat(w_h, b_h, gates_x, resets, mask):
    """The kernels' operands: w (hidden, gates hidden), b (gates hidden,), gx (time, batch,
    gates hidden), keep (time, batch) float, 0 where the carry resets, and mask as float."""
    hidden, gates, _ = w_h.shape
    keep = (~resets).astype(gates_x.dtype)
    mask = None if mask is None else mask.astype(gates_x.dtype)
    return (w_h.reshape(hidden, gates * hidden), b_h.reshape(gates * hidden),
            gates_x.reshape(*gates_x.shape[:-2], gates * hidden), keep, mask)


def _weight_grads(h0s, d_gh):
    """d W_h = sum_t h0_t^T d gh_t as one product, and d b_h; h0s (time, batch, hidden),
    d_gh (time, batch, gates hidden) -> ((hidden, gates, hidden), (gates, hidden))."""
    time, batch, hidden = h0s.shape
    flat = d_gh.reshape(time * batch, -1)
    d_w_h = h0s.reshape(time * batch, hidden).T @ flat
    return d_w_h.reshape(hidden, -1, hidden), flat.sum(0).reshape(-1, hidden)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lstm(reverse, w_h, b_h, gates_x, carry, resets, mask):
    return _lstm_fwd(reverse, w_h, b_h, gates_x, carry, resets, mask, save=False)[0]


def _lstm_fwd(reverse, w_h, b_h, gates_x, carry, resets, mask, save=True):
    """Residuals: per step the activated gates (i, f, g, o), the carry the step started
    from and tanh of the new cell state."""
    w, b, gx, keep, mask = _flat(w_h, b_h, gates_x, resets, mask)
    outs, final, residuals = rnn_cpu.forward(reverse, save, gx, w, b, *carry, keep, mask)
    return (outs, final), (w, *residuals, keep, mask)


def _lstm_bwd(reverse, residuals, cotangents):
    w, acts, h0s, c0s, tcs, keep, mask = residuals
    d_outs, (d_h, d_c) = cotangents
    time, batch, hidden = h0s.shape
    dzs, d_carry = rnn_cpu.backward(reverse, acts, c0s, tcs, keep, mask, d_outs, w, d_h, d_c)
    d_w_h, d_b_h = _weight_grads(h0s, dzs)
    return d_w_h, d_b_h, dzs.reshape(time, batch, 4, hidden), d_carry, None, None


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gru(reverse, w_h, b_h, gates_x, carry, resets, mask):
    return _gru_fwd(reverse, w_h, b_h, gates_x, carry, resets, mask, save=False)[0]


def _gru_fwd(reverse, w_h, b_h, gates_x, carry, resets, mask, save=True):
    """Residuals: per step r, z, n, the h-gate of n and the h the step started from."""
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


_gru.defvjp(_gru_fwd, _gru_bwd)
