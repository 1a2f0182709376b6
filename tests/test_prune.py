"""Magnitude pruning: Zhu and Gupta's schedule, masks that keep the largest weights, pruned
weights exactly zero through optimiser steps, and a resumed run equal to an uninterrupted
one (the masks are checkpointed with the optimiser state)."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest
from conftest import run_steps

from lmjax.data.pipelines import load_lm_data
from lmjax.models import GPTConfig
from lmjax.parallel import RULES, make_mesh
from lmjax.train import prune, trainer
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.config import TrainConfig
from lmjax.train.state import abstract_params
from lmjax.train.tasks import LMTask

MODEL = GPTConfig(vocab_size=65, num_layers=2, num_heads=2, embed_dim=32, block_size=16)


def test_schedule_is_zhu_and_gupta_cubic():
    config = prune.PruneConfig(sparsity=0.8, initial_sparsity=0.1, begin_step=10, end_step=50)
    for step in (0, 10, 20, 35, 50, 90):
        t = min(max((step - 10) / 40, 0.0), 1.0)
        want = 0.8 + (0.1 - 0.8) * (1 - t) ** 3
        assert float(prune.target_sparsity(config, 100, step)) == pytest.approx(want, abs=1e-6)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": {"kernel": rng.normal(size=(8, 16)).astype(np.float32),
                  "bias": rng.normal(size=(16,)).astype(np.float32)},
            "b": {"kernel": 3 * rng.normal(size=(16, 4)).astype(np.float32)},
            "embed": {"embedding": rng.normal(size=(10, 8)).astype(np.float32)}}


def _ones(params):
    return jax.tree.map(lambda p: np.ones(p.shape, bool), params)


def test_global_masks_prune_the_smallest_kernel_entries_only():
    params = _params()
    masks = prune.new_masks(params, _ones(params), 0.5, "global")
    kernels = np.concatenate([params["a"]["kernel"].ravel(), params["b"]["kernel"].ravel()])
    kept = np.concatenate([np.asarray(masks["a"]["kernel"]).ravel(),
                           np.asarray(masks["b"]["kernel"]).ravel()])
    assert (~kept).sum() == int(0.5 * kernels.size)
    assert np.abs(kernels[kept]).min() > np.abs(kernels[~kept]).max()
    assert np.asarray(masks["a"]["bias"]).all() and np.asarray(masks["embed"]["embedding"]).all()
    # The larger-scale kernel "b" keeps more than half its entries under one threshold.
    assert np.asarray(masks["b"]["kernel"]).mean() > 0.5


def test_layer_masks_prune_each_kernel_to_the_target():
    params = _params(1)
    masks = prune.new_masks(params, _ones(params), 0.75, "layer")
    for name in ("a", "b"):
        kernel, mask = params[name]["kernel"], np.asarray(masks[name]["kernel"])
        assert (~mask).sum() == int(0.75 * kernel.size)
        assert np.abs(kernel[mask]).min() > np.abs(kernel[~mask]).max()


def test_a_pruned_entry_stays_pruned_when_the_weights_move():
    params = _params(2)
    first = prune.new_masks(params, _ones(params), 0.5, "layer")
    moved = jax.tree.map(lambda p: p[::-1].copy(), params)  # other entries are now small
    second = prune.new_masks(moved, first, 0.5, "layer")
    for name in ("a", "b"):
        assert not np.any(np.asarray(second[name]["kernel"]) & ~np.asarray(first[name]["kernel"]))


def _task():
    return LMTask(MODEL, load_lm_data("tiny_shakespeare"))


def _train_config(**prune_fields):
    return TrainConfig(model=MODEL, num_steps=12, batch_size=8, warmup_steps=2, eval_every=6,
                       eval_batches=1, checkpoint_every=6, log_every=6,
                       prune=prune.PruneConfig(**prune_fields))


def _zero_where_masked(state):
    masks = state.opt_state[-1].masks
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks), strict=True):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_pruned_weights_are_exactly_zero_and_stay_zero():
    config = _train_config(sparsity=0.6, begin_step=0, end_step=6, every=2)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    metrics, state = run_steps(_task(), mesh, config, 12)
    _zero_where_masked(state)
    assert prune.kernel_sparsity(state.params) == pytest.approx(0.6, abs=0.01)
    assert np.isfinite([m["loss"] for m in metrics]).all()


def test_sharded_pruning_equals_one_device():
    config = _train_config(sparsity=0.5, begin_step=0, end_step=4, every=2)
    task = _task()
    one, one_state = run_steps(task, make_mesh(1, 1, 1, devices=jax.devices()[:1]), config, 6)
    many, many_state = run_steps(task, make_mesh(2, 2, 2), config, 6)
    np.testing.assert_allclose([m["loss"] for m in many], [m["loss"] for m in one], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(many_state.opt_state[-1].masks),
                    jax.tree.leaves(one_state.opt_state[-1].masks), strict=True):
        assert np.mean(np.asarray(a) != np.asarray(b)) < 1e-3  # ties at the threshold only


def _final_params(workdir, task, mesh, rules):
    reader = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    params = reader.restore_params(12, abstract_params(task, mesh, rules))
    reader.close()
    return params


def test_resumed_pruning_equals_uninterrupted(tmp_path):
    config = _train_config(sparsity=0.5, begin_step=2, end_step=10, every=2)
    mesh, rules = make_mesh(1, 1, 1, devices=jax.devices()[:1]), RULES.get("fsdp_tensor")
    task = _task()
    whole = tmp_path / "whole"
    trainer.train(task=task, config=config, mesh=mesh, rules=rules, workdir=str(whole))
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")  # as if killed between steps 6 and 12
    trainer.train(task=task, config=config, mesh=mesh, rules=rules, workdir=str(resumed))
    want = _final_params(whole, task, mesh, rules)
    got = _final_params(resumed, task, mesh, rules)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert prune.kernel_sparsity(got) == pytest.approx(0.5, abs=0.01)


def test_bad_prune_bindings_name_the_fix():
    with pytest.raises(ValueError, match="prune.sparsity must be in"):
        dataclasses.replace(_train_config(), prune=prune.PruneConfig(sparsity=1.0)).validate(1)
    with pytest.raises(ValueError, match="prune.scope"):
        _train_config(sparsity=0.5, scope="row").validate(1)
    with pytest.raises(ValueError, match="prune.end_step=20"):
        _train_config(sparsity=0.5, end_step=20).validate(1)
