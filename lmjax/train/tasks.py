"""Tasks: what the one trainer needs to know about a model family and its data.

A task bundles the model config and its Flax module, the arguments that initialise it,
the loss (with metrics), an evaluation step that returns *sums* (so metrics over many
batches are exact, e.g. accuracy and F1 over the whole dev set), the input pipelines and
an optional carried state: an RNN's hidden state handed from one training batch to the
next (truncated BPTT). The trainer stores that carry in the train state, so it is
sharded with the batch and checkpointed, and a resumed run continues exactly.

Every user of a model goes through a task: the trainer, `bench`, `eval`, the serving
stack and the parameter-server workers. `train.task` picks one by name
(lmjax/train/registry.py builds it with its data).
"""

import abc
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding

from lmjax.data import pipelines
from lmjax.parallel.mesh import to_global

Batch = dict[str, Any]
Carry = Any  # a pytree whose leaves have the batch as leading axis, or None


class Task(abc.ABC):
    """The interface the trainer uses. `data` may be None where only the model is needed
    (serving, parameter shapes); the input pipelines then cannot be used."""

    config: Any  # the model config, with the sizes the data decided (vocabulary, classes)
    model: nn.Module
    throughput_key: str = "tokens_per_sec"  # name of the train record's items/s field

    @abc.abstractmethod
    def init_args(self) -> tuple[jax.Array, ...]:
        """Positional arguments of `model.init` after the rng (batch of one)."""

    def init_carry(self, batch_size: int) -> Carry:
        """The carried state at the start of training (None: nothing carried)."""
        del batch_size
        return None

    @abc.abstractmethod
    def loss(self, params, batch: Batch, carry: Carry, rng, deterministic: bool
             ) -> tuple[jax.Array, tuple[dict, Carry]]:
        """(mean loss, (metrics, next carry)); `rng` is None when deterministic."""

    @abc.abstractmethod
    def eval_sums(self, params, batch: Batch, carry: Carry) -> tuple[dict, Carry]:
        """Sums over one eval batch that `finish_eval` turns into metrics."""

    def eval_carry(self, batch_size: int) -> Carry:
        return self.init_carry(batch_size)

    @abc.abstractmethod
    def finish_eval(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from sums added over all eval batches; always has `loss`."""

    @abc.abstractmethod
    def train_iterator(self, batch_size: int, seed: int):
        """Checkpointable iterator (`get_state`/`set_state`) of global-batch shares."""

    @abc.abstractmethod
    def eval_batches(self, batch_size: int, num_batches: int, seed: int) -> list[Batch]:
        """A fixed list of eval batches, the same at every evaluation."""

    @abc.abstractmethod
    def items_per_step(self, batch_size: int) -> int:
        """Tokens (or examples) one step of `batch_size` rows trains on."""

    def train_examples(self):
        """Random-access grain MapDataset of single training examples (dicts), in their
        stored order: the parameter server's workers shuffle and deal them out."""
        raise NotImplementedError(f"{type(self).__name__} has no random-access training "
                                  "examples, so the parameter server cannot train it")

    def extra_eval(self, params, step: int, final: bool) -> dict[str, float]:
        """Metrics computed outside the jitted eval sums (e.g. BLEU of decoded text),
        merged into the eval record at `step` (`final`: the run's last step)."""
        del params, step, final
        return {}

    def warm_start(self, params):
        """Params of a fresh run before its first step (fine-tuning loads pretrained ones);
        `params` are already placed on the mesh."""
        return params


def _rngs(rng) -> dict | None:
    return None if rng is None else {"dropout": rng}


class LMTask(Task):
    """Next-token prediction on random windows of a token stream (the GPT recipe).

    The model config needs `block_size` (the window length); its module maps tokens
    (batch, length) to logits (batch, length, vocab).
    """

    def __init__(self, config, data: pipelines.LMData | None = None):
        self.config, self.data = config, data
        self.model, self.length = config.module(), config.block_size

    def init_args(self):
        return (jnp.zeros((1, self.length), jnp.int32),)

    def loss(self, params, batch, carry, rng, deterministic):
        logits = self.model.apply({"params": params}, batch["inputs"],
                                  deterministic=deterministic, rngs=_rngs(rng))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        return loss, ({}, carry)

    def eval_sums(self, params, batch, carry):
        loss, _ = self.loss(params, batch, carry, None, True)
        return {"loss": loss, "batches": jnp.ones((), jnp.float32)}, carry

    def finish_eval(self, sums):
        return {"loss": sums["loss"] / sums["batches"]}

    def train_iterator(self, batch_size, seed):
        return pipelines.train_iterator(self.data.train, self.length, batch_size, seed)

    def eval_batches(self, batch_size, num_batches, seed):
        return pipelines.eval_batches(self.data.eval, self.length, batch_size, num_batches, seed)

    def items_per_step(self, batch_size):
        return batch_size * self.length

    def train_examples(self):
        return pipelines.window_examples(self.data.train, self.length)


def binary_counts(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict:
    """Weighted correct / true-positive / false-positive / false-negative counts.

    logits: (batch, classes); labels, weights: (batch,). Class 1 is the positive class.
    """
    pred = jnp.argmax(logits, axis=-1)
    pos_pred, pos_true = (pred == 1), (labels == 1)
    return {
        "correct": jnp.sum(weights * (pred == labels)),
        "tp": jnp.sum(weights * (pos_pred & pos_true)),
        "fp": jnp.sum(weights * (pos_pred & ~pos_true)),
        "fn": jnp.sum(weights * (~pos_pred & pos_true)),
    }


def classification_metrics(sums: dict[str, float]) -> dict[str, float]:
    """loss, accuracy and F1 (positive class 1) from summed counts."""
    count = max(float(sums["count"]), 1.0)
    tp, fp, fn = (float(sums[k]) for k in ("tp", "fp", "fn"))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count,
            "f1": f1, "examples": float(sums["count"])}


class ClassifyTask(Task):
    """Sequence classification: model(inputs, mask) -> logits (batch, classes).

    Batches are `{"inputs", "mask", "label", "weight"}`; eval pads the last batch with
    weight-0 rows so every dev example counts exactly once.
    """

    throughput_key = "examples_per_sec"

    def __init__(self, config, data: pipelines.ClassificationData):
        self.config, self.data, self.model = config, data, config.module()

    def init_args(self):
        length = self.data.max_length
        return jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.bool_)

    def _logits(self, params, batch, rng, deterministic):
        return self.model.apply({"params": params}, batch["inputs"], batch["mask"],
                                deterministic=deterministic, rngs=_rngs(rng))

    def logits(self, params, batch):
        """(batch, classes) logits of the deterministic model."""
        return self._logits(params, batch, None, True)

    def loss(self, params, batch, carry, rng, deterministic):
        logits = self._logits(params, batch, rng, deterministic)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        weights = batch["weight"]
        loss = jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        accuracy = jnp.sum(weights * (jnp.argmax(logits, -1) == batch["label"]))
        return loss, ({"accuracy": accuracy / jnp.maximum(jnp.sum(weights), 1.0)}, carry)

    def eval_sums(self, params, batch, carry):
        logits = self._logits(params, batch, None, True)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        sums = binary_counts(logits, batch["label"], batch["weight"])
        sums.update(loss=jnp.sum(per_example * batch["weight"]), count=jnp.sum(batch["weight"]))
        return sums, carry

    def finish_eval(self, sums):
        return classification_metrics(sums)

    def train_iterator(self, batch_size, seed):
        return pipelines.classification_iterator(self.data.train, batch_size, seed)

    def eval_batches(self, batch_size, num_batches, seed):
        del seed  # the whole dev split, in its stored order
        return pipelines.classification_eval_batches(self.data.eval, batch_size, num_batches)

    def items_per_step(self, batch_size):
        return batch_size

    def train_examples(self):
        return grain.MapDataset.source(self.data.train)


def add_sums(total: dict | None, sums: dict) -> dict:
    """Host-side float64 accumulation of eval sums."""
    sums = {k: np.float64(v) for k, v in sums.items()}
    if total is None:
        return sums
    return {k: total[k] + sums[k] for k in total}


def evaluate(task: Task, eval_fn, params, batches: list[dict], batch_size: int,
             sharding: NamedSharding | None = None) -> dict:
    """The task's eval metrics over `batches` (sums added on the host in float64).

    `eval_fn(params, batch, carry) -> (sums, carry)`; with `sharding`, batches and the
    carry are placed on its mesh."""
    carry = task.eval_carry(batch_size)
    if sharding is not None:
        carry = jax.device_put(carry, sharding)
    pending, total = [], None
    for batch in batches:
        batch = batch if sharding is None else to_global(batch, sharding)
        sums, carry = eval_fn(params, batch, carry)
        pending.append(sums)
        if len(pending) > 1:  # at most two in flight, as in the training loop
            jax.block_until_ready(pending[-2])
    for sums in jax.device_get(pending):
        total = add_sums(total, sums)
    return task.finish_eval(total)


class StreamLMTask(Task):
    """Language modelling with truncated BPTT: each batch row is a contiguous stream.

    model(tokens, carry, resets, deterministic, targets) -> (per-token losses, carry).
    The carry after one batch is the start of the next (kept in the train state, so
    checkpointed); it is reset where `resets` marks the start of a stream or document.
    Gradients stop at batch boundaries (the carry enters the step as data). Eval runs the
    held-out stream the same way, carrying the state across its fixed batches.
    """

    def __init__(self, config, data: pipelines.LMData | None = None):
        """`config` needs `block_size` and `zero_carry(batch)`, the carry of zeros."""
        self.config, self.data = config, data
        self.model, self.length = config.module(), config.block_size
        self.zero_carry = config.zero_carry

    def init_args(self):
        return (jnp.zeros((1, self.length), jnp.int32), self.zero_carry(1),
                jnp.zeros((1, self.length), jnp.bool_))

    def init_carry(self, batch_size):
        return self.zero_carry(batch_size)

    def _losses(self, params, batch, carry, rng, deterministic):
        """Per-token cross-entropy and the new carry: the model is given the targets (the
        RNN LM's head then computes the loss without handing out the logits)."""
        return self.model.apply({"params": params}, batch["inputs"], carry, batch["resets"],
                                deterministic=deterministic, targets=batch["targets"],
                                rngs=_rngs(rng))

    def loss(self, params, batch, carry, rng, deterministic):
        losses, carry = self._losses(params, batch, carry, rng, deterministic)
        return losses.mean(), ({}, jax.lax.stop_gradient(carry))

    def eval_sums(self, params, batch, carry):
        losses, carry = self._losses(params, batch, carry, None, True)
        return {"loss": losses.sum(), "tokens": jnp.asarray(losses.size, jnp.float32)}, carry

    def finish_eval(self, sums):
        return {"loss": sums["loss"] / sums["tokens"]}

    def train_iterator(self, batch_size, seed):
        del seed  # streams are read in order; that is what makes the carry meaningful
        return pipelines.stream_iterator(self.data.train, self.length, batch_size)

    def eval_batches(self, batch_size, num_batches, seed):
        del seed
        return pipelines.stream_batches(self.data.eval, self.length, batch_size, num_batches)

    def items_per_step(self, batch_size):
        return batch_size * self.length
