"""Loss, training step (with gradient accumulation) and evaluation step."""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from lmjax.train.state import TrainState


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross entropy. logits: (batch, length, vocab); targets: (batch, length)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _loss_fn(model: nn.Module, params, batch, rng, deterministic: bool) -> jax.Array:
    rngs = None if rng is None else {"dropout": rng}
    logits = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                         rngs=rngs)
    return lm_loss(logits, batch["targets"])


def _split_micro(x: jax.Array, num_micro: int) -> jax.Array:
    """(batch, ...) -> (num_micro, batch // num_micro, ...), microbatch i = rows i::num_micro.

    Strided rows keep every microbatch spread over the same devices as the full batch.
    """
    rows = x.shape[0] // num_micro
    return x.reshape(rows, num_micro, *x.shape[1:]).swapaxes(0, 1)


def _grads(model, params, batch, rng, num_micro: int, deterministic: bool):
    grad_fn = jax.value_and_grad(functools.partial(_loss_fn, model, deterministic=deterministic))
    if num_micro == 1:
        return grad_fn(params, batch, rng)
    micro = jax.tree.map(lambda x: _split_micro(x, num_micro), batch)

    def accumulate(carry, inputs):
        index, mb = inputs
        loss, grads = grad_fn(params, mb, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_micro), micro))
    return jax.tree.map(lambda x: x / num_micro, (loss, grads))


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    num_micro: int = 1,
    deterministic: bool = False,
) -> tuple[TrainState, dict]:
    """One optimiser update; per-step randomness is fold_in(rng, step)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, grads = _grads(model, state.params, batch, rng, num_micro, deterministic)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model: nn.Module) -> jax.Array:
    """Mean loss of one batch, deterministic (no dropout)."""
    return _loss_fn(model, params, batch, None, deterministic=True)
