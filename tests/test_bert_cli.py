"""BERT end to end through the CLI: pretrain, fine-tune from it, eval; mismatched runs."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import run_cli, train_losses
from flax import linen as nn

from lmjax.data import bert_data
from lmjax.data.config import PretrainDataConfig
from lmjax.data.tokenizers import SentencePieceTokenizer, load_tokenizer
from lmjax.models import GPTConfig
from lmjax.models.bert import BertClassifier, BertConfig
from lmjax.models.transformer import stack_layers
from lmjax.parallel import make_mesh
from lmjax.train import bert_tasks
from lmjax.train.checkpoint import Checkpointer, IncompatibleCheckpointError
from lmjax.train.config import TrainConfig
from lmjax.train.registry import TASKS

PRETRAIN = "--gin_file=configs/experiments/bert_tiny_e2e.gin"
FINETUNE = "--gin_file=configs/experiments/sst2_bert_tiny_e2e.gin"


def _records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bert_pretrain")
    result = run_cli("train", f"--workdir={workdir}", PRETRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _finetune(workdir, pretrained, *params):
    return run_cli("train", f"--workdir={workdir}", FINETUNE,
                   f"--gin_param=finetune.init_workdir='{pretrained}'",
                   *[f"--gin_param={p}" for p in params])


def test_pretrain_finetune_and_eval(pretrained, tmp_path):
    evals = _records(pretrained, "eval")
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert {"mlm_loss", "mlm_accuracy", "nsp_accuracy"} <= r.keys()
        assert 0 <= r["mlm_accuracy"] <= 1 and 0 <= r["nsp_accuracy"] <= 1
        assert abs(r["loss"] - r["mlm_loss"] - r["nsp_loss"]) < 1e-5
    assert {"mlm_loss", "mlm_accuracy", "nsp_accuracy"} <= _records(pretrained, "train")[0].keys()
    tokenizer = load_tokenizer(pretrained / "tokenizer")
    assert [tokenizer.id_to_piece(i) for i in range(5)] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    workdir = tmp_path / "finetune"
    result = _finetune(workdir, pretrained)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuning from the pretrained encoder" in result.stdout
    evals = _records(workdir, "eval")
    assert evals and all({"accuracy", "f1"} <= r.keys() for r in evals)
    evaluated = run_cli("eval", f"--workdir={workdir}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    best = min(evals, key=lambda r: r["loss"])
    assert f"accuracy {best['accuracy']:.4f}, f1 {best['f1']:.4f}" in evaluated.stdout


def _best_saved_params(workdir):
    """The params of the best checkpoint, read by orbax directly (not through lmjax)."""
    checkpoints = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    step = checkpoints.best_step()
    checkpoints.close()
    path = str(workdir / "checkpoints" / str(step) / "state")
    return ocp.PyTreeCheckpointer().restore(path)["params"]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["same_layout", "scanned"])
def test_warm_start_copies_the_pretrained_encoder_and_keeps_a_fresh_head(pretrained, scan_layers):
    """The fine-tuning params equal the checkpoint's encoder exactly (stacked when the
    fine-tuning model scans its layers); the head is new."""
    config_text = (pretrained / "config.gin").read_text()
    assert "BertConfig.embed_dim = 32" in config_text
    tok = load_tokenizer(pretrained / "tokenizer")
    data = bert_tasks.finetune_data(tok, 32, limit=8)
    config = BertConfig(vocab_size=tok.vocab_size, max_len=32, num_layers=1, embed_dim=32,
                        num_heads=2, scan_layers=scan_layers)
    task = bert_tasks.BertFinetuneTask(config, data, str(pretrained))
    fresh = nn.unbox(task.model.init(jax.random.key(0), *task.init_args())["params"])
    loaded = task.warm_start(fresh)
    saved = _best_saved_params(pretrained)["bert"]
    if scan_layers:
        saved = stack_layers(saved, 1)
    for a, b in zip(jax.tree.leaves(loaded["bert"]), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(loaded["bert"]["word"]["embedding"]),
                              np.asarray(fresh["bert"]["word"]["embedding"]))
    np.testing.assert_array_equal(np.asarray(loaded["classifier"]["kernel"]),
                                  np.asarray(fresh["classifier"]["kernel"]))


def _continue(workdir, pretrained, *params):
    """Continued pretraining of `pretrained` on the SST-2 sentences only."""
    return run_cli("train", f"--workdir={workdir}", PRETRAIN,
                   f"--gin_param=pretrain_data.init_workdir='{pretrained}'",
                   "--gin_param=pretrain_data.sources=['sst2']",
                   "--gin_param=pretrain_data.nsp=False", *[f"--gin_param={p}" for p in params])


def test_continued_pretraining_keeps_the_vocabulary_and_evaluates_on_sst2_dev(pretrained,
                                                                             tmp_path):
    workdir = tmp_path / "continued"
    result = _continue(workdir, pretrained)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"continuing the pretraining run in {pretrained}" in result.stdout
    assert (workdir / "tokenizer" / "spm.model").read_bytes() == \
        (pretrained / "tokenizer" / "spm.model").read_bytes()
    evals = _records(workdir, "eval")
    assert [r["step"] for r in evals] == [3, 6]
    assert all("mlm_accuracy" in r and "nsp_accuracy" not in r for r in evals)


def test_held_out_text_is_documents_unless_the_corpus_has_none():
    """The general corpus is scored on held-out documents only (NSP-labelled pairs); SST-2
    alone on its dev sentences (MLM-only rows), never on its training sentences."""
    pairs = bert_data.PairConfig(max_seq_len=32, dupe_factor=1)
    general = bert_data.load_pretrain_data(sources=("wikitext2", "sst2"), vocab_size=400,
                                           pairs=pairs, limit=12)
    assert len(general.eval) and np.all(general.eval.nsp_weights == 1)
    sst2 = bert_data.load_pretrain_data(sources=("sst2",), vocab_size=100, pairs=pairs,
                                        limit=50)
    assert len(sst2.eval) and np.all(sst2.eval.nsp_weights == 0)
    train_rows = {tuple(row) for row in sst2.train.tokens}
    assert not any(tuple(row) in train_rows for row in sst2.eval.tokens)


def test_continued_pretraining_starts_from_every_saved_param(pretrained, tmp_path):
    """Encoder and MLM/NSP heads equal the checkpoint's exactly."""
    data = PretrainDataConfig(sources=("sst2",), vocab_size=400, max_seq_len=32, nsp=False,
                              limit=12, init_workdir=str(pretrained))
    model = BertConfig(vocab_size=400, max_len=32, num_layers=1, embed_dim=32, num_heads=2)
    task = TASKS.get("bert_pretrain").build(model, data, str(tmp_path))
    fresh = nn.unbox(task.model.init(jax.random.key(0), *task.init_args())["params"])
    loaded = task.warm_start(fresh)
    saved = _best_saved_params(pretrained)
    assert set(loaded) == set(saved) and len(loaded) > 1  # heads too, not only "bert"
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(fresh), strict=True)]
    assert sum(changed) > len(changed) // 2


def test_continued_pretraining_of_another_architecture_is_refused(pretrained, tmp_path):
    result = _continue(tmp_path / "deeper", pretrained, "BertConfig.num_layers=2")
    assert result.returncode != 0
    assert "num_layers 1 in the checkpoint but 2 in the config" in result.stderr
    assert not os.path.exists(tmp_path / "deeper" / "metrics.jsonl")


def test_checkpoint_of_another_architecture_names_what_differs(pretrained, tmp_path):
    result = _finetune(tmp_path / "wide", pretrained, "BertConfig.num_layers=2",
                       "BertConfig.embed_dim=64")
    assert result.returncode != 0
    assert "num_layers 1 in the checkpoint but 2 in the config" in result.stderr
    assert "embed_dim 32 in the checkpoint but 64 in the config" in result.stderr
    assert not os.path.exists(tmp_path / "wide" / "metrics.jsonl")


def test_checkpoint_of_another_vocabulary_is_refused(pretrained, tmp_path):
    workdir = tmp_path / "other_vocab"
    other = SentencePieceTokenizer.train_with_specials(
        ["a small other corpus with its own words"] * 20, vocab_size=40, hard_vocab_limit=False)
    other.save(workdir / "tokenizer")
    result = _finetune(workdir, pretrained)
    assert result.returncode != 0
    assert "vocabulary differs" in result.stderr and str(pretrained) in result.stderr


def test_a_gpt_checkpoint_is_not_a_bert(tmp_path):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    gpt = GPTConfig(vocab_size=65, num_layers=1, num_heads=2, embed_dim=32, block_size=16)
    _, state = train_losses(mesh, gpt, TrainConfig(batch_size=2), 1)
    saver = Checkpointer(str(tmp_path / "gpt" / "checkpoints"))
    saver.save(1, state, None, {"best_eval_loss": None})
    saver.wait()
    saver.close()
    model = BertClassifier(BertConfig(vocab_size=65, num_layers=1, embed_dim=32, num_heads=2))
    params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    with pytest.raises(IncompatibleCheckpointError, match="not a BERT pretraining checkpoint"):
        bert_tasks.load_pretrained(str(tmp_path / "gpt"), params["bert"])
