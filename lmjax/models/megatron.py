"""Megatron tensor parallelism written out in `jax.shard_map` (Shoeybi et al. 2019), with
optional sequence parallelism (Korthikanti et al. 2022).

The automatic path (`mesh.tensor_impl = 'auto'`) shards the same parameters by their
logical axis names and lets XLA's partitioner choose the collectives. This path runs a
Transformer block (the GPT's pre-norm causal one, or BERT's post-norm bidirectional one
with its padding mask) manually over the `tensor` mesh axis and the batch axes: the QKV
and MLP-in projections are column-parallel (each device holds its heads and its slice
of the hidden units), the attention-out and MLP-out projections row-parallel, and
their partial sums meet in one `psum` per sublayer. The backward pass gets the other
two all-reduces from autodiff: the input of a column-parallel projection is replicated
over `tensor`, so its cotangent is summed over the axis. Two all-reduces per layer
forward, four with the backward pass; `lmjax bench --collectives` counts them.

The batch axes are manual too, because XLA's partitioner (jax 0.10, CPU) gathered the
whole batch over `data` around an all-gather or reduce-scatter in a region manual over
`tensor` alone. So the data-parallel gradient psums of the block's parameters are
written here as well (autodiff inserts them); fsdp-sharded parameters are gathered at
the region's edge by the partitioner, as FSDP does before a layer.

With `sequence_parallel`, the residual stream between blocks is split over the
sequence on the `tensor` axis: LayerNorms, dropout and residual adds run on 1/t of the
positions, an all-gather of the sequence replaces the forward identity before each
sublayer and a reduce-scatter replaces its all-reduce (the same bytes over the wire,
t times less activation memory outside attention and the MLP).

Parameters, their names and shapes are those of the automatic path, so checkpoints
move freely between the two. Dropout draws the same masks on any mesh: attention
probabilities per row and head (the key folded with the global row and head indices),
residual branches per row over the whole (length, embed), sliced where the sequence is
split. They differ from the automatic path's masks (drawn from whole arrays' shapes).
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

    norm: str  # "layernorm" or "rmsnorm"
    use_bias: bool
    mlp: str  # "gelu" or "swiglu"
    rope: bool
    dropout: float  # of the residual branches
    attention_dropout: float  # of the attention probabilities
    attention: str  # implementation, layers.resolve_attention
    dtype: jnp.dtype
    sequence_parallel: bool
    causal: bool = True  # GPT; BERT attends both ways
    post_norm: bool = False  # BERT: x = norm(x + sublayer(x)); GPT: x + sublayer(norm(x))
    norm_eps: float = 1e-5


def check_options(tensor_impl: str, sequence_parallel: bool) -> None:
    """Raises ValueError for a model config's tensor_impl / sequence_parallel pair."""
    if tensor_impl not in IMPLS:
        raise ValueError(f"unknown tensor_impl {tensor_impl!r}; use one of {', '.join(IMPLS)}")
    if sequence_parallel and tensor_impl != "shard_map":
        raise ValueError("sequence_parallel needs tensor_impl='shard_map' (set "
                         "mesh.tensor_impl = 'shard_map')")


def _mlp_params(params: dict) -> dict:
    """The MLP's projections: under `mlp` in a GPT block, beside the attention in BERT's."""
    return params["mlp"] if "mlp" in params else params


def check_split(params: dict, x: jax.Array, spec: BlockSpec) -> None:
    """Raises if the heads, the MLP width or (with sequence parallelism) the sequence do
    not split evenly over the active mesh's `tensor` axis."""
    t = jax.sharding.get_abstract_mesh().shape[AXIS]
    heads = params["attn"]["qkv"]["kernel"].shape[2]
    hidden = _mlp_params(params)["up"]["kernel"].shape[1]
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


def block(params: dict, x: jax.Array, key: jax.Array | None, spec: BlockSpec, *,
          positions: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """One Transformer block over the mesh's `tensor` axis (under an active mesh).

    x: (batch, length, embed), whole (or split over the sequence with
    `sequence_parallel`, as the previous block left it); returns the same layout.
    `key` draws the dropout masks (None: no dropout); `positions` (batch, length) rotate
    queries and keys with `spec.rope`; `mask` (batch, 1, 1, keys) hides padding keys.
    """
    check_split(params, x, spec)
    stream = P(BATCH_AXES, AXIS if spec.sequence_parallel else None, None)
    inputs = {"x": x, "positions": positions, "mask": mask, "key": key}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    specs = {k: stream if k == "x" else P() if k == "key" else P(BATCH_AXES) for k in inputs}
    body = jax.shard_map(lambda p, i: _block_body(p, i, spec),
                         in_specs=(param_specs(params), specs), out_specs=stream,
                         axis_names={*BATCH_AXES, AXIS})
    return body(params, inputs)


def _block_body(params: dict, inputs: dict, spec: BlockSpec) -> jax.Array:
    """Per device: x (batch, length or length/t, embed) -> same shape."""
    x, key = inputs["x"], inputs.get("key")
    keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))

    def attend(h):
        return _residual_dropout(_attention(params["attn"], h, inputs, keys[0], spec),
                                 keys[1], spec)

    def mlp(h):
        return _residual_dropout(_mlp(_mlp_params(params), h, spec), keys[2], spec)

    if spec.post_norm:
        x = _norm(params["norm1"], x + attend(_gather(x, spec)), spec)
        return _norm(params["norm2"], x + mlp(_gather(x, spec)), spec)
    x = x + attend(_gather(_norm(params["norm1"], x, spec), spec))
    return x + mlp(_gather(_norm(params["norm2"], x, spec), spec))


def _norm(params, x, spec: BlockSpec):
    """The block's LayerNorm or RMSNorm, unbound (`parent=None`): inside a module's call,
    a new module would otherwise become that module's child."""
    if spec.norm == "rmsnorm":
        module = nn.RMSNorm(epsilon=spec.norm_eps, dtype=spec.dtype, parent=None)
    else:
        module = nn.LayerNorm(epsilon=spec.norm_eps, use_bias=spec.use_bias, dtype=spec.dtype,
                              parent=None)
    return module.apply({"params": params}, x)


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


def _attention(params, h, inputs: dict, key, spec: BlockSpec):
    """h (batch, length, embed) -> partial output of this device's heads, reduced."""
    qkv = _column(params["qkv"], h, spec.dtype)  # (batch, length, 3, local heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if spec.rope:
        q, k = layers.rotary(q, inputs["positions"]), layers.rotary(k, inputs["positions"])
    mask, rate = inputs.get("mask"), spec.attention_dropout
    if key is None or rate == 0:
        y = layers.dot_product_attention(q, k, v, mask=mask, causal=spec.causal,
                                         implementation=spec.attention)
    else:
        keep = _head_masks(key, rate, q.shape)
        y = layers.reference_attention(q, k, v, mask=mask, causal=spec.causal,
                                       dropout_rate=rate, dropout_keep=keep)
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
    if key is None or spec.dropout == 0:
        return y
    batch, length, embed = y.shape
    t = jax.lax.axis_size(AXIS) if spec.sequence_parallel else 1
    draw = lambda row: jax.random.bernoulli(  # noqa: E731
        jax.random.fold_in(key, row), 1 - spec.dropout, (length * t, embed))
    keep = jax.vmap(draw)(_rows(batch))
    if spec.sequence_parallel:
        keep = jax.lax.dynamic_slice_in_dim(keep, jax.lax.axis_index(AXIS) * length, length, 1)
    return jnp.where(keep, y / (1 - spec.dropout), 0).astype(y.dtype)
