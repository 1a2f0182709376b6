"""A worker's copy of the parameters, and what each pull moves into it.

The worker keeps its last copy of every parameter. A pull of a shard whose version did
not move costs nothing; otherwise each parameter comes whole, or, with
`ps.pull_filter_threshold` > 0, only the entries that moved by more than the threshold
since the worker's copy (Li et al. 2014's significantly-modified filter: int32 index and
float32 value each, or the whole parameter where that is cheaper). The filter is lossy:
a worker's copy may differ from the server's by up to the threshold in every entry.
Embedding tables under `ps.sparse_keys` (lmjax/ps/sparse.py) bring only the rows of the
worker's next batch up to the shard's version (int32 row id and the row each).
"""

import numpy as np

INDEX_BYTES = 4


class ParamCache:
    """{name: float32 array} the worker computes with, and the version of each table row."""

    def __init__(self, threshold: float, tables: tuple[str, ...]):
        self.threshold = threshold
        self.tables = tables
        self.values: dict[str, np.ndarray] = {}
        self.row_versions: dict[str, np.ndarray] = {}

    def update(self, part: dict, version: int, moved: bool, rows: np.ndarray | None) -> int:
        """Brings one shard's `part` (the server's values at `version`) into the copy;
        `moved`: the version differs from the one held; `rows`: the next batch's rows.
        Returns the bytes that pull moves."""
        moved_bytes = 0
        for name, value in part.items():
            if name not in self.values:
                moved_bytes += self._whole(name, value, version)
            elif name in self.tables:
                moved_bytes += self._rows(name, value, version, rows)
            elif not moved:
                continue
            elif self.threshold > 0:
                moved_bytes += self._filtered(name, value)
            else:
                moved_bytes += self._whole(name, value, version)
        return moved_bytes

    def _whole(self, name: str, value, version: int) -> int:
        self.values[name] = np.array(value, dtype=np.float32, copy=True)
        if name in self.tables:
            self.row_versions[name] = np.full(self.values[name].shape[0], version)
        return self.values[name].nbytes

    def _rows(self, name: str, value, version: int, rows: np.ndarray) -> int:
        """The rows of `rows` not yet at `version`, copied from the server's table."""
        stale = rows[self.row_versions[name][rows] != version]
        self.values[name][stale] = np.asarray(value)[stale]
        self.row_versions[name][stale] = version
        row_bytes = self.values[name][0].nbytes
        return int(stale.size) * (INDEX_BYTES + row_bytes)

    def _filtered(self, name: str, value) -> int:
        """Entries that moved by more than the threshold; the whole array if cheaper."""
        value = np.asarray(value, dtype=np.float32)
        cached = self.values[name]
        changed = np.abs(value - cached) > self.threshold
        count = int(changed.sum())
        if count * (INDEX_BYTES + 4) >= cached.nbytes:
            cached[...] = value
            return cached.nbytes
        cached[changed] = value[changed]
        return count * (INDEX_BYTES + 4)
