"""Meshes, logical-axis rules and sharding helpers."""

from lmjax.parallel.mesh import batch_sharding, make_mesh
from lmjax.parallel.rules import RULES, logical_to_shardings

__all__ = ["RULES", "batch_sharding", "logical_to_shardings", "make_mesh"]
