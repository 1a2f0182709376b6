"""Megatron tensor parallelism written out in `jax.shard_map` (Shoeybi et al. 2019), with
optional sequence parallelism (Korthikanti et al. 2022).

The automatic path (`mesh.tensor_impl = 'auto'`) shards the same parameters by their
logical axis names and lets XLA's partitioner choose the collectives. This path runs a
GPT block manually over the `tensor` mesh axis (the batch axes stay automatic): the QKV
and MLP-in projections are column-parallel (each device holds its heads and its slice
of the hidden units), the attention-out and MLP-out projections row-parallel, and
their partial sums meet in one `psum` per sublayer. The backward pass gets the other
two all-reduces from autodiff: the input of a column-parallel projection is replicated
over `tensor`, so its cotangent is summed over the axis. Two all-reduces per layer
forward, four with the backward pass; `lmjax bench --collectives` counts them.

With `sequence_parallel`, the residual stream between blocks is split over the
sequence on the `tensor` axis: LayerNorms, dropout and residual adds run on 1/t of the
positions, an all-gather of the sequence replaces the forward identity before each
sublayer and a reduce-scatter replaces its all-reduce (the same bytes over the wire,
t times less activation memory outside attention and the MLP).

Parameters, their names and shapes are those of the automatic path, so checkpoints
move freely between the two. Dropout draws the same masks whatever the tensor degree:
attention probabilities per head (the key folded with the global head index) and the
residual branches over the whole (batch, length, embed) shape, sliced where the
sequence is split.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from lmjax.models import layers
from lmjax.parallel.mesh import BATCH_AXES

AXIS = "tensor"
IMPLS = ("auto", "shard_map")

# Which kernel axis each Megatron projection splits over `tensor` (biases follow their
# output axes); everything not listed (norms, row-parallel biases) is replicated.
_COLUMN_KERNEL = {"qkv": P(None, None, AXIS, None), "up": P(None, AXIS), "gate": P(None, AXIS)}
_COLUMN_BIAS = {"qkv": P(None, AXIS, None), "up": P(AXIS), "gate": P(AXIS)}
_ROW_KERNEL = {"out": P(AXIS, None, None), "down": P(AXIS, None)}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What one block needs besides its parameters (plain values, no Flax modules)."""

    norm: str
    use_bias: bool
    mlp: str
    rope: bool
    dropout: float
    attention: str
    dtype: jnp.dtype
    sequence_parallel: bool


def check_split(params: dict, x: jax.Array, spec: BlockSpec) -> None:
    """Raises if the heads, the MLP width or (with sequence parallelism) the sequence do
    not split evenly over the active mesh's `tensor` axis."""
    t = jax.sharding.get_abstract_mesh().shape[AXIS]
    heads = params["attn"]["qkv"]["kernel"].shape[2]
    hidden = params["mlp"]["up"]["kernel"].shape[1]
    if heads % t or hidden % t:
        raise ValueError(
            f"tensor_impl='shard_map' splits {heads} heads and {hidden} MLP units over "
            f"tensor={t}, which does not divide both; pick a tensor degree that does, or "
            "mesh.tensor_impl='auto' (which replicates what does not divide)")
    if spec.sequence_parallel and x.shape[1] % t:
        raise ValueError(
            f"sequence_parallel splits {x.shape[1]} positions over tensor={t}, which does "
            f"not divide them; use a sequence length divisible by {t}")


def param_specs(params: dict) -> dict:
    """PartitionSpecs over `tensor` of one block's parameters (Megatron's split)."""

    def spec(path, leaf) -> P:
        names = [getattr(k, "key", None) for k in path]
        owner, kind = names[-2], names[-1]
        if kind == "kernel":
            return _COLUMN_KERNEL.get(owner) or _ROW_KERNEL.get(owner) or P()
        if kind == "bias":
            return _COLUMN_BIAS.get(owner, P())
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


def block(params: dict, x: jax.Array, positions: jax.Array, key: jax.Array | None,
          spec: BlockSpec) -> jax.Array:
    """One pre-norm GPT block over the mesh's `tensor` axis (under an active mesh).

    x: (batch, length, embed), whole (or split over the sequence with
    `sequence_parallel`, as the previous block left it); returns the same layout.
    `key` draws the dropout masks (None: no dropout).
    """
    check_split(params, x, spec)
    stream = P(BATCH_AXES, AXIS if spec.sequence_parallel else None, None)
    specs = (param_specs(params), stream, P(BATCH_AXES))
    manual = {*BATCH_AXES, AXIS}
    if key is None:
        body = lambda p, h, pos: _block_body(p, h, pos, None, spec)  # noqa: E731
        return jax.shard_map(body, in_specs=specs, out_specs=stream,
                             axis_names=manual)(params, x, positions)
    body = lambda p, h, pos, k: _block_body(p, h, pos, k, spec)  # noqa: E731
    return jax.shard_map(body, in_specs=(*specs, P()), out_specs=stream,
                         axis_names=manual)(params, x, positions, key)


def _block_body(params, x, positions, key, spec: BlockSpec):
    """Per device: x (batch, length or length/t, embed) -> same shape."""
    keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
    h = _gather(_norm(params["norm1"], x, spec, "norm1"), spec)
    x = x + _residual_dropout(_attention(params["attn"], h, positions, keys[0], spec),
                              keys[1], spec)
    h = _gather(_norm(params["norm2"], x, spec, "norm2"), spec)
    return x + _residual_dropout(_mlp(params["mlp"], h, spec), keys[2], spec)


def _norm(params, x, spec: BlockSpec, name: str):
    return layers.norm(spec.norm, spec.use_bias, spec.dtype, name).apply({"params": params}, x)


def _gather(h, spec: BlockSpec):
    """The sublayer's input: the whole sequence (an all-gather under sequence parallelism)."""
    return jax.lax.all_gather(h, AXIS, axis=1, tiled=True) if spec.sequence_parallel else h


def _reduce(y, bias, spec: BlockSpec):
    """Row-parallel partial sums -> their sum (all-reduce), or this device's positions of
    it (reduce-scatter) under sequence parallelism; then the replicated bias."""
    if spec.sequence_parallel:
        y = jax.lax.psum_scatter(y, AXIS, scatter_dimension=1, tiled=True)
    else:
        y = jax.lax.psum(y, AXIS)
    return y if bias is None else y + bias.astype(spec.dtype)


def _matmul(x, kernel, in_axes: int, dtype):
    contract = tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes))
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))


def _column(params, x, dtype):
    y = _matmul(x, params["kernel"], 1, dtype)
    return y + params["bias"].astype(dtype) if "bias" in params else y


def _attention(params, h, positions, key, spec: BlockSpec):
    """h (batch, length, embed) -> partial output of this device's heads, reduced."""
    qkv = _column(params["qkv"], h, spec.dtype)  # (batch, length, 3, local heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if spec.rope:
        q, k = layers.rotary(q, positions), layers.rotary(k, positions)
    if key is None:
        y = layers.dot_product_attention(q, k, v, causal=True, implementation=spec.attention)
    else:
        keep = _head_masks(key, spec.dropout, q.shape)
        y = layers.reference_attention(q, k, v, causal=True, dropout_rate=spec.dropout,
                                       dropout_keep=keep)
    out = params["out"]
    return _reduce(_matmul(y, out["kernel"], 2, spec.dtype), out.get("bias"), spec)


def _rows(batch: int) -> jax.Array:
    """The global indices of this device's rows (the batch is split over BATCH_AXES)."""
    return jax.lax.axis_index(BATCH_AXES) * batch + jnp.arange(batch)


def _head_masks(key, rate: float, shape) -> jax.Array:
    """Keep masks (batch, local heads, length, length) of this device's rows and heads;
    row r, head n draws from fold_in(fold_in(key, r), n), the same on any mesh."""
    batch, length, heads, _ = shape
    first = jax.lax.axis_index(AXIS) * heads

    def draw(row, head):
        head_key = jax.random.fold_in(jax.random.fold_in(key, row), head)
        return jax.random.bernoulli(head_key, 1 - rate, (length, length))

    per_head = jax.vmap(draw, in_axes=(None, 0))
    return jax.vmap(per_head, in_axes=(0, None))(_rows(batch), first + jnp.arange(heads))


def _mlp(params, h, spec: BlockSpec):
    up = _column(params["up"], h, spec.dtype)
    if spec.mlp == "gelu":
        a = nn.gelu(up, approximate=False)
    else:  # swiglu, as layers.Mlp
        a = nn.silu(_column(params["gate"], h, spec.dtype)) * up
    down = params["down"]
    return _reduce(_matmul(a, down["kernel"], 1, spec.dtype), down.get("bias"), spec)


def _residual_dropout(y, key, spec: BlockSpec):
    """Dropout of a residual branch: row r's mask (length, embed) from fold_in(key, r),
    sliced to this device's positions under sequence parallelism."""
    if key is None:
        return y
    batch, length, embed = y.shape
    t = jax.lax.axis_size(AXIS) if spec.sequence_parallel else 1
    draw = lambda row: jax.random.bernoulli(  # noqa: E731
        jax.random.fold_in(key, row), 1 - spec.dropout, (length * t, embed))
    keep = jax.vmap(draw)(_rows(batch))
    if spec.sequence_parallel:
        keep = jax.lax.dynamic_slice_in_dim(keep, jax.lax.axis_index(AXIS) * length, length, 1)
    return jnp.where(keep, y / (1 - spec.dropout), 0).astype(y.dtype)
