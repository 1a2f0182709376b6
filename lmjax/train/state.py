"""The training state pytree of a task and its creation, already sharded on a mesh.

One way for every caller: `state_shardings` gives the abstract state and its
NamedShardings from the logical axis names (nothing allocated), `create_state` makes the
state with `jax.jit(init, out_shardings=...)` so parameters are born sharded, and
`abstract_params` gives the parameters alone (eval and serving read nothing else).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmjax.parallel.rules import logical_to_shardings, strip_boxes
from lmjax.train.checkpoint import as_abstract


@struct.dataclass
class TrainState:
    """Everything a step reads and writes: one pytree through a jitted, donated step."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    # State carried from one batch to the next (an RNN's hidden state in truncated
    # BPTT), leaves shaped (batch, ...); None for tasks that carry nothing.
    carry: Any = None


def _batch_partitioned(carry):
    """Tags each carry leaf's leading axis as `batch`, so it is sharded like the data."""
    return jax.tree.map(
        lambda x: nn.LogicallyPartitioned(x, names=("batch",) + (None,) * (x.ndim - 1)), carry)


def init_params(task, key: jax.Array):
    """The task's freshly initialised parameters (boxed with their logical axis names)."""
    return task.model.init(key, *task.init_args())["params"]


def _init_fn(task, tx: optax.GradientTransformation, batch_size: int):
    def init(seed: jax.Array) -> TrainState:
        init_key, train_key = jax.random.split(jax.random.key(seed))
        params = init_params(task, init_key)
        carry = task.init_carry(batch_size)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(train_key),
            carry=None if carry is None else _batch_partitioned(carry),
        )

    return init


def _shardings_of(init, mesh: Mesh, rules):
    boxed = jax.eval_shape(init, jnp.zeros((), jnp.uint32))
    return strip_boxes(boxed), logical_to_shardings(boxed, mesh, rules)


def state_shardings(task, tx, batch_size: int, mesh: Mesh, rules):
    """(abstract unboxed state, NamedShardings); the carry (if any) has `batch_size` rows."""
    return _shardings_of(_init_fn(task, tx, batch_size), mesh, rules)


def create_state(task, tx, batch_size: int, seed: int, mesh: Mesh, rules) -> TrainState:
    """The initial state of `seed`, created already sharded on `mesh`."""
    init = _init_fn(task, tx, batch_size)
    _, shardings = _shardings_of(init, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        fn = jax.jit(lambda s: nn.unbox(init(s)), in_shardings=replicated, out_shardings=shardings)
        return fn(jnp.asarray(seed, jnp.uint32))


def abstract_params(task, mesh: Mesh, rules):
    """The task's parameters as ShapeDtypeStructs carrying their shardings on `mesh`."""
    boxed = jax.eval_shape(lambda: init_params(task, jax.random.key(0)))
    return as_abstract(strip_boxes(boxed), logical_to_shardings(boxed, mesh, rules))
