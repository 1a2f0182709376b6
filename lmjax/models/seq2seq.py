"""Encoder-decoder Transformer (Vaswani et al. 2017) for translation.

Built from the layers the GPT and BERT use (`layers.CausalSelfAttention`, `layers.Mlp`,
`layers.norm`, `layers.Dense`) plus `layers.CrossAttention`. One embedding matrix is
shared by the source, the decoder input and the output projection (a joint
sentencepiece vocabulary, "tied" three ways as in the paper). Options: post-LayerNorm
(the paper) or pre-LayerNorm (trains more easily, with a final norm after each stack),
sinusoidal or learned positions, dropout on embeddings, residual branches and attention
probabilities. Every parameter carries logical axis names (`vocab`, `embed`, `heads`,
`mlp`, `position`), so the rule tables of `lmjax.parallel.rules` shard it.

Token id `pad_id` marks padding: encoder self-attention and cross-attention never look
at padded source positions, and decoder self-attention is causal, so padding after a
target sequence changes nothing before it.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from lmjax.models import layers
from lmjax.models.registry import MODELS

# One layer's decoding cache: its self-attention KVCache and the cross-attention keys
# and values of the source, each (batch, source length, heads, head_dim).
LayerCache = tuple[layers.KVCache, tuple[jax.Array, jax.Array]]


@MODELS.register("Seq2SeqConfig")
@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(layers.DerivedSizes):
    """Hyperparameters; defaults are the paper's base model (6+6 layers, 512 wide, 8 heads,
    MLP 2048, dropout 0.1, label smoothing 0.1) with pre-LayerNorm."""

    vocab_size: int = 8000
    max_len: int = 256  # longest source or target sequence (positions)
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    embed_dim: int = 512
    mlp_dim: int = 2048
    dropout: float = 0.1  # embeddings and residual branches
    attention_dropout: float = 0.1
    label_smoothing: float = 0.1
    norm_position: str = "pre"  # or "post" (the paper)
    position: str = "sinusoidal"  # or "learned"
    mlp: str = "relu"  # or "gelu", "swiglu"
    use_bias: bool = True
    pad_id: int = 0
    bos_id: int = 2  # the decoder's start token
    eos_id: int = 3
    dtype: str = "float32"  # compute dtype; parameters stay float32
    attention: str = "auto"  # see layers.resolve_attention
    vocab_multiple: int = 64  # padded vocabulary, as in GPTConfig

    def module(self) -> nn.Module:
        return EncoderDecoder(self)

    @property
    def num_layers(self) -> int:
        return self.num_encoder_layers + self.num_decoder_layers

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by "
                             f"num_heads={self.num_heads}")
        choices = {"norm_position": ("pre", "post"), "position": ("sinusoidal", "learned"),
                   "mlp": ("relu", "gelu", "swiglu"), "attention": layers.ATTENTION_CHOICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Seq2SeqConfig.{name}={getattr(self, name)!r}; use one of "
                                 f"{', '.join(allowed)}")
        for name in ("dropout", "attention_dropout", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"Seq2SeqConfig.{name}={getattr(self, name)} is outside [0, 1)")


def _norm(c: Seq2SeqConfig, name: str | None) -> nn.Module:
    return layers.norm("layernorm", True, c.compute_dtype, name)


def _self_attention(c: Seq2SeqConfig, causal: bool,
                    name: str | None = "attn") -> layers.CausalSelfAttention:
    return layers.CausalSelfAttention(
        c.num_heads, c.head_dim, c.num_layers, c.dropout, c.use_bias, False, c.compute_dtype,
        c.attention, causal=causal, attention_dropout=c.attention_dropout, name=name)


def _mlp(c: Seq2SeqConfig, name: str | None = "mlp") -> layers.Mlp:
    return layers.Mlp(c.mlp_dim, c.num_layers, c.mlp, c.dropout, c.use_bias, c.compute_dtype,
                      name=name)


def _residual(c: Seq2SeqConfig, x: jax.Array, norm: nn.Module, sublayer) -> jax.Array:
    """Pre-LN: x + f(LN(x)); post-LN (the paper): LN(x + f(x)). f applies its dropout."""
    if c.norm_position == "pre":
        return x + sublayer(norm(x))
    return norm(x + sublayer(x))


class EncoderBlock(nn.Module):
    config: Seq2SeqConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        """x (batch, length, embed); mask (batch, 1, 1, length), False at padding."""
        c = self.config
        positions = jnp.zeros(x.shape[:2], jnp.int32)  # unused without rope
        attn = _self_attention(c, causal=False)
        x = _residual(c, x, _norm(c, "norm1"),
                      lambda h: attn(h, positions, deterministic, mask=mask))
        x = _residual(c, x, _norm(c, "norm2"), lambda h: _mlp(c)(h, deterministic))
        return layers.constrain(x, ("batch", "length", "act_embed"))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the source, MLP.

    Without `cache` (training) the cross-attention projects `context`; with one
    (decoding) it reads the source's keys and values from the cache, the self-attention
    writes this step's keys and values at `positions`, and the block returns
    `(x, new cache)`."""

    config: Seq2SeqConfig

    def setup(self):
        c = self.config
        self.attn = _self_attention(c, causal=True, name=None)
        self.cross = layers.CrossAttention(c.num_heads, c.head_dim, c.embed_dim, c.num_layers,
                                           c.dropout, c.attention_dropout, c.use_bias,
                                           c.compute_dtype, c.attention)
        self.mlp = _mlp(c, name=None)
        self.norm1, self.norm2, self.norm3 = (_norm(c, None) for _ in range(3))

    def keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.cross.keys_values(context)

    def __call__(self, x: jax.Array, positions: jax.Array, context: jax.Array | None,
                 src_mask: jax.Array, deterministic: bool, cache: LayerCache | None = None):
        c = self.config
        self_cache = None if cache is None else cache[0]
        cross_kv = self.keys_values(context) if cache is None else cache[1]

        def self_attention(h):
            nonlocal self_cache
            if self_cache is None:
                return self.attn(h, positions, deterministic)
            y, self_cache = self.attn(h, positions, deterministic, self_cache)
            return y

        x = _residual(c, x, self.norm1, self_attention)
        x = _residual(c, x, self.norm2, lambda h: self.cross(h, cross_kv, src_mask, deterministic))
        x = _residual(c, x, self.norm3, lambda h: self.mlp(h, deterministic))
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        return x if cache is None else (x, (self_cache, cross_kv))


class EncoderDecoder(nn.Module):
    """(source (batch, S), decoder input (batch, T)) int -> logits (batch, T, padded_vocab)
    float32; logits beyond `vocab_size` are -inf-like.

    `encode`, `decode` and `init_cache` are the pieces decoding calls separately (through
    `model.apply(..., method=...)`): the source is encoded once, its cross-attention keys
    and values computed once, and each new target token costs one cached decoder step.
    """

    config: Seq2SeqConfig

    def setup(self):
        c = self.config
        # The paper scales embeddings by sqrt(embed_dim); with an init of std
        # embed_dim^-0.5 the scaled inputs have unit variance and the tied output
        # projection starts small.
        self.embed = nn.Embed(c.padded_vocab, c.embed_dim, dtype=c.compute_dtype,
                              embedding_init=layers.init(c.embed_dim ** -0.5, ("vocab", "embed")))
        if c.position == "learned":
            shape = (c.max_len, c.embed_dim)
            self.enc_wpe = self.param("enc_wpe", layers.init(0.02, ("position", "embed")), shape)
            self.dec_wpe = self.param("dec_wpe", layers.init(0.02, ("position", "embed")), shape)
        self.encoder = [EncoderBlock(c, name=f"encoder{i}") for i in range(c.num_encoder_layers)]
        self.decoder = [DecoderBlock(c, name=f"decoder{i}") for i in range(c.num_decoder_layers)]
        if c.norm_position == "pre":
            self.encoder_norm = _norm(c, "encoder_norm")
            self.decoder_norm = _norm(c, "decoder_norm")
        self.drop = nn.Dropout(c.dropout)

    def _embed(self, tokens: jax.Array, positions: jax.Array, table: str,
               deterministic: bool) -> jax.Array:
        """Scaled token embeddings plus positions (batch, length) -> (batch, length, embed)."""
        c = self.config
        if tokens.shape[1] > c.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {c.max_len}")
        x = self.embed(tokens) * jnp.asarray(c.embed_dim ** 0.5, c.compute_dtype)
        if c.position == "learned":
            pos = jnp.take(getattr(self, table), positions, axis=0, mode="clip")
        else:
            pos = jnp.take(layers.sinusoidal_positions(c.max_len, c.embed_dim), positions,
                           axis=0, mode="clip")
        x = self.drop(x + pos.astype(c.compute_dtype), deterministic=deterministic)
        return layers.constrain(x, ("batch", "length", "act_embed"))

    def encode(self, src: jax.Array, deterministic: bool = True) -> jax.Array:
        """src (batch, S) -> the encoder's output (batch, S, embed)."""
        positions = jnp.broadcast_to(jnp.arange(src.shape[1]), src.shape)
        x = self._embed(src, positions, "enc_wpe", deterministic)
        mask = self.source_mask(src)
        for block in self.encoder:
            x = block(x, mask, deterministic)
        return self.encoder_norm(x) if self.config.norm_position == "pre" else x

    def source_mask(self, src: jax.Array) -> jax.Array:
        """(batch, S) -> (batch, 1, 1, S): True at real source tokens."""
        return (src != self.config.pad_id)[:, None, None, :]

    def decode(self, tgt_in: jax.Array, encoded: jax.Array | None, src_mask: jax.Array,
               deterministic: bool = True, *, cache: list[LayerCache] | None = None,
               positions: jax.Array | None = None):
        """Decoder logits (batch, T, padded_vocab) for inputs `tgt_in` (batch, T).

        With `cache` (from `init_cache`) the tokens sit at `positions` (batch, T) and
        `encoded` is not read; returns `(logits, cache)` then."""
        c = self.config
        if (cache is None) != (positions is None):
            raise ValueError("cached decoding needs both `cache` and `positions`")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tgt_in.shape[1]), tgt_in.shape)
        x = self._embed(tgt_in, positions, "dec_wpe", deterministic)
        new_cache = []
        for i, block in enumerate(self.decoder):
            if cache is None:
                x = block(x, positions, encoded, src_mask, deterministic)
            else:
                x, layer_cache = block(x, positions, None, src_mask, deterministic, cache[i])
                new_cache.append(layer_cache)
        if c.norm_position == "pre":
            x = self.decoder_norm(x)
        logits = self.embed.attend(x).astype(jnp.float32)  # tied output projection
        logits = layers.constrain(logits, ("batch", "length", "act_vocab"))
        valid = jnp.arange(c.padded_vocab) < c.vocab_size
        logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, encoded: jax.Array, max_length: int,
                   dtype=jnp.float32) -> list[LayerCache]:
        """Per decoder layer: an empty self-attention cache for `max_length` target
        positions and the source's cross-attention keys and values (computed once)."""
        c = self.config
        batch = encoded.shape[0]
        return [(layers.KVCache.zeros(batch, max_length, c.num_heads, c.head_dim, dtype),
                 block.keys_values(encoded)) for block in self.decoder]

    def __call__(self, src: jax.Array, tgt_in: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        encoded = self.encode(src, deterministic)
        return self.decode(tgt_in, encoded, self.source_mask(src), deterministic)
