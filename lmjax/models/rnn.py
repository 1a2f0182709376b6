"""Recurrent models: Elman RNN, LSTM and GRU cells, stacks, an LM and a BiLSTM-max classifier.

The layout is what makes them fast, not the cells' arithmetic:

* the input projections of all timesteps are one matrix product outside the time loop
  (`(batch x time, in) @ (in, gates x hidden)`), so the loop only does the recurrent
  product `h @ W_h`; layer 0 of an LM without embedding dropout looks them up in the
  vocabulary's projections (`embedding @ W_i`) instead;
* the gates are fused: one `(hidden, gates, hidden)` kernel gives every gate at once;
* the loop is `jax.lax.scan` (`unroll` is configurable), differentiated by JAX.

`recurrence` is the one place a layer's time loop may leave this file: with the config's
`kernel` field at "auto" (the default) or "cpu", the LSTM's and GRU's run in the compiled
CPU kernels of lmjax/kernels where those can run (float32 on XLA's CPU backend with a
working C++ compiler; "cpu" raises where they cannot); elsewhere, and always with "xla",
in the `lax.scan` here, which the kernels are tested against.

Gate order and equations follow PyTorch's `nn.LSTM`/`nn.GRU` (see each cell's docstring),
so the NumPy reference in tests/test_rnn.py is a transcription of those documented
equations. Carries are pytrees whose leaves have the batch as leading axis, so the
trainer can shard and checkpoint them (lmjax/train/state.py).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from lmjax import kernels
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
    """xs (..., in) @ w_i (in, gates, hidden) -> (..., gates, hidden) as one 2-D product."""
    features, gates, hidden = w_i.shape
    flat = xs.reshape(-1, features) @ w_i.reshape(features, gates * hidden)
    return flat.reshape(*xs.shape[:-1], gates, hidden)


def _select(flag: Array, new, old):
    """Per-row choice between two carries; flag: (batch,) bool."""
    return jax.tree.map(lambda a, b: jnp.where(flag[:, None], a, b), new, old)


def xla_recurrence(cell: str, reverse: bool, unroll: int, w_h: Array, b_h: Array,
                   gates_x: Array, carry, resets: Array, mask: Array | None):
    """The recurrence as a plain `lax.scan`, differentiated by JAX.

    gates_x (time, batch, gates, hidden): the input projections with their bias; resets
    (time, batch) bool zeroes the carry before that step; mask (time, batch) bool keeps
    it at padding steps (None: no padding). Returns (outputs (time, batch, hidden),
    final carry).
    """
    spec = CELLS[cell]

    def body(c, step):
        gx, reset, keep = step
        c = _select(reset, jax.tree.map(jnp.zeros_like, c), c)
        new, out = spec.cell(c, gx, _recur(spec.hidden(c), w_h, b_h))
        return (new if keep is None else _select(keep, new, c)), out

    carry, outs = jax.lax.scan(body, carry, (gates_x, resets, mask), reverse=reverse,
                               unroll=unroll)
    return outs, carry


def recurrence(cell: str, reverse: bool, unroll: int, kernel: str, w_h: Array, b_h: Array,
               gates_x: Array, carry, resets: Array, mask: Array | None):
    """`xla_recurrence`, or the same recurrence in the CPU kernels when `kernel` (a config's
    `kernel` field: "auto", "xla" or "cpu") selects them and they can run."""
    if kernels.use_cpu(kernel, cell, w_h, b_h, gates_x, *jax.tree.leaves(carry)):
        return kernels.recurrence(cell, reverse, w_h, b_h, gates_x, carry, resets, mask)
    return xla_recurrence(cell, reverse, unroll, w_h, b_h, gates_x, carry, resets, mask)


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
    kernel: str = "auto"  # see `recurrence`

    @nn.compact
    def __call__(self, xs: Array, carry=None, resets: Array | None = None,
                 mask: Array | None = None, embedding: Array | None = None):
        """With `embedding` (vocab, in), xs are token ids (batch, time) and the inputs are
        their embeddings: the input projections are looked up in embedding @ w_i + b_i,
        one (vocab, in) product instead of one (batch x time, in) product."""
        spec = CELLS[self.cell]
        batch, time = xs.shape[:2]
        inputs = xs if embedding is None else embedding
        std = 1.0 / self.hidden ** 0.5  # PyTorch's uniform(-1/sqrt(H), 1/sqrt(H)) scale
        uniform = nn.initializers.uniform(2 * std)
        w_i = self.param("w_i", nn.with_logical_partitioning(_shifted(uniform, std), KERNEL_AXES),
                         (inputs.shape[-1], spec.gates, self.hidden))
        w_h = self.param("w_h", nn.with_logical_partitioning(_shifted(uniform, std), KERNEL_AXES),
                         (self.hidden, spec.gates, self.hidden))
        b_i = self.param("b_i", nn.with_logical_partitioning(self._bias_init(), BIAS_AXES),
                         (spec.gates, self.hidden))
        b_h = self.param("b_h", layers.zeros(BIAS_AXES), (spec.gates, self.hidden))
        if carry is None:
            carry = zero_carry(self.cell, batch, self.hidden, inputs.dtype)
        resets = jnp.zeros((time, batch), bool) if resets is None else resets.T
        mask = None if mask is None else mask.T
        # Every timestep's input projection at once, time-major: (time, batch, gates, hidden).
        if embedding is None:
            gates_x = _project(jnp.swapaxes(xs, 0, 1), w_i) + b_i
        else:
            gates_x = (_project(embedding, w_i) + b_i)[xs.T]
        outs, carry = recurrence(self.cell, self.reverse, self.unroll, self.kernel, w_h, b_h,
                                 gates_x, carry, resets, mask)
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
    unroll: int = 1  # lax.scan unroll of the XLA recurrence (speed only)
    forget_bias: float = 1.0
    # Where the LSTM's or GRU's time loop runs: "auto" (the CPU kernels where they can
    # run, else XLA's scan), "xla" (always XLA's scan) or "cpu" (the kernels, or an error).
    kernel: str = "auto"

    def module(self) -> nn.Module:
        return RNNLM(self)

    def __post_init__(self):
        _check_cell(self.cell, "RNNConfig.cell")
        kernels.check_choice(self.kernel, "RNNConfig.kernel")

    def zero_carry(self, batch: int) -> dict:
        """{'layer0': carry, ...}: the whole stack's initial state for `batch` rows."""
        return {f"layer{i}": zero_carry(self.cell, batch, self.hidden_dim)
                for i in range(self.num_layers)}


def _check_cell(cell: str, field: str) -> None:
    if cell not in CELLS:
        raise ValueError(f"{field} = {cell!r} is not a cell; use one of {sorted(CELLS)}")


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
        # in embedding @ w_i: the same values from one (vocab, in) product instead of one
        # row per token.
        fold = deterministic or c.dropout == 0
        x = tokens if fold else nn.Dropout(c.dropout)(embed(tokens), deterministic=False)
        new_carry = {}
        for i in range(c.num_layers):
            name = f"layer{i}"
            layer = RecurrentLayer(c.cell, c.hidden_dim, c.unroll, forget_bias=c.forget_bias,
                                   kernel=c.kernel, name=name)
            x, new_carry[name] = layer(x, carry[name], resets,
                                       embedding=embed.embedding if fold and i == 0 else None)
            x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
            x = layers.constrain(x, ("batch", "length", "act_mlp"))
        logits = layers.Dense((c.vocab_size,), ("embed", "vocab"), std=0.05, name="head")(x)
        if targets is None:
            return logits, new_carry
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets), new_carry


class BiLayer(nn.Module):
    """A bidirectional layer: forward and backward halves concatenated on features.

    xs (batch, time, in), mask (batch, time) -> (batch, time, 2 hidden). With padding at
    the end, the backward half reads each row's real tokens from last to first.
    """

    cell: str
    hidden: int
    unroll: int = 1
    forget_bias: float = 1.0
    kernel: str = "auto"  # see `recurrence`

    @nn.compact
    def __call__(self, xs: Array, mask: Array | None = None) -> Array:
        args = dict(cell=self.cell, hidden=self.hidden, unroll=self.unroll,
                    forget_bias=self.forget_bias, kernel=self.kernel)
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
    kernel: str = "auto"  # as RNNConfig.kernel

    def module(self) -> nn.Module:
        return BiLSTMClassifier(self)

    def __post_init__(self):
        _check_cell(self.cell, "BiLSTMConfig.cell")
        kernels.check_choice(self.kernel, "BiLSTMConfig.kernel")


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
            x = BiLayer(c.cell, c.hidden_dim, c.unroll, c.forget_bias, c.kernel,
                        name=f"bilayer{i}")(x, mask)
            if i + 1 < c.num_layers:
                x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        x = jnp.where(mask[..., None], x, -jnp.inf).max(axis=1)  # (batch, 2 hidden)
        return mlp_head(x, c.mlp_dim, c.num_classes, c.dropout, deterministic)
