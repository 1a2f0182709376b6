"""Pipeline parallelism over `stage`: the pipelined GPT trains as on one device, its
gradients are the unpipelined model's, and it resumes from an unpipelined checkpoint."""

import dataclasses
import json
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_losses
from flax import linen as nn

from lmjax import configs
from lmjax.data.pipelines import load_lm_data
from lmjax.models import GPT, GPTConfig
from lmjax.models.transformer import init_cache
from lmjax.parallel import RULES, make_mesh, pipeline
from lmjax.parallel.mesh import MeshConfig
from lmjax.train import trainer
from lmjax.train.config import TrainConfig
from lmjax.train.state import create_state
from lmjax.train.tasks import LMTask

TINY = GPTConfig(vocab_size=65, num_layers=4, num_heads=4, embed_dim=32, block_size=16,
                 scan_layers=True)
TRAIN = TrainConfig(num_steps=20, batch_size=16, warmup_steps=5)
RULES_ = RULES.get("fsdp_tensor")


@pytest.fixture(scope="module")
def one_device() -> np.ndarray:
    """20 training losses of the unpipelined model on one device."""
    return train_losses(make_mesh(1, 1, 1, devices=jax.devices()[:1]), TINY, TRAIN, 20)[0]


# (stage, data, fsdp, tensor, microbatches): both stage counts with data parallelism
# beside them, and (slow) a pipeline whose layers are also fsdp- and tensor-sharded.
MESHES = [(2, 4, 1, 1, 4), (4, 2, 1, 1, 8),
          pytest.param(2, 1, 2, 2, 8, marks=pytest.mark.slow)]


@pytest.mark.parametrize("stage,data,fsdp,tensor,micro", MESHES,
                         ids=["stage2-data4-micro4", "stage4-data2-micro8",
                              "stage2-fsdp2-tensor2-micro8"])
def test_pipelined_losses_equal_one_device(one_device, stage, data, fsdp, tensor, micro):
    config = dataclasses.replace(TRAIN, pipeline_microbatches=micro)
    mesh = make_mesh(data, fsdp, tensor, stage=stage)
    losses, state = train_losses(mesh, TINY, config, 20)
    assert np.all(np.isfinite(one_device)) and one_device[-1] < one_device[0]
    np.testing.assert_allclose(losses, one_device, rtol=1e-5)
    qkv = state.params["blocks"]["attn"]["qkv"]["kernel"]  # (layers, embed, 3, heads, hd)
    assert qkv.sharding.spec[0] == "stage"  # each stage holds its own layers


def _multi_step_losses(mesh, config: TrainConfig, calls: int) -> np.ndarray:
    """Losses of `calls` x train.steps_per_call steps through the trainer's `steps_fn`."""
    task = LMTask(TINY, load_lm_data("tiny_shakespeare"))
    setup = trainer.build(task, config, mesh, RULES_)
    batches = task.train_iterator(config.batch_size, 0)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES_):
        state = create_state(task, setup.tx, config.batch_size, 0, mesh, RULES_)
        for _ in range(calls):
            stacked = trainer.stack_batches([next(batches) for _ in range(config.steps_per_call)])
            state, metrics = setup.steps_fn(state, stacked)
            losses.append(np.asarray(metrics["loss"]))
    return np.concatenate(losses)


@pytest.mark.slow
def test_pipeline_inside_gradient_accumulation_and_multi_step_calls():
    """train.microbatches splits the batch before the pipeline splits each part again,
    and train.steps_per_call scans the pipelined step: still the one-device losses."""
    config = dataclasses.replace(TRAIN, microbatches=2, steps_per_call=4)
    one = _multi_step_losses(make_mesh(1, 1, 1, devices=jax.devices()[:1]), config, 5)
    piped = dataclasses.replace(config, pipeline_microbatches=2)
    np.testing.assert_allclose(_multi_step_losses(make_mesh(4, stage=2), piped, 5), one,
                               rtol=1e-5)


def _tokens(shape=(16, 16)) -> np.ndarray:
    return np.random.default_rng(0).integers(1, TINY.vocab_size, shape).astype(np.int32)


def _loss_and_grads(config: GPTConfig, mesh, micro: int, dropout: bool = False):
    """jit((params, tokens, dropout key) -> (a fixed random projection of the logits,
    its gradient)) on `mesh`; dropout is off when the key is None."""
    model = GPT(config)

    def loss(params, tokens, key):
        with pipeline.microbatches(micro):
            logits = model.apply({"params": params}, tokens, deterministic=not dropout,
                                 rngs={"dropout": key} if dropout else None)
        weights = jax.random.normal(jax.random.key(7), logits.shape)
        return jnp.sum(jnp.where(logits > -1e30, logits, 0) * weights)

    grad = jax.jit(jax.value_and_grad(loss))

    def run(params, tokens, key=None):
        with jax.set_mesh(mesh), nn.logical_axis_rules(RULES_):
            return grad(params, tokens, key)

    return run


def _assert_trees_close(a, b):
    """Equal up to float32 rounding: the pipeline sums each gradient over microbatches
    and ticks rather than over the batch at once, so sums round in another order (a few
    ulps of the tensor's largest entry, as tests/test_scan_layers.py explains)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=0, atol=2e-6 * np.abs(y).max())


@pytest.fixture(scope="module")
def params():
    model = GPT(TINY)
    return jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), _tokens())["params"]))()


def _single():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.mark.slow  # the fast losses tests above train on these gradients for 20 steps
@pytest.mark.parametrize("options,stage,micro", [({}, 4, 2), ({}, 2, 4), ({"remat": True}, 2, 8)],
                         ids=["stage4-micro2", "stage2-micro4", "remat-stage2-micro8"])
def test_pipelined_gradients_equal_unpipelined(params, options, stage, micro):
    config = dataclasses.replace(TINY, **options)
    loss, grads = _loss_and_grads(config, _single(), 1)(params, _tokens())
    got_loss, got = _loss_and_grads(config, make_mesh(-1, stage=stage), micro)(params, _tokens())
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    _assert_trees_close(got, grads)


def test_dropout_masks_do_not_depend_on_the_stage_count(params):
    """Keys fold per global layer and microbatch: 4 stages drop what 1 stage drops."""
    config = dataclasses.replace(TINY, dropout=0.3)
    one = _loss_and_grads(config, _single(), 4, dropout=True)
    loss, grads = one(params, _tokens(), jax.random.key(3))
    assert not np.isclose(one(params, _tokens(), jax.random.key(4))[0], loss, rtol=1e-3)
    four = _loss_and_grads(config, make_mesh(-1, stage=4), 4, dropout=True)
    got_loss, got = four(params, _tokens(), jax.random.key(3))
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    _assert_trees_close(got, grads)


def _metrics(workdir) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


def test_resumes_from_an_unpipelined_checkpoint(tmp_path):
    """stage=1 writes checkpoints at steps 10 and 20; stage=2 resumes from step 10 (the 20
    one removed) and its steps 11-20 equal the uninterrupted unpipelined run's."""
    config = dataclasses.replace(TRAIN, model=TINY, log_every=1, eval_every=10,
                                 eval_batches=1, checkpoint_every=10)
    task = LMTask(TINY, load_lm_data("tiny_shakespeare"))
    single = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    first = tmp_path / "unpipelined"
    trainer.train(task=task, config=config, mesh=single, rules=RULES_, workdir=str(first))
    resumed = tmp_path / "pipelined"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / "20")
    pipelined = dataclasses.replace(config, pipeline_microbatches=4)
    summary = trainer.train(task=task, config=pipelined, mesh=make_mesh(4, stage=2),
                            rules=RULES_, workdir=str(resumed))
    want, got = _metrics(first), _metrics(resumed)
    assert sorted(got) == list(range(1, 21))
    np.testing.assert_allclose([got[s] for s in range(11, 21)],
                               [want[s] for s in range(11, 21)], rtol=1e-5)
    assert summary["step"] == 20


def test_decoding_with_stages_is_refused(params):
    cache = init_cache(TINY, 2, 16)
    positions = jnp.zeros((2, 1), jnp.int32)
    with jax.set_mesh(make_mesh(-1, stage=2)), pytest.raises(ValueError, match="stage=1"):
        GPT(TINY).apply({"params": params}, _tokens((2, 1)), cache=cache, positions=positions)


@pytest.mark.parametrize("change,stages,says", [
    ({"pipeline_microbatches": 3}, 2, "do not split into train.pipeline_microbatches=3"),
    ({"pipeline_microbatches": 0}, 1, "train.pipeline_microbatches must be positive"),
    ({"model": dataclasses.replace(TINY, scan_layers=False)}, 2, "scan_layers = True"),
    ({"model": dataclasses.replace(TINY, num_layers=6)}, 4, "does not divide GPTConfig.num_"),
    ({"eval_batch_size": 6}, 1, "eval batch of 6 rows"),
])
def test_pipeline_settings_are_checked(change, stages, says):
    config = dataclasses.replace(TRAIN, **{"model": TINY, "pipeline_microbatches": 4, **change})
    with pytest.raises(ValueError, match=says):
        config.validate(2, stages)


def test_pipelined_model_checks_its_sizes(params):
    with pytest.raises(ValueError, match="train.pipeline_microbatches=3"):
        _loss_and_grads(TINY, make_mesh(-1, stage=2), micro=3)(params, _tokens())
    deep = dataclasses.replace(TINY, num_layers=6)
    deep_params = jax.eval_shape(lambda: nn.unbox(GPT(deep).init(jax.random.key(0),
                                                                _tokens())["params"]))
    with jax.set_mesh(make_mesh(-1, stage=4)), nn.logical_axis_rules(RULES_):
        with pytest.raises(ValueError, match="mesh.stage=4 does not divide"):
            jax.eval_shape(lambda p: GPT(deep).apply({"params": p}, _tokens()), deep_params)


def test_gin_binds_the_stage_axis_and_the_microbatches():
    gin.clear_config()
    try:
        configs.parse([], ["mesh.stage = 2", "train.pipeline_microbatches = 4"])
        assert configs.bound(MeshConfig).stage == 2
        assert configs.bound(TrainConfig).pipeline_microbatches == 4
    finally:
        gin.clear_config()
    mesh = make_mesh(-1, stage=2)
    assert dict(mesh.shape) == {"stage": 2, "data": 4, "fsdp": 1, "tensor": 1}
    assert pipeline.stage_count(mesh) == 2 and pipeline.stage_count(make_mesh()) == 1


def test_bubble_fraction():
    assert pipeline.bubble_fraction(4, 12) == pytest.approx(3 / 15)
    assert pipeline.bubble_fraction(1, 8) == 0
    assert pipeline.ticks(4, 12) == 15
