"""Optimiser and learning-rate schedule (nanoGPT's recipe on optax)."""

import jax
import jax.numpy as jnp
import optax


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
