"""Knowledge distillation (Hinton et al. 2015) of a trained classifier into a student.

The teacher is any classification run (`classify` or `bert_finetune`, for example a
fine-tuned BERT); the student is `train.model` on the `classify_dataset` data (a CBoW or
BiLSTM-max, as Tang et al. 2019, or a smaller BERT). The teacher's logits on every
training example are computed once, by `lmjax eval --workdir=TEACHER --train_logits=F` in
a child process (which reads the teacher's own config, vocabulary and best checkpoint),
and cached as WORKDIR/teacher_logits.npy: both runs read the training split in its stored
order, so row i of the file belongs to example i.

Per example the loss is
    (1 - alpha) * CE(label, softmax(s)) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T)),
s and t the student's and teacher's logits; T^2 keeps the soft term's gradients on the
scale of the hard term's as T changes (Hinton et al., section 2).

With `distill.augment = K` the student also trains on a transfer set (Tang et al. 2019,
section 3.3): up to K new sentences per training example made by deleting words and
sampling n-grams (`augment`), written once to WORKDIR/transfer.txt, with the teacher's
logits on them cached as WORKDIR/transfer_logits.npy. They have no labels, so their loss
is the soft term alone. Tang et al. also mask words and swap words of the same part of
speech; here a masked word is deleted (no tokenizer needs a mask token) and there is no
tagger.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax.data import pipelines
from lmjax.errors import RunError
from lmjax.train.tasks import ClassifyTask

LOGITS_FILE = "teacher_logits.npy"
TRANSFER_TEXTS = "transfer.txt"
TRANSFER_LOGITS = "transfer_logits.npy"
MAX_NGRAM = 5


def distill_losses(student, teacher, labels, temperature: float, alpha: float,
                   labelled=None) -> jax.Array:
    """Per-example distillation loss; student, teacher: (batch, classes); labels: (batch,).
    Where `labelled` (batch,) is False (a transfer-set example) the loss is the soft term."""
    hard = optax.softmax_cross_entropy_with_integer_labels(student, labels)
    log_p = jax.nn.log_softmax(teacher / temperature)
    log_q = jax.nn.log_softmax(student / temperature)
    soft = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * temperature ** 2
    mixed = (1 - alpha) * hard + alpha * soft
    return mixed if labelled is None else jnp.where(labelled, mixed, soft)


def augment(texts: list[str], copies: int, drop: float, ngram: float, seed: int) -> list[str]:
    """Up to `copies` new sentences per text: each word deleted with probability `drop`,
    then with probability `ngram` only a random n-gram (n uniform in 1..5) of the rest
    kept. Empty results and repeats (of the text or of an earlier copy) are discarded."""
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        words = text.split()
        seen = {" ".join(words)}
        for _ in range(copies):
            kept = [w for w, r in zip(words, rng.random(len(words)), strict=True) if r >= drop]
            if kept and rng.random() < ngram:
                n = min(int(rng.integers(1, MAX_NGRAM + 1)), len(kept))
                start = int(rng.integers(0, len(kept) - n + 1))
                kept = kept[start:start + n]
            sentence = " ".join(kept)
            if sentence and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


class TeacherExamples(pipelines.Examples):
    """Training examples with the teacher's logits of each, as `teacher_logits`, followed
    by the transfer set's (unlabelled: `labelled` False, label 0)."""

    def __init__(self, examples: pipelines.Examples, teacher: np.ndarray,
                 transfer: tuple[pipelines.Examples, np.ndarray] | None = None):
        parts = [(examples, teacher), *([transfer] if transfer else [])]
        super().__init__(*(np.concatenate([getattr(e, f) for e, _ in parts])
                           for f in ("inputs", "mask", "labels")))
        self.teacher = np.concatenate([logits for _, logits in parts]).astype(np.float32)
        self.labelled = np.arange(len(self.labels)) < len(examples)

    def __getitem__(self, index):
        return {**super().__getitem__(index), "teacher_logits": self.teacher[index],
                "labelled": self.labelled[index]}


class DistillTask(ClassifyTask):
    """The student's classification task with the distillation loss in training; eval is
    the plain classification eval (labels only), so runs compare with and without."""

    def __init__(self, config, data: pipelines.ClassificationData, teacher: np.ndarray,
                 temperature: float, alpha: float,
                 transfer: tuple[pipelines.Examples, np.ndarray] | None = None):
        if len(teacher) != len(data.train):
            raise ValueError(f"the teacher's logits cover {len(teacher)} training examples, "
                             f"the student's data has {len(data.train)}; both runs must read "
                             "the whole training split (no finetune.limit in the teacher)")
        if teacher.shape[1] != data.num_classes:
            raise ValueError(f"the teacher has {teacher.shape[1]} classes, the student's data "
                             f"{data.num_classes}")
        train = TeacherExamples(data.train, teacher, transfer)
        data = pipelines.ClassificationData(data.tokenizer, train, data.eval, data.max_length,
                                            data.num_classes)
        super().__init__(config, data)
        self.temperature, self.alpha = temperature, alpha

    def loss(self, params, batch, carry, rng, deterministic):
        logits = self._logits(params, batch, rng, deterministic)
        per_example = distill_losses(logits, batch["teacher_logits"], batch["label"],
                                     self.temperature, self.alpha, batch["labelled"])
        weights = batch["weight"]
        count = jnp.maximum(jnp.sum(weights), 1.0)
        accuracy = jnp.sum(weights * (jnp.argmax(logits, -1) == batch["label"])) / count
        return jnp.sum(per_example * weights) / count, ({"accuracy": accuracy}, carry)


def teacher_logits(teacher_workdir: str | None, workdir: str, name: str = LOGITS_FILE,
                   texts: str | None = None) -> np.ndarray:
    """The teacher's logits on the training split (or on the lines of the file `texts`),
    computed once and cached as WORKDIR/name."""
    if not teacher_workdir:
        raise ValueError("train.task = 'distill' needs distill.teacher_workdir, a trained "
                         "classification run (train.task = 'classify' or 'bert_finetune')")
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        if not os.path.exists(os.path.join(teacher_workdir, "config.gin")):
            raise FileNotFoundError(f"distill.teacher_workdir={teacher_workdir} holds no "
                                    "config.gin; train the teacher there first")
        os.makedirs(workdir, exist_ok=True)
        tmp = path.removesuffix(".npy") + ".tmp.npy"
        what = f"the {texts} sentences" if texts else "the training split"
        print(f"computing the teacher's logits on {what} ({teacher_workdir})")
        extra = [f"--texts={texts}"] if texts else []
        done = subprocess.run([sys.executable, "-m", "lmjax.main", "eval",
                               f"--workdir={teacher_workdir}", f"--train_logits={tmp}", *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise RunError(f"the teacher's logits could not be computed: "
                           f"{done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, path)
    return np.load(path)


def transfer_set(data: pipelines.ClassificationData, teacher_workdir: str, workdir: str,
                 copies: int, drop: float, ngram: float, seed: int
                 ) -> tuple[pipelines.Examples, np.ndarray]:
    """The augmented sentences (written once to WORKDIR/transfer.txt) encoded for the
    student, and the teacher's logits on them (cached)."""
    if data.train_texts is None or data.encode is None:
        raise ValueError("distill.augment needs the student's training texts; its data "
                         "(classify_dataset) must come from a text dataset")
    path = os.path.join(workdir, TRANSFER_TEXTS)
    if not os.path.exists(path):
        texts = augment(data.train_texts, copies, drop, ngram, seed)
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("\n".join(texts) + "\n")
        os.replace(path + ".tmp", path)
        print(f"transfer set: {len(texts)} sentences from {len(data.train_texts)} examples "
              f"({copies} tries each) in {path}")
    with open(path, encoding="utf-8") as f:
        texts = f.read().splitlines()
    logits = teacher_logits(teacher_workdir, workdir, TRANSFER_LOGITS, texts=path)
    if len(logits) != len(texts):
        raise ValueError(f"{os.path.join(workdir, TRANSFER_LOGITS)} has {len(logits)} rows "
                         f"for the {len(texts)} sentences of {path}; delete both to redo them")
    return data.encode(texts), logits
