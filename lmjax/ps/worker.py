"""A worker: pulls parameters, computes the loss gradient of its task on its data shard
(the trainer's Task, built through lmjax.train.registry.TASKS), pushes.

Worker w reads rows w, w + N, w + 2N, ... of one seeded shuffled stream of training
examples, `batch_size` rows per step, so at step c the N workers together hold exactly
the rows of batch c of a single process with batch N * batch_size.
"""

import dataclasses
import functools

import grain
import jax
import numpy as np
from flax import linen as nn

from lmjax.ps import codecs, sharding, sparse
from lmjax.ps.config import PSConfig
from lmjax.ps.policies import Policy, Push, Status
from lmjax.ps.pull import ParamCache
from lmjax.train.state import init_params
from lmjax.train.tasks import LMTask, Task


def make_task(config: PSConfig, data) -> Task:
    """ps.task's Task for ps.model on already loaded data (the registry sizes the model)."""
    from lmjax.train.registry import TASKS

    return TASKS.get(config.task).from_data(config.model, data)


def worker_batches(examples: grain.MapDataset, batch_size: int, num_workers: int,
                   index: int, seed: int) -> grain.MapDataset:
    """Random-access batches of worker `index` (batch c = its step c, so restarts resume)."""
    ds = examples.shuffle(seed=seed).repeat()
    return ds[index::num_workers].batch(batch_size, drop_remainder=True)


@functools.lru_cache(maxsize=8)
def _model_task(task_type: type, model_config) -> Task:
    """A task of `model_config` without data (the loss needs only the model): one per
    config, so simulations with many runs compile each function once."""
    return task_type(model_config, None)


@functools.lru_cache(maxsize=8)
def _init_fn(task_type: type, model_config, arg_shapes):
    del arg_shapes  # part of the cache key only
    return jax.jit(lambda key, *args: nn.unbox(
        _model_task(task_type, model_config).model.init(key, *args)["params"]))


def initial_params(task: Task, seed: int) -> dict:
    """Flat {name: numpy array} of fresh parameters (the same for every process)."""
    args = task.init_args()
    init = _init_fn(type(task), task.config, tuple(a.shape for a in args))
    return jax.device_get(sharding.flatten(init(jax.random.key(seed), *args)))


def task_shapes(task: Task) -> dict[str, tuple[int, ...]]:
    """Shapes of the task's parameters only: traces, so it creates no backend (a
    supervisor must not have one yet)."""
    boxed = jax.eval_shape(lambda: init_params(task, jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in sharding.flatten(nn.unbox(boxed)).items()}


def param_shapes(model_config) -> dict[str, tuple[int, ...]]:
    """Shapes of a language model's parameters."""
    return task_shapes(LMTask(model_config))


@functools.lru_cache(maxsize=8)
def _grad_fn(task_type: type, model_config):
    task = _model_task(task_type, model_config)

    def loss_fn(params, batch):
        return task.loss(params, batch, None, None, True)[0]

    return jax.jit(jax.value_and_grad(loss_fn))


def make_grad_fn(task: Task):
    """jit((params, batch) -> (loss, grads)) of the task's training loss, without dropout."""
    return _grad_fn(type(task), task.config)


def nbytes(tree: dict) -> int:
    return sum(int(np.asarray(v).nbytes) for v in tree.values())


@dataclasses.dataclass
class WorkerCore:
    """One worker's state machine; transports call wants_fetch/may_pull/take/step."""

    index: int
    config: PSConfig
    policy: Policy
    plan: sharding.ShardPlan
    grad_fn: object
    batches: grain.MapDataset
    clock: int = 0  # gradients computed so far (a restarted worker starts at its server clock)
    pushed_bytes: int = 0
    pulled_bytes: int = 0

    def __post_init__(self):
        self.params = None
        self.versions = [-1] * self.plan.num_shards
        self.rounds = [0] * self.plan.num_shards
        self.pushes = [0] * self.plan.num_shards  # pushes from the version held, per shard
        self.throttled = 0  # pulls that waited because of ps.max_pushes_per_version
        self._waiting = False
        self._accum: dict | None = None
        self._count = 0
        self._losses: list[float] = []
        self._batch: tuple[int, dict] | None = None  # (clock, batch) of the next step
        self.compressor = codecs.Compressor(self.config)
        self.tables = sparse.tables_of(self.config)
        self._rows = np.zeros(0, np.int32)  # table rows touched since the last push
        self.cache = ParamCache(self.config.pull_filter_threshold, self.tables)

    def wants_fetch(self) -> bool:
        return self.params is None or self.policy.fetch_due(self.clock)

    def may_pull(self, statuses: list[Status]) -> bool:
        """Whether the policy and the push bound let this worker read every shard now;
        counts each pull the bound holds back once in `throttled`."""
        if any(self.at_push_bound(k, s) for k, s in enumerate(statuses)) and not self._waiting:
            self._waiting = True
            self.throttled += 1
        return all(self.may_pull_shard(k, s) for k, s in enumerate(statuses))

    def may_pull_shard(self, shard: int, status: Status) -> bool:
        return (self.policy.may_pull(self.clock, self.versions[shard], status)
                and not self.at_push_bound(shard, status))

    def at_push_bound(self, shard: int, status: Status) -> bool:
        """True while the shard still publishes the version this worker has pushed
        max_pushes_per_version gradients from: more would only add stale ones."""
        return (self.pushes[shard] >= self.config.max_pushes_per_version
                and status.version == self.versions[shard] and not status.done)

    def pull_due(self, shard: int, status: Status) -> bool:
        """Whether a pull of `shard` moves anything: the worker's copy is missing or
        ps.pull_every_versions behind, or the shard holds a sparse table (the next batch's
        rows may be missing)."""
        return (self.params is None or any(n in self.tables for n in self.plan.names[shard])
                or abs(status.version - self.versions[shard]) >= self.config.pull_every_versions)

    def take(self, parts: list[dict | None], statuses: list[Status]) -> None:
        """Pulls the shards that are due from `parts` (the shards' parameters at the
        statuses' versions; None where not due) into the worker's copy."""
        rows = sparse.touched_rows(self.next_batch()) if self.tables else None
        for k, (part, status) in enumerate(zip(parts, statuses, strict=True)):
            if not self.pull_due(k, status):
                continue
            moved = status.version != self.versions[k]
            self.pulled_bytes += self.cache.update(part, status.version, moved, rows)
            if moved:
                self.pushes[k] = 0
            self.versions[k], self.rounds[k] = status.version, status.rounds
        self._waiting = False
        self.params = sharding.unflatten(self.cache.values)

    def next_batch(self) -> dict:
        """The batch of step `clock` (read once, for the rows it touches and its step)."""
        if self._batch is None or self._batch[0] != self.clock:
            self._batch = (self.clock, self.batches[self.clock])
        return self._batch[1]

    def step(self) -> list[Push] | None:
        """Computes one gradient; returns one Push per shard when a push is due, its
        gradients encoded by ps.compression ({name: payload}, lmjax/ps/codecs.py) and its
        sparse tables as the rows the batches since the last push touched."""
        batch = self.next_batch()
        loss, grads = self.grad_fn(self.params, batch)
        grads = jax.device_get(sharding.flatten(grads))
        if self._accum is None:
            self._accum = {k: np.array(v, copy=True) for k, v in grads.items()}
        else:
            for k, v in grads.items():
                self._accum[k] += v
        if self.tables:
            self._rows = np.union1d(self._rows, sparse.touched_rows(batch)).astype(np.int32)
        self._count += 1
        self._losses.append(float(loss))
        clock, self.clock = self.clock, self.clock + 1
        if not self.policy.push_due(clock):
            return None
        mean = {k: v / np.float32(self._count) for k, v in self._accum.items()}
        loss_mean = float(np.mean(self._losses))
        self._accum, self._count, self._losses = None, 0, []
        parts = [self._encode(part, codecs.push_rng(self.config, self.index, clock, k))
                 for k, part in enumerate(self.plan.split(mean))]
        self._rows = np.zeros(0, np.int32)
        self.pushed_bytes += sum(codecs.payload_bytes(p) for part in parts for p in part.values())
        self.pushes = [n + 1 for n in self.pushes]
        return [Push(self.index, clock, self.versions[k], self.rounds[k], loss_mean, part,
                     self.pushed_bytes, self.pulled_bytes) for k, part in enumerate(parts)]

    def _encode(self, part: dict, rng: np.random.Generator) -> dict:
        """{name: payload}: the codec's for dense parameters, (row ids, rows) for tables."""
        payloads = self.compressor.encode(
            {n: v for n, v in part.items() if n not in self.tables}, rng)
        payloads.update({n: sparse.gather(v, self._rows)
                         for n, v in part.items() if n in self.tables})
        return payloads
