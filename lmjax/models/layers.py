"""Building blocks shared by the model families: attention, MLPs, norms, positions.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`);
activations are constrained with `nn.with_logical_constraint` at block boundaries.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.extend import backend

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


def scan_blocks(block: type[nn.Module], num_layers: int, in_axes: tuple) -> type[nn.Module]:
    """`block` (carry, *args) -> (carry, output) under nn.scan over `num_layers` layers.

    Parameters get a leading axis named "layers" (the rule tables split it over `stage`);
    init and dropout rngs are split, so every layer draws its own weights and masks.
    `in_axes` says per argument after the carry: 0 scans it over its leading (layer)
    axis, nn.broadcast passes it whole to every layer.
    """
    return nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
        in_axes=in_axes, length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
    )


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


ATTENTION_CHOICES = ("auto", "xla", "cudnn", "reference")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _on_nvidia_gpu() -> bool:
    """Whether the default backend is CUDA (cuDNN's home; ROCm GPUs are 'gpu' too)."""
    return jax.default_backend() == "gpu" and "cuda" in backend.get_backend().platform_version


def resolve_attention(choice: str, dtype: Dtype, head_dim: int, dropout: bool,
                      masked: bool) -> str:
    """The implementation one attention call runs: "xla", "cudnn" or "reference".

    "auto" takes cuDNN's fused (flash) attention on NVIDIA GPUs for bfloat16/float16
    maskless (causal) calls without dropout and head_dim a multiple of 8 up to 128, and
    XLA otherwise. Attention dropout runs in "reference", the one path that exposes the
    probabilities: "auto" and "xla" switch to it while dropout is active (XLA compiles
    the same einsums plus the mask); "cudnn" raises instead, see `_check_cudnn`.
    """
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention {choice!r}; use one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "cudnn":
        _check_cudnn(jnp.dtype(dtype), dropout)
        return "cudnn"
    if choice == "reference" or dropout:
        return "reference"
    if choice == "xla":
        return "xla"
    fused_ok = jnp.dtype(dtype) in _HALF and not masked and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fused_ok and _on_nvidia_gpu() else "xla"


def _check_cudnn(dtype: jnp.dtype, dropout: bool) -> None:
    """cuDNN attention needs an NVIDIA GPU, half precision and no dropout.

    jax's cuDNN kernel takes a dropout rate, but its seed is a compile-time constant and
    XLA advances separate random offsets for the forward and backward kernels at every
    execution, so the mask ignores the model's "dropout" rng and the backward pass of a
    scanned (or rematerialised) layer regenerates a different mask than its forward.
    """
    others = "use attention='auto', 'xla' or 'reference'"
    if not _on_nvidia_gpu():
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU but the backend is "
                         f"{jax.default_backend()!r}; {others}")
    if dtype not in _HALF:
        raise ValueError(f"attention='cudnn' runs in bfloat16 or float16, not {dtype}; set "
                         f"the model's dtype='bfloat16' or {others}")
    if dropout:
        raise ValueError("attention='cudnn' cannot drop attention probabilities (its dropout "
                         "ignores the model's rng); set the attention dropout to 0 or "
                         "use attention='auto' or 'reference' while training")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, causal: bool = False,
                          implementation: str = "auto", dropout_rate: float = 0.0,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v; q (batch, length, heads, head_dim), k and v
    (batch, keys, heads, head_dim) -> (batch, length, heads, head_dim).

    `mask` (boolean, broadcastable to (batch, heads, length, keys)) hides keys where
    False. Attention probabilities are dropped at `dropout_rate` when `dropout_rng` is
    given (training); see `resolve_attention` for which implementation runs.
    """
    dropout = dropout_rng is not None and dropout_rate > 0
    impl = resolve_attention(implementation, q.dtype, q.shape[-1], dropout, mask is not None)
    if impl == "reference":
        return reference_attention(q, k, v, mask=mask, causal=causal,
                                   dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if impl == "cudnn" and mask is not None:
        # cuDNN takes the mask as a bias of exactly (batch, heads or 1, length, keys).
        mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        implementation=impl)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        mask: jax.Array | None = None, causal: bool = False,
                        dropout_rate: float = 0.0,
                        dropout_rng: jax.Array | None = None,
                        dropout_keep: jax.Array | None = None) -> jax.Array:
    """Attention written out: scores and softmax in float32, probabilities dropped at
    `dropout_rate` (kept ones scaled by 1 / (1 - rate)) when `dropout_rng` is given, or
    where `dropout_keep` (a boolean mask shaped like the probabilities) is False.

    Shapes as `dot_product_attention`.
    """
    # (batch, heads, length, keys)
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32)
    visible = mask
    if causal:
        below = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        visible = below if mask is None else mask & below
    probs = _probabilities(scores * q.shape[-1] ** -0.5, visible)
    if dropout_keep is None and dropout_rng is not None and dropout_rate > 0:
        dropout_keep = _keep_mask(dropout_rate, dropout_rng, probs.shape)
    if dropout_keep is not None:
        probs = jnp.where(dropout_keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v)


def _probabilities(scores: jax.Array, visible: jax.Array | None) -> jax.Array:
    """Softmax over the last (key) axis in float32; keys where `visible` is False get 0."""
    if visible is not None:
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _keep_mask(rate: float, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if not 0 <= rate < 1:
        raise ValueError(f"attention dropout rate {rate} is outside [0, 1)")
    return jax.random.bernoulli(rng, 1.0 - rate, shape)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention through `dot_product_attention`; `dropout` is the rate
    of both the attention probabilities and the output (nanoGPT's one rate) unless
    `attention_dropout` sets the probabilities' own.

    Causal by default; `causal=False` with a key `mask` (boolean, broadcastable to
    (batch, heads, length, keys)) is an encoder's bidirectional attention over padding.
    """

    num_heads: int
    head_dim: int
    num_layers: int
    dropout: float = 0.0
    use_bias: bool = True
    rope: bool = False
    dtype: Dtype = jnp.float32
    implementation: str = "auto"
    causal: bool = True
    attention_dropout: float | None = None  # None: `dropout`

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, deterministic: bool,
                 cache: "KVCache | None" = None, mask: jax.Array | None = None):
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
            rate = self.dropout if self.attention_dropout is None else self.attention_dropout
            rng = None if deterministic or rate == 0 else self.make_rng("dropout")
            # (batch, length, heads, head_dim)
            y = dot_product_attention(q, k, v, mask=mask, causal=self.causal,
                                      implementation=self.implementation,
                                      dropout_rate=rate, dropout_rng=rng)
        else:  # decoding: no dropout
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

    q: (batch, length, heads, head_dim) -> (batch, length, heads, head_dim). Scores and
    softmax in float32, as `reference_attention`.
    """
    # (batch, heads, length, max_length)
    scores = jnp.einsum("bqnh,bnkh->bnqk", q, cache.keys.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    key_pos = jnp.arange(cache.keys.shape[2])
    visible = key_pos[None, None, None, :] <= positions[:, None, :, None]
    probs = _probabilities(scores * q.shape[-1] ** -0.5, visible)
    return jnp.einsum("bnqk,bnkh->bqnh", probs.astype(q.dtype), cache.values.astype(q.dtype))


class Mlp(nn.Module):
    """GELU MLP (nanoGPT), ReLU MLP (Vaswani et al. 2017) or SwiGLU (Shazeer 2020)."""

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
        elif self.kind == "relu":  # the original Transformer's
            h = nn.relu(up)
        elif self.kind == "swiglu":
            h = nn.silu(self._dense(self.hidden, ("embed", "mlp"), 0.02, "gate")(x)) * up
        else:
            raise ValueError(f"unknown mlp {self.kind!r}; use 'gelu', 'relu' or 'swiglu'")
        h = constrain(h, ("batch", "length", "act_mlp"))
        std = 0.02 / (2 * self.num_layers) ** 0.5
        y = self._dense(embed, ("mlp", "embed"), std, "down")(h)
        return nn.Dropout(self.dropout)(y, deterministic=deterministic)


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
    """The fixed position encodings of Vaswani et al. (2017): (length, dim) float32,
    sin(pos / 10000^(2i/dim)) at even features 2i and the cosine at odd ones 2i+1."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    rates = 10000.0 ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # (dim / 2,)
    angles = pos * rates  # (length, dim / 2)
    out = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # (length, dim / 2, 2)
    return out.reshape(length, -1)[:, :dim]


class CrossAttention(nn.Module):
    """Multi-head attention of queries x over a context (an encoder's output).

    The context's keys and values come from `keys_values` (a decoder computes them once
    per source and reuses them at every decoding step); `__call__` takes them with the
    key `mask` (boolean, broadcastable to (batch, heads, length, keys), False hides
    padding). Parameter names mirror `CausalSelfAttention` with `q` and `kv` for `qkv`.
    """

    num_heads: int
    head_dim: int
    embed_dim: int
    num_layers: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    implementation: str = "auto"

    def setup(self):
        heads = (self.num_heads, self.head_dim)
        self.q = Dense(heads, ("embed", "heads", "head_dim"), use_bias=self.use_bias,
                       dtype=self.dtype)
        self.kv = Dense((2, *heads), ("embed", None, "heads", "head_dim"),
                        use_bias=self.use_bias, dtype=self.dtype)
        # As CausalSelfAttention: the residual projection's init scaled by depth.
        self.out = Dense((self.embed_dim,), ("heads", "head_dim", "embed"),
                         0.02 / (2 * self.num_layers) ** 0.5, in_axes=2,
                         use_bias=self.use_bias, dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout)

    def keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """context (batch, keys, embed) -> keys, values (batch, keys, heads, head_dim)."""
        kv = self.kv(context)  # (batch, keys, 2, heads, head_dim)
        names = ("batch", "length", "act_heads", None)
        return constrain(kv[:, :, 0], names), constrain(kv[:, :, 1], names)

    def __call__(self, x: jax.Array, keys_values: tuple[jax.Array, jax.Array],
                 mask: jax.Array | None, deterministic: bool) -> jax.Array:
        q = constrain(self.q(x), ("batch", "length", "act_heads", None))
        k, v = keys_values
        rng = None
        if not deterministic and self.attention_dropout > 0:
            rng = self.make_rng("dropout")
        y = dot_product_attention(q, k, v, mask=mask, implementation=self.implementation,
                                  dropout_rate=self.attention_dropout, dropout_rng=rng)
        return self.drop(self.out(y), deterministic=deterministic)
