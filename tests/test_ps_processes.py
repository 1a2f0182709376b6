"""Parameter server as real processes through jax.distributed on 127.0.0.1."""

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, is_loopback, listening, run_cli

from lmjax.models import GPTConfig
from lmjax.ps.config import PSConfig
from lmjax.ps.inproc import run_inproc

SYNC = "configs/ps/shakespeare_sync.gin"
ASYNC = "configs/ps/shakespeare_async.gin"
# configs/models/gpt_tiny.gin and the sync config's ps settings, for the inproc twin.
TINY = GPTConfig(vocab_size=65, num_layers=2, num_heads=2, embed_dim=32, block_size=32)


def run_ps(workdir, config, *params, timeout=400):
    args = ["ps", f"--workdir={workdir}", f"--gin_file={config}"]
    return run_cli(*args, *[f"--gin_param={p}" for p in params], timeout=timeout)


def records(workdir, split="train"):
    lines = Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def leftover_processes(workdir) -> list[str]:
    """Processes still running from this run (their command line names its spec)."""
    marker = os.path.join(str(workdir), "ps_spec.json").encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path("/proc", pid, "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            found.append(pid)
    return found


def inproc_losses(num_updates):
    from lmjax.data.pipelines import load_lm_data

    config = PSConfig(model=TINY,
                      policy="bsp", num_workers=2, num_updates=num_updates, batch_size=8,
                      optimizer="adam", learning_rate=1e-3, seed=0)
    result = run_inproc(workdir=None, data=load_lm_data("tiny_shakespeare"), config=config)
    return [r["loss"] for r in result.records if r["split"] == "train"]


def test_jax_distributed_sync_equals_inproc(tmp_path):
    out = run_ps(tmp_path, SYNC, "ps.num_updates=12")
    assert out.returncode == 0, out.stderr[-3000:]
    got = [r["loss"] for r in records(tmp_path)]
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 13))
    np.testing.assert_allclose(got, inproc_losses(12), rtol=1e-5)
    workers = records(tmp_path, "worker")
    assert sorted(r["worker"] for r in workers) == [0, 1]
    assert all(0 <= r["idle_fraction"] < 1 for r in workers)
    assert not leftover_processes(tmp_path)


@pytest.mark.slow
def test_killed_worker_does_not_stop_async(tmp_path):
    out = run_ps(tmp_path, ASYNC, "ps.num_updates=100", "ps.faults=['worker1@6']")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "worker1 died" in out.stdout
    # The supervisor kills at its first status poll that sees update 6 or later, so
    # read when the kill happened; gradients worker1 pushed before dying may still be
    # applied for a while after it (the server can lag behind), hence the allowance.
    killed_at = int(re.search(r"killed worker1 at update (\d+)", out.stdout).group(1))
    assert killed_at <= 70, f"the kill came too late to check anything: update {killed_at}"
    train = records(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 101))
    after = [r for r in train if r["step"] > killed_at + 20]
    assert {w for r in after for w in r["workers"]} == {0}
    assert not leftover_processes(tmp_path)


@pytest.mark.slow
def test_killed_server_resumes_from_checkpoint(tmp_path):
    out = run_ps(tmp_path, SYNC, "ps.num_updates=24", "ps.checkpoint_every=6",
                 "ps.faults=['server0@10']", "ps.max_restarts=1", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "killed server0" in out.stdout and "restarted server0" in out.stdout
    train = records(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 25))  # each update once, none lost
    # The restarted shard replays the gradients after its checkpoint: the run equals an
    # uninterrupted one.
    np.testing.assert_allclose([r["loss"] for r in train], inproc_losses(24), rtol=1e-5)
    log = Path(tmp_path, "logs", "server0.log").read_text()
    assert log.count("Traceback") == 0
    assert not leftover_processes(tmp_path)


def test_coordinator_listens_on_loopback_only(tmp_path):
    """The coordination service (and its unauthenticated key-value store) binds
    127.0.0.1, not every interface."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, "-m", "lmjax.main", "ps", f"--workdir={tmp_path}",
                             f"--gin_file={SYNC}", "--gin_param=ps.num_updates=40"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, deadline = set(), time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline and not seen:
            spec = Path(tmp_path, "ps_spec.json")
            if spec.exists():
                port = int(json.loads(spec.read_text())["coordinator"].rsplit(":", 1)[1])
                seen = {address for address, p in listening() if p == port}
            time.sleep(0.2)
    finally:
        code = proc.wait(timeout=400)
    assert code == 0, proc.stderr.read()[-3000:]
    assert seen and all(is_loopback(address) for address in seen), seen


def test_children_die_with_a_supervisor_killed_at_once(tmp_path):
    """The role processes tie themselves to the supervisor before their imports, so a
    supervisor killed as soon as they exist leaves none behind."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, "-m", "lmjax.main", "ps", f"--workdir={tmp_path}",
                             f"--gin_file={SYNC}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not leftover_processes(tmp_path) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its children started"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    time.sleep(1.0)  # the imports of a role take seconds; dying takes milliseconds
    assert not leftover_processes(tmp_path)


def test_a_rerun_refuses_to_delete_an_earlier_run_unless_asked(tmp_path):
    inproc = "ps.transport='inproc'"
    assert run_ps(tmp_path, SYNC, inproc, "ps.num_updates=3").returncode == 0
    before = Path(tmp_path, "metrics.jsonl").read_text()
    again = run_ps(tmp_path, SYNC, inproc, "ps.num_updates=4")
    assert again.returncode == 1 and "pass --overwrite" in again.stderr
    assert Path(tmp_path, "metrics.jsonl").read_text() == before  # nothing deleted
    args = ["ps", f"--workdir={tmp_path}", f"--gin_file={SYNC}", "--overwrite",
            f"--gin_param={inproc}", "--gin_param=ps.num_updates=4"]
    assert run_cli(*args).returncode == 0
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]


def test_port_in_use_fails_before_starting(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        out = run_ps(tmp_path, SYNC, f"ps.port={port}")
    assert out.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in out.stderr
    assert not Path(tmp_path, "logs").exists()  # nothing was started


def test_process_that_cannot_join_stops_everything(tmp_path):
    out = run_ps(tmp_path, SYNC, "ps.join_timeout=2")
    assert out.returncode == 1
    assert "did not all join within ps.join_timeout=2" in out.stderr
    assert Path(tmp_path, "logs").exists()  # processes were started ...
    assert not leftover_processes(tmp_path)  # ... and all stopped


def test_contradictory_config_fails_before_starting(tmp_path):
    out = run_ps(tmp_path, SYNC, "ps.num_servers=1000")
    assert out.returncode == 1, out.stderr
    assert "ps.num_servers=1000 exceeds the model's" in out.stderr
    assert not Path(tmp_path, "logs").exists()


@pytest.mark.parametrize("changes,message", [
    ({"staleness_bound": -2}, "staleness_bound must be"),
    ({"policy": "softsync", "softsync_n": 3}, "does not divide"),
    ({"policy": "hogwild"}, "unknown ps.policy 'hogwild'"),
    ({"policy": "backup", "backup_workers": 2}, "backup_workers=2 must be"),
    ({"faults": ("worker7@3",)}, "bad ps.faults entry"),
])
def test_config_check_names_the_problem(changes, message):
    from lmjax.ps.run import check

    with pytest.raises(ValueError, match=message):
        check(PSConfig(model=TINY, **changes))


@pytest.mark.slow
def test_restarted_worker_rejoins_synchronous_run(tmp_path):
    """A killed synchronous worker restarts, pulls the latest parameters and goes on from
    its clock (its data position), so the run equals an uninterrupted one."""
    out = run_ps(tmp_path, SYNC, "ps.num_updates=20", "ps.faults=['worker1@8']",
                 "ps.max_restarts=1", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "restarted worker1" in out.stdout
    train = records(tmp_path)
    np.testing.assert_allclose([r["loss"] for r in train], inproc_losses(20), rtol=1e-5)
    assert not leftover_processes(tmp_path)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _fields(buffer: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a protobuf message (the last of each number)."""
    out, i = {}, 0
    while i < len(buffer):
        tag, i = _read_varint(buffer, i)
        size, i = _read_varint(buffer, i) if tag & 7 == 2 else (0, i)
        out[tag >> 3], i = buffer[i:i + size], i + size
    return out


def _read_varint(buffer: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        value |= (buffer[i] & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if not buffer[i - 1] & 0x80:
            return value, i


class Stranger:
    """A process outside the run that can reach the coordinator's port, and nothing else:
    raw gRPC calls to the coordination service (xla.coordination.CoordinationService).
    A request without the service's incarnation is refused with an error that names it
    (jax 0.10.2), so the port is all a stranger needs."""

    def __init__(self, address: str):
        import grpc

        self.grpc, self.channel = grpc, grpc.insecure_channel(address)
        try:
            self._call("TryGetKeyValue", _field(2, b"-"))
        except grpc.RpcError as err:
            incarnation = int(re.search(r"currently (\d+)", err.details()).group(1))
        self.incarnations = _field(1, _varint(3 << 3 | 1) + struct.pack("<Q", incarnation))

    def _call(self, method: str, body: bytes) -> bytes:
        call = self.channel.unary_unary(f"/xla.coordination.CoordinationService/{method}",
                                        request_serializer=bytes, response_deserializer=bytes)
        return call(body, timeout=10)

    def try_get(self, name: str) -> bytes | None:
        try:
            reply = self._call("TryGetKeyValue", self.incarnations + _field(2, name.encode()))
        except self.grpc.RpcError as err:
            if err.code() == self.grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return _fields(_fields(reply)[1])[2]

    def create(self, name: str, value: bytes) -> bool:
        entry = _field(1, name.encode()) + _field(2, value)
        try:
            self._call("InsertKeyValue", self.incarnations + _field(2, entry))
        except self.grpc.RpcError as err:
            if err.code() == self.grpc.StatusCode.ALREADY_EXISTS:
                return False
            raise
        return True

    def increment(self, name: str) -> int:
        body = self.incarnations + _field(2, name.encode()) + _varint(3 << 3) + _varint(1)
        return int(_fields(_fields(self._call("IncrementKeyValue", body))[1])[2])

    def status(self) -> dict | None:
        """Shard 0's status (its JSON, after whatever precedes it)."""
        value = self.try_get("ps/s0/status")
        return None if value is None else json.loads(value[value.index(b'{"version"'):])

    def inject(self, payload: bytes) -> None:
        """Puts a gradient where shard 0 reads next: in the slot a worker would take
        (by the inbox counter, or by the lowest free claim)."""
        slot = self.increment("ps/s0/count")
        self.create(f"ps/s0/inbox/{slot}", payload)
        slot = 1
        while not self.create(f"ps/s0/claim/{slot}", b'{"worker": 0, "incarnation": 0}'):
            slot += 1
        self.create(f"ps/s0/inbox/{slot}", payload)


def forged_gradients():
    """A maker of well-formed pushes from "worker 0" for a version: huge gradients, loss 99."""
    from lmjax.ps import sharding
    from lmjax.ps.kv import encode_push
    from lmjax.ps.policies import Push
    from lmjax.ps.worker import param_shapes

    shapes = param_shapes(TINY)
    plan = sharding.plan_shards(shapes, 1)
    grads = {name: np.full(shape, 1e3, np.float32) for name, shape in shapes.items()}
    return lambda version, clock: encode_push(Push(0, clock, version, version, 99.0, grads),
                                              plan, 0)


def attack(workdir, times: int, done: threading.Event, injected: list) -> None:
    """Waits for the run's coordinator, then injects a forged gradient as soon as each
    new version is published, `times` times."""
    forged, spec = forged_gradients(), Path(workdir, "ps_spec.json")
    while not spec.exists() and not done.is_set():
        time.sleep(0.1)
    stranger = None
    while stranger is None and not done.is_set():
        try:
            stranger = Stranger(json.loads(spec.read_text())["coordinator"])
        except Exception:  # noqa: BLE001  (the service is not up yet)
            time.sleep(0.2)
    seen = -1
    while len(injected) < times and not done.is_set():
        status = stranger.status()
        if status is None or status["version"] == seen:
            time.sleep(0.002)
            continue
        seen = status["version"]
        stranger.inject(forged(seen, status["clocks"][0]))
        injected.append(seen)


@pytest.mark.slow
def test_forged_gradient_from_a_stranger_is_refused(tmp_path):
    """A stranger writes well-formed gradients into the inbox of a synchronous run as soon
    as each version is published: every one is refused (its HMAC does not match), and the
    losses equal an uninterrupted run's."""
    done, injected = threading.Event(), []
    thread = threading.Thread(target=attack, args=(tmp_path, 3, done, injected), daemon=True)
    thread.start()
    try:
        out = run_ps(tmp_path, SYNC, "ps.num_updates=30")
    finally:
        done.set()
        thread.join()
    assert out.returncode == 0, out.stderr[-3000:]
    train = records(tmp_path)
    assert all(r["loss"] < 10 for r in train)  # loss 99: a forged gradient was applied
    np.testing.assert_allclose([r["loss"] for r in train], inproc_losses(30), rtol=1e-5)
    assert len(injected) == 3 and injected[-1] < 30, injected
    log = Path(tmp_path, "logs", "server0.log").read_text()
    assert re.search(r"refused the value of ps/s0/(inbox|claim)/\d+", log), log[-2000:]
    assert json.loads(Path(tmp_path, "summary.json").read_text())["refused"] >= 3


def pushes_per_version(train) -> int:
    """The most applied gradients computed from one version (async: one per update)."""
    from collections import Counter

    return max(Counter(r["step"] - 1 - r["updates_behind"] for r in train).values())


@pytest.mark.slow
def test_server_fault_fires_at_the_named_update(tmp_path):
    """server0 is killed at update 40 exactly; while it restarts, workers push at most
    ps.max_pushes_per_version gradients from the last version instead of hundreds."""
    out = run_ps(tmp_path, ASYNC, "ps.num_updates=100", "ps.faults=['server0@40']",
                 "ps.max_restarts=1", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ps: killed server0 at update 40\n" in out.stdout
    train = records(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 101))
    assert pushes_per_version(train) <= 4 * 2  # the default bound, 2 workers
    assert sum(r["throttled"] for r in records(tmp_path, "worker")) > 0
    assert not leftover_processes(tmp_path)


@pytest.mark.slow
def test_worker_fault_fires_at_the_named_update(tmp_path):
    """worker1 is killed at update 20 exactly; the survivor goes on, never more than
    ps.max_pushes_per_version gradients from one version, and no update waits for the
    dead worker (a slot it claimed but never wrote is skipped at once)."""
    out = run_ps(tmp_path, ASYNC, "ps.num_updates=100", "ps.faults=['worker1@20']")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ps: killed worker1 at update 20\n" in out.stdout
    train = records(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 101))
    assert pushes_per_version(train) <= 4 * 2
    gaps = [b["time"] - a["time"] for a, b in zip(train, train[1:], strict=False)]
    assert max(gaps) < 3.0, max(gaps)  # a slot waited out would take 5 s
    assert not leftover_processes(tmp_path)
