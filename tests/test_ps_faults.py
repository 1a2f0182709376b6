"""Parameter-server hardening: authenticated key-value traffic, dead workers' inbox slots,
bounded pushes per parameter version, faults at the named update.

Most checks drive the roles' functions on an in-memory stand-in of the coordination
service's key-value store (FakeKV); the end-to-end ones run real processes.
"""

import collections
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from lmjax.data.config import LMDataConfig
from lmjax.models import GPTConfig
from lmjax.ps import launch, roles
from lmjax.ps.config import PSConfig
from lmjax.ps.kv import (
    ShardClient,
    ShardPublisher,
    SignedStore,
    dead_key,
    fault_key,
    key,
)
from lmjax.ps.policies import Push, make_policy
from lmjax.ps.server import ServerCore
from lmjax.ps.sharding import ShardPlan

MICRO = GPTConfig(vocab_size=65, num_layers=1, num_heads=1, embed_dim=16, block_size=8)
PLAN = ShardPlan((("w",),), {"w": (4,)})
SECRET = b"s" * 32


class FakeKV:
    """The coordination service's key-value calls the parameter server makes, in memory
    (errors carry the service's status names, as JaxRuntimeError does)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def key_value_set_bytes(self, name, value, allow_overwrite=False):
        if name in self.data and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: key {name} already exists.")
        self.data[name] = bytes(value)

    def key_value_try_get_bytes(self, name):
        if name not in self.data:
            raise RuntimeError(f"NOT_FOUND: Config key {name} not found.")
        return self.data[name]

    def blocking_key_value_get_bytes(self, name, timeout_ms):
        if name not in self.data:  # nobody else runs here: waiting would not help
            raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {name}")
        return self.data[name]

    def key_value_dir_get_bytes(self, prefix):
        return [(k, v) for k, v in sorted(self.data.items()) if k.startswith(prefix)]

    def key_value_delete(self, name):
        self.data.pop(name, None)


def ones_push(worker: int, clock: int, version: int = 0) -> Push:
    return Push(worker, clock, version, 0, 1.0, {"w": np.ones(4, np.float32)})


# 1. Authenticated key-value traffic.

def test_values_without_the_run_secret_are_refused(caplog):
    kv = FakeKV()
    store, stranger = SignedStore(kv, SECRET), SignedStore(kv, b"x" * 32)
    store.set("ps/s0/status", "real")
    assert store.try_get("ps/s0/status") == b"real"
    stranger.set("ps/s0/inbox/1", b"forged gradient")
    kv.key_value_set_bytes("ps/s0/inbox/2", b"no tag at all")
    kv.data["ps/s0/inbox/3"] = kv.data["ps/s0/status"]  # a real value under another key
    with caplog.at_level(logging.ERROR):
        for _ in range(2):
            assert [store.try_get(f"ps/s0/inbox/{i}") for i in (1, 2, 3)] == [None] * 3
    assert store.refused == {"ps/s0/inbox/1", "ps/s0/inbox/2", "ps/s0/inbox/3"}
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3 and "ps/s0/inbox/2" in refusals[1]  # each key logged once
    assert store.lookup("ps/s0/inbox/1") == (True, None)  # there, but refused
    assert store.lookup("ps/s0/inbox/9") == (False, None)


def test_a_forged_gradient_is_never_applied():
    """A stranger's gradient in the next inbox slot, with a forged claim, is skipped: the
    shard applies the real gradient that follows it."""
    kv = FakeKV()
    store = SignedStore(kv, SECRET)
    config = PSConfig(policy="async", num_workers=1, num_updates=5)
    core = ServerCore(0, {"w": np.zeros(4, np.float32)}, config, make_policy(config))
    publisher = ShardPublisher(store, PLAN, 0)
    stranger = ShardClient(SignedStore(kv, b"x" * 32), PLAN, 0)
    stranger.push(Push(0, 0, 0, 0, 99.0, {"w": np.full(4, 1e6, np.float32)}))
    ShardClient(store, PLAN, 0).push(ones_push(0, 0))  # claims slot 2: slot 1 is taken
    state = {"hole": None, "live": 0.0, "floor": 1, "start": 0.0, "faults": {}}
    assert publisher.read(1) is None
    roles._idle(core, publisher, store, config, state)
    assert publisher.cursor == 2
    roles._apply_backlog(core, publisher.read(2), publisher, None, None, state)
    assert core.version == 1 and np.all(np.abs(core.params_numpy()["w"]) < 1)
    assert store.refused == {key(0, "claim", 1), key(0, "inbox", 1)}


# 2. A dead worker's inbox slot is released as soon as the supervisor reports the death.

def test_the_slot_of_a_dead_worker_is_skipped_at_once():
    kv = FakeKV()
    store = SignedStore(kv, SECRET)
    config = PSConfig(policy="async", num_workers=2)
    core = ServerCore(0, {"w": np.zeros(4, np.float32)}, config, make_policy(config))
    publisher = ShardPublisher(store, PLAN, 0)
    assert ShardClient(store, PLAN, 0, owner=(1, 0)).claim() == 1  # then worker1 dies
    state = {"hole": None, "live": 0.0}
    roles._idle(core, publisher, store, config, state)
    assert publisher.cursor == 1  # worker1 may still be writing it
    store.set(dead_key(1), json.dumps({"incarnation": 0, "restarting": True}))
    roles._idle(core, publisher, store, config, state)
    assert publisher.cursor == 2  # at once, not after roles.HOLE_SECONDS
    assert core.alive == {0, 1}  # restarting: still part of SSP rounds
    # The restarted worker (incarnation 1) claims the next slot: that one is waited for.
    assert ShardClient(store, PLAN, 0, owner=(1, 1)).claim() == 2
    roles._idle(core, publisher, store, config, state)
    assert publisher.cursor == 2


def test_claims_never_share_a_slot():
    kv = FakeKV()
    store = SignedStore(kv, SECRET)
    clients = [ShardClient(store, PLAN, 0, owner=(w, 0)) for w in range(3)]
    slots = [clients[w % 3].claim() for w in range(30)]
    assert sorted(slots) == list(range(1, 31))
    owners = [json.loads(store.try_get(key(0, "claim", s)))["worker"] for s in range(1, 31)]
    assert owners == [w % 3 for w in range(30)]


def supervisor(tmp_path, **changes) -> launch.Supervisor:
    config = PSConfig(model=MICRO, transport="jax_distributed", num_workers=2, **changes)
    spec = roles.RunSpec.create(str(tmp_path), config, LMDataConfig(), "127.0.0.1:1")
    return launch.Supervisor(spec, str(tmp_path / "ps_spec.json"))


def test_supervisor_reports_a_dead_worker_to_the_servers(tmp_path):
    sup = supervisor(tmp_path, policy="async")
    store = SignedStore(FakeKV(), SECRET)
    launch._handle_death(sup, 3, -9, store)  # process 3: worker1 (1 server)
    assert json.loads(store.try_get(dead_key(1))) == {"incarnation": 0, "restarting": False}
    assert roles._alive(store, sup.config) == {0}


# 3. At most ps.max_pushes_per_version gradients from one version.

def pushes_per_version(data, bound: int):
    """Softsync with one slow worker: an update needs 4 gradients, the 3 fast workers
    give 3 a step, so without a bound a fast worker pushes twice from some versions."""
    from lmjax.ps.inproc import Simulation

    config = PSConfig(model=MICRO, policy="softsync", softsync_n=1, num_workers=4,
                      num_updates=12, batch_size=1, optimizer="sgd", learning_rate=0.1,
                      slowdown=(1.0, 1.0, 1.0, 4.0), max_pushes_per_version=bound)
    sim = Simulation(config, data)
    seen = collections.Counter()
    receive = sim.servers[0].receive

    def counting(push, now):
        seen[push.worker, push.version] += 1
        return receive(push, now)

    sim.servers[0].receive = counting
    result = sim.run()
    throttled = [r["throttled"] for r in result.records if r["split"] == "worker"]
    return max(seen.values()), throttled


def test_a_worker_waits_for_a_new_version_after_the_bound():
    from lmjax.data.pipelines import load_lm_data

    data = load_lm_data("tiny_shakespeare")
    most, throttled = pushes_per_version(data, bound=1)
    assert most == 1
    assert all(t > 0 for t in throttled[:3]) and throttled[3] == 0
    most, throttled = pushes_per_version(data, bound=8)
    assert most > 1 and throttled == [0, 0, 0, 0]  # the bound is what held them back


def test_the_bound_must_allow_the_pushes_between_two_pulls():
    from lmjax.ps.run import check

    with pytest.raises(ValueError, match="max_pushes_per_version=2 is below the 3 pushes"):
        check(PSConfig(model=MICRO, policy="async", n_fetch=3, max_pushes_per_version=2))


# 4. A fault fires at the update it names.

def test_a_shard_stops_at_the_update_a_fault_names():
    kv = FakeKV()
    store = SignedStore(kv, SECRET)
    config = PSConfig(policy="async", num_workers=2, num_updates=100, faults=("worker1@40",),
                      checkpoint_every=1000)
    core = ServerCore(0, {"w": np.zeros(4, np.float32)}, config, make_policy(config))
    worker = ShardClient(store, PLAN, 0)
    for clock in range(70):  # a backlog longer than the named update
        worker.push(ones_push(0, clock))
    publisher = ShardPublisher(store, PLAN, 0)
    state = {"floor": 1, "start": 0.0, "faults": roles._faults_of(config, 0)}
    roles._apply_backlog(core, publisher.read(1), publisher, None, None, state)
    assert core.version == 40
    store.set(fault_key(0, "done"), "1")  # the supervisor, had it been there
    roles._stop_at_faults(store, state["faults"], core.version)
    assert store.try_get(fault_key(0, "reached")) == b"40"
    roles._apply_backlog(core, publisher.read(publisher.cursor), publisher, None, None, state)
    assert core.version == 70


def test_supervisor_kills_at_the_reported_update(tmp_path):
    sup = supervisor(tmp_path, policy="async", faults=("worker1@40",))
    store = SignedStore(FakeKV(), SECRET)
    sup.procs[3] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    launch._inject_faults(sup, store)
    assert sup.procs[3].poll() is None  # not before the shard reports the update
    store.set(fault_key(0, "reached"), "40")
    launch._inject_faults(sup, store)
    assert sup.procs[3].returncode == -9
    assert sup.events[0] == "killed worker1 at update 40"
    assert store.try_get(fault_key(0, "done")) == b"1"
    assert json.loads(store.try_get(dead_key(1)))["incarnation"] == 0
