"""The training state pytree and its creation, already sharded on a mesh."""

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmjax.parallel.rules import logical_to_shardings, strip_boxes


@struct.dataclass
class TrainState:
    """Everything a step reads and writes: one pytree through a jitted, donated step."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
    def init(seed: jax.Array) -> TrainState:
        key = jax.random.key(seed)
        init_key, train_key = jax.random.split(key)
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(init_key, tokens)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(train_key),
        )

    return init


def state_shardings(model, tx, seq_len: int, mesh: Mesh, rules):
    """(abstract unboxed state, NamedShardings) from logical axis names, without allocating."""
    boxed = jax.eval_shape(_init_fn(model, tx, seq_len), jnp.zeros((), jnp.uint32))
    return strip_boxes(boxed), logical_to_shardings(boxed, mesh, rules)


def create_state(model, tx, seq_len: int, seed: int, mesh: Mesh, rules) -> TrainState:
    """Parameters are created already sharded: jit(init) with out_shardings from the rules."""
    _, shardings = state_shardings(model, tx, seq_len, mesh, rules)
    init = _init_fn(model, tx, seq_len)
    replicated = NamedSharding(mesh, PartitionSpec())
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        fn = jax.jit(lambda s: nn.unbox(init(s)), in_shardings=replicated, out_shardings=shardings)
        return fn(jnp.asarray(seed, jnp.uint32))
