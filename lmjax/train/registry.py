"""`TASKS`: `train.task` name -> how to build that task with its data.

A builder reads one data config (gin binds it under its own name: `dataset`,
`classify_dataset`, `pretrain_data`, `finetune`, `distill`), loads the data, gives the model config
the sizes the data decides (vocabulary, classes) and returns the task. The tokenizer is
saved to (or reused from) WORKDIR/tokenizer, so a resumed run, `eval`, `sample` and
`serve` encode exactly as training did.
"""

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from lmjax.data import bert_data, pipelines, translation
from lmjax.data.config import (
    ClassifyDataConfig,
    DistillConfig,
    FinetuneConfig,
    LMDataConfig,
    PretrainDataConfig,
    TranslationDataConfig,
)
from lmjax.models import BertConfig, Seq2SeqConfig
from lmjax.registry import Registry
from lmjax.train import bert_tasks, distill, seq2seq_task, tasks


@dataclasses.dataclass(frozen=True)
class TaskBuilder:
    data: type  # the data config class this task reads
    build: Callable[[Any, Any, str], tasks.Task]  # (model config, data config, workdir)
    # (model config, data already loaded) -> the task, for callers that load the data once
    # and build many tasks from it (the parameter server's workers and simulations).
    from_data: Callable[[Any, Any], tasks.Task] | None = None


TASKS: Registry[TaskBuilder] = Registry("task")


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer")


def lm_data(config: LMDataConfig, workdir: str) -> pipelines.LMData:
    return pipelines.load_lm_data(**dataclasses.asdict(config),
                                  tokenizer_dir=tokenizer_dir(workdir))


def _lm_from_data(model, data: pipelines.LMData) -> tasks.Task:
    return tasks.LMTask(dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size), data)


def _lm(model, config: LMDataConfig, workdir: str) -> tasks.Task:
    return _lm_from_data(model, lm_data(config, workdir))


def _stream(model, config: LMDataConfig, workdir: str) -> tasks.Task:
    """Truncated BPTT over contiguous streams; the model config needs `zero_carry(batch)`."""
    data = lm_data(config, workdir)
    model = dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size)
    return tasks.StreamLMTask(model, data)


def classify_data(config: ClassifyDataConfig, workdir: str) -> pipelines.ClassificationData:
    return pipelines.load_classification_data(**dataclasses.asdict(config),
                                              tokenizer_dir=tokenizer_dir(workdir))


def _sized(model, data: pipelines.ClassificationData):
    """The model config with the sizes the data decides."""
    return dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size,
                               num_classes=data.num_classes)


def _classify_from_data(model, data: pipelines.ClassificationData) -> tasks.Task:
    return tasks.ClassifyTask(_sized(model, data), data)


def _classify(model, config: ClassifyDataConfig, workdir: str) -> tasks.Task:
    return _classify_from_data(model, classify_data(config, workdir))


def _distill(model, config: DistillConfig, workdir: str) -> tasks.Task:
    """The student of `train.model` on the `classify_dataset` data, taught by the run in
    `distill.teacher_workdir`."""
    from lmjax import configs  # the student's data bindings

    teacher = distill.teacher_logits(config.teacher_workdir, workdir)
    data = classify_data(configs.bound(ClassifyDataConfig), workdir)
    transfer = None
    if config.augment:
        transfer = distill.transfer_set(data, config.teacher_workdir, workdir, config.augment,
                                        config.augment_drop, config.augment_ngram,
                                        config.augment_seed)
    return distill.DistillTask(_sized(model, data), data, teacher, config.temperature,
                               config.alpha, transfer)


def _require_bert(model, task: str) -> None:
    if not isinstance(model, BertConfig):
        raise ValueError(f"train.task={task!r} needs train.model = @BertConfig(), got "
                         f"{type(model).__name__}")


def _short_steps(config: PretrainDataConfig) -> int:
    """pretrain_data.short_steps, checked against train.steps_per_call: one compiled call
    runs batches of one length, so the switch must fall between calls."""
    from lmjax import configs
    from lmjax.train.config import TrainConfig

    per_call = configs.bound(TrainConfig).steps_per_call
    if config.short_steps % per_call:
        raise ValueError(f"pretrain_data.short_steps={config.short_steps} must be a multiple "
                         f"of train.steps_per_call={per_call}")
    return config.short_steps


def _bert_pretrain(model, config: PretrainDataConfig, workdir: str) -> tasks.Task:
    _require_bert(model, "bert_pretrain")
    pairs = bert_data.PairConfig(config.max_seq_len, config.short_seq_prob, config.dupe_factor,
                                 config.nsp)
    if config.init_workdir:  # continued pretraining keeps the run's vocabulary
        bert_tasks.pretrained_tokenizer(tokenizer_dir(workdir),
                                        tokenizer_dir(config.init_workdir),
                                        "pretrain_data.init_workdir")
    data = bert_data.load_pretrain_data(
        sources=tuple(config.sources), vocab_size=config.vocab_size, pairs=pairs,
        whole_word_mask=config.whole_word_mask, short_seq_len=config.short_seq_len,
        short_steps=_short_steps(config),
        seed=config.seed, limit=config.limit, tfds_dir=config.tfds_dir,
        tokenizer_dir=tokenizer_dir(workdir))
    length = data.train.tokens.shape[1]
    model = dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size,
                                max_len=max(model.max_len, length))
    return bert_tasks.BertPretrainTask(model, data, length, config.init_workdir)


def _bert_finetune(model, config: FinetuneConfig, workdir: str) -> tasks.Task:
    """SST-2 with the pretraining run's vocabulary; its encoder too with `init_params`."""
    _require_bert(model, "bert_finetune")
    init_dir = config.init_workdir and tokenizer_dir(config.init_workdir)
    tokenizer = bert_tasks.pretrained_tokenizer(tokenizer_dir(workdir), init_dir)
    data = bert_tasks.finetune_data(tokenizer, config.max_length, config.tfds_dir, config.limit)
    model = dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size,
                                num_classes=data.num_classes,
                                max_len=max(model.max_len, data.max_length))
    init_workdir = config.init_workdir if config.init_params else None
    return bert_tasks.BertFinetuneTask(model, data, init_workdir)


def _seq2seq(model, config: TranslationDataConfig, workdir: str) -> tasks.Task:
    """Translation with a joint vocabulary (WORKDIR/tokenizer) of the pair's train split."""
    if not isinstance(model, Seq2SeqConfig):
        raise ValueError(f"train.task='seq2seq' needs train.model = @Seq2SeqConfig(), got "
                         f"{type(model).__name__}")
    fields = ("name", "pair", "vocab_size", "max_length", "too_long", "limit", "tfds_dir",
              "manual_dir")
    data = translation.load_translation_data(
        **{f: getattr(config, f) for f in fields}, tokenizer_dir=tokenizer_dir(workdir))
    model = seq2seq_config(model, data.tokenizer.vocab_size, config.max_length)
    return seq2seq_task.Seq2SeqTask(model, data, config)


def seq2seq_config(model: Seq2SeqConfig, vocab_size: int, max_length: int) -> Seq2SeqConfig:
    """The model config with the tokenizer's vocabulary and special ids, and positions for
    the data's longest sequences (decoding may run up to twice as long)."""
    return dataclasses.replace(model, vocab_size=vocab_size, pad_id=translation.PAD,
                               bos_id=translation.BOS, eos_id=translation.EOS,
                               max_len=max(model.max_len, max_length))


TASKS.register("lm")(TaskBuilder(LMDataConfig, _lm, _lm_from_data))
TASKS.register("lm_stream")(TaskBuilder(LMDataConfig, _stream))
TASKS.register("classify")(TaskBuilder(ClassifyDataConfig, _classify, _classify_from_data))
TASKS.register("distill")(TaskBuilder(DistillConfig, _distill))
TASKS.register("bert_pretrain")(TaskBuilder(PretrainDataConfig, _bert_pretrain))
TASKS.register("bert_finetune")(TaskBuilder(FinetuneConfig, _bert_finetune))
TASKS.register("seq2seq")(TaskBuilder(TranslationDataConfig, _seq2seq))
