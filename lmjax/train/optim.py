"""Optimiser and learning-rate schedule (nanoGPT's recipe on optax)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lmjax.registry import Registry


def warmup_cosine(
    peak: float, min_lr: float, warmup_steps: int, decay_steps: int
) -> optax.Schedule:
    """nanoGPT's `get_lr`: linear warmup to `peak`, cosine down to `min_lr` at `decay_steps`."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / (warmup_steps + 1)
        ratio = jnp.clip((step - warmup_steps) / max(decay_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (peak - min_lr)
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params):
    """Weight decay on matrices only: kernels and embeddings, not biases or norm scales."""

    def is_matrix(path, _):
        names = {getattr(key, "key", None) for key in path}
        return bool(names & {"kernel", "embedding", "wpe"})

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def adamw(
    schedule: optax.Schedule,
    *,
    beta1: float = 0.9,
    beta2: float = 0.95,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (skipped when grad_clip <= 0)."""
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(
        optax.adamw(schedule, b1=beta1, b2=beta2, weight_decay=weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts)


def _clip(grad_clip: float) -> list[optax.GradientTransformation]:
    return [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []


def rmsprop(schedule: optax.Schedule, *, beta1: float = 0.9, beta2: float = 0.95,
            weight_decay: float = 0.0, grad_clip: float = 5.0) -> optax.GradientTransformation:
    """char-rnn's RMSprop: `beta2` is the squared-gradient decay (char-rnn: 0.95).

    Global-norm clipping stands in for char-rnn's element-wise clamp; beta1 and
    weight_decay are not used.
    """
    del beta1, weight_decay
    return optax.chain(*_clip(grad_clip), optax.rmsprop(schedule, decay=beta2, eps=1e-8))


def adam(schedule: optax.Schedule, *, beta1: float = 0.9, beta2: float = 0.999,
         weight_decay: float = 0.0, grad_clip: float = 1.0) -> optax.GradientTransformation:
    """Adam (no weight decay) with global-norm clipping."""
    del weight_decay
    return optax.chain(*_clip(grad_clip), optax.adam(schedule, b1=beta1, b2=beta2))


OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry("optimizer")
OPTIMIZERS.register("adamw")(adamw)
OPTIMIZERS.register("adam")(adam)
OPTIMIZERS.register("rmsprop")(rmsprop)
