"""Classification through the one trainer: SST-2 builder, metrics, end to end via the CLI."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import SHARED_DATA, run_cli

from lmjax.data import builders
from lmjax.train.tasks import binary_counts, classification_metrics


def _small_sst2(folder, train_rows: int = 1500, dev_rows: int = 200):
    """The first rows of the real SST-2 files, so tests prepare in seconds."""
    source = SHARED_DATA / "sst2"
    folder.mkdir(parents=True)
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        lines = (source / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / name).write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return folder


def test_bad_tsv_row_is_reported_with_file_and_line(tmp_path):
    folder = _small_sst2(tmp_path / "sst2", 20, 5)
    lines = (folder / "train.tsv").read_text().splitlines(keepends=True)
    lines[7] = "positive\tnot a label\n"  # line 8 of the file
    (folder / "train.tsv").write_text("".join(lines))
    with pytest.raises(builders.BadDataError, match=r"train\.tsv:8: cannot parse row"):
        builders.prepare("sst2", str(tmp_path / "tfds"), str(folder))
    result = run_cli(*classify_args(tmp_path / "run", folder, "configs/experiments/sst2_cbow.gin"))
    assert result.returncode == 1 and "train.tsv:8: cannot parse row" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_header_only_file_is_named(tmp_path):
    folder = _small_sst2(tmp_path / "sst2", 5, 5)
    (folder / "train.tsv").write_text("label\tsentence\n")
    with pytest.raises(builders.BadDataError, match=r"train\.tsv has no rows under its header"):
        builders.prepare("sst2", str(tmp_path / "tfds"), str(folder))


def test_dev_file_reads_its_content_column(tmp_path):
    folder = _small_sst2(tmp_path / "sst2", 5, 5)
    rows = builders.read_sst2_tsv(folder / "dev.tsv", "content")
    assert len(rows) == 5 and all(label in (0, 1) and text for label, text in rows)
    with pytest.raises(builders.BadDataError, match=r"dev\.tsv:1: header"):
        builders.read_sst2_tsv(folder / "dev.tsv", "sentence")


def test_metrics_from_sums_equal_plain_accuracy_and_f1():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 2)), rng.integers(0, 2, 50)
    weights = np.ones(50, np.float32)
    weights[-7:] = 0  # padding rows of a last eval batch
    halves = [binary_counts(logits[s], labels[s], weights[s]) for s in (slice(0, 25),
                                                                        slice(25, 50))]
    sums = {k: float(halves[0][k] + halves[1][k]) for k in halves[0]}
    sums.update(loss=0.0, count=float(weights.sum()))
    got = classification_metrics(sums)
    pred, real = logits[:43].argmax(-1), labels[:43]
    tp = np.sum((pred == 1) & (real == 1))
    precision, recall = tp / np.sum(pred == 1), tp / np.sum(real == 1)
    assert got["accuracy"] == pytest.approx(np.mean(pred == real), abs=1e-12)
    assert got["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)


def _evals(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "eval"]


def classify_args(workdir, data_root, config: str, *params: str) -> list[str]:
    params = (f"classify_dataset.manual_dir='{data_root}'",
              f"classify_dataset.tfds_dir='{data_root.parent / 'tfds'}'",
              "classify_dataset.vocab_size=500", "train.num_steps=30", "train.eval_every=15",
              "train.checkpoint_every=15", "train.log_every=5", "train.batch_size=16",
              "train.eval_batch_size=32") + params
    return ["train", f"--workdir={workdir}", f"--gin_file={config}",
            *[f"--gin_param={p}" for p in params]]


@pytest.fixture(scope="module")
def small_sst2(tmp_path_factory):
    return _small_sst2(tmp_path_factory.mktemp("data") / "sst2")


def test_cbow_classify_end_to_end_and_eval_command(small_sst2, tmp_path):
    workdir = tmp_path / "cbow"
    result = run_cli(*classify_args(workdir, small_sst2, "configs/experiments/sst2_cbow.gin"))
    assert result.returncode == 0, result.stderr[-3000:]
    evals = _evals(workdir)
    assert [r["step"] for r in evals] == [15, 30]
    assert all({"loss", "accuracy", "f1", "best_loss"} <= r.keys() for r in evals)
    assert all(r["examples"] == 200 for r in evals)  # every dev row once, padding excluded
    best = min(evals, key=lambda r: r["loss"])
    out = run_cli("eval", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"accuracy {best['accuracy']:.4f}, f1 {best['f1']:.4f}" in out.stdout
    shutil.rmtree(workdir / "checkpoints")
    again = run_cli("eval", f"--workdir={workdir}")
    assert again.returncode == 1 and "no checkpoint" in again.stderr


def test_bilstm_classify_end_to_end(small_sst2, tmp_path):
    workdir = tmp_path / "bilstm"
    result = run_cli(*classify_args(workdir, small_sst2, "configs/experiments/sst2_bilstm.gin",
                                    "BiLSTMConfig.embed_dim=16", "BiLSTMConfig.hidden_dim=16",
                                    "BiLSTMConfig.mlp_dim=16", "classify_dataset.max_length=24"),
                     devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = _evals(workdir)
    assert [r["step"] for r in evals] == [15, 30]
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["f1"] <= 1.0 for r in evals)
    assert "accuracy" in result.stdout and "f1" in result.stdout
