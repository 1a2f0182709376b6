"""The training step, with gradient accumulation over microbatches.

The step is generic over a task (lmjax/train/tasks.py): the task computes the loss and
its metrics and may hand a carried state (an RNN's hidden state) to the next batch.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from lmjax.parallel import pipeline
from lmjax.train.state import TrainState


def _split_micro(x: jax.Array, num_micro: int) -> jax.Array:
    """(batch, ...) -> (num_micro, batch // num_micro, ...), microbatch i = rows i::num_micro.

    Strided rows keep every microbatch spread over the same devices as the full batch.
    """
    rows = x.shape[0] // num_micro
    return x.reshape(rows, num_micro, *x.shape[1:]).swapaxes(0, 1)


def _join_micro(x: jax.Array) -> jax.Array:
    """Inverse of `_split_micro`: (num_micro, rows, ...) -> (rows * num_micro, ...)."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _grads(task, params, batch, carry, rng, num_micro: int, deterministic: bool):
    """((loss, (metrics, carry)), grads), averaged over microbatches."""

    def loss_fn(p, mb, c, key):
        return task.loss(p, mb, c, key, deterministic)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        return grad_fn(params, batch, carry, rng)
    split = functools.partial(jax.tree.map, lambda x: _split_micro(x, num_micro))

    def accumulate(total, inputs):
        index, mb, c = inputs
        (loss, (metrics, c)), grads = grad_fn(params, mb, c, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, total, (loss, metrics, grads)), c

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split(batch)),
                            jax.tree.map(lambda x: x[0], split(carry)), rng)
    (_, (metric_shapes, _)), _ = shapes
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, metric_shapes),
             jax.tree.map(jnp.zeros_like, params))
    total, carries = jax.lax.scan(accumulate, zeros, (jnp.arange(num_micro), split(batch),
                                                      split(carry)))
    loss, metrics, grads = jax.tree.map(lambda x: x / num_micro, total)
    return (loss, (metrics, jax.tree.map(_join_micro, carries))), grads


def train_step(
    state: TrainState,
    batch: dict,
    *,
    task,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    num_micro: int = 1,
    deterministic: bool = False,
    pipeline_microbatches: int = 1,
) -> tuple[TrainState, dict]:
    """One optimiser update; per-step randomness is fold_in(rng, step).

    `pipeline_microbatches` splits each of the `num_micro` batches again inside a
    pipelined model (lmjax/parallel/pipeline.py; the stage count is the mesh's)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    with pipeline.microbatches(pipeline_microbatches):
        (loss, (extra, carry)), grads = _grads(task, state.params, batch, state.carry, rng,
                                               num_micro, deterministic)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **extra,
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
    }
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, carry=carry)
    return new, metrics
