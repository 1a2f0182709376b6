"""The encoder-decoder's training steps on data=2 x tensor=4 (8 emulated devices) equal
one device's; its parameters shard over the tensor axis by their logical names."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import run_steps

from lmjax.data import translation
from lmjax.data.config import TranslationDataConfig
from lmjax.models import Seq2SeqConfig
from lmjax.parallel import RULES, make_mesh
from lmjax.train import optim, trainer
from lmjax.train.config import TrainConfig
from lmjax.train.seq2seq_task import Seq2SeqTask
from lmjax.train.state import state_shardings

VOCAB = 200  # padded to 256, which tensor=4 divides
MODEL = Seq2SeqConfig(vocab_size=VOCAB, max_len=32, num_encoder_layers=1, num_decoder_layers=1,
                      num_heads=4, embed_dim=32, mlp_dim=64, dropout=0.1, attention_dropout=0.1)
TRAIN = TrainConfig(model=MODEL, task="seq2seq", num_steps=20, batch_size=512,
                    warmup_steps=2, learning_rate=3e-3, optimizer="adam")
# One bucket shape: one compilation. No BLEU (the synthetic pairs have no text).
DATA = TranslationDataConfig(buckets=(32,), row_multiple=8, bleu_limit=0)


def _task():
    rng = np.random.default_rng(0)

    def side():
        return [np.append(rng.integers(4, VOCAB, rng.integers(2, 30)),
                          translation.EOS).astype(np.int32) for _ in range(64)]

    pairs = translation.Pairs(side(), side())
    data = translation.TranslationData(None, ("en", "de"), pairs, pairs, [], [])
    return Seq2SeqTask(MODEL, data, DATA)


def test_data_and_tensor_parallel_steps_equal_one_device():
    one, _ = run_steps(_task(), make_mesh(1, 1, 1, devices=jax.devices()[:1]), TRAIN, 20)
    many, state = run_steps(_task(), make_mesh(2, 1, 4), TRAIN, 20)
    losses = np.array([m["loss"] for m in one])
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    np.testing.assert_allclose([m["loss"] for m in many], losses, rtol=1e-4)
    qkv = state.params["encoder0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec[2] == "tensor"  # (embed, 3, heads, head_dim): heads split


def test_every_parameter_has_logical_axis_names():
    mesh = make_mesh(2, 1, 4)
    tx = optim.adam(optim.warmup_cosine(1e-3, 1e-4, 10, 100))
    _, shardings = state_shardings(_task(), tx, 512, mesh, RULES.get("fsdp_tensor"))
    specs = {jax.tree_util.keystr(p): s.spec
             for p, s in jax.tree_util.tree_flatten_with_path(shardings.params)[0]}
    assert specs["['embed']['embedding']"][0] == "tensor"  # vocab rows
    assert specs["['decoder0']['cross']['kv']['kernel']"][2] == "tensor"
    assert specs["['decoder0']['mlp']['up']['kernel']"][1] == "tensor"


@pytest.mark.slow  # ~30 s of compiling the step and eval
def test_max_minutes_stops_evaluates_and_saves(tmp_path):
    config = dataclasses.replace(TRAIN, num_steps=1000, max_minutes=1e-9, eval_batches=2)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    summary = trainer.train(task=_task(), config=config, mesh=mesh,
                            rules=RULES.get("fsdp_tensor"), workdir=str(tmp_path))
    assert summary["step"] == 1 and np.isfinite(summary["eval_loss"])
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
