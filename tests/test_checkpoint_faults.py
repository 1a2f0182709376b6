"""Damaged and unwritable checkpoints: a run resumes from the newest intact checkpoint,
reads of parameters (eval, sample, serve) do the same, and a failed save stops the run
with one line naming the path instead of training on or hanging."""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
from conftest import REPO, run_cli, tiny_args

from lmjax import configs
from lmjax.parallel import RULES, make_mesh
from lmjax.train import trainer
from lmjax.train.checkpoint import Checkpointer, CheckpointError, best_params
from lmjax.train.config import TrainConfig
from lmjax.train.state import abstract_params
from lmjax.train.tasks import LMTask


def _chunks(step_dir: Path) -> list[Path]:
    """The state's data files. All of them are damaged: which one holds the parameters
    (rather than the optimiser's moments) differs from run to run."""
    chunks = [p for p in (step_dir / "state").rglob("*")
              if p.is_file() and p.parent.name == "d"]
    assert chunks, f"no data files under {step_dir / 'state'}"
    return chunks


def _for_each_chunk(damage):
    return lambda step_dir: [damage(chunk) for chunk in _chunks(step_dir)]


DAMAGES = {
    "chunk_deleted": _for_each_chunk(Path.unlink),
    "chunk_truncated": _for_each_chunk(lambda p: p.write_bytes(p.read_bytes()[:10])),
    "chunk_overwritten": _for_each_chunk(lambda p: p.write_bytes(b"\0" * p.stat().st_size)),
    "state_metadata_deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "meta_deleted": lambda d: (d / "meta" / "metadata").unlink(),
    "state_folder_deleted": lambda d: shutil.rmtree(d / "state"),
}


@pytest.fixture
def trained(tiny_trained):
    return tiny_trained


def _setup(workdir: Path):
    gin.clear_config()
    configs.parse([str(workdir / "config.gin")], [])
    config = configs.bound(TrainConfig)
    gin.clear_config()
    task = LMTask(dataclasses.replace(config.model, vocab_size=65))
    mesh, rules = make_mesh(1, 1, 1, devices=jax.devices()[:1]), RULES.get("fsdp_tensor")
    return task, config, mesh, rules


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_by_name(trained, tmp_path, capfd, damage):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    DAMAGES[damage](workdir / "checkpoints" / "20")
    task, config, mesh, rules = _setup(workdir)
    setup = trainer.build(task, config, mesh, rules)
    checkpoints = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    with jax.set_mesh(mesh):
        _, _, step = checkpoints.restore_latest(setup.abstract)
        params, best = best_params(str(workdir), abstract_params(task, mesh, rules))
    checkpoints.close()
    assert step == best == 10
    assert "checkpoint step 20" in capfd.readouterr().err
    want = Checkpointer(str(trained / "checkpoints"), read_only=True)
    intact = want.restore_params(10, abstract_params(task, mesh, rules))
    want.close()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(intact), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_and_eval_use_the_intact_checkpoint(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    DAMAGES["chunk_truncated"](workdir / "checkpoints" / "20")
    evaluated = run_cli("eval", f"--workdir={workdir}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "eval: step 10" in evaluated.stdout and "step 20" in evaluated.stderr
    resumed = run_cli(*tiny_args(workdir, "train.num_steps=30"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done: step 30" in resumed.stdout


def test_no_intact_checkpoint_is_one_error_naming_the_steps(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    for step in ("10", "20"):
        DAMAGES["state_folder_deleted"](workdir / "checkpoints" / step)
    task, config, mesh, rules = _setup(workdir)
    with pytest.raises(CheckpointError, match=r"no checkpoint .* can be read: step 20: .*; "
                                              r"step 10: "):
        best_params(str(workdir), abstract_params(task, mesh, rules))
    result = run_cli("sample", f"--workdir={workdir}", "--prompt=ROMEO:")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("lmjax: error: no checkpoint")


def _immutable(path: Path) -> bool:
    """Makes a folder unwritable even for root (chattr +i); False where that is refused."""
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def test_a_failed_save_stops_the_run_with_one_line(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    if not _immutable(checkpoints):
        pytest.skip("chattr +i is not permitted here, so no folder can refuse root's writes")
    try:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        result = subprocess.run([sys.executable, "-m", "lmjax.main",
                                 *tiny_args(tmp_path / "run")], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], check=True)
    assert result.returncode == 1  # and it returned: no hang in orbax's threads
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmjax: error: saving a checkpoint in") and str(checkpoints) in last
    assert "Operation not permitted" in last and "done:" not in result.stdout


def test_a_read_only_workdir_is_one_line_naming_it(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    if not _immutable(workdir):
        pytest.skip("chattr +i is not permitted here, so no folder can refuse root's writes")
    try:
        result = run_cli(*tiny_args(workdir))
    finally:
        subprocess.run(["chattr", "-i", str(workdir)], check=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("lmjax: error: ") and str(workdir) in lines[-1]
    assert "Traceback" not in result.stderr
