"""Parameter-server pulls and sparse keys: cached and filtered pulls, embedding rows."""

import dataclasses

import numpy as np
import pytest

from lmjax.data.pipelines import ClassificationData, pad_examples
from lmjax.data.tokenizers import CharTokenizer
from lmjax.models import CBoWConfig, GPTConfig
from lmjax.ps import sharding, sparse
from lmjax.ps.config import PSConfig
from lmjax.ps.inproc import run_inproc
from lmjax.ps.pull import ParamCache
from lmjax.ps.worker import initial_params, make_grad_fn, make_task

CBOW = CBoWConfig(embed_dim=8, hidden_dim=16, dropout=0.0)
MICRO = GPTConfig(vocab_size=65, num_layers=1, num_heads=1, embed_dim=16, block_size=8)


def sentences(rng, count: int, vocab: int, length: int):
    """Random sentences of 1..length ids in [1, vocab) (0 pads), labels from their ids."""
    ids = [rng.integers(1, vocab, rng.integers(1, length + 1)) for _ in range(count)]
    labels = [int(np.mean(s) > vocab / 2) for s in ids]
    return pad_examples(ids, labels, length)


@pytest.fixture(scope="module")
def classes():
    """A 200-word classification set: each batch touches a few dozen of the rows."""
    rng = np.random.default_rng(0)
    tokenizer = CharTokenizer.from_text("".join(chr(0x100 + i) for i in range(200)))
    return ClassificationData(tokenizer, sentences(rng, 256, 200, 6), sentences(rng, 64, 200, 6),
                              max_length=6)


def cbow_config(**changes) -> PSConfig:
    fields = dict(model=CBOW, task="classify", policy="bsp", num_workers=2, num_servers=2,
                  num_updates=6, batch_size=4, optimizer="sgd", learning_rate=0.5)
    return PSConfig(**{**fields, **changes})


def test_dense_gradient_is_zero_outside_the_touched_rows(classes):
    task = make_task(cbow_config(), classes)
    params = sharding.unflatten(initial_params(task, 0))
    batch = task.train_examples().batch(4)[0]
    _, grads = make_grad_fn(task)(params, batch)
    table = np.asarray(sharding.flatten(grads)["embed/embedding"])
    rows = sparse.touched_rows(batch)
    assert 0 < rows.size < table.shape[0] // 4
    np.testing.assert_array_equal(np.delete(table, rows, axis=0), 0)
    ids, values = sparse.gather(table, rows)
    np.testing.assert_array_equal(values, table[rows])  # the dense push on those rows
    np.testing.assert_array_equal(sparse.scatter((ids, values), table.shape), table)


@pytest.mark.parametrize("optimizer,learning_rate", [("sgd", 0.5), ("adam", 1e-2)])
def test_bsp_with_sparse_keys_equals_the_dense_run(classes, optimizer, learning_rate):
    """Pushing the touched rows and pulling the next batch's rows changes nothing: the
    server applies the same dense gradient, and the worker reads every row it uses at the
    shard's version. Far fewer bytes move."""
    dense_config = cbow_config(optimizer=optimizer, learning_rate=learning_rate)
    dense = run_inproc(workdir=None, data=classes, config=dense_config)
    rows = run_inproc(workdir=None, data=classes,
                      config=dataclasses.replace(dense_config, sparse_keys=True))
    losses = [[r["loss"] for r in res.records if r["split"] == "train"] for res in (dense, rows)]
    assert losses[0] == losses[1]
    for name, value in dense.params.items():
        np.testing.assert_array_equal(rows.params[name], value, err_msg=name)
    moved = [sum(r["pushed_bytes"] + r["pulled_bytes"] for r in res.records
                 if r["split"] == "worker") for res in (dense, rows)]
    assert moved[1] < moved[0] / 2, moved


def test_async_sparse_pushes_and_pulls_only_rows(classes):
    config = cbow_config(policy="async", num_updates=12, sparse_keys=True)
    result = run_inproc(workdir=None, data=classes, config=config)
    workers = [r for r in result.records if r["split"] == "worker"]
    table = 200 * CBOW.embed_dim * 4
    for r in workers:  # per push at most 4 sentences x 6 ids of the table, plus the rest
        rest = (CBOW.embed_dim * 16 + 16 + 16 * 2 + 2) * 4
        assert r["pushed_bytes"] <= r["gradients"] * (24 * (4 + CBOW.embed_dim * 4) + rest)
        assert r["pulled_bytes"] < table + rest + r["gradients"] * (24 * 36 + rest)


def test_a_worker_pulls_only_after_the_version_moved_far_enough():
    """pull_every_versions = 3: each pull brings a shard at least 3 versions newer, so
    at most num_updates / 3 + 1 pulls per shard move bytes."""
    from lmjax.data.pipelines import load_lm_data

    data = load_lm_data("tiny_shakespeare")
    config = PSConfig(model=MICRO, policy="async", num_workers=2, num_updates=24, batch_size=1,
                      optimizer="sgd", learning_rate=0.1)
    every = run_inproc(workdir=None, data=data, config=config)
    third = run_inproc(workdir=None, data=data,
                       config=dataclasses.replace(config, pull_every_versions=3))
    size = sum(v.nbytes for v in every.params.values())
    pulled = [sum(r["pulled_bytes"] for r in res.records if r["split"] == "worker")
              for res in (every, third)]
    assert pulled[1] <= 2 * size * (24 // 3 + 1) < pulled[0], pulled
    behind = [r["updates_behind"] for r in third.records if r["split"] == "train"]
    assert max(behind) >= 3


def test_the_filter_moves_entries_beyond_the_threshold():
    cache = ParamCache(threshold=0.1, tables=())
    old = np.zeros(1000, np.float32)
    assert cache.update({"w": old}, 0, True, None) == 4000  # first pull: whole
    new = old.copy()
    new[:10] = 1.0  # ten entries moved far
    new[10:] = 0.05  # the rest a little
    assert cache.update({"w": new}, 1, True, None) == 10 * 8  # index and value each
    np.testing.assert_array_equal(cache.values["w"][:10], 1.0)
    np.testing.assert_array_equal(cache.values["w"][10:], 0.0)
    assert np.abs(cache.values["w"] - new).max() <= 0.1
    assert cache.update({"w": new + 1}, 2, True, None) == 4000  # all moved: whole is cheaper
    assert cache.update({"w": new + 2}, 2, False, None) == 0  # same version: nothing


def test_threshold_zero_pulls_whole_and_filtered_runs_train():
    from lmjax.data.pipelines import load_lm_data

    data = load_lm_data("tiny_shakespeare")
    config = PSConfig(model=MICRO, policy="async", num_workers=2, num_updates=30, batch_size=4,
                      optimizer="sgd", learning_rate=0.3)
    whole = run_inproc(workdir=None, data=data, config=config)
    filtered = run_inproc(workdir=None, data=data,
                          config=dataclasses.replace(config, pull_filter_threshold=1e-3))
    pulled = [sum(r["pulled_bytes"] for r in res.records if r["split"] == "worker")
              for res in (whole, filtered)]
    assert pulled[1] < pulled[0]
    losses = [r["loss"] for r in filtered.records if r["split"] == "train"]
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.parametrize("changes,message", [
    ({"sparse_keys": True}, "does not apply to GPTConfig: its token embedding wte is tied"),
    ({"pull_filter_threshold": -1.0}, "pull_filter_threshold must be a finite number >= 0"),
    ({"pull_every_versions": 0}, "pull_every_versions must be positive"),
    ({"pull_every_versions": 2, "policy": "bsp"}, "needs an asynchronous policy"),
    ({"sparse_keys": True, "transport": "jax_distributed"}, "inproc transport only"),
    ({"task": "bert_pretrain"}, "unknown ps.task 'bert_pretrain'"),
])
def test_pull_settings_are_checked(changes, message):
    from lmjax.ps.run import check

    with pytest.raises(ValueError, match=message):
        check(PSConfig(model=MICRO, **changes))


def test_sparse_keys_need_n_fetch_one(classes):
    from lmjax.ps.run import check

    config = cbow_config(policy="async", n_fetch=2, sparse_keys=True)
    with pytest.raises(ValueError, match="needs ps.n_fetch=1"):
        check(config, make_task(config, classes))
