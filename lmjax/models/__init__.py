"""Model families."""

from lmjax.models.transformer import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
