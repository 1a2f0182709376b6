"""Optimisers and the learning-rate schedule (nanoGPT's recipe on optax).

`OPTIMIZERS` is the one registry of optimisers, used by the trainer (`train.optimizer`)
and the parameter-server shards (`ps.optimizer`). Every entry takes the learning rate (a
number or an optax schedule) and the keywords beta1, beta2, weight_decay and grad_clip;
an entry ignores the ones it has no use for (its docstring says which).
"""

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


def warmup_linear(
    peak: float, min_lr: float, warmup_steps: int, decay_steps: int
) -> optax.Schedule:
    """BERT's schedule: linear warmup to `peak`, then linear decay to `min_lr` at
    `decay_steps` (Devlin et al. decay to 0)."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / (warmup_steps + 1)
        ratio = jnp.clip((step - warmup_steps) / max(decay_steps - warmup_steps, 1), 0.0, 1.0)
        return jnp.where(step < warmup_steps, warm, peak + ratio * (min_lr - peak))

    return schedule


SCHEDULES = {"cosine": warmup_cosine, "linear": warmup_linear}


def decay_mask(params):
    """Weight decay on matrices only: kernels and embeddings, not biases or norm scales."""

    def is_matrix(path, _):
        # Nested dicts, or the flat "block0/attn/qkv/kernel" names of parameter shards.
        names = {part for key in path for part in str(getattr(key, "key", "")).split("/")}
        return bool(names & {"kernel", "embedding", "wpe"})

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def _clip(grad_clip: float) -> list[optax.GradientTransformation]:
    """Global-norm clipping, or nothing when grad_clip <= 0."""
    return [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []


def adamw(schedule: optax.Schedule, *, beta1: float = 0.9, beta2: float = 0.95,
          weight_decay: float = 0.1, grad_clip: float = 1.0) -> optax.GradientTransformation:
    """AdamW, weight decay on matrices only (`decay_mask`), with global-norm clipping."""
    return optax.chain(*_clip(grad_clip), optax.adamw(
        schedule, b1=beta1, b2=beta2, weight_decay=weight_decay, mask=decay_mask))


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


def sgd(schedule: optax.Schedule, *, beta1: float = 0.0, beta2: float = 0.0,
        weight_decay: float = 0.0, grad_clip: float = 0.0) -> optax.GradientTransformation:
    """Plain SGD; no betas or weight decay."""
    del beta1, beta2, weight_decay
    return optax.chain(*_clip(grad_clip), optax.sgd(schedule))


def momentum(schedule: optax.Schedule, *, beta1: float = 0.9, beta2: float = 0.0,
             weight_decay: float = 0.0, grad_clip: float = 0.0) -> optax.GradientTransformation:
    """SGD with heavy-ball momentum `beta1`."""
    del beta2, weight_decay
    return optax.chain(*_clip(grad_clip), optax.sgd(schedule, momentum=beta1))


def adagrad(schedule: optax.Schedule, *, beta1: float = 0.0, beta2: float = 0.0,
            weight_decay: float = 0.0, grad_clip: float = 0.0) -> optax.GradientTransformation:
    """Adagrad (per-parameter learning rates); no betas or weight decay."""
    del beta1, beta2, weight_decay
    return optax.chain(*_clip(grad_clip), optax.adagrad(schedule))


OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry("optimizer")
for _name, _make in (("adamw", adamw), ("adam", adam), ("rmsprop", rmsprop), ("sgd", sgd),
                     ("momentum", momentum), ("adagrad", adagrad)):
    OPTIMIZERS.register(_name)(_make)
