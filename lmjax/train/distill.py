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


def distill_losses(student, teacher, labels, temperature: float, alpha: float) -> jax.Array:
    """Per-example distillation loss; student, teacher: (batch, classes); labels: (batch,)."""
    hard = optax.softmax_cross_entropy_with_integer_labels(student, labels)
    log_p = jax.nn.log_softmax(teacher / temperature)
    log_q = jax.nn.log_softmax(student / temperature)
    soft = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * temperature ** 2
    return (1 - alpha) * hard + alpha * soft


class TeacherExamples(pipelines.Examples):
    """Training examples with the teacher's logits of each, as `teacher_logits`."""

    def __init__(self, examples: pipelines.Examples, teacher: np.ndarray):
        super().__init__(examples.inputs, examples.mask, examples.labels)
        self.teacher = teacher.astype(np.float32)

    def __getitem__(self, index):
        return {**super().__getitem__(index), "teacher_logits": self.teacher[index]}


class DistillTask(ClassifyTask):
    """The student's classification task with the distillation loss in training; eval is
    the plain classification eval (labels only), so runs compare with and without."""

    def __init__(self, config, data: pipelines.ClassificationData, teacher: np.ndarray,
                 temperature: float, alpha: float):
        if len(teacher) != len(data.train):
            raise ValueError(f"the teacher's logits cover {len(teacher)} training examples, "
                             f"the student's data has {len(data.train)}; both runs must read "
                             "the whole training split (no finetune.limit in the teacher)")
        if teacher.shape[1] != data.num_classes:
            raise ValueError(f"the teacher has {teacher.shape[1]} classes, the student's data "
                             f"{data.num_classes}")
        data = pipelines.ClassificationData(data.tokenizer, TeacherExamples(data.train, teacher),
                                            data.eval, data.max_length, data.num_classes)
        super().__init__(config, data)
        self.temperature, self.alpha = temperature, alpha

    def loss(self, params, batch, carry, rng, deterministic):
        logits = self._logits(params, batch, rng, deterministic)
        per_example = distill_losses(logits, batch["teacher_logits"], batch["label"],
                                     self.temperature, self.alpha)
        weights = batch["weight"]
        count = jnp.maximum(jnp.sum(weights), 1.0)
        accuracy = jnp.sum(weights * (jnp.argmax(logits, -1) == batch["label"])) / count
        return jnp.sum(per_example * weights) / count, ({"accuracy": accuracy}, carry)


def teacher_logits(teacher_workdir: str | None, workdir: str) -> np.ndarray:
    """The teacher's training-split logits, computed once and cached in WORKDIR."""
    if not teacher_workdir:
        raise ValueError("train.task = 'distill' needs distill.teacher_workdir, a trained "
                         "classification run (train.task = 'classify' or 'bert_finetune')")
    path = os.path.join(workdir, LOGITS_FILE)
    if not os.path.exists(path):
        if not os.path.exists(os.path.join(teacher_workdir, "config.gin")):
            raise FileNotFoundError(f"distill.teacher_workdir={teacher_workdir} holds no "
                                    "config.gin; train the teacher there first")
        os.makedirs(workdir, exist_ok=True)
        tmp = os.path.join(workdir, "teacher_logits.tmp.npy")
        print(f"computing the teacher's logits on the training split ({teacher_workdir})")
        done = subprocess.run([sys.executable, "-m", "lmjax.main", "eval",
                               f"--workdir={teacher_workdir}", f"--train_logits={tmp}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise RunError(f"the teacher's logits could not be computed: "
                           f"{done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, path)
    return np.load(path)
