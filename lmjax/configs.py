"""Where gin meets lmjax: the config dataclasses, registered under their binding names.

Gin configures the dataclasses themselves, so a binding names a field: `train.batch_size`
is `TrainConfig.batch_size`, `mesh.data` is `MeshConfig.data`, `ps.num_workers` is
`PSConfig.num_workers`, `GPTConfig.num_layers` is a field of the model config. Every
model config in `lmjax.models.MODELS` is configurable under its class name, including
ones registered later by a module that a gin file imports (`import my_model`). No other
module of lmjax imports gin; commands turn the bindings into plain objects with `bound`.
"""

import os

import gin

from lmjax.data.config import ClassifyDataConfig, FinetuneConfig, LMDataConfig, PretrainDataConfig
from lmjax.models import MODELS
from lmjax.parallel.mesh import MeshConfig
from lmjax.ps.config import PSConfig
from lmjax.train.config import TrainConfig

BINDINGS: dict[str, type] = {
    "train": TrainConfig,
    "mesh": MeshConfig,
    "ps": PSConfig,
    "dataset": LMDataConfig,
    "classify_dataset": ClassifyDataConfig,
    "pretrain_data": PretrainDataConfig,
    "finetune": FinetuneConfig,
}
_CONFIGURABLE = {cls: gin.external_configurable(cls, name) for name, cls in BINDINGS.items()}
MODELS.subscribe(lambda name, cls: gin.external_configurable(cls, name))


def bound(cls: type):
    """An instance of the config class `cls` with the parsed gin bindings applied."""
    return _CONFIGURABLE[cls]()


def parse(files: list[str], bindings: list[str]) -> None:
    """Parses gin files and bindings; raises ValueError naming a bad file or binding."""
    for path in files:
        if not os.path.exists(path):
            raise ValueError(f"gin file {path!r} does not exist")
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=True)
    except (ValueError, KeyError, SyntaxError, ImportError, TypeError, OSError) as err:
        raise ValueError(f"bad gin config: {err}") from err


def config_text() -> str:
    """The parsed configuration as gin text (what `train` saves as WORKDIR/config.gin)."""
    return gin.config_str()
