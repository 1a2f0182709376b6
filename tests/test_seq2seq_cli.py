"""Translation end to end through the CLI: train the tiny Multi30k config, translate,
resume after SIGKILL, and bad input (all in the slow tier: each run compiles a few
bucket shapes)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_cli

TINY = "--gin_file=configs/experiments/multi30k_tiny.gin"
pytestmark = pytest.mark.slow


def _records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _train_args(workdir, *params):
    return ["train", f"--workdir={workdir}", TINY, *[f"--gin_param={p}" for p in params]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mt") / "run"
    result = run_cli(*_train_args(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_train_writes_loss_accuracy_and_bleu(trained):
    evals = _records(trained, "eval")
    assert [r["step"] for r in evals] == [10, 20]
    assert all({"loss", "accuracy", "bleu", "bleu_lc", "chrf"} <= r.keys() for r in evals)
    train = _records(trained, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert (trained / "tokenizer" / "tokenizer.json").exists()
    assert "translation.pair = 'en-de'" in (trained / "config.gin").read_text()


def test_translate_gives_one_line_per_input_line(trained, tmp_path):
    source = tmp_path / "in.en"
    source.write_text("A man is riding a bike.\n\nTwo dogs play in the snow.\n")
    out = run_cli("translate", f"--workdir={trained}", f"--input={source}", "--beam=1")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""  # 3 lines, newline-ended
    written = tmp_path / "out.de"
    beam = run_cli("translate", f"--workdir={trained}", f"--input={source}", "--beam=4",
                   f"--output={written}")
    assert beam.returncode == 0, beam.stderr[-2000:]
    assert len(written.read_text().split("\n")) == 4 and beam.stdout == ""


def test_translate_rejects_a_too_long_line_when_configured(trained, tmp_path):
    source = tmp_path / "long.en"
    source.write_text("A dog.\n" + "word " * 200 + "\n")
    out = run_cli("translate", f"--workdir={trained}", f"--input={source}",
                  f"--gin_file={trained / 'config.gin'}",
                  "--gin_param=translation.too_long='reject'")
    assert out.returncode == 1
    assert f"{source}:2 has" in out.stderr and "too_long='truncate'" in out.stderr
    cut = run_cli("translate", f"--workdir={trained}", f"--input={source}", "--beam=1")
    assert cut.returncode == 0 and f"warning: {source}:2" in cut.stderr


def test_unknown_language_pair_is_one_line_naming_the_pairs(tmp_path):
    result = run_cli(*_train_args(tmp_path / "run", "translation.pair='en-xx'"))
    assert result.returncode == 1
    assert "unknown language pair 'en-xx'; available: en-de, en-fr" in result.stderr


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, trained):
    params = ["train.checkpoint_every=5", "train.log_every=1", "translation.bleu_every=0"]
    reference = tmp_path / "reference"
    assert run_cli(*_train_args(reference, *params)).returncode == 0
    workdir = tmp_path / "killed"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, "-m", "lmjax.main", *_train_args(workdir, *params)],
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
    resumed = run_cli(*_train_args(workdir, *params))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _records(reference, "train"), _records(workdir, "train")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    assert abs(_records(workdir, "eval")[-1]["loss"] - _records(reference, "eval")[-1]["loss"]) \
        <= 1e-6
