"""Sharded equals unsharded; partition specs match a golden snapshot; cross-mesh restore."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import train_losses
from flax import linen as nn

from lmjax.models import GPTConfig
from lmjax.parallel import RULES, make_mesh
from lmjax.parallel.rules import fit_spec
from lmjax.train import optim, trainer
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.config import TrainConfig
from lmjax.train.state import state_shardings
from lmjax.train.tasks import LMTask

GOLDEN = Path(__file__).parent / "golden" / "partition_specs.json"
BABY = GPTConfig(vocab_size=65, num_layers=4, num_heads=4, embed_dim=128, block_size=64)
TRAIN = TrainConfig(num_steps=20, batch_size=16, warmup_steps=5)


@pytest.fixture(scope="module")
def unsharded():
    return train_losses(make_mesh(1, 1, 1, devices=jax.devices()[:1]), BABY, TRAIN, 20)[0]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (2, 1, 4)], ids=str)
def test_sharded_equals_unsharded(unsharded, shape):
    sharded, _ = train_losses(make_mesh(*shape), BABY, TRAIN, 20)
    assert np.all(np.isfinite(unsharded)) and unsharded[-1] < unsharded[0]
    np.testing.assert_allclose(sharded, unsharded, rtol=1e-4)


def _specs(rules_name: str, shape) -> dict[str, str]:
    mesh = make_mesh(*shape)
    task = LMTask(GPTConfig(vocab_size=65, num_layers=1, num_heads=4, embed_dim=64,
                            block_size=32))
    tx = optim.adamw(optim.warmup_cosine(1e-3, 1e-4, 10, 100))
    _, shardings = state_shardings(task, tx, 32, mesh, RULES.get(rules_name))
    flat = jax.tree_util.tree_flatten_with_path(shardings.params)[0]
    return {jax.tree_util.keystr(path): str(s.spec) for path, s in flat}


RECIPES = {
    "data_parallel": (8, 1, 1),
    "fsdp": (2, 4, 1),
    "tensor_parallel": (2, 1, 4),
    "fsdp_tensor": (2, 2, 2),
}


def test_partition_specs_match_golden():
    """Regenerate with: python tests/test_sharding.py (after checking the change is intended)."""
    got = {name: _specs(name, shape) for name, shape in RECIPES.items()}
    assert got == json.loads(GOLDEN.read_text())


def test_tensor_parallel_splits_heads_and_mlp():
    specs = _specs("tensor_parallel", (2, 1, 4))
    assert specs["['block0']['attn']['qkv']['kernel']"] == "P(None, None, 'tensor', None)"
    assert specs["['block0']['mlp']['up']['kernel']"] == "P(None, 'tensor')"
    assert specs["['block0']['mlp']['down']['kernel']"] == "P('tensor', None)"
    assert specs["['wte']['embedding']"] == "P('tensor', None)"  # padded 65 -> 128 rows


def test_fit_spec_replicates_what_does_not_divide():
    mesh = make_mesh(2, 1, 4)
    spec = jax.sharding.PartitionSpec("tensor", ("data", "fsdp"))
    assert fit_spec((65, 6), spec, mesh) == jax.sharding.PartitionSpec(None, ("data", "fsdp"))


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    _, state = train_losses(make_mesh(8, 1, 1), BABY, TRAIN, 2)
    saver = Checkpointer(str(tmp_path / "ckpt"))
    saver.save(2, state, None, {"best_eval_loss": None})
    saver.wait()
    target = make_mesh(2, 2, 2)
    rules = RULES.get("fsdp_tensor")
    setup = trainer.build(LMTask(BABY), TRAIN, target, rules)
    with jax.set_mesh(target), nn.logical_axis_rules(rules):
        restored, _ = saver.restore(2, setup.abstract)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = restored.params["block0"]["mlp"]["up"]["kernel"]
    assert leaf.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    saver.close()



def test_sizes_that_do_not_divide_the_mesh_still_train_identically():
    """6 heads and a 65-symbol vocabulary on tensor=4: heads are replicated, vocab padded."""
    model = GPTConfig(vocab_size=65, num_layers=1, num_heads=6, embed_dim=96, block_size=16)
    config = TrainConfig(num_steps=3, batch_size=8, warmup_steps=1)
    one, _ = train_losses(make_mesh(1, 1, 1, devices=jax.devices()[:1]), model, config, 3)
    many, state = train_losses(make_mesh(2, 1, 4), model, config, 3)
    np.testing.assert_allclose(many, one, rtol=1e-4)
    qkv = state.params["block0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec[2] is None  # 6 heads do not divide tensor=4: replicated


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({n: _specs(n, s) for n, s in RECIPES.items()}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
