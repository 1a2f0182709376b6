"""Recurrent models: Elman RNN, LSTM and GRU cells, stacks, an LM and a BiLSTM-max classifier.

Speed on small CPUs comes from the layout, not from the cells' arithmetic:

* the input projections of all timesteps are one matrix product outside the time loop
  (`(batch, time, in) @ (in, gates, hidden)`), so the loop only does the recurrent
  product `h @ W_h`;
* the gates are fused: one `(hidden, gates, hidden)` kernel gives every gate at once;
* the loop is `jax.lax.scan` with a configurable `unroll`, which removes most of XLA's
  per-iteration overhead (the loop body is tiny at char-rnn's size).

Gate order and equations follow PyTorch's `nn.LSTM`/`nn.GRU` (see each cell's docstring),
so the NumPy reference in tests/test_rnn.py is a transcription of those documented
equations. Carries are pytrees whose leaves have the batch as leading axis, so the
trainer can shard and checkpoint them (lmjax/train/state.py).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from lmjax.models import layers
from lmjax.models.classifiers import mlp_head

Array = jax.Array

# Logical names: kernels are (in, gate, hidden); the hidden axis is split over `tensor`
# (rule "mlp"), inputs over `fsdp` (rule "embed").
KERNEL_AXES = ("embed", None, "mlp")
BIAS_AXES = (None, "mlp")


def _lstm_step(carry, gates_x, w_h, b_h):
    """PyTorch nn.LSTM: i, f, g, o = x W_i + b_i + h W_h + b_h;
    c' = sigmoid(f) c + sigmoid(i) tanh(g); h' = sigmoid(o) tanh(c')."""
    h, c = carry
    z = gates_x + jnp.einsum("bh,hgk->bgk", h, w_h) + b_h  # (batch, 4, hidden)
    i, f, g, o = z[:, 0], z[:, 1], z[:, 2], z[:, 3]
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


def _gru_step(carry, gates_x, w_h, b_h):
    """PyTorch nn.GRU: r = sigmoid(x W_ir + b_ir + h W_hr + b_hr), z likewise,
    n = tanh(x W_in + b_in + r (h W_hn + b_hn)), h' = (1 - z) n + z h."""
    h = carry
    zh = jnp.einsum("bh,hgk->bgk", h, w_h) + b_h  # (batch, 3, hidden)
    r = jax.nn.sigmoid(gates_x[:, 0] + zh[:, 0])
    z = jax.nn.sigmoid(gates_x[:, 1] + zh[:, 1])
    n = jnp.tanh(gates_x[:, 2] + r * zh[:, 2])
    h = (1.0 - z) * n + z * h
    return h, h


def _elman_step(carry, gates_x, w_h, b_h):
    """Elman RNN: h' = tanh(x W_i + b_i + h W_h + b_h)."""
    h = jnp.tanh(gates_x[:, 0] + jnp.einsum("bh,hgk->bgk", carry, w_h)[:, 0] + b_h[0])
    return h, h


@dataclasses.dataclass(frozen=True)
class CellSpec:
    gates: int
    step: Callable
    has_cell_state: bool


CELLS = {
    "lstm": CellSpec(4, _lstm_step, True),
    "gru": CellSpec(3, _gru_step, False),
    "rnn": CellSpec(1, _elman_step, False),
}


def zero_carry(cell: str, batch: int, hidden: int, dtype=jnp.float32):
    """The initial state of one layer: (h, c) for an LSTM, h otherwise; each (batch, hidden)."""
    h = jnp.zeros((batch, hidden), dtype)
    return (h, jnp.zeros_like(h)) if CELLS[cell].has_cell_state else h


def _select(flag: Array, new, old):
    """Per-row choice between two carries; flag: (batch,) bool."""
    return jax.tree.map(lambda a, b: jnp.where(flag[:, None], a, b), new, old)


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
                 mask: Array | None = None):
        spec = CELLS[self.cell]
        batch, _, features = xs.shape
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
            carry = zero_carry(self.cell, batch, self.hidden, xs.dtype)
        # All timesteps' input projections in one product: (time, batch, gates, hidden).
        gates_x = jnp.einsum("btf,fgk->tbgk", xs, w_i) + b_i
        steps = {"g": gates_x}
        if resets is not None:
            steps["reset"] = resets.T
        if mask is not None:
            steps["mask"] = mask.T
        zeros = zero_carry(self.cell, batch, self.hidden, xs.dtype)

        def body(c, step):
            if "reset" in step:
                c = _select(step["reset"], zeros, c)
            new, out = spec.step(c, step["g"], w_h, b_h)
            if "mask" in step:
                new = _select(step["mask"], new, c)
            return new, out

        carry, outs = jax.lax.scan(body, carry, steps, reverse=self.reverse,
                                   unroll=self.unroll)
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
    unroll: int = 10  # scan unroll (speed only; results are identical)
    forget_bias: float = 1.0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; use one of {sorted(CELLS)}")

    def zero_carry(self, batch: int) -> dict:
        """{'layer0': carry, ...}: the whole stack's initial state for `batch` rows."""
        return {f"layer{i}": zero_carry(self.cell, batch, self.hidden_dim)
                for i in range(self.num_layers)}


class RNNLM(nn.Module):
    """tokens (batch, time), carry, resets (batch, time) -> (logits (batch, time, vocab), carry)."""

    config: RNNConfig

    @nn.compact
    def __call__(self, tokens: Array, carry: dict | None = None, resets: Array | None = None,
                 deterministic: bool = True):
        c = self.config
        carry = carry if carry is not None else c.zero_carry(tokens.shape[0])
        x = nn.Embed(c.vocab_size, c.embed_dim,
                     embedding_init=layers.init(0.1, ("vocab", "embed")), name="embed")(tokens)
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        new_carry = {}
        for i in range(c.num_layers):
            name = f"layer{i}"
            x, new_carry[name] = RecurrentLayer(c.cell, c.hidden_dim, c.unroll,
                                                forget_bias=c.forget_bias,
                                                name=name)(x, carry[name], resets)
            x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
            x = layers.constrain(x, ("batch", "length", "act_mlp"))
        logits = layers.Dense((c.vocab_size,), ("embed", "vocab"), std=0.05,
                              name="head")(x).astype(jnp.float32)
        return logits, new_carry


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
    unroll: int = 8
    forget_bias: float = 1.0


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
