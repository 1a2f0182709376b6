"""Loading a trained translation model, and the `translate` command.

Reads what `sample` reads (the run's config.gin, WORKDIR/tokenizer and the best
checkpoint's parameters) and nothing of the corpus: the languages, the length limit and
what to do with longer sentences come from the run's `translation.*` bindings.
"""

import dataclasses
import os
import sys

import jax
import numpy as np

from lmjax.data import translation
from lmjax.data.config import TranslationDataConfig
from lmjax.data.tokenizers import Tokenizer, load_tokenizer
from lmjax.models import Seq2SeqConfig
from lmjax.parallel import RULES, make_mesh
from lmjax.train.checkpoint import best_params
from lmjax.train.config import TrainConfig
from lmjax.train.registry import seq2seq_config
from lmjax.train.seq2seq_task import Seq2SeqTask, translate_ids
from lmjax.train.state import abstract_params


@dataclasses.dataclass
class LoadedTranslator:
    """A trained encoder-decoder: its task, host parameters, tokenizer, data config and
    the checkpoint's step."""

    task: Seq2SeqTask
    params: dict
    tokenizer: Tokenizer
    data: TranslationDataConfig
    step: int

    @property
    def pair(self) -> tuple[str, str]:
        return translation.parse_pair(self.data.pair)


def load_best(workdir: str, config: TrainConfig, data: TranslationDataConfig) -> LoadedTranslator:
    """The best checkpoint of the translation run in `workdir`, on the host."""
    if config.task != "seq2seq" or not isinstance(config.model, Seq2SeqConfig):
        raise ValueError(
            f"{workdir} trained train.task={config.task!r} with {type(config.model).__name__}; "
            "translate needs an encoder-decoder (train.model = @Seq2SeqConfig(), "
            "train.task = 'seq2seq')")
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer in {tokenizer_dir}; is {workdir} a training "
                                "workdir? (train first with `lmjax train --workdir=...`)")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = seq2seq_config(config.model, tokenizer.vocab_size, data.max_length)
    task = Seq2SeqTask(model, None, data)
    mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    params, step = best_params(os.path.abspath(workdir),
                               abstract_params(task, mesh, RULES.get("data_parallel")))
    return LoadedTranslator(task, jax.device_get(params), tokenizer, data, step)


def encode_lines(loaded: LoadedTranslator, lines: list[str], name: str) -> list[np.ndarray]:
    """Token ids of each line (EOS appended); a line longer than the model's maximum is
    cut with a warning or refused, as the run's `translation.too_long` says."""
    out = []
    for number, line in enumerate(lines, start=1):
        ids = loaded.tokenizer.encode(line)
        if len(ids) + 1 > loaded.data.max_length and loaded.data.too_long == "truncate":
            print(f"warning: {name}:{number} has {len(ids) + 1} tokens with EOS; translating "
                  f"its first {loaded.data.max_length}", file=sys.stderr)
        out.append(translation.fit_length(ids, loaded.data.max_length, loaded.data.too_long,
                                          f"{name}:{number}"))
    return out


def translate_lines(loaded: LoadedTranslator, lines: list[str], *, beam: int = 4,
                    alpha: float = 0.6, batch_size: int = 64, name: str = "input") -> list[str]:
    """One detokenised translation per line (an empty line gives an empty line)."""
    text = [line.strip() for line in lines]
    keep = [i for i, line in enumerate(text) if line]
    sources = encode_lines(loaded, [text[i] for i in keep], name)
    hyps = translate_ids(loaded.task.config, loaded.params, sources, loaded.tokenizer,
                         beam=beam, alpha=alpha, batch_size=batch_size)
    out = [""] * len(lines)
    for i, hyp in zip(keep, hyps, strict=True):
        out[i] = hyp
    return out
