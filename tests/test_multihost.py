"""Multi-process training on jax.distributed, with real local processes (`lmjax launch`).

Fast tier: the job and data-share logic without processes, a failing launch, and one
2-process x 4-device run whose losses equal 1 process x 8 devices. Slow tier: the baby
config on data, FSDP and tensor meshes over 1x8, 2x4 and 4x2; a SIGKILLed and a hung
process; checkpoints restored across process counts. Every run checks that no process
is left behind and that the job listens on loopback only.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import numpy as np
import pytest
from conftest import REPO, is_loopback

from lmjax import main
from lmjax.data import bert_data, pipelines
from lmjax.parallel import distributed, launch

TINY = "configs/experiments/shakespeare_char_tiny.gin"
BABY = "configs/experiments/shakespeare_char_baby.gin"
WAIT = 600  # s, the longest any launched job may take here


@pytest.fixture
def clean_gin(monkeypatch):
    monkeypatch.chdir(REPO)  # gin files include each other by repo-relative paths
    gin.clear_config()
    yield
    gin.clear_config()


# --- helpers: launched jobs, their processes and listeners ---------------------------


def _train_args(workdir, gin_file, params) -> list[str]:
    return ["train", f"--workdir={workdir}", f"--gin_file={gin_file}",
            *(f"--gin_param={p}" for p in params)]


@contextlib.contextmanager
def launched(workdir: Path, processes: int, devices: int, *params: str, gin_file=TINY,
             flags=()):
    """`lmjax launch` of a train run, in its own process group (killed on the way out);
    yields (Popen, path of its output)."""
    log = workdir.parent / f"{workdir.name}-{processes}x{devices}.log"
    cmd = [sys.executable, "-m", "lmjax.main", "launch", f"--num_processes={processes}",
           f"--devices_per_process={devices}", "--", *_train_args(workdir, gin_file, params),
           *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def run_launch(workdir: Path, processes: int, devices: int, *params: str, gin_file=TINY
               ) -> str:
    """Runs a launched job to the end; returns its output (asserting it succeeded)."""
    with launched(workdir, processes, devices, *params, gin_file=gin_file) as (proc, log):
        proc.wait(timeout=WAIT)
        output = log.read_text()
        assert proc.returncode == 0, output[-4000:]
    assert not left_behind(workdir)
    return output


def run_single(workdir: Path, *params: str, gin_file=TINY) -> dict:
    """One process x 8 devices (this test process's), through the CLI's code path."""
    gin.clear_config()
    return main.run(_train_args(workdir, gin_file, params))


def child_pids(output: str) -> dict[int, int]:
    """{process id: OS pid} from the launcher's 'process P started (pid N)' lines."""
    return {int(p): int(n) for p, n in re.findall(r"process (\d+) started \(pid (\d+)\)",
                                                  output)}


def left_behind(workdir: Path) -> list[int]:
    """Live processes whose command line names `workdir`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().split(") ")[-1][0]
        except OSError:
            continue
        if str(workdir) in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def listeners(pids) -> list[str]:
    """Addresses (hex, as /proc/net writes them) of the TCP sockets `pids` listen on."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.append(fields[1].split(":")[0])
    return found


def records(workdir: Path, split: str = "train") -> dict[int, float]:
    """{step: loss} of metrics.jsonl's records of `split`."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == split}


def losses(workdir: Path) -> np.ndarray:
    found = records(workdir)
    assert sorted(found) == list(range(1, max(found) + 1)), sorted(found)
    return np.asarray([found[s] for s in sorted(found)])


def wait_for_step(workdir: Path, step: int, proc, timeout: float = WAIT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            if max(records(workdir), default=0) >= step:
                return
        time.sleep(0.1)
    raise AssertionError(f"the job did not reach step {step} (exit code {proc.poll()})")


# --- fast: the logic alone -----------------------------------------------------------


def test_job_from_flags_environment_and_clusters():
    assert distributed.job_from(environ={}) is None
    env = {distributed.COORDINATOR_ENV: "127.0.0.1:1234", distributed.NUM_PROCESSES_ENV: "2",
           distributed.PROCESS_ID_ENV: "1"}
    job = distributed.job_from(environ=env)
    assert (job.coordinator, job.num_processes, job.process_id) == ("127.0.0.1:1234", 2, 1)
    assert job.explicit and job.loopback
    assert distributed.job_from(process_id=0, environ=env).process_id == 0  # flags first
    cluster = distributed.job_from("10.0.0.1:1234", 4, 3, environ={})
    assert cluster.explicit and not cluster.loopback
    with pytest.raises(ValueError, match="--coordinator_address, --num_processes"):
        distributed.job_from(process_id=1, environ={})
    srun = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}
    assert distributed.job_from(environ=srun) == distributed.Job()  # JAX reads the rest
    assert distributed.job_from(environ={"SLURM_STEP_NUM_TASKS": "1"}) is None
    assert distributed.job_from(environ={"SLURM_NTASKS": "4"}) is None  # salloc's shell
    assert distributed.job_from(environ={"OMPI_COMM_WORLD_SIZE": "2"}) == distributed.Job()
    assert distributed.job_from(force=True, environ={}) == distributed.Job()


class _Sharding:
    """A stand-in for a sharding whose addressable devices hold the given rows."""

    def __init__(self, *blocks):
        self.blocks = blocks

    def addressable_devices_indices_map(self, shape):
        return {i: (slice(lo, hi),) for i, (lo, hi) in enumerate(self.blocks)}


def test_batch_share_follows_the_rows_the_devices_hold():
    with distributed.loading_for(_Sharding((4, 6), (6, 8))):
        assert distributed.batch_share(16) == (1, 4)
    with distributed.loading_for(_Sharding((0, 8), (0, 8))):  # replicas of one block
        assert distributed.batch_share(16) == (0, 2)
    with distributed.loading_for(_Sharding((0, 4), (8, 12))):
        with pytest.raises(ValueError, match="not one block"):
            distributed.batch_share(16)
    assert distributed.batch_share(16) == (0, 1)  # one process, no sharding given


@pytest.mark.parametrize("count", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(monkeypatch, count):
    """Each process's blocks, put together, are the one-process batches, and the
    iterator state (saved in checkpoints) is the same in every process."""
    tokens = np.arange(1000, dtype=np.int32)
    alone = pipelines.train_iterator(tokens, 8, 16, seed=3)
    parts = []
    for index in range(count):
        monkeypatch.setattr(pipelines, "batch_share", lambda rows, i=index: (i, count))
        parts.append(pipelines.train_iterator(tokens, 8, 16, seed=3))
    for _ in range(3):
        batch, shares = next(alone), [next(p) for p in parts]
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]),
                                          batch[key])
    assert all(p.get_state() == alone.get_state() for p in parts)


def test_bert_masking_does_not_depend_on_the_process_count(monkeypatch):
    """BERT's masking draws per global batch: the blocks equal the one-process batch."""
    rng = np.random.default_rng(0)
    rows = bert_data.Instances(rng.integers(5, 100, (50, 16)).astype(np.int32),
                               np.zeros((50, 16), np.int32), np.zeros(50, np.int32),
                               np.ones(50, np.float32))
    mask = bert_data.MaskConfig(vocab_size=100, max_predictions=3)
    alone = bert_data.pretrain_eval_batches(rows, 8, 4, 7, mask)
    parts = []
    for index in range(2):
        monkeypatch.setattr(bert_data, "batch_share", lambda n, i=index: (i, 2))
        parts.append(bert_data.pretrain_eval_batches(rows, 8, 4, 7, mask))
    for k, batch in enumerate(alone):
        for key, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), value)


def test_child_environment_gives_each_process_its_devices(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --foo")
    config = launch.LaunchConfig(command=("train",), num_processes=2, devices_per_process=4)
    env = launch.child_env(config, 1, 4321, gpus=[])
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env[distributed.COORDINATOR_ENV] == "127.0.0.1:4321"
    assert (env[distributed.NUM_PROCESSES_ENV], env[distributed.PROCESS_ID_ENV]) == ("2", "1")
    gpu_env = launch.child_env(config, 1, 4321, gpus=[str(g) for g in range(8)])
    assert gpu_env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    with pytest.raises(launch.LaunchError, match="GPUs"):
        launch.device_env(config, 0, ["0", "1"])
    assert launch.visible_gpus({"JAX_PLATFORMS": "cpu"}) == []
    assert launch.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]


def test_launch_names_the_failed_process(tmp_path):
    """A command that fails in every process (no gin file): the launcher says which
    process failed and how, exits 1 and leaves nothing running."""
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "lmjax.main", "launch", "--num_processes=2", "--",
         "train", f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 1
    assert re.search(r"lmjax: error: process \d of 2 \(pid \d+\) stopped with exit code 2",
                     result.stderr), result.stderr
    assert "[0] lmjax: error: train needs at least one --gin_file" in result.stdout
    assert not left_behind(workdir)


# --- fast: one real 2-process job ----------------------------------------------------


def test_two_processes_train_exactly_like_one(tmp_path, clean_gin):
    """2 processes x 4 devices = 1 process x 8 devices: the same losses at every step
    (relative 1e-5), eval included; process 0 alone writes the run's files; the job
    listens on loopback only and leaves no process behind."""
    params = ("train.num_steps=4", "train.log_every=1", "train.eval_every=4",
              "train.checkpoint_every=4")
    multi = tmp_path / "two"
    with launched(multi, 2, 4, *params) as (proc, log):
        seen = set()
        while proc.poll() is None:  # the job's sockets, while it runs
            seen.update(listeners(child_pids(log.read_text()).values()))
            time.sleep(0.2)
        output = log.read_text()
        assert proc.returncode == 0, output[-4000:]
    assert seen and all(is_loopback(address) for address in seen), seen
    assert not left_behind(multi)
    assert output.count("done: step 4") == 1 and "[0] done: step 4" in output
    assert (multi / "config.gin").exists() and list((multi / "tensorboard").iterdir())

    single = tmp_path / "one"
    run_single(single, *params)
    np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-5)
    np.testing.assert_allclose(records(multi, "eval")[4], records(single, "eval")[4],
                               rtol=1e-5)


# --- slow: the acceptance runs -------------------------------------------------------

MESHES = {"data": ("mesh.data=-1",), "fsdp": ("mesh.data=1", "mesh.fsdp=-1"),
          "tensor": ("mesh.data=-1", "mesh.tensor=4")}  # tensor spans processes in 4x2


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_baby_config_trains_alike_on_1x8_2x4_and_4x2(tmp_path, clean_gin, mesh):
    """The baby config, 20 steps at batch 16: the same losses (relative 1e-5) with 1
    process x 8 devices, 2 x 4 and 4 x 2."""
    params = ("train.num_steps=20", "train.batch_size=16", "train.log_every=1",
              "train.eval_every=20", "train.checkpoint_every=20", *MESHES[mesh])
    run_single(tmp_path / "1x8", *params, gin_file=BABY)
    want = losses(tmp_path / "1x8")
    assert len(want) == 20 and want[-1] < want[0]
    for processes, devices in ((2, 4), (4, 2)):
        workdir = tmp_path / f"{processes}x{devices}"
        run_launch(workdir, processes, devices, *params, gin_file=BABY)
        np.testing.assert_allclose(losses(workdir), want, rtol=1e-5)


RESUMABLE = ("train.num_steps=40", "train.log_every=1", "train.eval_every=40",
             "train.checkpoint_every=10")


@pytest.mark.slow
def test_killed_process_stops_the_job_and_the_rerun_resumes(tmp_path):
    """SIGKILL one of 2 processes mid-training: every process exits within 60 s, the
    launcher names the dead one, and rerunning the command resumes to exactly the
    uninterrupted run's losses."""
    reference = tmp_path / "uninterrupted"
    run_launch(reference, 2, 4, *RESUMABLE)
    workdir = tmp_path / "killed"
    with launched(workdir, 2, 4, *RESUMABLE) as (proc, log):
        wait_for_step(workdir, 12, proc)
        os.kill(child_pids(log.read_text())[1], signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=60)
        stopped_after = time.time() - killed_at
    output = log.read_text()
    assert proc.returncode == 1 and stopped_after < 60, output[-3000:]
    assert re.search(r"process 1 of 2 \(pid \d+\) stopped with signal SIGKILL", output)
    assert not left_behind(workdir)
    assert max(records(workdir)) < 40  # it was stopped mid-training
    run_launch(workdir, 2, 4, *RESUMABLE)
    np.testing.assert_allclose(losses(workdir), losses(reference), rtol=1e-6)


@pytest.mark.slow
def test_hung_process_stops_the_job(tmp_path):
    """A process that stops answering (SIGSTOP) misses its heartbeats: the others stop
    with an error naming it within the heartbeat timeout, and the launcher ends all."""
    workdir = tmp_path / "hung"
    params = ("train.num_steps=400", "train.log_every=1", "train.eval_every=400")
    with launched(workdir, 2, 4, *params, flags=("--heartbeat_timeout=10",)) as (proc, log):
        wait_for_step(workdir, 3, proc)
        os.kill(child_pids(log.read_text())[1], signal.SIGSTOP)
        stopped_at = time.time()
        proc.wait(timeout=60)
        took = time.time() - stopped_at
    output = log.read_text()
    assert proc.returncode == 1 and took < 60, output[-3000:]
    assert "stopped sending heartbeats" in output and "process 0 of 2" in output
    assert not left_behind(workdir)


@pytest.mark.slow
def test_killed_launcher_takes_its_processes_with_it(tmp_path):
    """SIGKILL the launcher alone (its children are not signalled): they die with it."""
    workdir = tmp_path / "orphans"
    params = ("train.num_steps=400", "train.log_every=1", "train.eval_every=400")
    with launched(workdir, 2, 4, *params) as (proc, log):
        wait_for_step(workdir, 2, proc)
        children = child_pids(log.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while left_behind(workdir) and time.time() < deadline:
            time.sleep(0.1)
        assert not left_behind(workdir), (children, left_behind(workdir))


@pytest.mark.slow
def test_processes_started_alone_stop_when_one_dies(tmp_path):
    """Without the launcher (as on a cluster): `train --coordinator_address=...
    --num_processes=2 --process_id=P` in each process; when process 1 dies, process 0
    stops within 60 s with an error naming it."""
    workdir = tmp_path / "alone"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    address = f"127.0.0.1:{launch.free_port()}"
    procs, logs = [], [tmp_path / f"p{p}.log" for p in (0, 1)]
    try:
        for pid, path in enumerate(logs):
            flags = [f"--coordinator_address={address}", "--num_processes=2",
                     f"--process_id={pid}", "--heartbeat_timeout=10"]
            with open(path, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "lmjax.main",
                     *_train_args(workdir, TINY, ("train.num_steps=400", "train.log_every=1",
                                                  "train.eval_every=400")), *flags],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        wait_for_step(workdir, 3, procs[0])
        procs[1].kill()
        killed_at = time.time()
        procs[0].wait(timeout=60)
        assert time.time() - killed_at < 60
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    assert procs[0].returncode != 0
    assert "stopped sending heartbeats" in logs[0].read_text()
    assert not left_behind(workdir)


@pytest.mark.slow
def test_checkpoints_restore_across_process_counts(tmp_path, clean_gin):
    """A checkpoint written by 2 processes trains on in 1, and the reverse, to the
    losses of one uninterrupted 1-process run (relative 1e-5)."""
    base = ("train.decay_steps=20", "train.log_every=1", "train.eval_every=10",
            "train.checkpoint_every=10")
    first, rest = (*base, "train.num_steps=10"), (*base, "train.num_steps=20")
    reference = tmp_path / "one"
    run_single(reference, *rest)
    two_then_one, one_then_two = tmp_path / "2-then-1", tmp_path / "1-then-2"
    run_launch(two_then_one, 2, 4, *first)
    run_single(two_then_one, *rest)
    run_single(one_then_two, *first)
    run_launch(one_then_two, 2, 4, *rest)
    for workdir in (two_then_one, one_then_two):
        np.testing.assert_allclose(losses(workdir), losses(reference), rtol=1e-5)
