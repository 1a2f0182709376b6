"""End to end through the CLI: metrics, resume after SIGKILL, sampling, and bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_cli, tiny_args


def _records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = run_cli(*tiny_args(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_train_writes_metrics_config_and_checkpoints(trained):
    workdir, result = trained
    train, evals = _records(workdir, "train"), _records(workdir, "eval")
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert all({"loss", "learning_rate", "tokens_per_sec"} <= r.keys() for r in train)
    assert [r["step"] for r in evals] == [10, 20]
    assert train[-1]["loss"] < train[0]["loss"]
    assert "train.num_steps = 20" in (workdir / "config.gin").read_text()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
    assert os.listdir(workdir / "tensorboard")
    assert "done: step 20" in result.stdout


@pytest.mark.slow  # ~1 min; the serving and command tests read the best checkpoint too
def test_sample_and_eval_read_the_best_checkpoint(trained):
    workdir, _ = trained
    out = run_cli("sample", f"--workdir={workdir}", "--prompt=ROMEO:", "--max_new_tokens=20",
                  "--seed=3")
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout.strip().splitlines()
    assert out.stdout.startswith("ROMEO:") and len(out.stdout.rstrip("\n")) >= 6
    again = run_cli("sample", f"--workdir={workdir}", "--prompt=ROMEO:", "--max_new_tokens=20",
                    "--seed=3")
    assert again.stdout.strip().splitlines() == text  # seeded
    evaluated = run_cli("eval", f"--workdir={workdir}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    best = _records(workdir, "eval")[-1]["best_loss"]
    assert f"loss {best:.4f}" in evaluated.stdout


@pytest.mark.slow  # ~1-2 min; by default test_rnn checks a stopped-and-rerun run resumes exactly
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, trained):
    params = ["train.checkpoint_every=5", "train.log_every=1"]
    reference, _ = trained
    reference_run = tmp_path / "reference"
    assert run_cli(*tiny_args(reference_run, *params)).returncode == 0
    workdir = tmp_path / "killed"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, "-m", "lmjax.main", *tiny_args(workdir, *params)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(r["step"] >= 12 for r in _records(workdir, "train")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli(*tiny_args(workdir, *params))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _records(reference_run, "train"), _records(workdir, "train")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    final, final_want = _records(workdir, "eval")[-1], _records(reference_run, "eval")[-1]
    assert abs(final["loss"] - final_want["loss"]) <= 1e-6
    assert not [d for d in os.listdir(workdir / "checkpoints") if not d.isdigit()]


def test_unknown_binding_exits_2_and_names_it(tmp_path):
    result = run_cli(*tiny_args(tmp_path, "train.num_stepz=3"))
    assert result.returncode == 2
    assert "num_stepz" in result.stderr


def test_missing_dataset_says_where_the_file_goes(tmp_path):
    env_dir = tmp_path / "empty"
    env_dir.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "lmjax.main", *tiny_args(tmp_path / "run")], cwd=REPO,
        env=dict(os.environ, LMJAX_DATA_DIR=str(env_dir), LMJAX_TFDS_DIR=str(tmp_path / "tfds"),
                 XLA_FLAGS=""),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "LMJAX_DATA_DIR" in result.stderr and "tinyshakespeare/input.txt" in result.stderr


def test_nan_loss_stops_names_step_keeps_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "nan"
    result = run_cli(*tiny_args(workdir, "train.learning_rate=1e12", "train.grad_clip=0.0",
                                "train.warmup_steps=0", "train.checkpoint_every=1",
                                "train.log_every=1"))
    assert result.returncode != 0
    assert "at step" in result.stderr and "nan" in result.stderr.lower()
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints"))
    bad_step = int(result.stderr.split("at step ")[1].split(";")[0])
    assert steps and max(steps) < bad_step


def test_checkpoint_of_another_shape_is_refused_untouched(trained, tmp_path):
    workdir, _ = trained
    before = {p: os.path.getmtime(workdir / p) for p in ("config.gin", "metrics.jsonl")}
    result = run_cli(*tiny_args(workdir, "GPTConfig.embed_dim=64"))
    assert result.returncode != 0
    assert re.search(r"parameter \S+ has shape \(.*\) in the checkpoint but \(.*\) in the "
                     "config", result.stderr), result.stderr
    assert before == {p: os.path.getmtime(workdir / p) for p in before}
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
