"""Decoder-only Transformer LM with nanoGPT's architecture and common options."""

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from lmjax.models import layers, megatron
from lmjax.models.registry import MODELS
from lmjax.parallel import pipeline


@MODELS.register("GPTConfig")
@dataclasses.dataclass(frozen=True)
class GPTConfig(layers.DerivedSizes):
    """Hyperparameters of the GPT family; defaults are nanoGPT's shakespeare_char GPU config."""

    vocab_size: int = 65
    block_size: int = 256
    num_layers: int = 6
    num_heads: int = 6
    embed_dim: int = 384
    mlp_ratio: int = 4
    dropout: float = 0.0
    use_bias: bool = True
    norm: str = "layernorm"  # or "rmsnorm"
    mlp: str = "gelu"  # or "swiglu"
    position: str = "learned"  # or "rope"
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False
    # Run the blocks under nn.scan: parameters (and the KV cache) stacked on a leading
    # "layers" axis under `blocks/`, one compiled block whatever the depth. Convert
    # between the layouts with `stack_layers` / `unstack_layers`.
    scan_layers: bool = False
    attention: str = "auto"  # or "xla", "cudnn", "reference": see layers.resolve_attention
    # The embedding is padded to a multiple of this (nanoGPT pads 50257 -> 50304) so
    # the vocabulary divides any tensor-parallel degree; padded logits are masked out.
    vocab_multiple: int = 64
    # How the blocks split over the mesh's `tensor` axis while training: "auto" (XLA
    # partitions by the logical axis names) or "shard_map" (Megatron's collectives
    # written out, lmjax/models/megatron.py), optionally with sequence parallelism.
    # Set from `mesh.tensor_impl` / `mesh.sequence_parallel` by MeshConfig.configure.
    tensor_impl: str = "auto"
    sequence_parallel: bool = False

    def module(self) -> nn.Module:
        return GPT(self)

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.position not in ("learned", "rope"):
            raise ValueError(f"unknown position {self.position!r}; use 'learned' or 'rope'")
        if self.attention not in layers.ATTENTION_CHOICES:
            raise ValueError(f"unknown attention {self.attention!r}; use one of "
                             f"{', '.join(layers.ATTENTION_CHOICES)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} is outside [0, 1)")
        megatron.check_options(self.tensor_impl, self.sequence_parallel)


class Block(nn.Module):
    """One pre-norm block: (x, cache or None) -> (x, updated cache or None).

    Positions and `deterministic` come after the carry and the cache, the signature
    nn.scan wants: x is carried, the cache is scanned over its layer axis.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, cache: layers.KVCache | None, positions: jax.Array,
                 deterministic: bool) -> tuple[jax.Array, layers.KVCache | None]:
        c = self.config
        if c.tensor_impl == "shard_map" and cache is None and not self.is_initializing():
            return self._megatron(x, positions, deterministic), None
        norm = functools.partial(layers.norm, c.norm, c.use_bias, c.compute_dtype)
        attention = layers.CausalSelfAttention(
            c.num_heads, c.head_dim, c.num_layers, c.dropout, c.use_bias,
            c.position == "rope", c.compute_dtype, c.attention, name="attn",
        )
        y = attention(norm("norm1")(x), positions, deterministic, cache)
        if cache is not None:
            y, cache = y
        x = x + y
        x = x + layers.Mlp(
            c.mlp_ratio * c.embed_dim, c.num_layers, c.mlp, c.dropout, c.use_bias,
            c.compute_dtype, name="mlp",
        )(norm("norm2")(x), deterministic)
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        return x, cache

    def _megatron(self, x: jax.Array, positions: jax.Array, deterministic: bool) -> jax.Array:
        """The training path of tensor_impl='shard_map': the parameters created by the
        layers above (at init), run by lmjax/models/megatron.py."""
        c = self.config
        spec = megatron.BlockSpec(c.norm, c.use_bias, c.mlp, c.position == "rope", c.dropout,
                                  c.dropout, c.attention, c.compute_dtype, c.sequence_parallel)
        key = None if deterministic or c.dropout == 0 else self.make_rng("dropout")
        return megatron.block(self.variables["params"], x, key, spec, positions=positions)


class GPT(nn.Module):
    """tokens (batch, length) int -> logits (batch, length, padded_vocab) float32.

    Logits of padding entries beyond `vocab_size` are -inf-like, so losses and sampling
    see exactly `vocab_size` classes.

    With `cache` (one `layers.KVCache` per layer, or one stacked over the layers with
    `scan_layers`; see `init_cache`) the tokens sit at `positions` (batch, length) of
    each row; their keys and values are written into the cache and attention reads it,
    so a prompt is prefilled once and each new token costs one position. Returns
    `(logits, cache)` then.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True, *,
                 cache: list[layers.KVCache] | layers.KVCache | None = None,
                 positions: jax.Array | None = None):
        c = self.config
        _, length = tokens.shape
        if length > c.block_size:
            raise ValueError(f"sequence length {length} exceeds block_size {c.block_size}")
        if (cache is None) != (positions is None):
            raise ValueError("cached decoding needs both `cache` and `positions`")
        wte = nn.Embed(
            c.padded_vocab, c.embed_dim, dtype=c.compute_dtype,
            embedding_init=layers.init(0.02, ("vocab", "embed")), name="wte",
        )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        x = wte(tokens)
        if c.position == "learned":
            wpe = self.param("wpe", layers.init(0.02, ("position", "embed")),
                             (c.block_size, c.embed_dim))
            if cache is None:
                x = x + wpe[:length].astype(c.compute_dtype)
            else:  # padding positions past the block are clipped; their outputs go unused
                x = x + jnp.take(wpe, positions, axis=0, mode="clip").astype(c.compute_dtype)
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        x, cache = self._blocks(x, positions, deterministic, cache)
        x = layers.norm(c.norm, c.use_bias, c.compute_dtype, "norm_f")(x)
        logits = wte.attend(x).astype(jnp.float32)  # tied embeddings
        logits = layers.constrain(logits, ("batch", "length", "act_vocab"))
        valid = jnp.arange(c.padded_vocab) < c.vocab_size
        logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
        return logits if cache is None else (logits, cache)

    def _blocks(self, x, positions, deterministic, cache):
        c = self.config
        if pipeline.active():
            if cache is not None:
                raise ValueError(
                    "cached decoding runs unpipelined: decode on a mesh with stage=1 and "
                    f"without pipeline microbatches (here stage={pipeline.stage_count()}, "
                    f"microbatches={pipeline.current_microbatches()})")
            if not self.is_initializing():  # init creates the stacked parameters below
                return self._pipelined(x, positions, deterministic), None
        block = Block
        if c.remat and cache is None:  # decoding keeps no activations for backprop
            # Inside scan, CSE cannot merge the recomputation with the forward anyway.
            block = nn.remat(Block, static_argnums=(4,), prevent_cse=not c.scan_layers)
        if c.scan_layers:
            # The cache (or None) is scanned over its layer axis, like the parameters.
            blocks = layers.scan_blocks(block, c.num_layers, (0, nn.broadcast, nn.broadcast))
            return blocks(c, name="blocks")(x, cache, positions, deterministic)
        new_cache = []
        for i in range(c.num_layers):
            x, layer_cache = block(c, name=f"block{i}")(
                x, None if cache is None else cache[i], positions, deterministic)
            new_cache.append(layer_cache)
        return x, None if cache is None else new_cache

    def _pipelined(self, x, positions, deterministic):
        """The stacked blocks through lmjax/parallel/pipeline.py (training and eval).

        The scanned `blocks` parameters are read as they are stored (layers leading) and
        each layer runs as an unbound `Block` (`block_layer`): pipeline.run is a plain
        function of arrays, which a shard_map over `stage` needs, and the parameter tree
        stays the scanned one, so checkpoints do not care whether a run pipelines.
        """
        c = self.config
        if not c.scan_layers:
            raise ValueError("pipelining (mesh.stage > 1 or train.pipeline_microbatches > "
                             "1) runs the stacked layers: set GPTConfig.scan_layers = True")
        if c.tensor_impl == "shard_map":
            # A shard_map block nested in the stage shard_map fails Shardy's verifier
            # (jax 0.10): manual axes must precede the free `stage` axis.
            raise ValueError("pipelining (mesh.stage > 1 or train.pipeline_microbatches > 1) "
                             "does not combine with mesh.tensor_impl='shard_map' yet; use "
                             "mesh.tensor_impl='auto' (XLA's tensor parallelism) inside stages")
        key = None if deterministic or c.dropout == 0 else self.make_rng("dropout")
        return pipeline.run(block_layer(c, deterministic), self.variables["params"]["blocks"],
                            x, positions, key, stages=pipeline.stage_count(),
                            microbatches=pipeline.current_microbatches())


def block_layer(config: GPTConfig, deterministic: bool) -> pipeline.Layer:
    """One `Block` as a pure function (params of one layer, x, positions, dropout key or
    None) -> x, the layer `pipeline.run` applies; rematerialised with `config.remat`."""

    def layer(params, x, positions, key):
        rngs = None if key is None else {"dropout": key}
        block = Block(config, parent=None)  # unbound: not a submodule of the caller
        return block.apply({"params": params}, x, None, positions, deterministic, rngs=rngs)[0]

    # Inside the schedule's scans, CSE cannot merge the recomputation anyway.
    return jax.checkpoint(layer, prevent_cse=False) if config.remat else layer


def init_cache(config: GPTConfig, batch: int, max_length: int | None = None,
               dtype=jnp.float32) -> list[layers.KVCache] | layers.KVCache:
    """An empty KV cache for `batch` rows of up to `max_length` (default block_size) tokens.

    One KVCache per layer; with `scan_layers` one KVCache whose arrays are stacked on a
    leading layer axis: (layers, batch, heads, max_length, head_dim).
    """
    length = max_length or config.block_size
    shape = (batch, config.num_heads, length, config.head_dim)
    if config.scan_layers:
        stacked = (config.num_layers, *shape)
        return layers.KVCache(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype))
    return [layers.KVCache.zeros(batch, length, config.num_heads, config.head_dim, dtype)
            for _ in range(config.num_layers)]


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unscanned parameters (`block0` ... `block{num_layers-1}`) -> the `scan_layers`
    layout: one `blocks` subtree whose arrays are the layers' stacked on axis 0.

    Works at any depth of a nested dict (BERT's blocks sit under `bert/`), on unboxed
    arrays (`nn.unbox`); everything but the blocks is returned as it was.
    """
    names = [f"block{i}" for i in range(num_layers)]
    if names[0] in params:
        if f"block{num_layers}" in params or not all(n in params for n in names):
            raise ValueError(f"parameters do not hold exactly {num_layers} blocks "
                             f"block0..block{num_layers - 1}: {sorted(params)}")
        rest = {k: v for k, v in params.items() if k not in names}
        return rest | {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs),
                                              *(params[n] for n in names))}
    return {k: stack_layers(v, num_layers) if isinstance(v, Mapping) else v
            for k, v in params.items()}


def unstack_layers(params: dict) -> dict:
    """The `scan_layers` layout -> `block0`, `block1`, ... (the inverse of `stack_layers`)."""
    if "blocks" in params:
        stacked = params["blocks"]
        count = jax.tree.leaves(stacked)[0].shape[0]
        rest = {k: v for k, v in params.items() if k != "blocks"}
        return rest | {f"block{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                       for i in range(count)}
    return {k: unstack_layers(v) if isinstance(v, Mapping) else v for k, v in params.items()}


def _find(tree, key: str):
    """The first subtree stored under `key` at any depth of a nested dict, or None."""
    if not isinstance(tree, Mapping):
        return None
    if key in tree:
        return tree[key]
    return next((found for v in tree.values() if (found := _find(v, key)) is not None), None)


def match_layout(params: dict, like: dict) -> dict:
    """`params` in the layer layout of `like`: stacked (`scan_layers`) or one subtree per
    layer, converting with `stack_layers` / `unstack_layers` where the two differ. Works
    on arrays and on ShapeDtypeStructs (under jax.eval_shape)."""
    stacked = _find(like, "blocks")
    if stacked is not None and _find(params, "blocks") is None:
        return stack_layers(params, jax.tree.leaves(stacked)[0].shape[0])
    if stacked is None and _find(params, "blocks") is not None:
        return unstack_layers(params)
    return params
