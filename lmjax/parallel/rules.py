"""Logical axis names -> mesh axes.

Parameters and activations name their axes logically (`embed`, `heads`, ...); one short
table per recipe maps those names onto the mesh. Activations use their own names
(`batch`, `length`, `act_*`) so that FSDP can shard parameter `embed` without also
sharding activations along their hidden dimension.
"""

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmjax.registry import Registry

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_BATCH = (("batch", ("data", "fsdp")),)
# The stacked-layer axis of scanned blocks (scan_layers) is split over pipeline stages:
# each stage holds its consecutive layers (lmjax/parallel/pipeline.py). With stage=1 (the
# default) it stays whole on every device, as nn.scan slices one layer per iteration.
_LAYERS = (("layers", "stage"),)
_FSDP = (("embed", "fsdp"),)
_TENSOR = (
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

RULES: Registry[Rules] = Registry("sharding rule table")
RULES.register("data_parallel")(_BATCH + _LAYERS)
RULES.register("fsdp")(_BATCH + _LAYERS + _FSDP)
RULES.register("tensor_parallel")(_BATCH + _LAYERS + _TENSOR)
# Axes of size 1 are no-ops, so the union serves every mesh shape; it is the default.
RULES.register("fsdp_tensor")(_BATCH + _LAYERS + _FSDP + _TENSOR)


def fit_spec(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (that dimension is replicated).

    Sizes such as a 65-symbol vocabulary are padded by the model; this is the safety
    net for everything else, so any config runs on any mesh.
    """
    fitted = []
    padded = tuple(spec) + (None,) * (len(shape) - len(spec))
    for dim, axes in zip(shape, padded, strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[name] for name in names])) if names else 1
        fitted.append(axes if dim % size == 0 else None)
    return PartitionSpec(*fitted)


def strip_boxes(tree):
    """`nn.unbox` without the sharding constraint it adds under a mesh (for abstract trees)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
        tree, is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def logical_to_shardings(abstract_boxed, mesh: Mesh, rules: Rules):
    """Shardings for a pytree whose leaves may be `nn.Partitioned` (as `jax.eval_shape` gives).

    Returns a tree matching the unboxed structure, one NamedSharding per array.
    """
    logical = nn.get_partition_spec(abstract_boxed)
    abstract = strip_boxes(abstract_boxed)

    def one(leaf, logical_spec):
        spec = nn.logical_to_mesh_axes(logical_spec, rules)
        return NamedSharding(mesh, fit_spec(leaf.shape, spec, mesh))

    return jax.tree.map(one, abstract, logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
