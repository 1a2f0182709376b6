"""`lmjax launch`: N local processes that join one `jax.distributed` job on 127.0.0.1.

The launcher starts `python -m lmjax.main COMMAND...` N times with the job in the
environment (lmjax/parallel/distributed.py reads it): the coordinator's address on a free
loopback port, the process count and each process's id. On a CPU-only machine each
process gets D emulated CPU devices (`--xla_force_host_platform_device_count`) and
`JAX_PLATFORMS=cpu`; on a GPU machine, D of the visible GPUs (`CUDA_VISIBLE_DEVICES`).
Their output is streamed line by line with a `[p]` prefix. When one process fails (exit
code or signal), the launcher says which and stops all the others; every child also
dies with the launcher (PR_SET_PDEATHSIG), so a killed launcher leaves nothing behind.
"""

import dataclasses
import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from lmjax.errors import RunError
from lmjax.lifeline import LAUNCHER_ENV
from lmjax.parallel.distributed import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
POLL_SECONDS = 0.1


class LaunchError(RunError):
    """A launched process failed or could not start; every process was stopped."""


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    command: tuple[str, ...]  # the lmjax command line after `--`, e.g. ('train', ...)
    num_processes: int
    devices_per_process: int | None = None  # default: 1 CPU device, or the GPUs / N
    port: int = 0  # the coordinator's port on 127.0.0.1; 0 picks a free one
    # After the first process exits cleanly, how long the others may take to follow.
    finish_timeout: float = 120.0
    module: str = "lmjax.main"  # children run `python -m MODULE COMMAND...`


def free_port(port: int = 0) -> int:
    """`port` if free on 127.0.0.1 (0: any free port); a taken port is a LaunchError."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise LaunchError(f"port {port} on 127.0.0.1 is in use ({err.strerror}); pass "
                              "--port=0 to pick a free one, or stop what holds it") from err
        return sock.getsockname()[1]


def visible_gpus(environ=os.environ) -> list[str]:
    """The GPUs the children may use (none where JAX_PLATFORMS says cpu)."""
    if environ.get("JAX_PLATFORMS", "").lower() == "cpu":
        return []
    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    return sorted(p.removeprefix("/dev/nvidia") for p in glob.glob("/dev/nvidia[0-9]*"))


def device_env(config: LaunchConfig, process_id: int, gpus: list[str]) -> dict[str, str]:
    """The device settings of one child: D CPU devices, or its D GPUs."""
    if not gpus:
        devices = config.devices_per_process or 1
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith(DEVICE_COUNT_FLAG)]
        return {"XLA_FLAGS": " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"]),
                "JAX_PLATFORMS": "cpu"}
    devices = config.devices_per_process or len(gpus) // config.num_processes
    if devices < 1 or devices * config.num_processes > len(gpus):
        raise LaunchError(f"{config.num_processes} processes x {devices} GPUs need "
                          f"{config.num_processes * max(devices, 1)} GPUs, but "
                          f"{len(gpus)} are visible; lower --num_processes or "
                          "--devices_per_process")
    mine = gpus[process_id * devices:(process_id + 1) * devices]
    return {"CUDA_VISIBLE_DEVICES": ",".join(mine)}


def child_env(config: LaunchConfig, process_id: int, port: int, gpus: list[str]) -> dict:
    env = dict(os.environ)
    env.update(device_env(config, process_id, gpus))
    env.update({COORDINATOR_ENV: f"127.0.0.1:{port}",
                NUM_PROCESSES_ENV: str(config.num_processes),
                PROCESS_ID_ENV: str(process_id),
                LAUNCHER_ENV: str(os.getpid()),
                "PYTHONUNBUFFERED": "1"})
    return env


class Job:
    """The running children, their log streams and their teardown."""

    def __init__(self, config: LaunchConfig):
        self.config = config
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        port, gpus = free_port(self.config.port), visible_gpus()
        for pid in range(self.config.num_processes):
            proc = subprocess.Popen([sys.executable, "-m", self.config.module,
                                     *self.config.command],
                                    env=child_env(self.config, pid, port, gpus),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self.procs.append(proc)
            self.say(f"process {pid} started (pid {proc.pid})")
            thread = threading.Thread(target=self._stream, args=(pid, proc.stdout),
                                      daemon=True)
            thread.start()
            self.threads.append(thread)

    def say(self, line: str) -> None:
        with self.lock:
            sys.stdout.write(f"lmjax launch: {line}\n")
            sys.stdout.flush()

    def _stream(self, pid: int, stream) -> None:
        for raw in iter(stream.readline, b""):
            # A progress bar redraws with \r: show its latest state on the line.
            text = raw.decode(errors="replace").rstrip("\n").split("\r")[-1]
            with self.lock:
                sys.stdout.write(f"[{pid}] {text}\n")
                sys.stdout.flush()
        stream.close()

    def stop(self) -> None:
        """Kills the children still running. SIGKILL at once: JAX catches SIGTERM (its
        preemption notice) and goes on, and orbax commits a checkpoint atomically, so a
        kill never leaves one half-written."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        self.drain()

    def drain(self) -> None:
        """Waits (a little) for the last lines of the exited children to be printed."""
        for thread in self.threads:
            thread.join(timeout=5)


def describe(code: int) -> str:
    """'exit code 3' or 'signal SIGKILL' for a Popen return code."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _watch(job: Job) -> None:
    """Returns when every child exited 0; raises LaunchError naming the first that did
    not (or the ones still running finish_timeout after the first clean exit)."""
    first_done = None
    while True:
        codes = [p.poll() for p in job.procs]
        failed = [(pid, c) for pid, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            pid, code = failed[0]
            raise LaunchError(f"process {pid} of {len(codes)} (pid {job.procs[pid].pid}) "
                              f"stopped with {describe(code)}; the other processes were "
                              "stopped. Rerun the same command to resume from the last "
                              "checkpoint.")
        if all(c == 0 for c in codes):
            return
        if first_done is None and 0 in codes:
            first_done = time.time()
        if first_done is not None and time.time() - first_done > job.config.finish_timeout:
            late = [pid for pid, c in enumerate(codes) if c is None]
            raise LaunchError(f"processes {late} still ran {job.config.finish_timeout:.0f} s "
                              "after another finished; all were stopped")
        time.sleep(POLL_SECONDS)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def launch(config: LaunchConfig) -> None:
    """Runs the job to the end; LaunchError (every child stopped) if a process fails."""
    if config.num_processes < 1:
        raise LaunchError(f"--num_processes must be positive, got {config.num_processes}")
    if not config.command:
        raise LaunchError("no command to launch: put it after --, e.g. `lmjax launch "
                          "--num_processes=2 -- train --workdir=DIR --gin_file=F`")
    if config.module == "lmjax.main" and config.command[0] != "train":
        raise LaunchError(f"`lmjax {config.command[0]}` does not run as a multi-process job; "
                          "launch `train` (the others run in one process)")
    job = Job(config)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        job.start()
        _watch(job)
        job.drain()
        job.say(f"all {config.num_processes} processes finished")
    except KeyboardInterrupt:
        raise LaunchError("interrupted; every process was stopped") from None
    finally:  # every child stopped, whatever ended the job
        job.stop()
        signal.signal(signal.SIGTERM, previous)
