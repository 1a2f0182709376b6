"""Starting a jax_distributed parameter server: a local supervisor, or one role per process.

Local runs (`python -m lmjax.main ps ...`): the supervisor hosts the coordination
service itself (process 0) and starts the S servers and N workers as child processes
on 127.0.0.1. It must outlive everyone: when the process hosting the service dies,
every other process aborts (its heartbeats fail). The service runs with
`jax_enable_recoverability`, because without it the death of any process makes the
service tell all the others to abort once `heartbeat_timeout` passes (measured with
jax 0.10.2, see experiments/ps/README.md); with it, a dead process leaves
`get_live_nodes` within about a second and a restarted one rejoins under its old id.

Clusters: `python -m lmjax.ps.launch --spec=DIR/ps_spec.json` in every process; with
no --process_id, jax.distributed detects SLURM or Open MPI and the rank picks the role.
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from lmjax.errors import RunError
from lmjax.ps.child import PARENT_ENV
from lmjax.ps.config import PSConfig, parse_fault
from lmjax.ps.kv import (
    SECRET_FILE,
    SignedStore,
    dead_key,
    fault_key,
    parse_status,
    read_secret,
    write_secret,
)
from lmjax.ps.roles import (
    ROLES,
    RunSpec,
    raw_phase,
    read_finals,
    role_of,
    write_final_records,
)

TOLERANT = {"async", "ssp", "softsync", "backup"}  # policies that go on without a worker
POLL_SECONDS = 0.2


class LaunchError(RunError, RuntimeError):
    """A process could not start, join or finish; every started process was stopped."""


def check_port(port: int) -> int:
    """A free port on 127.0.0.1 (port 0 picks one); a taken port is an error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise LaunchError(f"port {port} on 127.0.0.1 is in use ({err.strerror}); set "
                              "ps.port=0 to pick a free port, or stop what holds it") from err
        return sock.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ)
    # One CPU device and one compute thread per process: several processes share the cores.
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=1 "
                        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_ENV] = str(os.getpid())
    return env


class Supervisor:
    """Starts, watches, restarts and stops the role processes of one local run."""

    def __init__(self, spec: RunSpec, spec_path: str):
        self.spec, self.spec_path, self.config = spec, spec_path, spec.ps
        self.procs: dict[int, subprocess.Popen] = {}
        self.restarts = {pid: 0 for pid in range(1, spec.num_processes)}
        self.finished: set[int] = set()
        self.dead: set[int] = set()  # workers the run goes on without
        self.faults = {i: parse_fault(f, self.config) for i, f in enumerate(self.config.faults)}
        self.logs = os.path.join(spec.workdir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.events: list[str] = []

    def name(self, pid: int) -> str:
        role, index = role_of(pid, self.config)
        return f"{role}{index}"

    def start(self, pid: int) -> None:
        log = open(os.path.join(self.logs, f"{self.name(pid)}.log"), "a")  # noqa: SIM115
        cmd = [sys.executable, "-m", "lmjax.ps.child", f"--spec={self.spec_path}",
               f"--process_id={pid}", f"--incarnation={self.restarts[pid]}"]
        self.procs[pid] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           env=child_env())
        log.close()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()

    def log_tail(self, pid: int, lines: int = 15) -> str:
        path = os.path.join(self.logs, f"{self.name(pid)}.log")
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def fail(self, message: str, pid: int | None = None) -> None:
        self.stop_all()
        if pid is not None:
            message += f"\n--- last lines of {self.logs}/{self.name(pid)}.log ---\n"
            message += self.log_tail(pid)
        raise LaunchError(message)


def configure_jax(spec: RunSpec) -> None:
    """Settings every process of a run shares; before jax.distributed.initialize."""
    import jax

    jax.config.update("jax_enable_recoverability", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_compilation_cache_dir", os.path.join(spec.workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def start_coordinator(spec: RunSpec, joined: threading.Event, holder: dict) -> None:
    """Joins as process 0, which hosts the coordination service (blocks until all join).

    Every process creates its CPU backend, which exchanges device topologies through the
    service, so the supervisor creates one too (its backend must not exist before).
    """
    import jax

    from lmjax.ps.kv import kv_client

    try:
        configure_jax(spec)
        # Bind the service to the spec's address (127.0.0.1 for local runs): JAX's
        # default listens on every interface, and the key-value store has no password.
        jax.distributed.initialize(spec.coordinator, spec.num_processes, 0,
                                   initialization_timeout=spec.ps.join_timeout + 60,
                                   heartbeat_timeout_seconds=spec.ps.heartbeat_timeout,
                                   coordinator_bind_address=spec.coordinator)
        jax.devices()
        holder["client"] = kv_client()
    except Exception as err:  # noqa: BLE001  (reported by the supervisor's loop)
        holder["error"] = err
    joined.set()


def supervise(spec: RunSpec, spec_path: str) -> dict:
    """Runs the whole job; returns a summary or raises LaunchError with everything stopped."""
    sup = Supervisor(spec, spec_path)
    secret = write_secret(spec.workdir)  # before any child starts: they read it at once
    joined, holder = threading.Event(), {}
    thread = threading.Thread(target=start_coordinator, args=(spec, joined, holder),
                              daemon=True)
    thread.start()
    start = time.time()
    try:
        for pid in range(1, spec.num_processes):
            sup.start(pid)
        _wait_joined(sup, joined, start)
        if "error" in holder:
            sup.fail(f"the supervisor could not join as the coordinator: {holder['error']}")
        store = SignedStore(holder["client"], secret)
        store.set("ps/start", repr(time.time()))
        _watch(sup, store)
        summary = _finish(sup, store, start)
    except BaseException:
        sup.stop_all()
        raise
    finally:  # the secret is worth nothing once the run's service is gone
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(spec.workdir, SECRET_FILE))
    return summary


def _wait_joined(sup: Supervisor, joined: threading.Event, start: float) -> None:
    while not joined.wait(POLL_SECONDS):
        for pid, proc in sup.procs.items():
            if proc.poll() is not None:
                sup.fail(f"{sup.name(pid)} exited with code {proc.returncode} before every "
                         "process joined the cluster; all processes were stopped", pid)
        if time.time() - start > sup.config.join_timeout:
            sup.fail(f"the processes did not all join within ps.join_timeout="
                     f"{sup.config.join_timeout} s; all processes were stopped")


def _version(store: SignedStore) -> int:
    text = store.try_get("ps/s0/status")
    return 0 if text is None else parse_status(text)[0].version


def _watch(sup: Supervisor, store: SignedStore) -> None:
    """Until every server finished: restart or tolerate deaths, inject faults."""
    servers = set(range(1, sup.config.num_servers + 1))
    while not servers <= sup.finished:
        time.sleep(POLL_SECONDS)
        _inject_faults(sup, store)
        for pid, proc in sup.procs.items():
            if pid in sup.finished or pid in sup.dead or proc.poll() is None:
                continue
            if proc.returncode == 0:
                sup.finished.add(pid)
            else:
                _handle_death(sup, pid, proc.returncode, store)


def _inject_faults(sup: Supervisor, store: SignedStore) -> None:
    """Kills the role a fault names once its shard reports the named update; the shard
    waits there until `done`, after the death has been handled (and reported)."""
    for index, (kind, role_index, _) in list(sup.faults.items()):
        reached = store.try_get(fault_key(index, "reached"))
        if reached is None:
            continue
        pid = role_index + 1 if kind == "server" else role_index + 1 + sup.config.num_servers
        proc = sup.procs[pid]
        del sup.faults[index]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            sup.events.append(f"killed {kind}{role_index} at update {int(reached)}")
            _handle_death(sup, pid, proc.returncode, store)
        else:
            sup.events.append(f"{kind}{role_index} was not running at update {int(reached)}")
        store.set(fault_key(index, "done"), "1")


def _handle_death(sup: Supervisor, pid: int, code: int, store: SignedStore) -> None:
    name, config = sup.name(pid), sup.config
    restart = sup.restarts[pid] < config.max_restarts
    if name.startswith("worker"):
        # First of all: the servers stop waiting on an inbox slot this worker claimed.
        notice = {"incarnation": sup.restarts[pid], "restarting": restart}
        store.set(dead_key(pid - 1 - config.num_servers), json.dumps(notice))
    if restart:
        sup.restarts[pid] += 1
        sup.events.append(f"restarted {name} (exit code {code})")
        sup.start(pid)
        return
    if name.startswith("worker") and config.policy in TOLERANT:
        dead = len(sup.dead) + 1
        if dead == config.num_workers:
            sup.fail(f"{name} died (exit code {code}) and no worker is left", pid)
        if config.policy != "backup" or dead <= config.backup_workers:
            sup.dead.add(pid)
            sup.events.append(f"{name} died (exit code {code}); going on without it")
            return
    if name.startswith("worker"):
        sup.fail(f"{name} died (exit code {code}) and policy {config.policy!r} needs every "
                 "worker; set ps.max_restarts > 0 so the supervisor restarts it, or use "
                 "the async or ssp policy", pid)
    sup.fail(f"{name} died (exit code {code}) after {sup.restarts[pid]} restarts "
             f"(ps.max_restarts={config.max_restarts}); all processes were stopped", pid)


def _finish(sup: Supervisor, store: SignedStore, start: float) -> dict:
    """Waits for the workers, then appends the roles' final records to metrics.jsonl."""
    deadline = time.time() + 60
    for pid, proc in sup.procs.items():
        if pid not in sup.dead:
            try:
                proc.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                sup.fail(f"{sup.name(pid)} did not stop after the last update", pid)
    version = _version(store)
    finals = read_finals(store, sup.config)
    write_final_records(sup.spec.workdir, version, finals)
    refused = {name: final["refused"] for name, final in finals.items()}
    refused["supervisor"] = len(store.refused)
    if sum(refused.values()):
        sup.events.append(f"refused {sum(refused.values())} values that failed the HMAC "
                          f"check ({', '.join(f'{k}: {v}' for k, v in refused.items() if v)}; "
                          f"see {sup.logs})")
    for event in sup.events:
        print(f"ps: {event}")
    return {"updates": version, "seconds": time.time() - start, "events": sup.events,
            "refused": sum(refused.values())}


def role_main(argv: list[str] | None = None) -> None:
    """One role process: join the cluster, then serve or work as the process id says."""
    parser = argparse.ArgumentParser(description=role_main.__doc__)
    parser.add_argument("--spec", required=True, help="DIR/ps_spec.json written by `lmjax ps`")
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--coordinator", default=None, help="host:port (default: the spec's)")
    parser.add_argument("--incarnation", type=int, default=0,
                        help="how often the supervisor restarted this role before")
    args = parser.parse_args(argv)
    spec = RunSpec.load(args.spec)
    import jax

    configure_jax(spec)
    config = spec.ps
    cluster = args.process_id is None
    jax.distributed.initialize(
        args.coordinator or (None if cluster else spec.coordinator),
        args.num_processes or (None if cluster else spec.num_processes), args.process_id,
        initialization_timeout=config.join_timeout,
        heartbeat_timeout_seconds=config.heartbeat_timeout)
    from lmjax.ps.kv import kv_client

    client = kv_client()
    store = SignedStore(client, read_secret(spec.workdir))
    role, index = role_of(jax.process_index(), config)
    if spec.bench:
        raw_phase(spec, role, client)  # the raw store's speed: unsigned on purpose
    if role == "coordinator":
        run_cluster_coordinator(spec, store)
    else:
        ROLES.get(role)(spec, index, store, args.incarnation)
    sys.stdout.flush()
    # Skip the shutdown barrier: peers that already left (or died) must not hold us.
    os._exit(0)


def run_cluster_coordinator(spec: RunSpec, store: SignedStore) -> None:
    """Process 0 on a cluster: hosts the service, starts the clock, writes final records."""
    store.set("ps/start", repr(time.time()))
    config: PSConfig = spec.ps
    while not parse_status(store.wait("ps/s0/status", 600_000))[0].done:
        time.sleep(1.0)
    time.sleep(5.0)  # let workers publish their final records
    write_final_records(spec.workdir, _version(store), read_finals(store, config))


if __name__ == "__main__":
    role_main()
