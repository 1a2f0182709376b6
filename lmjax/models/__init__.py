"""Model families, picked by name from configs."""

from lmjax.models.transformer import GPT, GPTConfig
from lmjax.registry import Registry

MODELS: Registry[type] = Registry("model")
MODELS.register("gpt")(GPT)

__all__ = ["GPT", "GPTConfig", "MODELS"]
