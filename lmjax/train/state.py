"""The training state pytree and its creation, already sharded on a mesh."""

from typing import Any

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
    # State carried from one batch to the next (an RNN's hidden state in truncated
    # BPTT), leaves shaped (batch, ...); None for tasks that carry nothing (checkpoints
    # from before this field existed still restore, see Checkpointer.restore).
    carry: Any = None


def _batch_partitioned(carry):
    """Tags each carry leaf's leading axis as `batch`, so it is sharded like the data."""
    return jax.tree.map(
        lambda x: nn.LogicallyPartitioned(x, names=("batch",) + (None,) * (x.ndim - 1)), carry)


def _task_init_fn(model: nn.Module, tx: optax.GradientTransformation, init_args, carry_fn):
    def init(seed: jax.Array) -> TrainState:
        key = jax.random.key(seed)
        init_key, train_key = jax.random.split(key)
        params = model.init(init_key, *init_args)["params"]
        carry = None if carry_fn is None else _batch_partitioned(carry_fn())
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(train_key),
            carry=carry,
        )

    return init


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
    return _task_init_fn(model, tx, (jnp.zeros((1, seq_len), jnp.int32),), None)


def _shardings_of(init, mesh: Mesh, rules):
    boxed = jax.eval_shape(init, jnp.zeros((), jnp.uint32))
    return strip_boxes(boxed), logical_to_shardings(boxed, mesh, rules)


def _create(init, shardings, seed: int, mesh: Mesh, rules) -> TrainState:
    replicated = NamedSharding(mesh, PartitionSpec())
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        fn = jax.jit(lambda s: nn.unbox(init(s)), in_shardings=replicated, out_shardings=shardings)
        return fn(jnp.asarray(seed, jnp.uint32))


def state_shardings(model, tx, seq_len: int, mesh: Mesh, rules):
    """(abstract unboxed state, NamedShardings) from logical axis names, without allocating."""
    return _shardings_of(_init_fn(model, tx, seq_len), mesh, rules)


def create_state(model, tx, seq_len: int, seed: int, mesh: Mesh, rules) -> TrainState:
    """Parameters are created already sharded: jit(init) with out_shardings from the rules."""
    _, shardings = state_shardings(model, tx, seq_len, mesh, rules)
    return _create(_init_fn(model, tx, seq_len), shardings, seed, mesh, rules)


def task_init_fn(task, tx, batch_size: int):
    """The init function of a task's state; the carry (if any) is for `batch_size` rows."""
    carry = task.init_carry(batch_size)
    carry_fn = None if carry is None else (lambda: task.init_carry(batch_size))
    return _task_init_fn(task.model, tx, task.init_args(), carry_fn)


def task_state_shardings(task, tx, batch_size: int, mesh: Mesh, rules):
    """`state_shardings` for any task: params from its init args, carry over `batch`."""
    return _shardings_of(task_init_fn(task, tx, batch_size), mesh, rules)


def create_task_state(task, tx, batch_size: int, seed: int, mesh: Mesh, rules) -> TrainState:
    _, shardings = task_state_shardings(task, tx, batch_size, mesh, rules)
    return _create(task_init_fn(task, tx, batch_size), shardings, seed, mesh, rules)
