"""`MODELS`: config class name -> frozen config dataclass whose `module()` builds the model.

A model registers its config where it is defined (`@MODELS.register("GPTConfig")`), so a
new model is one module file; lmjax/configs.py makes every registered config (also ones
registered later, e.g. by a module a gin file imports) configurable under its name.
"""

from lmjax.registry import Registry

MODELS: Registry[type] = Registry("model")
