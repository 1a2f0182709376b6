"""scan_layers: the scanned GPT and BERT are the unscanned models with their blocks'
parameters stacked; `stack_layers` / `unstack_layers` convert between the layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_losses
from flax import linen as nn

from lmjax.models import GPT, BertPretrain, GPTConfig
from lmjax.models.bert import BertConfig
from lmjax.models.transformer import stack_layers, unstack_layers
from lmjax.parallel import RULES, make_mesh

GPT_CONFIG = GPTConfig(vocab_size=65, block_size=16, num_layers=3, num_heads=4, embed_dim=32)
BERT_CONFIG = BertConfig(vocab_size=50, max_len=16, num_layers=3, embed_dim=32, num_heads=4,
                         dropout=0.0, attention_dropout=0.0)


def _tokens(seed: int, vocab: int, shape=(2, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, shape).astype(np.int32)


def _init(model: nn.Module, tokens) -> dict:
    return jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), tokens)["params"]))()


def _outputs_and_grads(model: nn.Module, params, tokens):
    """Outputs and the gradient of a fixed random projection of them, float32."""

    def loss(p):
        outputs = model.apply({"params": p}, tokens)
        leaves = jax.tree.leaves(outputs)
        weights = [jax.random.normal(jax.random.key(i), o.shape) for i, o in enumerate(leaves)]
        # Padded vocabulary logits are finfo.min constants: leave them out of the loss.
        total = sum(jnp.sum(jnp.where(o > -1e30, o, 0) * w)
                    for o, w in zip(leaves, weights, strict=True))
        return total, outputs

    with jax.default_matmul_precision("highest"):
        (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return outputs, grads


def _assert_close(x, y):
    """Equal up to float32 rounding. XLA fuses the scan body and the unrolled blocks
    differently, so sums (a bias or scale gradient adds batch x length terms) round in
    another order: the error is a few ulps of the tensor's largest entry, not of each
    entry (a small sum of large terms keeps the large terms' absolute error)."""
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=0, atol=2e-6 * np.abs(y).max())


def _assert_trees_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        _assert_close(x, y)


@pytest.mark.parametrize("options", [{}, {"remat": True},
                                     {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}])
def test_scanned_gpt_equals_unscanned(options):
    config = dataclasses.replace(GPT_CONFIG, **options)
    scanned = dataclasses.replace(config, scan_layers=True)
    tokens = _tokens(0, config.vocab_size)
    params = _init(GPT(config), tokens)
    stacked = stack_layers(params, config.num_layers)
    logits, grads = _outputs_and_grads(GPT(config), params, tokens)
    scanned_logits, scanned_grads = _outputs_and_grads(GPT(scanned), stacked, tokens)
    real = slice(0, config.vocab_size)  # padded vocabulary logits are finfo.min constants
    _assert_close(scanned_logits[..., real], logits[..., real])
    _assert_trees_close(unstack_layers(scanned_grads), grads)


def test_scanned_bert_equals_unscanned():
    scanned = dataclasses.replace(BERT_CONFIG, scan_layers=True)
    tokens = _tokens(1, BERT_CONFIG.vocab_size)
    tokens[1, 10:] = BERT_CONFIG.pad_id
    params = _init(BertPretrain(BERT_CONFIG), tokens)
    stacked = stack_layers(params, BERT_CONFIG.num_layers)
    assert "blocks" in stacked["bert"] and "block0" not in stacked["bert"]
    (mlm, nsp), grads = _outputs_and_grads(BertPretrain(BERT_CONFIG), params, tokens)
    (scanned_mlm, scanned_nsp), scanned_grads = _outputs_and_grads(BertPretrain(scanned),
                                                                   stacked, tokens)
    real = slice(0, BERT_CONFIG.vocab_size)  # padded vocabulary logits are finfo.min
    _assert_close(scanned_mlm[..., real], mlm[..., real])
    _assert_close(scanned_nsp, nsp)
    _assert_trees_close(unstack_layers(scanned_grads), grads)


def test_stack_and_unstack_are_inverse():
    tokens = _tokens(2, GPT_CONFIG.vocab_size)
    scanned = dataclasses.replace(GPT_CONFIG, scan_layers=True)
    stacked = _init(GPT(scanned), tokens)
    # The layout a scanned init creates is the one stack_layers makes.
    unstacked = unstack_layers(stacked)
    assert sorted(unstacked) == ["block0", "block1", "block2", "norm_f", "wpe", "wte"]
    again = stack_layers(unstacked, GPT_CONFIG.num_layers)
    assert jax.tree.structure(again) == jax.tree.structure(stacked)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked), strict=True):
        np.testing.assert_array_equal(a, b)
    # Scanned init draws each layer separately: the layers differ.
    kernel = stacked["blocks"]["attn"]["qkv"]["kernel"]
    assert kernel.shape == (3, 32, 3, 4, 8) and not np.allclose(kernel[0], kernel[1])


def test_stack_layers_checks_the_layer_count():
    params = {"block0": {"w": np.zeros(2)}, "block1": {"w": np.zeros(2)}, "x": np.zeros(1)}
    with pytest.raises(ValueError, match="exactly 3 blocks"):
        stack_layers(params, 3)
    with pytest.raises(ValueError, match="exactly 1 blocks"):
        stack_layers(params, 1)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_stacked_parameters_lead_with_a_layers_axis_split_over_stages(family):
    """The layers axis maps to the pipeline's `stage` axis, whole on every device of a
    mesh with stage=1 (every mesh that does not pipeline)."""
    if family == "gpt":
        model = GPT(dataclasses.replace(GPT_CONFIG, scan_layers=True))
    else:
        model = BertPretrain(dataclasses.replace(BERT_CONFIG, scan_layers=True))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), np.ones((1, 8), np.int32)))
    flat = jax.tree_util.tree_flatten_with_path(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    stacked = [leaf for path, leaf in flat if "blocks" in jax.tree_util.keystr(path)]
    assert stacked and all(leaf.names[0] == "layers" and leaf.value.shape[0] == 3
                           for leaf in stacked)
    for name in RULES.names():
        spec = nn.logical_to_mesh_axes(("layers", "embed", "mlp"), RULES.get(name))
        assert spec[0] == "stage", (name, spec)


def test_scanned_model_drops_out_in_training_only():
    config = dataclasses.replace(GPT_CONFIG, scan_layers=True, dropout=0.5, num_layers=2)
    tokens = _tokens(3, config.vocab_size)
    model = GPT(config)
    params = _init(model, tokens)
    train = jax.jit(lambda p, key: model.apply({"params": p}, tokens, deterministic=False,
                                               rngs={"dropout": key}))
    np.testing.assert_array_equal(train(params, jax.random.key(1)),
                                  train(params, jax.random.key(1)))  # the rng fixes the masks
    assert not np.allclose(train(params, jax.random.key(1)), train(params, jax.random.key(2)))
    evaluated = jax.jit(lambda p: model.apply({"params": p}, tokens))(params)
    assert not np.allclose(train(params, jax.random.key(1)), evaluated)


def test_scanned_gpt_sharded_trains_as_on_one_device():
    """The stacked parameters shard like the per-layer ones, behind a whole layer axis."""
    from lmjax.train import trainer

    model = GPTConfig(vocab_size=65, num_layers=2, num_heads=4, embed_dim=32, block_size=16,
                      scan_layers=True)
    config = trainer.TrainConfig(num_steps=3, batch_size=8, warmup_steps=1)
    one, _ = train_losses(make_mesh(1, 1, 1, devices=jax.devices()[:1]), model, config, 3)
    many, state = train_losses(make_mesh(2, 2, 2), model, config, 3)
    np.testing.assert_allclose(many, one, rtol=1e-4)
    qkv = state.params["blocks"]["attn"]["qkv"]["kernel"]  # (layers, embed, 3, heads, hd)
    # The layers axis names `stage`, of size 1 here: whole on every device.
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("stage", "fsdp", None, "tensor", None)


@pytest.mark.parametrize("saved_scanned", [False, True], ids=["loop->scan", "scan->loop"])
def test_a_checkpoint_restores_into_the_other_layout(tmp_path, saved_scanned):
    """Params-only restores (eval, sample, serve, fine-tuning) convert the layer layout:
    a checkpoint of one layout serves the other, and a different depth is refused."""
    from lmjax.train.checkpoint import Checkpointer, IncompatibleCheckpointError
    from lmjax.train.state import TrainState, abstract_params
    from lmjax.train.tasks import LMTask

    def config(scanned, layers=GPT_CONFIG.num_layers):
        return dataclasses.replace(GPT_CONFIG, scan_layers=scanned, num_layers=layers)

    params = _init(GPT(config(saved_scanned)), _tokens(0, 65))
    state = TrainState(step=jnp.array(1), params=params, opt_state=(), rng=jnp.zeros(2, "uint32"))
    saver = Checkpointer(str(tmp_path), async_save=False)
    saver.save(1, state, None, {"best_eval_loss": None})
    saver.close()
    mesh, rules = make_mesh(2, 1, 4), RULES.get("fsdp_tensor")
    reader = Checkpointer(str(tmp_path), read_only=True)
    target = abstract_params(LMTask(config(not saved_scanned)), mesh, rules)
    restored = reader.restore_params(1, target)
    want = unstack_layers(params) if saved_scanned else stack_layers(params, 3)
    for (path, got), wanted in zip(jax.tree_util.tree_leaves_with_path(restored),
                                   jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(wanted), err_msg=str(path))
    qkv = restored["blocks" if not saved_scanned else "block0"]["attn"]["qkv"]["kernel"]
    assert "tensor" in str(qkv.sharding.spec)  # placed on the target's shardings
    deeper = abstract_params(LMTask(config(not saved_scanned, layers=4)), mesh, rules)
    with pytest.raises(IncompatibleCheckpointError, match="does not match the configured"):
        reader.restore_params(1, deeper)
    reader.close()
