"""Knowledge distillation: the loss against a NumPy transcription of Hinton et al.'s
objective, the task's batches carrying the teacher's logits of each example, the
transfer set's augmentation (Tang et al.), and the `distill` task end to end through the
CLI (teacher logits computed once and cached)."""

import json

import jax
import numpy as np
import pytest
from conftest import run_cli

from lmjax.data import pipelines
from lmjax.data.config import DistillConfig
from lmjax.data.tokenizers import CharTokenizer
from lmjax.models import CBoWConfig
from lmjax.train.distill import DistillTask, augment, distill_losses


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


def test_unlabelled_rows_take_the_soft_term_alone():
    rng = np.random.default_rng(4)
    student, teacher = (3 * rng.normal(size=(10, 2)).astype(np.float32) for _ in range(2))
    labels, labelled = rng.integers(0, 2, 10), np.arange(10) % 3 != 0
    got = np.asarray(distill_losses(student, teacher, labels, 2.0, 0.3, labelled))
    mixed = _reference(student, teacher, labels, 2.0, 0.3)
    soft = _reference(student, teacher, labels, 2.0, 1.0)
    np.testing.assert_allclose(got, np.where(labelled, mixed, soft), rtol=1e-5, atol=1e-6)


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


def test_transfer_rows_follow_the_training_rows_unlabelled():
    data = _data()
    rng = np.random.default_rng(5)
    teacher = rng.normal(size=(len(data.train), 2)).astype(np.float32)
    extra = pipelines.pad_examples([np.array([1, 2]), np.array([3])], [0, 0], 6)
    extra_logits = rng.normal(size=(2, 2)).astype(np.float32)
    config = CBoWConfig(vocab_size=data.tokenizer.vocab_size, num_classes=2, embed_dim=8,
                        hidden_dim=8, dropout=0.0)
    task = DistillTask(config, data, teacher, 2.0, 0.5, (extra, extra_logits))
    train = task.data.train
    assert len(train) == len(data.train) + 2
    np.testing.assert_array_equal(train.inputs[-2:], extra.inputs)
    np.testing.assert_array_equal(train.teacher[-2:], extra_logits)
    assert train.labelled.tolist() == [True] * len(data.train) + [False, False]
    assert not train[len(data.train)]["labelled"] and train[0]["labelled"]


def test_augment_deletes_words_and_samples_ngrams_without_repeats():
    texts = ["a b c d e f g h", "one two three", "solo"]
    out = augment(texts, copies=20, drop=0.1, ngram=0.25, seed=0)
    assert out == augment(texts, copies=20, drop=0.1, ngram=0.25, seed=0)  # seeded
    assert out != augment(texts, copies=20, drop=0.1, ngram=0.25, seed=1)
    assert len(out) == len(set(out)) and all(out) and not set(out) & set(texts)
    for sentence in out:  # an ordered subsequence of one source's words
        words = sentence.split()
        assert any(_is_subsequence(words, t.split()) for t in texts)
    assert any(len(s.split()) <= 5 for s in out if s.split()[0] in "abcdefgh")
    # Nothing deleted and no n-grams: every copy repeats its text, so none is kept.
    assert augment(texts, copies=5, drop=0.0, ngram=0.0, seed=0) == []
    # Only n-grams: each copy is a contiguous run of at most 5 words.
    for sentence in augment(texts, copies=10, drop=0.0, ngram=0.999, seed=0):
        assert sentence in texts[0] or sentence in texts[1]
        assert len(sentence.split()) <= 5


def _is_subsequence(words, source):
    it = iter(source)
    return all(w in it for w in words)


@pytest.mark.parametrize("binding,message", [
    ({"augment": -1}, "distill.augment must be >= 0"),
    ({"augment_drop": 1.0}, "distill.augment_drop is a probability"),
    ({"augment_ngram": -0.1}, "distill.augment_ngram is a probability"),
])
def test_bad_augment_bindings_are_refused(binding, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**binding)


def test_texts_without_train_logits_is_refused(tmp_path):
    result = run_cli("eval", f"--workdir={tmp_path}",
                     "--gin_file=configs/experiments/sst2_cbow.gin",
                     f"--texts={tmp_path / 'lines.txt'}")
    assert result.returncode == 1
    assert "--texts names the inputs of --train_logits" in result.stderr


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
    # --texts encodes lines as the training split is: the first training sentences give
    # the same logits as the training split's first rows.
    from lmjax.data import builders

    rows = builders.read_examples("sst2", "train")[:40]
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(r["text"].decode("utf-8") for r in rows) + "\n")
    done = run_cli("eval", f"--workdir={teacher}", f"--train_logits={tmp_path / 'l.npy'}",
                   f"--texts={lines}")
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), logits[:40], rtol=1e-5, atol=1e-6)
    # A transfer set: written once, the teacher's logits on each of its lines, and the
    # student trains on both.
    augmented = tmp_path / "augmented"
    done = run_cli(*args[:1], f"--workdir={augmented}", *args[2:],
                   "--gin_param=distill.augment=1")
    assert done.returncode == 0, done.stderr[-2000:]
    transfer = (augmented / "transfer.txt").read_text().splitlines()
    transfer_logits = np.load(augmented / "transfer_logits.npy")
    assert 10_000 < len(transfer) < 67349 and transfer_logits.shape == (len(transfer), 2)
    assert "transfer set:" in done.stdout
