"""Loading a trained language model for serving, and the `sample` command.

Serving reads three things from a workdir: the run's config (config.gin, parsed by the
CLI), the tokenizer training saved and the best checkpoint's parameters. It reads no
corpus and builds no optimiser or train step.
"""

import dataclasses
import os

import jax

from lmjax.data.tokenizers import Tokenizer, load_tokenizer
from lmjax.models import GPTConfig
from lmjax.parallel import RULES, make_mesh
from lmjax.serve.generate import Decoder, SamplingParams, generate
from lmjax.train.checkpoint import best_params
from lmjax.train.config import TrainConfig
from lmjax.train.state import abstract_params
from lmjax.train.tasks import LMTask


@dataclasses.dataclass
class Loaded:
    """A trained model ready to serve: its task, float32 parameters on the host, the
    tokenizer and the checkpoint's step."""

    task: LMTask
    params: dict
    tokenizer: Tokenizer
    step: int


def load_best(workdir: str, config: TrainConfig) -> Loaded:
    """The best checkpoint of `workdir` (trained with `config`), read-only, on the host."""
    if config.task != "lm" or not isinstance(config.model, GPTConfig):
        raise ValueError(
            f"{workdir} trained train.task={config.task!r} with "
            f"{type(config.model).__name__}; sample and serve need a GPT language model "
            "(train.model = @GPTConfig(), train.task = 'lm'); a translation run translates "
            "with `lmjax translate`")
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer in {tokenizer_dir}; is {workdir} a training "
                                "workdir? (train first with `lmjax train --workdir=...`)")
    tokenizer = load_tokenizer(tokenizer_dir)
    task = LMTask(dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size))
    mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    params, step = best_params(os.path.abspath(workdir),
                               abstract_params(task, mesh, RULES.get("data_parallel")))
    return Loaded(task, jax.device_get(params), tokenizer, step)


def sample(loaded: Loaded, prompt: str, options: SamplingParams) -> str:
    """`prompt` continued by the loaded model (KV-cached generation)."""
    ids = loaded.tokenizer.encode(prompt)
    if len(ids) == 0:
        raise ValueError("the prompt is empty; give at least one character")
    out = generate(Decoder(loaded.task.model), loaded.params, [ids], options)[0]
    return prompt + loaded.tokenizer.decode(out.tokens)
