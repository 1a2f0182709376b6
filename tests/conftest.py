"""Test setup: 8 emulated CPU devices, offline data and a per-session tfds directory.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
Float32 matmuls run at full precision (`JAX_DEFAULT_MATMUL_PRECISION=highest`, also in
the CLI subprocesses the tests start): the numerical tests compare against float32
references, and GPUs would otherwise use TF32 (on the CPU this changes nothing).
"""

import os
import subprocess
import sys
import threading
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def _data_dir() -> str:
    default = str(SHARED_DATA) if SHARED_DATA.exists() else ""
    data_dir = os.environ.get("LMJAX_DATA_DIR") or default
    if not data_dir or not Path(data_dir, "tinyshakespeare", "input.txt").exists():
        pytest.exit(
            "Tiny Shakespeare not found: set LMJAX_DATA_DIR to the folder holding "
            "tinyshakespeare/input.txt (the project's shared data folder).",
            returncode=3,
        )
    return data_dir


@pytest.fixture(scope="session", autouse=True)
def offline_data(tmp_path_factory) -> str:
    """Points lmjax at the offline corpora and a fresh tfds dir, prepared once per session."""
    os.environ["LMJAX_DATA_DIR"] = _data_dir()
    os.environ.setdefault("LMJAX_TFDS_DIR", str(tmp_path_factory.mktemp("tfds")))
    from lmjax.data import builders

    builders.prepare("tiny_shakespeare")
    return os.environ["LMJAX_DATA_DIR"]


def listening() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening on this machine; the address in hex,
    as /proc/net/tcp and tcp6 write it (each 32-bit word little-endian)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A":  # LISTEN
                found.add((address, int(port, 16)))
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or ::ffff:127.x.y.z, in /proc/net's hex."""
    if len(address) == 8:
        return address.endswith("7F")
    mapped = address.startswith("0000000000000000FFFF0000") and address.endswith("7F")
    return mapped or address == "00000000000000000000000001000000"


@pytest.fixture(scope="session", autouse=True)
def loopback_only():
    """Nothing the suite starts listens beyond 127.0.0.1: a thread reads /proc/net every
    0.1 s during the session (sockets listening before it began are not the suite's)."""
    if not Path("/proc/net/tcp").exists():
        yield
        return
    before, strays, stop = listening(), set(), threading.Event()

    def watch():
        while not stop.wait(0.1):
            strays.update(s for s in listening() - before if not is_loopback(s[0]))

    thread = threading.Thread(target=watch, name="loopback-watch", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()
    assert not strays, f"sockets listened beyond loopback (address hex, port): {sorted(strays)}"


def run_cli(*args: str, devices: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m lmjax.main ARGS` in a subprocess with `devices` CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, "-m", "lmjax.main", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def tiny_args(workdir, *params: str) -> list[str]:
    args = ["train", f"--workdir={workdir}",
            "--gin_file=configs/experiments/shakespeare_char_tiny.gin"]
    return args + [f"--gin_param={p}" for p in params]


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> Path:
    """A workdir of the tiny config trained by the CLI (20 steps, checkpoints at 10 and 20,
    the best at 20), shared by the session: tests copy it before they change anything."""
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    result = run_cli(*tiny_args(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def run_steps(task, mesh, train_config, steps: int, rules_name="fsdp_tensor", seed: int = 0):
    """`steps` training steps of `task` on `mesh` from the seed's init and batches:
    (metrics of each step as floats, final state)."""
    import jax
    from flax import linen as nn

    from lmjax.parallel import RULES
    from lmjax.parallel.mesh import to_global
    from lmjax.train import trainer
    from lmjax.train.state import create_state

    rules = RULES.get(rules_name)
    setup = trainer.build(task, train_config, mesh, rules)
    batches = task.train_iterator(train_config.batch_size, seed)
    out = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = create_state(task, setup.tx, train_config.batch_size, seed, mesh, rules)
        for _ in range(steps):
            state, metrics = setup.step_fn(state, to_global(next(batches), setup.batch_sharding))
            out.append(metrics)
    return [{k: float(v) for k, v in m.items()} for m in jax.device_get(out)], state


def train_losses(mesh, model_config, train_config, steps: int, rules_name="fsdp_tensor"):
    """Train losses of the GPT LM of `model_config` on Tiny Shakespeare; and the state."""
    import numpy as np

    from lmjax.data.pipelines import load_lm_data
    from lmjax.train.tasks import LMTask

    task = LMTask(model_config, load_lm_data("tiny_shakespeare"))
    metrics, state = run_steps(task, mesh, train_config, steps, rules_name)
    return np.asarray([m["loss"] for m in metrics], np.float32), state
