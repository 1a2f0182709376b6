"""A server shard: holds its parameters and optimiser state and applies gradients with optax.

The shard is transport-agnostic: `receive` takes one worker's gradient and returns the
records of the updates it caused; the transport decides how gradients arrive and how
the parameters are published.
"""

import functools
import json
import os
import shutil

import jax
import numpy as np
import optax

from lmjax.ps import codecs, sparse
from lmjax.ps.config import PSConfig
from lmjax.ps.policies import Policy, Push, Status
from lmjax.registry import Registry
from lmjax.train.optim import OPTIMIZERS

LR_SCALINGS: Registry = Registry("lr_scaling")
LR_SCALINGS.register("fixed")(lambda taus: 1.0)
# Zhang et al. 2016: alpha = alpha0 / <tau>, tau counted in updates since the read.
LR_SCALINGS.register("staleness")(lambda taus: 1.0 / max(1.0, float(np.mean(taus))))


def _update(tx, params, opt_state, grads, scale):
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: u * scale, updates)  # scales the learning rate
    return optax.apply_updates(params, updates), opt_state


@functools.lru_cache(maxsize=16)
def make_optimizer(name: str, learning_rate: float):
    """(optax transformation, jitted update); cached so simulations with many shards and
    runs compile each shape once."""
    # No clipping: a shard sees only its part of the gradient, so its norm means nothing.
    tx = OPTIMIZERS.get(name)(learning_rate, grad_clip=0.0)
    # No donation: in-process workers hold the very arrays they pulled (immutable snapshots).
    return tx, jax.jit(functools.partial(_update, tx))


def mean_grads(grads: list[dict]) -> dict:
    """Mean of {name: gradient} dicts, summed in the list's order (the same on every
    transport)."""
    total = {name: np.array(g, dtype=np.float32, copy=True) for name, g in grads[0].items()}
    for part in grads[1:]:
        for name, g in part.items():
            total[name] += g
    return {name: g / np.float32(len(grads)) for name, g in total.items()}


class ServerCore:
    """Parameters of one key range, their optax state, a version and the policy's queue."""

    def __init__(self, shard: int, params: dict, config: PSConfig, policy: Policy):
        self.shard = shard
        self.config = config
        self.policy = policy
        self.tx, self._update = make_optimizer(config.optimizer, config.learning_rate)
        self.params = jax.device_put(params)
        self.codec = codecs.make_codec(config)
        self.shapes = {k: tuple(v.shape) for k, v in params.items()}
        self.tables = tuple(n for n in sparse.tables_of(config) if n in params)
        self.opt_state = self.tx.init(self.params)
        self.version = 0
        self.clocks = [0] * config.num_workers
        self.alive = set(range(config.num_workers))
        self.pending: list[Push] = []
        self.bytes = {w: (0, 0) for w in range(config.num_workers)}
        self.dropped = 0

    def warm_up(self) -> None:
        """Compiles the update before workers start, so early gradients do not pile up."""
        zeros = {k: np.zeros(v.shape, np.float32) for k, v in self.params.items()}
        jax.block_until_ready(self._update(self.params, self.opt_state, zeros, np.float32(0)))

    def status(self) -> Status:
        live = [self.clocks[w] for w in sorted(self.alive)] or [max(self.clocks)]
        return Status(self.version, min(live), self.version >= self.config.num_updates,
                      tuple(self.clocks))

    def receive(self, push: Push, now: float) -> list[dict]:
        """Queues one gradient and applies whatever the policy releases; returns records."""
        self.clocks[push.worker] = max(self.clocks[push.worker], push.clock + 1)
        self.bytes[push.worker] = (push.pushed_bytes, push.pulled_bytes)
        if self.version >= self.config.num_updates:
            return []
        before = len(self.pending) + 1
        group, self.pending = self.policy.collect([*self.pending, push], self.version)
        records = []
        while group:
            records.append(self._apply(group, now))
            group, self.pending = self.policy.collect(self.pending, self.version)
        self.dropped += before - len(self.pending) - sum(len(r["workers"]) for r in records)
        return records

    def _apply(self, group: list[Push], now: float) -> dict:
        taus = [self.version - p.version for p in group]
        scale = LR_SCALINGS.get(self.config.lr_scaling)(taus)
        # Pushes wait in the queue as their compact payloads; decoded only when applied.
        grads = [self._decode(p.grads) for p in group]
        self.params, self.opt_state = self._update(self.params, self.opt_state,
                                                   mean_grads(grads), np.float32(scale))
        self.version += 1
        pushed, pulled = (sum(b[i] for b in self.bytes.values()) for i in (0, 1))
        return {
            "split": "train",
            "step": self.version,
            "loss": float(np.mean([p.loss for p in group])),
            "staleness": max(self.policy.staleness(p, self.version - 1) for p in group),
            "updates_behind": max(taus),
            "clocks_behind": max(p.clock - p.rounds for p in group),
            "lr_scale": scale,
            "workers": [p.worker for p in group],
            "time": now,
            "pushed_bytes": pushed,
            "pulled_bytes": pulled,
        }

    def _decode(self, payloads: dict) -> dict:
        """{name: dense gradient}: the codec's decode, and sparse tables' rows scattered
        into zeros (the dense gradient exactly: it is zero outside the rows)."""
        grads = codecs.decode_grads(
            self.codec, {n: p for n, p in payloads.items() if n not in self.tables}, self.shapes)
        grads.update({n: sparse.scatter(payloads[n], self.shapes[n]) for n in self.tables})
        return grads

    def params_numpy(self) -> dict:
        return jax.device_get(self.params)


class ServerCheckpoints:
    """Checkpoints of one shard: a directory written under a temporary name, then renamed.

    Orbax (0.12.8) cannot serve here: in a multi-process job it writes numpy arrays from
    process 0 only and refuses a process's own jax.Arrays, while every shard saves its
    own state on its own schedule. A rename is atomic, so a killed shard leaves either
    the whole checkpoint or none. `meta` carries what is not an array: version, worker
    clocks and the inbox slots still needed to rebuild the queue after a restart.
    """

    def __init__(self, workdir: str, shard: int, keep: int = 2):
        self.directory = os.path.join(os.path.abspath(workdir), f"server{shard}", "checkpoints")
        self.keep = keep
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):  # left by a killed save
                shutil.rmtree(os.path.join(self.directory, name))

    def steps(self) -> list[int]:
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

    def save(self, core: ServerCore, meta: dict) -> None:
        final = os.path.join(self.directory, str(core.version))
        tmp = final + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        leaves = jax.tree.leaves(jax.device_get(core.opt_state))
        arrays = {f"params/{k}": v for k, v in jax.device_get(core.params).items()}
        arrays.update({f"opt_state/{i}": np.asarray(v) for i, v in enumerate(leaves)})
        with open(os.path.join(tmp, "state.npz"), "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for step in self.steps()[:-self.keep]:
            shutil.rmtree(os.path.join(self.directory, str(step)))

    def restore(self, core: ServerCore) -> dict | None:
        """Loads the latest checkpoint into `core`; returns its meta (None: fresh start)."""
        steps = self.steps()
        if not steps:
            return None
        path = os.path.join(self.directory, str(steps[-1]))
        with np.load(os.path.join(path, "state.npz")) as state:
            core.params = jax.device_put({k: state[f"params/{k}"] for k in core.params})
            treedef = jax.tree.structure(core.opt_state)
            leaves = [state[f"opt_state/{i}"] for i in range(treedef.num_leaves)]
        core.opt_state = jax.device_put(jax.tree.unflatten(treedef, leaves))
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        core.version = meta["version"]
        core.clocks = list(meta["clocks"])
        return meta

    def close(self) -> None:
        pass
