"""Consistency policies: when a server applies gradients and when a worker may pull.

A policy answers three questions, on both transports alike:
- `collect`: given the gradients waiting at a shard, which (if any) to apply now;
- `may_pull`: may a worker that has computed `clock` gradients read the parameters now;
- `staleness`: how stale an applied gradient is, in the policy's own unit.
"""

import dataclasses

from lmjax.ps.config import PSConfig
from lmjax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Status:
    """What a shard publishes: updates applied, complete rounds (min worker clock), done."""

    version: int = 0
    rounds: int = 0
    done: bool = False
    clocks: tuple[int, ...] = ()


@dataclasses.dataclass
class Push:
    """One worker's gradient for one shard, with the versions it was computed from."""

    worker: int
    clock: int  # index of the worker's step that produced it (0, 1, ...)
    version: int  # the shard's version the worker read
    rounds: int  # the shard's complete rounds at that read
    loss: float
    grads: dict  # {name: payload}, the shard's gradients as ps.compression encoded them
    pushed_bytes: int = 0  # the worker's totals so far, for the metrics
    pulled_bytes: int = 0
    slot: int = -1  # inbox slot (jax_distributed), for replay after a server restart


class Policy:
    """Defaults: asynchronous apply on arrival, pull the latest parameters without waiting."""

    def __init__(self, config: PSConfig):
        self.config = config

    def collect(self, pending: list[Push], version: int) -> tuple[list[Push] | None, list[Push]]:
        """(gradients to apply now or None, gradients left waiting)."""
        if not pending:
            return None, pending
        return pending[:1], pending[1:]

    def may_pull(self, clock: int, last_version: int, status: Status) -> bool:
        return True

    def fetch_due(self, clock: int) -> bool:
        return True

    def push_due(self, clock: int) -> bool:
        return True

    def staleness(self, push: Push, version: int) -> int:
        """Zhang et al.'s tau: updates applied since the worker read the parameters."""
        return version - push.version


POLICIES: Registry[type[Policy]] = Registry("policy")


@POLICIES.register("bsp")
class Synchronous(Policy):
    """Bulk synchronous: wait for the gradients of all workers on the current version."""

    def round_size(self) -> int:
        return self.config.num_workers

    def collect(self, pending, version):
        current = [p for p in pending if p.version == version]  # late ones are dropped
        if len(current) < self.round_size():
            return None, current
        current.sort(key=lambda p: p.worker)  # a fixed summation order on both transports
        return current[: self.round_size()], []

    def may_pull(self, clock, last_version, status):
        return status.version > last_version or status.done


@POLICIES.register("backup")
class BackupWorkers(Synchronous):
    """Chen et al. 2016: apply the first N of N + b gradients; the b late ones are dropped."""

    def round_size(self) -> int:
        return self.config.num_active

    def collect(self, pending, version):
        current = [p for p in pending if p.version == version]
        if len(current) < self.round_size():
            return None, current
        first = sorted(current[: self.round_size()], key=lambda p: p.worker)  # arrival order
        return first, []


@POLICIES.register("async")
class Downpour(Policy):
    """Apply each gradient on arrival; pull every n_fetch and push every n_push steps."""

    def fetch_due(self, clock):
        return clock % self.config.n_fetch == 0

    def push_due(self, clock):
        return (clock + 1) % self.config.n_push == 0


@POLICIES.register("ssp")
class StaleSynchronous(Policy):
    """Ho et al. 2013: a worker at clock c reads only once every worker has reached c - s.

    Staleness is counted in clocks: c minus the complete rounds in the parameters read.
    """

    def may_pull(self, clock, last_version, status):
        bound = self.config.staleness_bound
        return bound < 0 or status.rounds >= clock - bound or status.done

    def staleness(self, push, version):
        return push.clock - push.rounds


@POLICIES.register("softsync")
class SoftSynchronous(Policy):
    """Zhang et al. 2016 n-softsync: apply the mean of the first lambda / n arrivals."""

    def collect(self, pending, version):
        size = self.config.num_workers // self.config.softsync_n
        if len(pending) < size:
            return None, pending
        return pending[:size], pending[size:]


def make_policy(config: PSConfig) -> Policy:
    return POLICIES.get(config.policy)(config)
