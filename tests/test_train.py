"""Training-step properties: gradient accumulation, schedule, weight-decay mask."""

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import train_losses

from lmjax.models import GPTConfig
from lmjax.parallel import make_mesh
from lmjax.train import optim, trainer
from lmjax.train.config import TrainConfig

MODEL = GPTConfig(vocab_size=65, num_layers=2, num_heads=4, embed_dim=64, block_size=32)
TRAIN = TrainConfig(num_steps=3, batch_size=16, warmup_steps=1)


def test_gradient_accumulation_equals_full_batch():
    mesh = make_mesh(2, 2, 2)
    full_losses, full = train_losses(mesh, MODEL, TRAIN, 3)
    micro_losses, micro = train_losses(mesh, MODEL, dataclasses.replace(TRAIN, microbatches=4), 3)
    np.testing.assert_allclose(micro_losses, full_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(micro.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_schedule_matches_nanogpt():
    """nanoGPT's get_lr(it) for warmup 100, decay 2000, lr 1e-3, min_lr 1e-4."""
    schedule = optim.warmup_cosine(1e-3, 1e-4, 100, 2000)

    def nanogpt(it):
        if it < 100:
            return 1e-3 * (it + 1) / 101
        if it > 2000:
            return 1e-4
        ratio = (it - 100) / 1900
        return 1e-4 + 0.5 * (1.0 + np.cos(np.pi * ratio)) * (1e-3 - 1e-4)

    for it in [0, 1, 50, 99, 100, 101, 500, 1999, 2000, 2500]:
        np.testing.assert_allclose(float(schedule(it)), nanogpt(it), rtol=1e-5)


def test_weight_decay_only_on_matrices():
    params = {"wte": {"embedding": 1}, "wpe": 1, "block0": {"qkv": {"kernel": 1, "bias": 1},
                                                            "norm1": {"scale": 1, "bias": 1}}}
    mask = optim.decay_mask(params)
    assert mask == {"wte": {"embedding": True}, "wpe": True,
                    "block0": {"qkv": {"kernel": True, "bias": False},
                               "norm1": {"scale": False, "bias": False}}}


def test_remat_equals_plain_and_bf16_tracks_fp32():
    mesh = make_mesh(2, 1, 1, devices=jax.devices()[:2])
    plain, _ = train_losses(mesh, MODEL, TRAIN, 3)
    remat, _ = train_losses(mesh, dataclasses.replace(MODEL, remat=True), TRAIN, 3)
    np.testing.assert_allclose(remat, plain, rtol=1e-6)
    bf16, state = train_losses(mesh, dataclasses.replace(MODEL, dtype="bfloat16"), TRAIN, 3)
    np.testing.assert_allclose(bf16, plain, rtol=2e-2)  # bf16 has 8 bits of mantissa
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}


def test_checkpoint_of_an_older_format_is_refused_by_name(tmp_path):
    """A checkpoint whose meta lacks this version's format marker (written before the
    state layout of this version) gets one clear error, for a resume and for serving."""
    from lmjax.train.checkpoint import Checkpointer, IncompatibleCheckpointError, as_abstract
    from lmjax.train.state import TrainState

    state = TrainState(step=jax.numpy.array(7), params={"w": jax.numpy.arange(6.0)},
                       opt_state=(jax.numpy.ones(3),), rng=jax.numpy.array([1, 2], "uint32"))
    writer = Checkpointer(str(tmp_path), async_save=False)
    writer.save(7, state, None, {"best_eval_loss": None})
    # What older versions wrote: the same items, a meta without "format".
    writer.manager.save(8, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave({"note": "old"})))
    writer.close()
    abstract = as_abstract(state, jax.tree.map(lambda x: x.sharding, state))
    reader = Checkpointer(str(tmp_path), read_only=True)
    restored, meta = reader.restore(7, abstract)
    assert meta["format"] == 2 and int(restored.step) == 7
    with pytest.raises(IncompatibleCheckpointError, match="step 8 .* older lmjax"):
        reader.restore(8, abstract)
    with pytest.raises(IncompatibleCheckpointError, match="older lmjax"):
        reader.restore_params(8, abstract.params)
    reader.close()


def test_non_finite_loss_inside_a_call_names_its_step():
    """A call's metrics are stacked over its steps: the error names the step itself."""
    ok = np.ones(3, np.float32)
    pending = [(1, {"loss": np.float32(2.0), "grad_norm": np.float32(1.0)}),
               (2, {"loss": np.array([2.0, np.nan, 2.0], np.float32), "grad_norm": ok})]
    with pytest.raises(trainer.NonFiniteLossError, match="at step 3;"):
        trainer._check_finite(pending)
    pending[1][1]["loss"][1] = 1.5
    steps = trainer._check_finite(pending)
    assert [float(m["loss"]) for m in steps] == [2.0, 2.0, 1.5, 2.0]


def test_linear_schedule_warms_up_then_decays_linearly():
    schedule = optim.warmup_linear(1e-3, 0.0, 10, 110)
    assert float(schedule(0)) == pytest.approx(1e-3 / 11)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(5e-4)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="train.lr_decay"):
        TrainConfig(model=MODEL, lr_decay="step").validate(1)
