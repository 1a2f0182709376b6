"""What each process of a jax_distributed run does: serve a shard or work.

Process ids: 0 is the coordinator (the supervisor, or the coordinator role on a
cluster), 1..S are the server shards, S+1..S+N the workers.
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np

from lmjax.models import MODELS
from lmjax.ps import sharding
from lmjax.ps.codecs import make_codec
from lmjax.ps.config import PSConfig, parse_fault
from lmjax.ps.kv import (
    ShardClient,
    ShardPublisher,
    SignedStore,
    dead_key,
    encode_arrays,
    fault_key,
)
from lmjax.ps.policies import make_policy
from lmjax.ps.server import ServerCheckpoints, ServerCore
from lmjax.ps.worker import WorkerCore, initial_params, make_grad_fn, worker_batches
from lmjax.registry import Registry
from lmjax.train.metrics import MetricWriter
from lmjax.train.registry import TASKS

HOLE_SECONDS = 5.0  # a claimed slot no one reported dead, left empty this long, is skipped
FAULT_WAIT_SECONDS = 60  # a shard at a fault's update waits this long for the supervisor
LIVENESS_SECONDS = 1.0
MAX_BACKLOG = 64  # gradients applied between two publications at most


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a role process needs, written by the launcher to DIR/ps_spec.json."""

    workdir: str
    model: dict  # {"name": a name in lmjax.models.MODELS, "fields": its config's fields}
    config: dict  # the PSConfig's other fields
    dataset: dict  # the fields of ps.task's data config (LMDataConfig for 'lm')
    coordinator: str  # host:port
    bench: bool = False  # lmjax/ps/bench.py: measure raw KV transfers, then no-compute updates

    @classmethod
    def create(cls, workdir: str, config: PSConfig, data_config,
               coordinator: str, bench: bool = False) -> "RunSpec":
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        model = fields.pop("model")
        return cls(workdir, {"name": type(model).__name__, "fields": dataclasses.asdict(model)},
                   fields, dataclasses.asdict(data_config), coordinator, bench)

    @property
    def model_config(self):
        return MODELS.get(self.model["name"])(**self.model["fields"])

    @property
    def ps(self) -> PSConfig:
        fields = {**self.config, "slowdown": tuple(self.config["slowdown"]),
                  "faults": tuple(self.config["faults"])}
        return PSConfig(model=self.model_config, **fields)

    @property
    def data_config(self):
        return TASKS.get(self.config["task"]).data(**self.dataset)

    def task(self):
        """ps.task's Task through the registry; its data loads here (the tokenizer comes
        from WORKDIR/tokenizer, saved by the launcher)."""
        return TASKS.get(self.ps.task).build(self.model_config, self.data_config, self.workdir)

    @property
    def num_processes(self) -> int:
        return 1 + self.ps.num_servers + self.ps.num_workers

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "RunSpec":
        with open(path) as f:
            return cls(**json.load(f))


def role_of(process_id: int, config: PSConfig) -> tuple[str, int]:
    if process_id == 0:
        return "coordinator", 0
    if process_id <= config.num_servers:
        return "server", process_id - 1
    return "worker", process_id - 1 - config.num_servers


def _plan(spec: RunSpec, task):
    params = initial_params(task, spec.ps.seed)
    plan = sharding.plan_shards({k: v.shape for k, v in params.items()}, spec.ps.num_servers)
    return params, plan


ROLES: Registry = Registry("role")


@ROLES.register("server")
def run_server(spec: RunSpec, shard: int, store: SignedStore, incarnation: int = 0) -> None:
    del incarnation  # a restarted shard goes on from its checkpoint
    config = spec.ps
    params, plan = _plan(spec, spec.task())
    core = ServerCore(shard, plan.split(params)[shard], config, make_policy(config))
    checkpoints = ServerCheckpoints(spec.workdir, shard)
    publisher = ShardPublisher(store, plan, shard, make_codec(config))
    meta = checkpoints.restore(core) or {"cursor": 1, "floor": 1, "pending": []}
    # Gradients queued at the checkpoint are still in the inbox: read them back.
    core.pending = [publisher.read(slot, 60_000) for slot in meta["pending"]]
    publisher.cursor = meta["cursor"]
    writer = MetricWriter(spec.workdir, core.version) if shard == 0 else None
    core.warm_up()
    start = float(store.wait("ps/start", 600_000))
    publisher.publish(core.status(), core.params_numpy())
    store.set(f"ps/ready/server{shard}", "1")
    state = {"floor": meta["floor"], "hole": None, "live": 0.0, "start": start,
             "faults": _faults_of(config, shard)}
    while not core.status().done:
        push = publisher.read(publisher.cursor)
        if push is None:
            _idle(core, publisher, store, config, state)
            continue
        state["hole"] = None
        applied = _apply_backlog(core, push, publisher, checkpoints, writer, state)
        publisher.publish(core.status(), core.params_numpy() if applied else None)
        _stop_at_faults(store, state["faults"], core.version)
    store.set(f"ps/final/server{shard}", json.dumps({"refused": len(store.refused)}))
    checkpoints.close()
    if writer:
        writer.close()


def _apply_backlog(core: ServerCore, push, publisher, checkpoints, writer, state) -> bool:
    """Applies the gradients waiting in the inbox, at most MAX_BACKLOG, so the caller
    publishes once per batch (one parameter upload); stops at an update a fault names.
    Returns whether any update was applied."""
    applied = False
    for _ in range(MAX_BACKLOG):
        publisher.cursor = push.slot + 1
        records = core.receive(push, time.time() - state["start"])
        applied = applied or bool(records)
        for record in records if writer else ():
            writer.write(record)
        if records and (core.version % core.config.checkpoint_every == 0 or core.status().done):
            _checkpoint(core, checkpoints, publisher, state)
        if core.status().done or any(at <= core.version for at in state["faults"]):
            break
        push = publisher.try_read(publisher.cursor)
        if push is None:
            break
    return applied


def _checkpoint(core: ServerCore, checkpoints, publisher, state: dict) -> None:
    """Saves, then deletes the inbox slots the checkpoint covers (acknowledged updates)."""
    pending = [p.slot for p in core.pending]
    floor = min([*pending, publisher.cursor])
    checkpoints.save(core, {"version": core.version, "clocks": core.clocks,
                            "cursor": publisher.cursor, "floor": floor, "pending": pending})
    publisher.forget(range(state["floor"], floor))
    state["floor"] = floor


def _faults_of(config: PSConfig, shard: int) -> dict[int, list[int]]:
    """{update: indices into ps.faults} of the faults this shard stops at: its own
    (`server{shard}@N`) and, on shard 0, every worker's."""
    due: dict[int, list[int]] = {}
    for index, fault in enumerate(config.faults):
        kind, role_index, at = parse_fault(fault, config)
        if (kind, role_index) == ("server", shard) or (kind == "worker" and shard == 0):
            due.setdefault(at, []).append(index)
    return due


def _stop_at_faults(store: SignedStore, faults: dict[int, list[int]], version: int) -> None:
    """At the update a fault names, reports it and waits until the supervisor has killed
    the role, so the fault fires at exactly that update. A shard restarted after its own
    fault passes the update again without stopping."""
    for at in sorted(at for at in faults if at <= version):
        for index in faults.pop(at):
            if store.try_get(fault_key(index, "reached")) is not None:
                continue
            store.set(fault_key(index, "reached"), str(version))
            if store.get(fault_key(index, "done"), FAULT_WAIT_SECONDS * 1000) is None:
                print(f"no supervisor acted on ps.faults[{index}] within "
                      f"{FAULT_WAIT_SECONDS} s; going on", flush=True)


def _idle(core: ServerCore, publisher, store: SignedStore, config: PSConfig,
          state: dict) -> None:
    """No gradient arrived: refresh which workers live (SSP rounds skip dead ones) and
    skip an inbox slot that will never be written.

    The supervisor reports dead workers under `ps/dead/` (`get_live_nodes` cannot serve
    here: it is a barrier that every listed process must enter).
    """
    now = time.time()
    if now - state["live"] > LIVENESS_SECONDS:
        state["live"] = now
        alive = _alive(store, config)
        if alive != core.alive:
            core.alive = alive
            publisher.publish(core.status(), None)
    if _abandoned(publisher, store, state, now):
        publisher.cursor += 1
        state["hole"] = None


def _alive(store: SignedStore, config: PSConfig) -> set[int]:
    """Workers not reported dead for good (a restarting worker still counts)."""
    notices = dict(store.dir_get("ps/dead/"))
    return {w for w in range(config.num_workers)
            if json.loads(notices.get(dead_key(w), b'{"restarting": true}'))["restarting"]}


def _abandoned(publisher, store: SignedStore, state: dict, now: float) -> bool:
    """Whether the inbox slot at the cursor will never be written: its claim is forged, or
    its taker died between claiming and writing it (the supervisor's notice names that
    incarnation: skipped at once), or it stayed empty for HOLE_SECONDS (nobody told)."""
    slot = publisher.cursor
    taken, claim = publisher.claim(slot)
    if not taken:
        state["hole"] = None
        return False
    if claim is None:
        print(f"inbox slot {slot}: its claim is forged; skipped", flush=True)
        return True
    notice = store.try_get(dead_key(claim["worker"]))
    if notice is not None and json.loads(notice)["incarnation"] >= claim["incarnation"]:
        print(f"inbox slot {slot}: worker{claim['worker']} died before writing it; skipped",
              flush=True)
        return True
    state["hole"] = state["hole"] or now
    if now - state["hole"] > HOLE_SECONDS:
        print(f"inbox slot {slot}: empty for {HOLE_SECONDS} s; skipped", flush=True)
        return True
    return False


@ROLES.register("worker")
def run_worker(spec: RunSpec, index: int, store: SignedStore, incarnation: int = 0) -> None:
    config = spec.ps
    task = spec.task()
    _, plan = _plan(spec, task)
    shards = [ShardClient(store, plan, k, owner=(index, incarnation))
              for k in range(config.num_servers)]
    first = shards[0].status()[0]
    grad_fn = echo_grads if spec.bench else make_grad_fn(task)
    core = WorkerCore(index, config, make_policy(config), plan, grad_fn,
                      worker_batches(task.train_examples(), config.batch_size,
                                     config.num_workers, index, config.seed),
                      clock=first.clocks[index])  # a restarted worker goes on from its clock
    # Compile before the start, so a slow compile does not make the first gradient stale.
    jax.block_until_ready(grad_fn(sharding.unflatten(initial_params(task, 0)),
                                  core.batches[core.clock]))
    store.set(f"ps/ready/worker{index}", "1")
    for other in range(config.num_workers):  # start together (a restarted worker passes)
        store.wait(f"ps/ready/worker{other}", config.join_timeout * 1000)
    start, idle = time.time(), 0.0
    while True:
        if core.wants_fetch():
            waited = time.time()
            statuses = _wait_for_pull(core, shards)
            idle += time.time() - waited
            if statuses is None:
                break
            due = [core.pull_due(k, st) for k, st in enumerate(statuses)]
            parts = [s.pull(st.version) if d else None
                     for s, st, d in zip(shards, statuses, due, strict=True)]
            if any(d and p is None for d, p in zip(due, parts, strict=True)):
                continue  # a newer version replaced it meanwhile
            core.take(parts, statuses)
        elif shards[0].status()[0].done:
            break
        began = time.time()
        pushes = core.step()
        _straggle(config, index, time.time() - began)
        for shard, push in zip(shards, pushes or [], strict=False):
            shard.push(push)
    seconds = time.time() - start
    final = {"gradients": core.clock, "idle_fraction": idle / max(seconds, 1e-9),
             "seconds": seconds, "throttled": core.throttled, "refused": len(store.refused),
             "pushed_bytes": core.pushed_bytes, "pulled_bytes": core.pulled_bytes}
    store.set(f"ps/final/worker{index}", json.dumps(final))


def _straggle(config: PSConfig, index: int, seconds: float) -> None:
    """A worker with slow-down factor f takes f times its real compute time."""
    factor = config.slowdown[index] if index < len(config.slowdown) else 1.0
    if factor > 1:
        time.sleep((factor - 1) * seconds)


def raw_phase(spec: RunSpec, role: str, client) -> None:
    """The raw store between the worker (sender) and the server (echo); others skip."""
    rounds = spec.ps.num_updates
    # The very bytes the parameter server moves: the initial parameters, in plan order
    # (the store compresses, so random bytes would not compare).
    params = initial_params(spec.task(), spec.ps.seed)
    payload = encode_arrays(sorted(params), params)
    size = len(payload)
    if role == "server":
        for i in range(rounds):
            client.blocking_key_value_get_bytes(f"bench/up/{i}", 600_000)
            client.key_value_delete(f"bench/up/{i}")
            client.key_value_set_bytes(f"bench/down/{i}", payload)
    elif role == "worker":
        start = time.perf_counter()
        for i in range(rounds):
            client.key_value_set_bytes(f"bench/up/{i}", payload)
            client.blocking_key_value_get_bytes(f"bench/down/{i}", 600_000)
            client.key_value_delete(f"bench/down/{i}")
        seconds = time.perf_counter() - start
        with open(os.path.join(spec.workdir, "bench_raw.json"), "w") as f:
            json.dump({"bytes": 2 * size * rounds, "seconds": seconds}, f)


def echo_grads(params, batch):
    """The benchmark's stand-in for the model, without compute: the parameters themselves
    as gradients, so pushes carry bytes as varied as pulls (the store compresses)."""
    del batch
    return 0.0, {k: np.array(v, copy=True) for k, v in sharding.flatten(params).items()}



def _wait_for_pull(core: WorkerCore, shards: list[ShardClient]):
    """Statuses once the policy lets this worker read every shard; None when the run ended."""
    while True:
        pairs = [s.status() for s in shards]
        statuses = [status for status, _ in pairs]
        if any(s.done for s in statuses):
            return None
        if core.may_pull(statuses):
            return statuses
        blocked = next(k for k, s in enumerate(statuses) if not core.may_pull_shard(k, s))
        shards[blocked].wait_change(pairs[blocked][1])


def read_finals(store: SignedStore, config: PSConfig) -> dict[str, dict]:
    """The final records the roles left, by role name (`worker0`, `server0`, ...)."""
    names = [f"worker{w}" for w in range(config.num_workers)]
    names += [f"server{k}" for k in range(config.num_servers)]
    finals = {name: store.try_get(f"ps/final/{name}") for name in names}
    return {name: json.loads(text) for name, text in finals.items() if text is not None}


def write_final_records(workdir: str, version: int, finals: dict[str, dict]) -> None:
    """After the run's last update: one `"split": "worker"` record per worker, then one
    `"split": "server"` record per shard."""
    writer = MetricWriter(workdir, version)
    for name, final in sorted(finals.items(), key=lambda item: item[0].startswith("server")):
        role = name.rstrip("0123456789")
        writer.write({"split": role, "step": version, role: int(name[len(role):]), **final})
    writer.close()
