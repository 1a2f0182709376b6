"""Knowledge distillation: the loss against a NumPy transcription of Hinton et al.'s
objective, the task's batches carrying the teacher's logits of each example, and the
`distill` task end to end through the CLI (teacher logits computed once and cached)."""

import json

import jax
import numpy as np
import pytest
from conftest import run_cli

from lmjax.data import pipelines
from lmjax.data.tokenizers import CharTokenizer
from lmjax.models import CBoWConfig
from lmjax.train.distill import DistillTask, distill_losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(student, teacher, labels, temperature, alpha):
    """(1 - a) * CE(y, softmax(s)) + a * T^2 * KL(softmax(t/T) || softmax(s/T)), in NumPy."""
    hard = -_log_softmax(student.astype(np.float64))[np.arange(len(labels)), labels]
    p = np.exp(_log_softmax(teacher.astype(np.float64) / temperature))
    log_q = _log_softmax(student.astype(np.float64) / temperature)
    soft = (p * (np.log(p) - log_q)).sum(-1) * temperature ** 2
    return (1 - alpha) * hard + alpha * soft


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.0, 0.5), (4.0, 0.9), (3.0, 1.0)])
def test_loss_equals_numpy_transcription(temperature, alpha):
    rng = np.random.default_rng(0)
    student, teacher = (3 * rng.normal(size=(16, 3)).astype(np.float32) for _ in range(2))
    labels = rng.integers(0, 3, 16)
    got = distill_losses(student, teacher, labels, temperature, alpha)
    np.testing.assert_allclose(np.asarray(got), _reference(student, teacher, labels,
                                                           temperature, alpha), rtol=1e-5,
                               atol=1e-6)


def test_soft_term_is_zero_when_the_student_copies_the_teacher():
    logits = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32)
    got = distill_losses(logits, logits, np.zeros(8, np.int32), 2.0, 1.0)
    np.testing.assert_allclose(np.asarray(got), 0.0, atol=1e-6)


def _data(n=12, length=6):
    tok = CharTokenizer.from_text("abcdef")
    rng = np.random.default_rng(2)
    ids = [rng.integers(1, tok.vocab_size, rng.integers(2, length + 1)) for _ in range(n)]
    train = pipelines.pad_examples(ids, list(rng.integers(0, 2, n)), length)
    return pipelines.ClassificationData(tok, train, train, length)


def test_task_loss_reads_each_examples_teacher_logits():
    data = _data()
    teacher = np.random.default_rng(3).normal(size=(len(data.train), 2)).astype(np.float32)
    config = CBoWConfig(vocab_size=data.tokenizer.vocab_size, num_classes=2, embed_dim=8,
                        hidden_dim=8, dropout=0.0)
    task = DistillTask(config, data, teacher, temperature=2.0, alpha=0.7)
    params = task.model.init(jax.random.key(0), *task.init_args())["params"]
    batch = next(iter(task.train_iterator(4, seed=0)))
    rows = [int(np.flatnonzero((data.train.inputs == row).all(1))[0]) for row in batch["inputs"]]
    np.testing.assert_array_equal(batch["teacher_logits"], teacher[rows])
    loss, _ = task.loss(params, batch, None, None, True)
    student = np.asarray(task.logits(params, batch))
    want = _reference(student, teacher[rows], batch["label"], 2.0, 0.7).mean()
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_teacher_of_another_size_is_refused_by_count():
    data = _data()
    with pytest.raises(ValueError, match="cover 5 training examples, the student's data has 12"):
        DistillTask(CBoWConfig(), data, np.zeros((5, 2), np.float32), 2.0, 0.5)


def test_distill_without_teacher_names_the_binding(tmp_path):
    result = run_cli("train", f"--workdir={tmp_path / 'student'}",
                     "--gin_file=configs/experiments/sst2_cbow_distill.gin",
                     "--gin_param=distill.teacher_workdir=None")
    assert result.returncode == 1
    assert "distill.teacher_workdir" in result.stderr


@pytest.mark.slow
def test_distill_end_to_end_caches_the_teacher_logits(tmp_path):
    short = ["--gin_param=train.num_steps=20", "--gin_param=train.eval_every=20",
             "--gin_param=train.checkpoint_every=20", "--gin_param=train.eval_batches=2"]
    teacher = tmp_path / "teacher"
    done = run_cli("train", f"--workdir={teacher}", "--gin_file=configs/experiments/sst2_cbow.gin",
                   *short)
    assert done.returncode == 0, done.stderr[-2000:]
    student = tmp_path / "student"
    args = ["train", f"--workdir={student}", "--gin_file=configs/experiments/sst2_cbow_distill.gin",
            f"--gin_param=distill.teacher_workdir='{teacher}'", *short]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    logits = np.load(student / "teacher_logits.npy")
    assert logits.shape == (67349, 2) and np.isfinite(logits).all()
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "eval" and "accuracy" in r for r in records)
    stamp = (student / "teacher_logits.npy").stat().st_mtime_ns
    assert run_cli("eval", f"--workdir={student}").returncode == 0
    assert (student / "teacher_logits.npy").stat().st_mtime_ns == stamp  # read, not redone
