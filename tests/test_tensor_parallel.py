"""Megatron tensor parallelism in shard_map (lmjax/models/megatron.py): the same losses
and gradients as one device, with and without sequence parallelism; dropout masks that
do not depend on the mesh; exactly Megatron's collectives in the lowered step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_steps
from flax import linen as nn

from lmjax.data.pipelines import load_lm_data
from lmjax.models import GPTConfig, RNNConfig
from lmjax.parallel import RULES, collectives, make_mesh, pipeline
from lmjax.parallel.mesh import MeshConfig, to_global
from lmjax.parallel.rules import strip_boxes
from lmjax.train import trainer
from lmjax.train.config import TrainConfig
from lmjax.train.state import create_state
from lmjax.train.tasks import LMTask

LAYERS = 2
MODEL = GPTConfig(vocab_size=65, num_layers=LAYERS, num_heads=4, embed_dim=64, block_size=32)
TRAIN = TrainConfig(num_steps=20, batch_size=8, warmup_steps=5)
RULES_NAME = "fsdp_tensor"


def megatron(model=MODEL, sequence_parallel=False, **changes):
    return dataclasses.replace(model, tensor_impl="shard_map",
                               sequence_parallel=sequence_parallel, **changes)


def one_device():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def data():
    return load_lm_data("tiny_shakespeare")


def losses(data, mesh, model, steps=20) -> np.ndarray:
    metrics, _ = run_steps(LMTask(model, data), mesh, TRAIN, steps, RULES_NAME)
    return np.asarray([m["loss"] for m in metrics], np.float32)


@pytest.fixture(scope="module")
def reference(data):
    """20 losses of the automatic path on one device."""
    return losses(data, one_device(), MODEL)


SLOW = pytest.mark.slow  # the other half of a grid whose fast half runs by default


@pytest.mark.parametrize("shape, sequence_parallel", [
    ((2, 1, 4), False), ((4, 1, 2), True),
    pytest.param((4, 1, 2), False, marks=SLOW), pytest.param((2, 1, 4), True, marks=SLOW),
], ids=["tensor4", "tensor2-sequence", "tensor2", "tensor4-sequence"])
def test_losses_equal_one_device(data, reference, shape, sequence_parallel):
    got = losses(data, make_mesh(*shape), megatron(sequence_parallel=sequence_parallel))
    assert np.all(np.isfinite(reference)) and reference[-1] < reference[0] - 0.3
    np.testing.assert_allclose(got, reference, rtol=1e-5)


def _grads(data, mesh, model):
    task = LMTask(model, data)
    rules = RULES.get(RULES_NAME)
    setup = trainer.build(task, TRAIN, mesh, rules)
    batch = next(task.train_iterator(TRAIN.batch_size, 0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = create_state(task, setup.tx, TRAIN.batch_size, 0, mesh, rules).params
        batch = to_global(batch, setup.batch_sharding)
        loss = lambda p, b: task.loss(p, b, None, jax.random.key(0), True)[0]  # noqa: E731
        return jax.device_get(jax.jit(jax.grad(loss))(params, batch))


@pytest.mark.parametrize("sequence_parallel", [pytest.param(False, marks=SLOW), True],
                         ids=["megatron", "sequence"])
def test_gradients_equal_one_device(data, sequence_parallel):
    want = _grads(data, one_device(), MODEL)
    got = _grads(data, make_mesh(2, 1, 4), megatron(sequence_parallel=sequence_parallel))
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)  # same parameters
    for (path, w), g in zip(flat_want, jax.tree.leaves(got), strict=True):
        scale = np.abs(w).max()
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_dropout_masks_do_not_depend_on_the_mesh(data):
    """With dropout, the shard_map path draws its masks per row and head, so any mesh
    (data, fsdp, tensor, with sequence parallelism, scanned and rematerialised layers)
    trains exactly as one device does on the same path."""
    model = megatron(dropout=0.2, scan_layers=True, remat=True)
    one = losses(data, one_device(), model, steps=5)
    split = dataclasses.replace(model, sequence_parallel=True)
    many = losses(data, make_mesh(2, 2, 2), split, steps=5)
    np.testing.assert_allclose(many, one, rtol=1e-5)


def _lower(data, mesh, model, backward: bool):
    """The lowered and compiled loss (forward only) or train step of `model` on `mesh`."""
    task = LMTask(model, data)
    rules = RULES.get(RULES_NAME)
    setup = trainer.build(task, TRAIN, mesh, rules)
    batch = next(task.train_iterator(TRAIN.batch_size, 0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = create_state(task, setup.tx, TRAIN.batch_size, 0, mesh, rules)
        batch = to_global(batch, setup.batch_sharding)
        if backward:
            lowered = setup.step_fn.lower(state, batch)
        else:
            loss = lambda p, b: task.loss(p, b, None, jax.random.key(0), True)[0]  # noqa: E731
            lowered = jax.jit(loss).lower(state.params, batch)
        return lowered, lowered.compile()


def _count(data, model, backward):
    mesh = make_mesh(2, 1, 4)
    lowered, compiled = _lower(data, mesh, model, backward)
    report = collectives.step_report(lowered, compiled, mesh)
    print(f"\n{model.tensor_impl} sequence_parallel={model.sequence_parallel} "
          f"{'train step' if backward else 'forward'}:")
    print(collectives.format_report(report, LAYERS, scanned=False))
    return collectives.lowered_collectives(lowered, mesh)


def test_megatron_collective_counts(data):
    """Two all-reduces over `tensor` per layer forward, four with the backward pass
    (Shoeybi et al. 2019); the gradient all-reduces over `data` are apart."""
    tensor = ("tensor",)
    forward = _count(data, megatron(), backward=False)
    assert collectives.count(forward, "all_reduce", tensor) == 2 * LAYERS
    assert {op.kind for op in forward} == {"all_reduce"}
    step = _count(data, megatron(), backward=True)
    assert collectives.count(step, "all_reduce", tensor) == 4 * LAYERS
    assert {op.axes for op in step} == {("tensor",), ("data",)}
    _count(data, MODEL, backward=True)  # what XLA does for the automatic path, printed


def test_sequence_parallel_collective_counts(data):
    """Sequence parallelism: an all-gather and a reduce-scatter over `tensor` per
    sublayer instead of the all-reduce, both ways; all-reduces remain only for the
    gradients of the replicated norms and biases."""
    tensor = ("tensor",)
    model = megatron(sequence_parallel=True)
    forward = _count(data, model, backward=False)
    assert collectives.count(forward, "all_gather", tensor) == 2 * LAYERS
    assert collectives.count(forward, "reduce_scatter", tensor) == 2 * LAYERS
    assert {op.kind for op in forward} == {"all_gather", "reduce_scatter"}
    step = _count(data, model, backward=True)
    assert collectives.count(step, "all_gather", tensor) == 4 * LAYERS
    assert collectives.count(step, "reduce_scatter", tensor) == 4 * LAYERS
    assert collectives.count(step, "all_reduce", tensor) == 0


@pytest.mark.slow
def test_sequence_parallel_splits_the_activations(data):
    """Activations outside attention and the MLP live on 1/t of the positions: the
    compiled step needs less temporary memory."""
    mesh = make_mesh(2, 1, 4)
    model = megatron(num_layers=4)
    plain = _lower(data, mesh, model, True)[1].memory_analysis().temp_size_in_bytes
    split = _lower(data, mesh, dataclasses.replace(model, sequence_parallel=True), True)[1]
    assert split.memory_analysis().temp_size_in_bytes < plain


def _trace(model: GPTConfig, mesh) -> None:
    """Traces the model's training forward pass on `mesh` (shapes only)."""
    module = model.module()
    tokens = jnp.zeros((8, model.block_size), jnp.int32)
    params = strip_boxes(jax.eval_shape(module.init, jax.random.key(0), tokens))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES.get(RULES_NAME)):
        jax.eval_shape(module.apply, params, tokens)


def test_sizes_that_do_not_split_are_refused():
    mesh = make_mesh(2, 1, 4)
    with pytest.raises(ValueError, match="6 heads .* tensor=4"):
        _trace(megatron(num_heads=6, embed_dim=96), mesh)
    with pytest.raises(ValueError, match="30 positions over tensor=4"):
        _trace(megatron(block_size=30, sequence_parallel=True), mesh)
    _trace(megatron(block_size=32, sequence_parallel=True), mesh)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown tensor_impl 'manual'"):
        GPTConfig(tensor_impl="manual")
    with pytest.raises(ValueError, match="sequence_parallel needs tensor_impl='shard_map'"):
        GPTConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match="apply to GPTConfig models, not RNNConfig"):
        MeshConfig(tensor_impl="shard_map").configure(RNNConfig())
    assert MeshConfig(tensor_impl="shard_map").configure(MODEL).tensor_impl == "shard_map"


@pytest.mark.parametrize("line, groups", [
    ("%a = f32[4]{0} all-reduce(%x), channel_id=1, replica_groups={{0,2},{1,3}}, "
     "use_global_device_ids=true", [[0, 2], [1, 3]]),
    ("%a = f32[4]{0} all-reduce(%x), replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
    ("%a = f32[4]{0} all-gather(%x), replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}",
     [[0, 2], [1, 3]]),
    ("%a = f32[4]{0} all-reduce(%x), replica_groups=mesh['axis_0'=2,'axis_1'=2], "
     "device_ids=([2,2]T(1,0)) {'axis_1'}, use_global_device_ids=true", [[0, 2], [1, 3]]),
    ("%a = f32[4]{0} all-reduce(%x), replica_groups={}", [[0, 1, 2, 3]]),
])
def test_hlo_replica_groups_are_read_in_every_form(line, groups):
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    assert collectives._hlo_groups(line, "all_reduce", mesh) == groups


@pytest.mark.parametrize("dropout", [0.0, pytest.param(0.1, marks=SLOW)],
                         ids=["no-dropout", "dropout"])
def test_bert_encoder_block_equals_one_device(dropout):
    """BERT's post-norm, bidirectional block with padding runs the same shard_map code:
    sharded with sequence parallelism it trains like one device (the automatic path
    without dropout, the shard_map path with it)."""
    import test_bert_sharding as bert

    model = dataclasses.replace(bert.MODEL, num_layers=2, dropout=dropout,
                                attention_dropout=dropout)
    data = bert._classify_data()

    def bert_losses(config, mesh):
        task = bert.bert_tasks.BertFinetuneTask(config, data, None)
        return [m["loss"] for m in run_steps(task, mesh, bert.TRAIN, 3)[0]]

    split = dataclasses.replace(model, tensor_impl="shard_map", sequence_parallel=True)
    want = bert_losses(model if dropout == 0 else megatron(split, False), one_device())
    np.testing.assert_allclose(bert_losses(split, make_mesh(2, 1, 4)), want, rtol=1e-5)


def test_pipeline_with_shard_map_blocks_is_refused():
    model = megatron(num_layers=4, scan_layers=True)
    with pytest.raises(ValueError, match="does not combine with mesh.tensor_impl='shard_map'"):
        with pipeline.microbatches(2):
            _trace(model, make_mesh(1, 1, 4, stage=2))
