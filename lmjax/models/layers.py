"""Building blocks shared by the model families: attention, MLPs, norms, positions.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`);
activations are constrained with `nn.with_logical_constraint` at block boundaries.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = jnp.dtype


class DerivedSizes:
    """Sizes derived from a Transformer config's `embed_dim`, `num_heads`, `vocab_size`,
    `vocab_multiple` and `dtype` fields (shared by GPTConfig and BertConfig)."""

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def init(std: float, names: tuple[str | None, ...]):
    """A normal(std) initialiser that tags the parameter with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


class Dense(nn.Module):
    """x @ kernel contracting the last `in_axes` axes of x; kernel shape (in..., out...).

    flax's DenseGeneral initialises a flattened kernel and reshapes it, which loses
    logical axis names of multi-axis kernels such as (embed, 3, heads, head_dim).
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]  # logical names of the kernel's axes
    std: float = 0.02
    in_axes: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape[-self.in_axes :] + tuple(self.features)
        kernel = self.param("kernel", init(self.std, self.names), shape)
        contract = tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes))
        dims = (contract, ((), ()))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims)
        if self.use_bias:
            bias = self.param("bias", zeros(self.names[self.in_axes :]), self.features)
            y = y + bias.astype(self.dtype)
        return y


def norm(kind: str, use_bias: bool, dtype: Dtype, name: str) -> nn.Module:
    """LayerNorm (nanoGPT: eps 1e-5, optional bias) or RMSNorm."""
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=1e-5, dtype=dtype, scale_init=ones(("norm",)), name=name)
    if kind == "layernorm":
        return nn.LayerNorm(
            epsilon=1e-5, use_bias=use_bias, dtype=dtype,
            scale_init=ones(("norm",)), bias_init=zeros(("norm",)), name=name,
        )
    raise ValueError(f"unknown norm {kind!r}; use 'layernorm' or 'rmsnorm'")


def rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotating pairs (i, i + head_dim/2).

    x: (batch, length, heads, head_dim); positions: (batch, length).
    """
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None, None].astype(jnp.float32) * freqs  # (batch, length, 1, half)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `jax.nn.dot_product_attention`."""

    num_heads: int
    head_dim: int
    num_layers: int
    dropout: float = 0.0
    use_bias: bool = True
    rope: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, deterministic: bool,
                 cache: "KVCache | None" = None):
        """Training path without `cache`; with one, also returns the updated cache."""
        embed = x.shape[-1]
        qkv = Dense(
            (3, self.num_heads, self.head_dim), ("embed", None, "heads", "head_dim"),
            use_bias=self.use_bias, dtype=self.dtype, name="qkv",
        )(x)  # (batch, length, 3, heads, head_dim)
        names = ("batch", "length", "act_heads", None)
        q, k, v = (constrain(qkv[:, :, i], names) for i in range(3))
        if self.rope:
            q, k = rotary(q, positions), rotary(k, positions)
        if cache is None:
            # (batch, length, heads, head_dim)
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            cache = cache.write(k, v, positions)
            y = cached_attention(q, cache, positions)
        # nanoGPT's scaled init for residual projections: 0.02 / sqrt(2 * layers).
        y = Dense(
            (embed,), ("heads", "head_dim", "embed"), 0.02 / (2 * self.num_layers) ** 0.5,
            in_axes=2, use_bias=self.use_bias, dtype=self.dtype, name="out",
        )(y)
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        return y if cache is None else (y, cache)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's keys and values, preallocated: (batch, heads, max_length, head_dim) each.

    Heads before positions, so attention's batched matmuls read the cache in place
    (with positions first, XLA on CPU transposed the whole cache at every step).

    Row b holds the keys/values of positions 0..n-1 of sequence b; entries past a row's
    length may hold stale values, which attention never reads (it only looks at keys
    at or before each query's position, all of which have been written).
    """

    keys: jax.Array
    values: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_length: int, heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        shape = (batch, heads, max_length, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> "KVCache":
        """Stores k, v (batch, length, heads, head_dim) at `positions` (batch, length).

        Positions past the end are dropped (padding of a shorter row), never clamped
        onto real entries.
        """
        rows = jnp.arange(k.shape[0])[:, None]
        # [rows, :, positions] indexes (batch, length, heads, head_dim): k's own layout.
        keys = self.keys.at[rows, :, positions].set(k.astype(self.keys.dtype), mode="drop")
        values = self.values.at[rows, :, positions].set(v.astype(self.values.dtype),
                                                        mode="drop")
        return KVCache(keys, values)


def cached_attention(q: jax.Array, cache: KVCache, positions: jax.Array) -> jax.Array:
    """Causal attention of queries at `positions` (batch, length) over the cache.

    q: (batch, length, heads, head_dim) -> (batch, length, heads, head_dim). Softmax in
    float32, as `jax.nn.dot_product_attention` computes it.
    """
    scale = q.shape[-1] ** -0.5
    # (batch, heads, length, max_length)
    scores = jnp.einsum("bqnh,bnkh->bnqk", q, cache.keys.astype(q.dtype)).astype(jnp.float32)
    key_pos = jnp.arange(cache.keys.shape[2])
    visible = key_pos[None, None, None, :] <= positions[:, None, :, None]
    scores = jnp.where(visible, scores * scale, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bnqk,bnkh->bqnh", weights, cache.values.astype(q.dtype))


class Mlp(nn.Module):
    """GELU MLP (nanoGPT) or SwiGLU (Shazeer 2020)."""

    hidden: int
    num_layers: int
    kind: str = "gelu"
    dropout: float = 0.0
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    def _dense(self, features: int, names, std: float, name: str) -> Dense:
        return Dense((features,), names, std, use_bias=self.use_bias, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        embed = x.shape[-1]
        up = self._dense(self.hidden, ("embed", "mlp"), 0.02, "up")(x)
        if self.kind == "gelu":
            h = nn.gelu(up, approximate=False)
        elif self.kind == "swiglu":
            h = nn.silu(self._dense(self.hidden, ("embed", "mlp"), 0.02, "gate")(x)) * up
        else:
            raise ValueError(f"unknown mlp {self.kind!r}; use 'gelu' or 'swiglu'")
        h = constrain(h, ("batch", "length", "act_mlp"))
        std = 0.02 / (2 * self.num_layers) ** 0.5
        y = self._dense(embed, ("mlp", "embed"), std, "down")(h)
        return nn.Dropout(self.dropout)(y, deterministic=deterministic)
