"""Parameters split over server shards by key ranges balanced by size.

A parameter server keys its values (here by the parameter's path, 'block0/attn/...') and
gives each shard a contiguous range of keys. Ranges are cut where the running size
crosses k/S of the total, so shards hold similar numbers of floats.
"""

import dataclasses

import numpy as np
from flax import traverse_util


def flatten(params: dict) -> dict[str, object]:
    """{'block0': {'attn': {...}}} -> {'block0/attn/...': array}."""
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: dict[str, object]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """names[k]: the sorted parameter names shard k holds; shapes of every parameter."""

    names: tuple[tuple[str, ...], ...]
    shapes: dict[str, tuple[int, ...]]

    @property
    def num_shards(self) -> int:
        return len(self.names)

    def split(self, flat: dict) -> list[dict]:
        return [{name: flat[name] for name in names} for names in self.names]

    def merge(self, parts: list[dict]) -> dict:
        return {name: value for part in parts for name, value in part.items()}

    def sizes(self) -> list[int]:
        return [sum(int(np.prod(self.shapes[n])) for n in names) for names in self.names]


def plan_shards(shapes: dict[str, tuple[int, ...]], num_shards: int) -> ShardPlan:
    """Contiguous ranges of sorted keys with balanced total size; every shard non-empty."""
    names = sorted(shapes)
    if not 0 < num_shards <= len(names):
        raise ValueError(f"cannot split {len(names)} parameters over {num_shards} shards")
    sizes = np.array([int(np.prod(shapes[n])) for n in names], dtype=np.float64)
    ends = np.cumsum(sizes)
    cuts = []
    for k in range(1, num_shards):
        # First key whose running size reaches k/S of the total, leaving room for the rest.
        cut = int(np.searchsorted(ends, ends[-1] * k / num_shards)) + 1
        low = (cuts[-1] if cuts else 0) + 1
        cuts.append(min(max(cut, low), len(names) - (num_shards - k)))
    bounds = [0, *cuts, len(names)]
    ranges = tuple(tuple(names[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return ShardPlan(ranges, dict(shapes))
