"""Gin-configurable entry points: the only module where gin touches the library.

Binding names here are a contract used by configs and checks: `train.num_steps`,
`train.batch_size`, `train.learning_rate`, `mesh.data`, `mesh.fsdp`, `mesh.tensor`, ...
"""

import dataclasses
import inspect
import os

import gin
import jax

from lmjax.data import bert_data
from lmjax.data.pipelines import ClassificationData, LMData, load_classification_data, load_lm_data
from lmjax.models import BertConfig, BiLSTMConfig, CBoWConfig, GPTConfig, RNNConfig
from lmjax.parallel import RULES, make_mesh
from lmjax.ps.config import PSConfig
from lmjax.registry import Registry
from lmjax.train import bert_tasks, tasks, trainer

gin.external_configurable(GPTConfig, "GPTConfig")
gin.external_configurable(CBoWConfig, "CBoWConfig")
gin.external_configurable(RNNConfig, "RNNConfig")
gin.external_configurable(BiLSTMConfig, "BiLSTMConfig")
gin.external_configurable(BertConfig, "BertConfig")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@gin.configurable
def mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    rules: str = "fsdp_tensor",
    cpu_devices: int | None = None,
):
    """The device mesh (-1: the rest of the devices) and the logical-axis rule table.

    `cpu_devices` splits the host CPU into that many JAX devices (`jax_num_cpu_devices`),
    so a CPU run can be data parallel over its cores: on the 2-core reference machine
    two devices with half a batch each run the baby config's step about 1.4x faster than
    one device using both cores (experiments/shakespeare_char/README.md). It only
    affects the CPU backend; on a GPU the mesh still spans the GPUs. An explicit
    `--xla_force_host_platform_device_count` in XLA_FLAGS wins over it.
    """
    if cpu_devices is not None and _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    return make_mesh(data, fsdp, tensor), RULES.get(rules)


@gin.configurable
def dataset(
    name: str = "tiny_shakespeare",
    tokenizer: str = "char",
    vocab_size: int | None = None,
    tfds_dir: str | None = None,
    manual_dir: str | None = None,
    workdir: str | None = None,
) -> LMData:
    """Token streams of a tfds dataset; the tokenizer is saved to (or loaded from) workdir."""
    return load_lm_data(name, tokenizer=tokenizer, vocab_size=vocab_size, tfds_dir=tfds_dir,
                        manual_dir=manual_dir, tokenizer_dir=_tokenizer_dir(workdir))


@gin.configurable
def classify_dataset(
    name: str = "sst2",
    tokenizer: str = "sentencepiece",
    vocab_size: int | None = 8000,
    max_length: int = 64,
    lowercase: bool = False,
    tfds_dir: str | None = None,
    manual_dir: str | None = None,
    workdir: str | None = None,
) -> ClassificationData:
    """Padded examples of a text classification tfds dataset (train and dev splits)."""
    return load_classification_data(
        name, tokenizer=tokenizer, vocab_size=vocab_size, max_length=max_length,
        tfds_dir=tfds_dir, manual_dir=manual_dir, tokenizer_dir=_tokenizer_dir(workdir),
        lowercase=lowercase)


# train.task -> function(model config, workdir) -> (model config, data, task). The
# model config gets the sizes the data decides (vocabulary, classes).
TASKS: Registry = Registry("task")


@TASKS.register("lm")
def _lm_task(model, workdir: str):
    data = dataset(workdir=workdir)
    model = dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size)
    return model, data, tasks.LMTask(model.module(), data, model.block_size)


@TASKS.register("lm_stream")
def _stream_task(model, workdir: str):
    """Truncated BPTT over contiguous streams; `model` must define `zero_carry(batch)`."""
    data = dataset(workdir=workdir)
    model = dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size)
    return model, data, tasks.StreamLMTask(model.module(), data, model.block_size,
                                           model.zero_carry)


@TASKS.register("classify")
def _classify_task(model, workdir: str):
    data = classify_dataset(workdir=workdir)
    model = dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size,
                                num_classes=data.num_classes)
    return model, data, tasks.ClassifyTask(model.module(), data)


@gin.configurable
def pretrain_data(
    sources: tuple[str, ...] = ("wikitext2", "tiny_shakespeare", "sst2"),
    vocab_size: int = 8000,
    max_seq_len: int = 128,
    short_seq_prob: float = 0.1,
    dupe_factor: int = 5,
    seed: int = 12345,
    limit: int | None = None,
    tfds_dir: str | None = None,
    workdir: str | None = None,
) -> bert_data.PretrainData:
    """BERT pretraining examples (NSP pairs, MLM masks) of offline tfds corpora."""
    pairs = bert_data.PairConfig(max_seq_len, short_seq_prob, dupe_factor)
    return bert_data.load_pretrain_data(
        sources=tuple(sources), vocab_size=vocab_size, pairs=pairs, seed=seed, limit=limit,
        tfds_dir=tfds_dir, tokenizer_dir=_tokenizer_dir(workdir))


@gin.configurable
def finetune(
    init_workdir: str | None = None,
    init_params: bool = True,
    max_length: int = 64,
    limit: int | None = None,
    tfds_dir: str | None = None,
    workdir: str | None = None,
):
    """SST-2 for a BERT with the vocabulary of the pretraining run in `init_workdir`.

    With `init_params` the encoder starts from that run's best checkpoint; without, from
    a random initialisation (the same model trained from scratch, for comparison).
    Returns (classification data, workdir to load the encoder from or None).
    """
    tokenizer = bert_tasks.finetune_tokenizer(_tokenizer_dir(workdir), init_workdir and
                                              _tokenizer_dir(init_workdir))
    data = bert_tasks.finetune_data(tokenizer, max_length, tfds_dir, limit)
    return data, init_workdir if init_params else None


def _require_bert(model, task: str) -> None:
    if not isinstance(model, BertConfig):
        raise ValueError(f"train.task={task!r} needs train.model = @BertConfig(), got "
                         f"{type(model).__name__}")


@TASKS.register("bert_pretrain")
def _bert_pretrain_task(model, workdir: str):
    _require_bert(model, "bert_pretrain")
    data = pretrain_data(workdir=workdir)
    length = data.train.tokens.shape[1]
    model = dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size,
                                max_len=max(model.max_len, length))
    return model, data, bert_tasks.BertPretrainTask(model, data, length)


@TASKS.register("bert_finetune")
def _bert_finetune_task(model, workdir: str):
    _require_bert(model, "bert_finetune")
    data, init_workdir = finetune(workdir=workdir)
    model = dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size,
                                num_classes=data.num_classes,
                                max_len=max(model.max_len, data.max_length))
    return model, data, bert_tasks.BertFinetuneTask(model, data, init_workdir)


def _tokenizer_dir(workdir: str | None) -> str | None:
    return os.path.join(workdir, "tokenizer") if workdir else None


_DEFAULT = trainer.TrainConfig()


@gin.configurable(denylist=["workdir", "on_ready", "runner"])
def train(
    workdir: str,
    model: GPTConfig = gin.REQUIRED,
    *,
    task: str = "lm",
    num_steps: int = _DEFAULT.num_steps,
    batch_size: int = _DEFAULT.batch_size,
    learning_rate: float = _DEFAULT.learning_rate,
    min_lr: float = _DEFAULT.min_lr,
    warmup_steps: int = _DEFAULT.warmup_steps,
    decay_steps: int | None = _DEFAULT.decay_steps,
    beta1: float = _DEFAULT.beta1,
    beta2: float = _DEFAULT.beta2,
    weight_decay: float = _DEFAULT.weight_decay,
    grad_clip: float = _DEFAULT.grad_clip,
    microbatches: int = _DEFAULT.microbatches,
    steps_per_call: int = _DEFAULT.steps_per_call,
    log_every: int = _DEFAULT.log_every,
    eval_every: int = _DEFAULT.eval_every,
    eval_batches: int = _DEFAULT.eval_batches,
    eval_batch_size: int | None = _DEFAULT.eval_batch_size,
    checkpoint_every: int = _DEFAULT.checkpoint_every,
    keep_checkpoints: int = _DEFAULT.keep_checkpoints,
    seed: int = _DEFAULT.seed,
    optimizer: str = _DEFAULT.optimizer,
    on_ready=None,
    runner=trainer.train,
):
    """Trains `model` on `task` (a name in TASKS) on `mesh()`; see TrainConfig for the fields.

    `model` is any registered model config (lmjax.models.MODELS); the task reads its data
    from `dataset()` (language models) or `classify_dataset()` (classification).

    The fields are spelled out (not **kwargs) so gin rejects misspelled bindings. This
    configurable describes the whole run; `eval` and `sample` pass another `runner` that
    receives the same arguments, so they rebuild exactly the model that was trained.
    """
    values = locals()
    config = trainer.TrainConfig(**{f.name: values[f.name] for f in
                                    dataclasses.fields(trainer.TrainConfig)})
    device_mesh, rules = mesh()  # first: it may set the CPU device count
    model, data, built = TASKS.get(task)(model, workdir)
    kwargs = dict(workdir=workdir, model_config=model, data=data, config=config,
                  mesh=device_mesh, rules=rules, on_ready=on_ready)
    if "task" in inspect.signature(runner).parameters:
        kwargs["task"] = built
    elif task != "lm":
        raise ValueError(f"this command supports only train.task = 'lm', not {task!r}")
    return runner(**kwargs)


_PS = PSConfig()


@gin.configurable(denylist=["workdir", "on_ready"])
def ps(
    workdir: str,
    model: GPTConfig = gin.REQUIRED,
    *,
    transport: str = _PS.transport,
    num_servers: int = _PS.num_servers,
    num_workers: int = _PS.num_workers,
    policy: str = _PS.policy,
    backup_workers: int = _PS.backup_workers,
    staleness_bound: int = _PS.staleness_bound,
    softsync_n: int = _PS.softsync_n,
    n_fetch: int = _PS.n_fetch,
    n_push: int = _PS.n_push,
    num_updates: int = _PS.num_updates,
    batch_size: int = _PS.batch_size,
    optimizer: str = _PS.optimizer,
    learning_rate: float = _PS.learning_rate,
    lr_scaling: str = _PS.lr_scaling,
    seed: int = _PS.seed,
    delay: str = _PS.delay,
    compute_time: float = _PS.compute_time,
    slowdown: tuple = _PS.slowdown,
    sigma: float = _PS.sigma,
    port: int = _PS.port,
    checkpoint_every: int = _PS.checkpoint_every,
    max_restarts: int = _PS.max_restarts,
    faults: tuple = _PS.faults,
    heartbeat_timeout: int = _PS.heartbeat_timeout,
    join_timeout: int = _PS.join_timeout,
    on_ready=None,
):
    """A parameter-server run of `model` on `dataset()`; see lmjax/ps/config.py for the fields."""
    from lmjax.ps.run import run_ps

    values = locals()
    config = PSConfig(**{f.name: values[f.name] for f in dataclasses.fields(PSConfig)})
    config = dataclasses.replace(config, slowdown=tuple(slowdown), faults=tuple(faults))
    data = dataset(workdir=workdir)
    model = dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size)
    return run_ps(workdir=workdir, model_config=model, data=data,
                  dataset_args=_dataset_args(), config=config, on_ready=on_ready)


def _dataset_args() -> dict:
    """The `dataset` arguments in effect, so worker processes load the same data."""
    defaults = {name: p.default for name, p in inspect.signature(dataset).parameters.items()}
    args = {**defaults, **gin.get_bindings("dataset")}
    args.pop("workdir")
    return {"name": args["name"], "tfds_dir": args["tfds_dir"],
            "manual_dir": args["manual_dir"], "tokenizer": args["tokenizer"],
            "vocab_size": args["vocab_size"]}
