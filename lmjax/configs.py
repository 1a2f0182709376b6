"""Where gin meets lmjax: the config dataclasses, registered under their binding names.

Gin configures the dataclasses themselves, so a binding names a field: `train.batch_size`
is `TrainConfig.batch_size`, `mesh.data` is `MeshConfig.data`, `prune.sparsity` is
`PruneConfig.sparsity`, `ps.num_workers` is `PSConfig.num_workers`, `GPTConfig.num_layers`
is a field of the model config. Every model config in `lmjax.models.MODELS` is
configurable under its class name, including ones registered later by a module that a gin
file imports (`import my_model`). No other module of lmjax imports gin; commands turn the
bindings into plain objects with `bound`.
"""

import dataclasses
import os
import tokenize
import types
import typing

import gin

from lmjax.data.config import (
    ClassifyDataConfig,
    DistillConfig,
    FinetuneConfig,
    LMDataConfig,
    PretrainDataConfig,
    TranslationDataConfig,
)
from lmjax.models import MODELS
from lmjax.parallel.mesh import MeshConfig
from lmjax.ps.config import PSConfig
from lmjax.train.config import TrainConfig
from lmjax.train.prune import PruneConfig

BINDINGS: dict[str, type] = {
    "train": TrainConfig,
    "mesh": MeshConfig,
    "ps": PSConfig,
    "dataset": LMDataConfig,
    "classify_dataset": ClassifyDataConfig,
    "pretrain_data": PretrainDataConfig,
    "finetune": FinetuneConfig,
    "distill": DistillConfig,
    "prune": PruneConfig,
    "translation": TranslationDataConfig,
}
_CONFIGURABLE = {cls: gin.external_configurable(cls, name) for name, cls in BINDINGS.items()}
MODELS.subscribe(lambda name, cls: gin.external_configurable(cls, name))


def bound(cls: type):
    """An instance of the config class `cls` with the parsed gin bindings applied; a
    value of the wrong type (in it or in a model config it holds) raises ValueError
    naming the binding, the value and the type its field wants."""
    config = _CONFIGURABLE[cls]()
    check_types(config, _binding_name(cls))
    return config


def _binding_name(cls: type) -> str:
    return next((name for name, c in BINDINGS.items() if c is cls), cls.__name__)


def check_types(config, name: str) -> None:
    """Checks every field of the dataclass `config` (and of dataclasses inside it)
    against its annotation; `name` is the gin name its bindings start with."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            check_types(value, type(value).__name__)
        elif not _matches(value, hints[field.name]):
            raise ValueError(
                f"{name}.{field.name} = {value!r} is a {type(value).__name__}, but the field "
                f"takes {_describe(hints[field.name])}; fix the binding")


def _matches(value, hint) -> bool:
    """Whether `value` fits the annotation (ints count as floats; bools are not ints)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is tuple:  # gin writes lists as often as tuples
        element = args[0] if args else typing.Any
        return isinstance(value, tuple | list) and all(_matches(v, element) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def parse(files: list[str], bindings: list[str]) -> None:
    """Parses gin files and bindings; raises ValueError naming a bad file or binding."""
    for path in files:
        if not os.path.exists(path):
            raise ValueError(f"gin file {path!r} does not exist")
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=True)
    except (ValueError, KeyError, SyntaxError, ImportError, TypeError, OSError,
            tokenize.TokenError) as err:
        raise ValueError(f"bad gin config: {_first_line(err)}{_which(bindings)}") from err


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _which(bindings: list[str]) -> str:
    """' (in --gin_param=B)' for the first binding gin cannot parse on its own."""
    for binding in bindings:
        try:
            with gin.unlock_config():
                gin.parse_config(binding, skip_unknown=True)
        except Exception:  # noqa: BLE001  (any failure points at this binding)
            return f" (in --gin_param={binding!r})"
    return ""


def config_text() -> str:
    """The parsed configuration as gin text (what `train` saves as WORKDIR/config.gin)."""
    return gin.config_str()
