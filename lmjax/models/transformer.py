"""Decoder-only Transformer LM with nanoGPT's architecture and common options."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from lmjax.models import layers
from lmjax.models.registry import MODELS


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
    attention: str = "auto"  # or "xla", "cudnn", "reference": see layers.resolve_attention
    # The embedding is padded to a multiple of this (nanoGPT pads 50257 -> 50304) so
    # the vocabulary divides any tensor-parallel degree; padded logits are masked out.
    vocab_multiple: int = 64

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


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, deterministic: bool,
                 cache: layers.KVCache | None = None):
        c = self.config
        norm = functools.partial(layers.norm, c.norm, c.use_bias, c.compute_dtype)
        y = layers.CausalSelfAttention(
            c.num_heads, c.head_dim, c.num_layers, c.dropout, c.use_bias,
            c.position == "rope", c.compute_dtype, c.attention, name="attn",
        )(norm("norm1")(x), positions, deterministic, cache)
        if cache is not None:
            y, cache = y
        x = x + y
        x = x + layers.Mlp(
            c.mlp_ratio * c.embed_dim, c.num_layers, c.mlp, c.dropout, c.use_bias,
            c.compute_dtype, name="mlp",
        )(norm("norm2")(x), deterministic)
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        return x if cache is None else (x, cache)


class GPT(nn.Module):
    """tokens (batch, length) int -> logits (batch, length, padded_vocab) float32.

    Logits of padding entries beyond `vocab_size` are -inf-like, so losses and sampling
    see exactly `vocab_size` classes.

    With `cache` (one `layers.KVCache` per layer, see `init_cache`) the tokens sit at
    `positions` (batch, length) of each row; their keys and values are written into the
    cache and attention reads it, so a prompt is prefilled once and each new token costs
    one position. Returns `(logits, cache)` then.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True, *,
                 cache: list[layers.KVCache] | None = None, positions: jax.Array | None = None):
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
        if cache is None:
            block = nn.remat(Block, static_argnums=(3,)) if c.remat else Block
            for i in range(c.num_layers):
                x = block(c, name=f"block{i}")(x, positions, deterministic)
            return x, None
        new_cache = []
        for i in range(c.num_layers):  # no remat: decoding keeps no activations for backprop
            x, layer_cache = Block(c, name=f"block{i}")(x, positions, deterministic, cache[i])
            new_cache.append(layer_cache)
        return x, new_cache


def init_cache(config: GPTConfig, batch: int, max_length: int | None = None,
               dtype=jnp.float32) -> list[layers.KVCache]:
    """An empty KV cache for `batch` rows of up to `max_length` (default block_size) tokens."""
    length = max_length or config.block_size
    return [layers.KVCache.zeros(batch, length, config.num_heads, config.head_dim, dtype)
            for _ in range(config.num_layers)]

