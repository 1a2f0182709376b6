"""BERT (Devlin et al. 2019): a post-LayerNorm Transformer encoder with pretraining and
classification heads.

Sizes follow Turc et al. 2019 ("Well-read students learn better"): `tiny` L2/H128,
`mini` L4/H256, `small` L4/H512, `medium` L8/H512, `base` L12/H768, with H/64 heads and
an MLP of 4H. Every parameter carries logical axis names, so the rule tables of
`lmjax.parallel.rules` shard it like the GPT (`vocab`, `embed`, `heads`, `mlp`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from lmjax.models import layers, megatron
from lmjax.models.registry import MODELS

# name -> (layers, hidden); heads = hidden / 64 as in Turc et al.
SIZES = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
}


@MODELS.register("BertConfig")
@dataclasses.dataclass(frozen=True)
class BertConfig(layers.DerivedSizes):
    """BERT hyperparameters. `size` picks a preset; explicit layer/width/head counts win."""

    size: str = "tiny"
    vocab_size: int = 8000
    max_len: int = 128  # learned positions
    num_layers: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    mlp_ratio: int = 4
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    num_classes: int = 2
    pad_id: int = 0
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"  # compute dtype; parameters stay float32
    vocab_multiple: int = 64  # padded vocabulary, as in GPTConfig
    # As in GPTConfig: blocks under nn.scan, parameters stacked under `bert/blocks/`.
    scan_layers: bool = False
    attention: str = "auto"  # or "xla", "cudnn", "reference": see layers.resolve_attention
    # As in GPTConfig: set from mesh.tensor_impl / mesh.sequence_parallel while training.
    tensor_impl: str = "auto"
    sequence_parallel: bool = False

    def module(self) -> nn.Module:
        return BertClassifier(self)

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"unknown BERT size {self.size!r}; known: {', '.join(SIZES)}")
        preset_layers, preset_width = SIZES[self.size]
        # A frozen dataclass fills its own defaults here; after this every field is concrete.
        if self.num_layers is None:
            object.__setattr__(self, "num_layers", preset_layers)
        if self.embed_dim is None:
            object.__setattr__(self, "embed_dim", preset_width)
        if self.num_heads is None:
            object.__setattr__(self, "num_heads", max(self.embed_dim // 64, 1))
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.attention not in layers.ATTENTION_CHOICES:
            raise ValueError(f"unknown attention {self.attention!r}; use one of "
                             f"{', '.join(layers.ATTENTION_CHOICES)}")
        if not (0 <= self.dropout < 1 and 0 <= self.attention_dropout < 1):
            raise ValueError(f"dropout={self.dropout} and attention_dropout="
                             f"{self.attention_dropout} must lie in [0, 1)")
        megatron.check_options(self.tensor_impl, self.sequence_parallel)


def _layer_norm(c: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=c.layer_norm_eps, dtype=c.compute_dtype, scale_init=layers.ones(("norm",)),
        bias_init=layers.zeros(("norm",)), name=name,
    )


def _dense(c: BertConfig, features: tuple[int, ...], names, name: str, in_axes: int = 1):
    return layers.Dense(features, names, 0.02, in_axes=in_axes, dtype=c.compute_dtype, name=name)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; `mask` (batch, 1, length, length) hides padding."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        qkv = _dense(c, (3, c.num_heads, c.head_dim), ("embed", None, "heads", "head_dim"),
                     "qkv")(x)  # (batch, length, 3, heads, head_dim)
        names = ("batch", "length", "act_heads", None)
        q, k, v = (layers.constrain(qkv[:, :, i], names) for i in range(3))
        dropout = c.attention_dropout > 0 and not deterministic
        y = layers.dot_product_attention(
            q, k, v, mask=mask, implementation=c.attention, dropout_rate=c.attention_dropout,
            dropout_rng=self.make_rng("dropout") if dropout else None,
        )  # (batch, length, heads, head_dim)
        y = _dense(c, (c.embed_dim,), ("heads", "head_dim", "embed"), "out", in_axes=2)(y)
        return nn.Dropout(c.dropout)(y, deterministic=deterministic)


class EncoderBlock(nn.Module):
    """Post-LayerNorm block: x = LN(x + attn(x)); x = LN(x + mlp(x)).

    Returns (x, None): the (carry, output) pair nn.scan wants.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array,
                 deterministic: bool) -> tuple[jax.Array, None]:
        c = self.config
        if c.tensor_impl == "shard_map" and not self.is_initializing():
            return self._megatron(x, mask, deterministic), None
        x = _layer_norm(c, "norm1")(x + SelfAttention(c, name="attn")(x, mask, deterministic))
        h = _dense(c, (c.mlp_ratio * c.embed_dim,), ("embed", "mlp"), "up")(x)
        h = layers.constrain(nn.gelu(h, approximate=False), ("batch", "length", "act_mlp"))
        h = _dense(c, (c.embed_dim,), ("mlp", "embed"), "down")(h)
        x = _layer_norm(c, "norm2")(x + nn.Dropout(c.dropout)(h, deterministic=deterministic))
        return layers.constrain(x, ("batch", "length", "act_embed")), None

    def _megatron(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        """tensor_impl='shard_map': the parameters created above (at init), run by
        lmjax/models/megatron.py as a post-norm, bidirectional block."""
        c = self.config
        spec = megatron.BlockSpec(
            "layernorm", True, "gelu", False, c.dropout, c.attention_dropout, c.attention,
            c.compute_dtype, c.sequence_parallel, causal=False, post_norm=True,
            norm_eps=c.layer_norm_eps)
        dropout = max(c.dropout, c.attention_dropout) > 0 and not deterministic
        key = self.make_rng("dropout") if dropout else None
        return megatron.block(self.variables["params"], x, key, spec, mask=mask)


class BertEncoder(nn.Module):
    """(tokens, segments) (batch, length) -> (sequence (batch, length, H), pooled (batch, H)).

    Positions whose token is `pad_id` (or, when given, where `mask` is False) are hidden
    from attention, so outputs at real positions do not depend on how much padding follows.
    """

    config: BertConfig

    def setup(self):
        c = self.config
        self.word = nn.Embed(c.padded_vocab, c.embed_dim, dtype=c.compute_dtype,
                             embedding_init=layers.init(0.02, ("vocab", "embed")))
        self.position = nn.Embed(c.max_len, c.embed_dim, dtype=c.compute_dtype,
                                 embedding_init=layers.init(0.02, ("position", "embed")))
        self.segment = nn.Embed(c.type_vocab_size, c.embed_dim, dtype=c.compute_dtype,
                                embedding_init=layers.init(0.02, ("segment", "embed")))
        self.norm = _layer_norm(c, "embed_norm")
        self.drop = nn.Dropout(c.dropout)
        if c.scan_layers:
            # (x, mask, deterministic): x carried, mask and deterministic broadcast.
            blocks = layers.scan_blocks(EncoderBlock, c.num_layers, (nn.broadcast, nn.broadcast))
            self.blocks = blocks(c, name="blocks")
        else:
            self.blocks = [EncoderBlock(c, name=f"block{i}") for i in range(c.num_layers)]
        self.pooler = _dense(c, (c.embed_dim,), ("embed", None), "pooler")

    def __call__(self, tokens: jax.Array, segments: jax.Array | None = None,
                 deterministic: bool = True,
                 mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        c = self.config
        length = tokens.shape[1]
        if length > c.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {c.max_len}")
        if segments is None:
            segments = jnp.zeros_like(tokens)
        x = self.word(tokens) + self.position(jnp.arange(length))[None] + self.segment(segments)
        x = self.drop(self.norm(x), deterministic=deterministic)
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        real = tokens != c.pad_id if mask is None else mask.astype(bool)
        mask = real[:, None, None, :]  # (batch, 1, 1, keys): every query sees the real keys
        if c.scan_layers:
            x, _ = self.blocks(x, mask, deterministic)
        else:
            for block in self.blocks:
                x, _ = block(x, mask, deterministic)
        pooled = jnp.tanh(self.pooler(x[:, 0]))  # the [CLS] position
        return x, pooled

    def attend(self, x: jax.Array) -> jax.Array:
        """x @ word_embeddings.T: the tied MLM decoder."""
        return self.word.attend(x)


class BertPretrain(nn.Module):
    """Encoder + MLM head (at `masked_positions` only) + NSP head.

    Returns mlm logits (batch, predictions, padded_vocab), padded entries masked, and
    nsp logits (batch, 2).
    """

    config: BertConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, segments: jax.Array | None = None,
                 masked_positions: jax.Array | None = None,
                 deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        c = self.config
        encoder = BertEncoder(c, name="bert")
        sequence, pooled = encoder(tokens, segments, deterministic)
        if masked_positions is None:
            masked_positions = jnp.zeros((tokens.shape[0], 1), jnp.int32)
        # (batch, predictions, H): the MLM head only runs where predictions are scored.
        picked = jnp.take_along_axis(sequence, masked_positions[..., None], axis=1)
        h = nn.gelu(_dense(c, (c.embed_dim,), ("embed", None), "mlm_transform")(picked),
                    approximate=False)
        h = _layer_norm(c, "mlm_norm")(h)
        bias = self.param("mlm_bias", layers.zeros(("vocab",)), (c.padded_vocab,))
        logits = (encoder.attend(h) + bias).astype(jnp.float32)
        valid = jnp.arange(c.padded_vocab) < c.vocab_size
        logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
        nsp = _dense(c, (2,), ("embed", None), "nsp")(pooled).astype(jnp.float32)
        return logits, nsp


class BertClassifier(nn.Module):
    """Encoder + dropout + linear head on the pooled [CLS]: logits (batch, num_classes).

    Called as the classification task calls its models: (tokens, mask); segments are
    all 0 (single sentences) unless given.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None,
                 segments: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        c = self.config
        _, pooled = BertEncoder(c, name="bert")(tokens, segments, deterministic, mask)
        pooled = nn.Dropout(c.dropout)(pooled, deterministic=deterministic)
        return _dense(c, (c.num_classes,), ("embed", None), "classifier")(pooled).astype(
            jnp.float32)
