"""Joining a multi-process JAX job (`jax.distributed`) and each process's share of a batch.

One `lmjax train` runs in every process of a job. It joins before anything touches a JAX
backend, from (first that applies):
- the flags `--coordinator_address`, `--num_processes`, `--process_id`;
- the environment `lmjax launch` gives its children (`LMJAX_COORDINATOR`, ...);
- a cluster JAX detects itself: a SLURM step or Open MPI job of several tasks, or any
  environment with `--distributed` (TPU pod slices: JAX asks the TPU metadata).
Without any of them the run is one process, as before.

Every process then builds the same global mesh. Batches are split over the mesh's
batch axes exactly as in one process: process p loads one contiguous block of rows of
each global batch (`batch_share`), the block its devices hold, so 2 processes x 4
devices read and train on exactly the batches 1 process x 8 devices does.
"""

import contextlib
import contextvars
import dataclasses
import functools
import os
import sys
import traceback

import jax

COORDINATOR_ENV = "LMJAX_COORDINATOR"  # host:port of the coordination service
NUM_PROCESSES_ENV = "LMJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "LMJAX_PROCESS_ID"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


@dataclasses.dataclass(frozen=True)
class Job:
    """How this process joins a job; None fields are detected by JAX from the cluster."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = 30  # s without a heartbeat before a process counts as dead
    join_timeout: int = 300  # s to wait for every process to join
    shutdown_timeout: int = 60  # s the final barrier waits for the others

    @property
    def explicit(self) -> bool:
        return None not in (self.coordinator, self.num_processes, self.process_id)

    @property
    def loopback(self) -> bool:
        return self.coordinator is not None and self.coordinator.rsplit(":", 1)[0] in \
            LOOPBACK_HOSTS


def _int_env(environ, name: str) -> int | None:
    value = environ.get(name)
    return None if value in (None, "") else int(value)


def cluster_detected(environ=os.environ) -> bool:
    """An `srun` step or Open MPI job of more than one task (JAX reads the rest from it).
    An allocation's shell (salloc, an sbatch script outside srun) is not one."""
    tasks = [environ.get("SLURM_STEP_NUM_TASKS"), environ.get("OMPI_COMM_WORLD_SIZE")]
    return any(int(n) > 1 for n in tasks if n)


def job_from(coordinator=None, num_processes=None, process_id=None, force=False,
             environ=os.environ, **timeouts) -> Job | None:
    """The job this process joins (flags first, then lmjax launch's environment, then a
    detected cluster), or None for a single-process run."""
    job = Job(coordinator or environ.get(COORDINATOR_ENV),
              num_processes if num_processes is not None else _int_env(environ,
                                                                        NUM_PROCESSES_ENV),
              process_id if process_id is not None else _int_env(environ, PROCESS_ID_ENV),
              **timeouts)
    given = [f for f in ("coordinator", "num_processes", "process_id")
             if getattr(job, f) is not None]
    if not given and not force and not cluster_detected(environ):
        return None
    if given and not job.explicit and not cluster_detected(environ):
        missing = [f"--{'coordinator_address' if f == 'coordinator' else f}"
                   for f in ("coordinator", "num_processes", "process_id") if f not in given]
        raise ValueError(f"a multi-process run needs {', '.join(missing)} as well (or a "
                         "SLURM or Open MPI job, from which JAX reads them)")
    return job


def initialize(job: Job) -> None:
    """Joins the job's coordination service; call before anything creates a backend.

    CPU collectives go through gloo. A coordinator on a loopback address binds the service
    to that address only (JAX's default listens on every interface)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if job.loopback:
        _gloo_on_loopback()
    jax.distributed.initialize(
        job.coordinator, job.num_processes, job.process_id,
        cluster_detection_method="deactivate" if job.explicit else None,
        initialization_timeout=job.join_timeout,
        heartbeat_timeout_seconds=job.heartbeat_timeout,
        shutdown_timeout_seconds=job.shutdown_timeout,
        coordinator_bind_address=job.coordinator if job.loopback else None)


def _gloo_on_loopback() -> None:
    """Makes gloo's CPU collectives listen on 127.0.0.1. JAX creates them without an
    address, and gloo then listens on whatever the machine's hostname resolves to, which
    may be a public interface; jax 0.10 has no setting for it, hence the wrapper."""
    from jax._src.lib import _jax

    make = _jax.make_gloo_tcp_collectives
    if not isinstance(make, functools.partial):
        _jax.make_gloo_tcp_collectives = functools.partial(make, hostname="127.0.0.1")


def is_multiprocess() -> bool:
    """True once this process has joined a job of more than one process."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


@contextlib.contextmanager
def exit_at_once_on_error():
    """In a multi-process job, an error ends this process at once (exit 1) after printing
    it: the normal exit would wait in JAX's shutdown barrier for peers that may be dead."""
    try:
        yield
    except BaseException as err:
        if not jax.distributed.is_initialized() or isinstance(err, SystemExit):
            raise
        from lmjax.errors import RunError

        if isinstance(err, (ValueError, KeyError, OSError, RunError)):
            print(f"lmjax: error: process {jax.process_index()}: {err}", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"lmjax: error: process {jax.process_index()} stopped: "
                  f"{type(err).__name__}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


# Which rows of each global batch this process loads. The trainer sets the batch sharding
# while it builds its iterators; without one, the rows split evenly over the processes.
_BATCH_SHARDING = contextvars.ContextVar("lmjax_batch_sharding", default=None)


@contextlib.contextmanager
def loading_for(sharding):
    """Within it, `batch_share` gives the rows of `sharding` this process's devices hold."""
    token = _BATCH_SHARDING.set(sharding)
    try:
        yield
    finally:
        _BATCH_SHARDING.reset(token)


def batch_share(global_batch: int) -> tuple[int, int]:
    """(index, count): this process loads rows [index * n, (index + 1) * n) of every global
    batch of `global_batch` rows, n = global_batch // count. Processes that hold the same
    rows (a mesh axis other than the batch's spans them) load the same block."""
    sharding = _BATCH_SHARDING.get()
    if sharding is None:
        index, count = jax.process_index(), jax.process_count()
    else:
        index, count = _share_of(sharding, global_batch)
    if global_batch % count:
        raise ValueError(f"batch size {global_batch} does not divide over {count} processes")
    return index, count


def _share_of(sharding, rows: int) -> tuple[int, int]:
    blocks = sorted({(s[0].indices(rows)[:2]) for s in
                     sharding.addressable_devices_indices_map((rows,)).values()})
    lo, hi = blocks[0][0], blocks[-1][1]
    contiguous = all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    if not contiguous or rows % (hi - lo) or lo % (hi - lo):
        raise ValueError(
            f"process {jax.process_index()} holds rows {blocks} of each batch of {rows}, "
            "not one block of an even split: order the mesh's devices by process "
            "(lmjax.parallel.mesh.make_mesh does) or change the batch size")
    return lo // (hi - lo), rows // (hi - lo)


def barrier(name: str) -> None:
    """Waits until every process of the job reaches the barrier `name` (no-op alone)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_zero_first(fn):
    """fn() in process 0, then (after a barrier) in the others: for work that writes
    shared files the others then read (preparing a dataset, saving the tokenizer)."""
    if not is_multiprocess():
        return fn()
    result = fn() if jax.process_index() == 0 else None
    barrier("lmjax: process 0 went first")
    return result if jax.process_index() == 0 else fn()
