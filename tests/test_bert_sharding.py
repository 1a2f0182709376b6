"""BERT pretraining and fine-tuning steps on 8 emulated devices equal one device."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import run_steps
from flax import linen as nn

from lmjax.data import bert_data, pipelines
from lmjax.data.bert_data import MaskConfig, PairConfig
from lmjax.models.bert import BertConfig
from lmjax.parallel import RULES, make_mesh
from lmjax.train import bert_tasks, trainer
from lmjax.train.config import TrainConfig
from lmjax.train.state import create_state

VOCAB = 200
LENGTH = 32
# 4 heads and a 200-symbol vocabulary (padded to 256) split over tensor=4.
MODEL = BertConfig(size="tiny", vocab_size=VOCAB, max_len=LENGTH, num_layers=1, embed_dim=64,
                   num_heads=4, dropout=0.1, attention_dropout=0.1)
TRAIN = TrainConfig(num_steps=3, batch_size=8, warmup_steps=1, learning_rate=1e-3)


def _pretrain_data():
    rng = np.random.default_rng(0)
    docs = [[rng.integers(5, VOCAB, rng.integers(3, 12)) for _ in range(rng.integers(4, 12))]
            for _ in range(60)]
    inst = bert_data.make_instances(docs, [], PairConfig(max_seq_len=LENGTH, dupe_factor=1), 0)
    mask = MaskConfig(vocab_size=VOCAB, max_predictions=bert_data.pad_predictions(LENGTH))
    return bert_data.PretrainData(None, inst, inst, mask)


def _classify_data():
    rng = np.random.default_rng(1)
    ids = [np.concatenate([[2], rng.integers(5, VOCAB, rng.integers(3, LENGTH - 2)), [3]])
           for _ in range(64)]
    examples = pipelines.pad_examples(ids, rng.integers(0, 2, 64).tolist(), LENGTH)
    return pipelines.ClassificationData(None, examples, examples, LENGTH)


TASKS = {
    "pretrain": lambda: bert_tasks.BertPretrainTask(MODEL, _pretrain_data(), LENGTH),
    "finetune": lambda: bert_tasks.BertFinetuneTask(MODEL, _classify_data(), None),
}


def _losses(task, mesh, steps=3):
    return run_steps(task, mesh, TRAIN, steps)


# Fine-tuning by default; pretraining (about a minute) in the slow tier.
@pytest.mark.parametrize("name", [pytest.param("pretrain", marks=pytest.mark.slow),
                                  "finetune"])
def test_bert_on_data_and_tensor_axes_equals_one_device(name):
    one, _ = _losses(TASKS[name](), make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    many, state = _losses(TASKS[name](), make_mesh(2, 1, 4))
    assert np.all(np.isfinite([m["loss"] for m in one]))
    assert all(m["grad_norm"] > 0 for m in one)  # the steps really update the params
    for a, b in zip(one, many, strict=True):
        assert a.keys() == b.keys()
        for key in a:  # loss, MLM/NSP or classification metrics, gradient norm
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
    qkv = state.params["bert"]["block0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec[2] == "tensor"  # heads are really split
    word = state.params["bert"]["word"]["embedding"]
    assert word.sharding.spec[0] == "tensor"  # padded vocabulary rows too


def test_dropout_is_on_in_these_runs():
    """Guards the test above: with dropout the same params give different losses per rng."""
    task = TASKS["finetune"]()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = RULES.get("fsdp_tensor")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = create_state(task, trainer.build(task, TRAIN, mesh, rules).tx, 8, 0, mesh,
                             rules)
    batch = next(task.train_iterator(8, 0))
    a = task.loss(state.params, batch, None, jax.random.key(1), False)[0]
    b = task.loss(state.params, batch, None, jax.random.key(2), False)[0]
    assert abs(float(a) - float(b)) > 1e-6
    assert dataclasses.asdict(MODEL)["dropout"] > 0
