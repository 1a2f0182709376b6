"""Magnitude pruning of dense kernels during training (Zhu and Gupta 2017).

The masks live in the optimiser state (`PruneState`), so they are part of the train
state: sharded like the parameters, saved in every checkpoint and restored on resume.
Pruning is the last transformation of the optimiser chain: at each pruning step it
recomputes the masks from the magnitudes of the updated kernels, and at every step it
rewrites the update so that `params + update` is exactly zero where the mask is off
(`where(mask, update, -params)`: x + (-x) is exactly 0 in IEEE arithmetic). A pruned
weight therefore stays zero through every later optimiser step and through resume.

Target sparsity follows Zhu and Gupta's cubic schedule,
    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3   for t0 <= t <= t1,
with the masks updated every `every` steps between `begin_step` (t0) and `end_step` (t1).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCOPES = ("global", "layer")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Gin binds it as `prune` (`prune.sparsity = 0.5`); sparsity 0 turns pruning off."""

    sparsity: float = 0.0  # s_f, the fraction of dense-kernel entries that end up zero
    initial_sparsity: float = 0.0  # s_i, the target at begin_step
    begin_step: int = 0
    end_step: int | None = None  # default: 3/4 of train.num_steps (then fine-tune masked)
    every: int = 100  # steps between mask updates
    scope: str = "global"  # one magnitude threshold over all kernels, or "layer": per kernel

    @property
    def enabled(self) -> bool:
        return self.sparsity > 0

    def validate(self, num_steps: int) -> None:
        """Raises ValueError naming the binding to change."""
        for name in ("sparsity", "initial_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"prune.{name} must be in [0, 1), got {value}")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"prune.initial_sparsity={self.initial_sparsity} exceeds "
                             f"prune.sparsity={self.sparsity}; the schedule only prunes more")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown prune.scope {self.scope!r}; known: {', '.join(SCOPES)}")
        if self.every <= 0:
            raise ValueError(f"prune.every must be positive, got {self.every}")
        end = self.end(num_steps)
        if not 0 <= self.begin_step <= end <= num_steps:
            raise ValueError(f"pruning runs from prune.begin_step={self.begin_step} to "
                             f"prune.end_step={end}; both must lie in [0, train.num_steps="
                             f"{num_steps}] and begin must not follow end")

    def end(self, num_steps: int) -> int:
        return (3 * num_steps) // 4 if self.end_step is None else self.end_step


def is_kernel(path) -> bool:
    """Dense kernels: leaves named `kernel` (not embeddings, biases or norm scales)."""
    return any(getattr(key, "key", None) == "kernel" for key in path)


def target_sparsity(config: PruneConfig, num_steps: int, step: jax.Array) -> jax.Array:
    """Zhu and Gupta's cubic schedule at `step` (s_i before begin, s_f after end)."""
    begin, end = config.begin_step, config.end(num_steps)
    progress = jnp.clip((step - begin) / max(end - begin, 1), 0.0, 1.0)
    return config.sparsity + (config.initial_sparsity - config.sparsity) * (1 - progress) ** 3


def _threshold(magnitudes: jax.Array, sparsity: jax.Array) -> jax.Array:
    """The largest magnitude that is pruned: the k-th smallest, k = floor(sparsity * n);
    -1 when k is 0, so nothing is pruned."""
    flat = jnp.sort(magnitudes.reshape(-1))
    k = jnp.floor(sparsity * flat.size).astype(jnp.int32)
    return jnp.where(k > 0, flat[jnp.maximum(k - 1, 0)], -1.0)


def new_masks(params, masks, sparsity: jax.Array, scope: str):
    """Masks keeping the largest-magnitude kernel entries at `sparsity` (per kernel, or one
    threshold over all kernels). A pruned entry stays pruned (masks only shrink)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    old = treedef.flatten_up_to(masks)
    kernels = [i for i, (path, _) in enumerate(leaves) if is_kernel(path)]
    # Pruned entries are exactly zero, so they rank first and stay below the threshold.
    magnitude = {i: jnp.abs(leaves[i][1]).astype(jnp.float32) * old[i] for i in kernels}
    if scope == "global":
        everything = jnp.concatenate([magnitude[i].reshape(-1) for i in kernels])
        cut = _threshold(everything, sparsity)
        thresholds = dict.fromkeys(kernels, cut)
    else:
        thresholds = {i: _threshold(magnitude[i], sparsity) for i in kernels}
    out = [old[i] & (magnitude[i] > thresholds[i]) if i in magnitude else old[i]
           for i in range(len(leaves))]
    return jax.tree_util.tree_unflatten(treedef, out)


class PruneState(NamedTuple):
    count: jax.Array  # optimiser steps taken
    masks: dict  # bool, shaped like the params (all True outside the kernels)


def magnitude_pruning(config: PruneConfig, num_steps: int) -> optax.GradientTransformation:
    """The pruning transformation (to chain after the optimiser)."""
    end = config.end(num_steps)

    def init(params):
        return PruneState(jnp.zeros((), jnp.int32),
                          jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params))

    def update(updates, state, params):
        if params is None:
            raise ValueError("magnitude pruning needs the parameters in tx.update")
        step = state.count
        candidate = jax.tree.map(lambda p, u: p + u, params, updates)
        due = (step >= config.begin_step) & (step <= end) & ((step - config.begin_step)
                                                             % config.every == 0)
        masks = jax.lax.cond(
            due, lambda: new_masks(candidate, state.masks,
                                   target_sparsity(config, num_steps, step), config.scope),
            lambda: state.masks)
        updates = jax.tree.map(lambda m, u, p: jnp.where(m, u, -p), masks, updates, params)
        return updates, PruneState(step + 1, masks)

    return optax.GradientTransformation(init, update)


def kernel_sparsity(params) -> float:
    """The fraction of dense-kernel entries that are exactly zero."""
    zeros = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if is_kernel(path):
            zeros += int(jnp.sum(leaf == 0))
            total += leaf.size
    return zeros / max(total, 1)
