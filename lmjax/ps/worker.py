"""A worker: pulls parameters, computes the language-model loss gradient on its data
shard (through lmjax.train.tasks.LMTask, the trainer's task), pushes.

Worker w reads rows w, w + N, w + 2N, ... of one seeded shuffled stream of training
windows, `batch_size` rows per step, so at step c the N workers together hold exactly
the rows of batch c of a single process with batch N * batch_size.
"""

import dataclasses
import functools

import grain
import jax
import numpy as np
from flax import linen as nn

from lmjax.data.pipelines import Windows
from lmjax.ps import codecs, sharding
from lmjax.ps.config import PSConfig
from lmjax.ps.policies import Policy, Push, Status
from lmjax.train.state import init_params
from lmjax.train.tasks import LMTask


def _pairs(window: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": window[..., :-1], "targets": window[..., 1:]}


def worker_batches(tokens: np.ndarray, length: int, batch_size: int, num_workers: int,
                   index: int, seed: int) -> grain.MapDataset:
    """Random-access batches of worker `index` (batch c = its step c, so restarts resume)."""
    ds = grain.MapDataset.source(Windows(tokens, length)).shuffle(seed=seed).repeat()
    return ds[index::num_workers].batch(batch_size, drop_remainder=True).map(_pairs)


@functools.lru_cache(maxsize=4)
def _task(model_config) -> LMTask:
    """The language-model task of `model_config` (a frozen, hashable config): one per
    config, so simulations with many runs compile each function once."""
    return LMTask(model_config)


@functools.lru_cache(maxsize=4)
def _init_fn(model_config):
    task = _task(model_config)
    return jax.jit(lambda key: nn.unbox(init_params(task, key)))


def initial_params(model_config, seed: int) -> dict:
    """Flat {name: numpy array} of fresh parameters (the same for every process)."""
    return jax.device_get(sharding.flatten(_init_fn(model_config)(jax.random.key(seed))))


def param_shapes(model_config) -> dict[str, tuple[int, ...]]:
    """Shapes only: traces, so it creates no backend (a supervisor must not have one yet)."""
    task = _task(model_config)
    boxed = jax.eval_shape(lambda: init_params(task, jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in sharding.flatten(nn.unbox(boxed)).items()}


@functools.lru_cache(maxsize=4)
def make_grad_fn(model_config):
    """jit((params, batch) -> (loss, grads)) of the task's training loss, without dropout."""
    task = _task(model_config)

    def loss_fn(params, batch):
        return task.loss(params, batch, None, None, True)[0]

    return jax.jit(jax.value_and_grad(loss_fn))


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
        self.compressor = codecs.Compressor(self.config)

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

    def take(self, parts: list[dict], statuses: list[Status]) -> None:
        self.params = sharding.unflatten(self.plan.merge(parts))
        self.pushes = [n if s.version == v else 0
                       for n, s, v in zip(self.pushes, statuses, self.versions, strict=True)]
        self._waiting = False
        self.versions = [s.version for s in statuses]
        self.rounds = [s.rounds for s in statuses]
        self.pulled_bytes += sum(nbytes(p) for p in parts)

    def step(self) -> list[Push] | None:
        """Computes one gradient; returns one Push per shard when a push is due, its
        gradients encoded by ps.compression ({name: payload}, lmjax/ps/codecs.py)."""
        loss, grads = self.grad_fn(self.params, self.batches[self.clock])
        grads = jax.device_get(sharding.flatten(grads))
        if self._accum is None:
            self._accum = {k: np.array(v, copy=True) for k, v in grads.items()}
        else:
            for k, v in grads.items():
                self._accum[k] += v
        self._count += 1
        self._losses.append(float(loss))
        clock, self.clock = self.clock, self.clock + 1
        if not self.policy.push_due(clock):
            return None
        mean = {k: v / np.float32(self._count) for k, v in self._accum.items()}
        loss_mean = float(np.mean(self._losses))
        self._accum, self._count, self._losses = None, 0, []
        parts = [self.compressor.encode(part, codecs.push_rng(self.config, self.index, clock, k))
                 for k, part in enumerate(self.plan.split(mean))]
        self.pushed_bytes += sum(codecs.payload_bytes(p) for part in parts for p in part.values())
        self.pushes = [n + 1 for n in self.pushes]
        return [Push(self.index, clock, self.versions[k], self.rounds[k], loss_mean, part,
                     self.pushed_bytes, self.pulled_bytes) for k, part in enumerate(parts)]
