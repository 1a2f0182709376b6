"""The in-process transport: every role in one process, driven by a virtual clock.

A discrete-event simulation: a worker's gradient takes a virtual compute time drawn
from its delay model, arrives at every shard when it finishes, and the shards apply it
as the policy says. Gradients are computed for real (the same jitted function as a
worker process), so losses are real; only time is simulated. Events with equal times
run in the order they were scheduled, and every random draw comes from the seed, so a
run is deterministic.
"""

import dataclasses
import heapq
import itertools

import numpy as np
from tqdm import tqdm

from lmjax.ps import sharding
from lmjax.ps.config import PSConfig
from lmjax.ps.policies import make_policy
from lmjax.ps.server import ServerCore
from lmjax.ps.worker import WorkerCore, initial_params, make_grad_fn, make_task, worker_batches
from lmjax.registry import Registry
from lmjax.train.metrics import MetricWriter

DELAYS: Registry = Registry("delay")


@DELAYS.register("fixed")
def fixed_delay(config: PSConfig, worker: int, rng: np.random.Generator) -> float:
    return config.compute_time * slowdown(config, worker)


@DELAYS.register("lognormal")
def lognormal_delay(config: PSConfig, worker: int, rng: np.random.Generator) -> float:
    """Heavy-tailed: the median is the fixed time, log(time) has standard deviation sigma."""
    return config.compute_time * slowdown(config, worker) * float(rng.lognormal(0.0, config.sigma))


def slowdown(config: PSConfig, worker: int) -> float:
    return config.slowdown[worker] if worker < len(config.slowdown) else 1.0


@dataclasses.dataclass
class Result:
    records: list[dict]  # one per applied update (from shard 0), then one per worker
    params: dict  # final flat parameters, all shards merged


class Simulation:
    """Servers, workers and an event queue of (time, order, kind, worker)."""

    def __init__(self, config: PSConfig, data):
        """`data`: the data of ps.task (LMData for 'lm', ClassificationData for 'classify')."""
        self.task = make_task(config, data)
        self.config = config = dataclasses.replace(config, model=self.task.config)
        policy = make_policy(config)
        params = initial_params(self.task, config.seed)
        self.plan = sharding.plan_shards({k: v.shape for k, v in params.items()},
                                         config.num_servers)
        self.servers = [ServerCore(k, part, config, policy)
                        for k, part in enumerate(self.plan.split(params))]
        grad_fn = make_grad_fn(self.task)
        examples = self.task.train_examples()
        self.workers = [
            WorkerCore(w, config, policy, self.plan, grad_fn,
                       worker_batches(examples, config.batch_size, config.num_workers, w,
                                      config.seed))
            for w in range(config.num_workers)]
        self.rngs = [np.random.default_rng([config.seed, w]) for w in range(config.num_workers)]
        self.queue: list = []
        self.order = itertools.count()
        self.waiting: dict[int, float] = {}  # worker -> virtual time it started waiting
        self.idle = [0.0] * config.num_workers
        self.now = 0.0

    def schedule(self, time: float, kind: str, worker: int) -> None:
        heapq.heappush(self.queue, (time, next(self.order), kind, worker))

    def statuses(self):
        return [s.status() for s in self.servers]

    def fetch_and_start(self, w: int) -> None:
        worker = self.workers[w]
        if worker.wants_fetch():
            if not worker.may_pull(self.statuses()):
                self.waiting.setdefault(w, self.now)
                return
            worker.take([s.params for s in self.servers], self.statuses())
        delay = DELAYS.get(self.config.delay)(self.config, w, self.rngs[w])
        self.schedule(self.now + delay, "done", w)

    def finish(self, w: int) -> list[dict]:
        pushes = self.workers[w].step()
        records = []
        for server, push in zip(self.servers, pushes or [], strict=False):
            applied = server.receive(push, self.now)
            if server.shard == 0:
                records.extend(applied)
        self.schedule(self.now, "fetch", w)
        for other in sorted(self.waiting):  # a push may release workers waiting to pull
            if self.workers[other].may_pull(self.statuses()):
                self.idle[other] += self.now - self.waiting.pop(other)
                self.schedule(self.now, "fetch", other)
        return records

    def run(self, writer: MetricWriter | None = None) -> Result:
        for w in range(self.config.num_workers):
            self.schedule(0.0, "fetch", w)
        records = []
        bar = tqdm(total=self.config.num_updates, desc="ps inproc", unit="update", leave=False)
        while self.servers[0].version < self.config.num_updates and self.queue:
            self.now, _, kind, w = heapq.heappop(self.queue)
            if kind == "fetch":
                self.fetch_and_start(w)
                continue
            new = self.finish(w)
            records.extend(new)
            bar.update(len(new))
            for record in new:
                if writer:
                    writer.write(record)
        bar.close()
        finals = self.worker_records()
        if writer:
            for record in finals:
                writer.write(record)
        params = self.plan.merge([s.params_numpy() for s in self.servers])
        return Result(records + finals, params)

    def worker_records(self) -> list[dict]:
        step = self.servers[0].version
        for w, start in self.waiting.items():
            self.idle[w] += self.now - start
        return [{"split": "worker", "step": step, "worker": w, "gradients": worker.clock,
                 "idle_fraction": self.idle[w] / self.now if self.now else 0.0,
                 "throttled": worker.throttled, "pushed_bytes": worker.pushed_bytes,
                 "pulled_bytes": worker.pulled_bytes}
                for w, worker in enumerate(self.workers)]


def run_inproc(*, workdir: str | None, config: PSConfig, data) -> Result:
    """Runs the whole parameter server in virtual time; writes DIR/metrics.jsonl if workdir."""
    writer = MetricWriter(workdir, resume_step=0) if workdir else None
    try:
        return Simulation(config, data).run(writer)
    finally:
        if writer:
            writer.close()
