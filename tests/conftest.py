"""Test setup: 8 emulated CPU devices, offline data and a per-session tfds directory.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os
import subprocess
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

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


def train_losses(mesh, model_config, train_config, steps: int, rules_name="fsdp_tensor",
                 workdir="/tmp/lmjax-test-unused"):
    """Train losses of `steps` steps from the same init and batches, on `mesh`; and the state."""
    import jax
    import numpy as np
    from flax import linen as nn

    from lmjax.data.pipelines import load_lm_data, train_iterator
    from lmjax.parallel import RULES
    from lmjax.train import trainer
    from lmjax.train.state import create_state

    data = load_lm_data("tiny_shakespeare")
    rules = RULES.get(rules_name)
    setup = trainer.build(model_config, train_config, mesh, rules, workdir)
    batches = train_iterator(data.train, model_config.block_size, train_config.batch_size, 0)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = create_state(setup.model, setup.tx, model_config.block_size, 0, mesh, rules)
        for _ in range(steps):
            state, metrics = setup.step_fn(state, trainer.to_global(next(batches),
                                                                    setup.batch_sharding))
            losses.append(metrics["loss"])
    setup.checkpoints.close()
    return np.asarray(jax.device_get(losses)), state
