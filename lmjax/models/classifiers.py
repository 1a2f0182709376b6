"""Simple sentence classifiers: a continuous bag of words over learned embeddings."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from lmjax.models import layers
from lmjax.models.registry import MODELS


@MODELS.register("CBoWConfig")
@dataclasses.dataclass(frozen=True)
class CBoWConfig:
    """Mean of learned word embeddings -> MLP -> classes (the GLUE paper's CBoW baseline)."""

    vocab_size: int = 8000
    num_classes: int = 2
    embed_dim: int = 300
    hidden_dim: int = 512  # 0: a linear head
    dropout: float = 0.1

    def module(self) -> nn.Module:
        return CBoW(self)


def mlp_head(x: jax.Array, hidden_dim: int, num_classes: int, dropout: float,
             deterministic: bool) -> jax.Array:
    """(batch, features) -> dropout -> [tanh hidden layer] -> dropout -> logits (batch, classes)."""
    x = nn.Dropout(dropout)(x, deterministic=deterministic)
    if hidden_dim:
        x = jnp.tanh(layers.Dense((hidden_dim,), ("embed", "mlp"), std=0.05, name="hidden")(x))
        x = nn.Dropout(dropout)(x, deterministic=deterministic)
    return layers.Dense((num_classes,), ("mlp" if hidden_dim else "embed", None), std=0.05,
                        name="out")(x)


class CBoW(nn.Module):
    """tokens (batch, length) int, mask (batch, length) bool -> logits (batch, classes)."""

    config: CBoWConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab_size, c.embed_dim,
                     embedding_init=layers.init(0.1, ("vocab", "embed")), name="embed")(tokens)
        weights = mask.astype(x.dtype)[..., None]  # (batch, length, 1)
        mean = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)  # (batch, embed)
        return mlp_head(mean, c.hidden_dim, c.num_classes, c.dropout, deterministic)
