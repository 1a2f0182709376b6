"""Sparse keys: embedding tables move between workers and servers as rows.

A batch reads only the rows of its token ids, so the gradient of an embedding table is
zero outside those rows (padding ids included: a padded position's row is read and its
gradient is exactly zero, so counting it costs one row and keeps the rule simple). A
push therefore carries (row ids, rows) and equals the dense push restricted to them;
the server scatters the rows into a zero gradient and applies its optimiser to the whole
table, so any optimiser behaves exactly as with dense pushes (Adam's moments decay on
untouched rows too: this is dense Adam, not lazy Adam). A pull brings only the rows of
the worker's next batch up to the shard's version: the rows it does not read cannot
change its loss or gradient. As Downpour's and ps-lite's key-value pairs, with a row as
the key.

A model's tables are named in SPARSE_TABLES by its config's class name.
"""

import numpy as np

from lmjax.ps.config import PSConfig

# Parameter names (lmjax.ps.sharding.flatten) of each model's embedding tables whose rows
# are indexed by batch["inputs"].
SPARSE_TABLES: dict[str, tuple[str, ...]] = {
    "CBoWConfig": ("embed/embedding",),
    "BiLSTMConfig": ("embed/embedding",),
}
WHY_NOT = {
    "GPTConfig": "its token embedding wte is tied to the output layer (logits = x wte^T), "
                 "so every row has a gradient at every step",
}


def tables_of(config: PSConfig) -> tuple[str, ...]:
    """The parameter names that move as rows (none unless ps.sparse_keys)."""
    if not config.sparse_keys:
        return ()
    name = type(config.model).__name__
    if name not in SPARSE_TABLES:
        why = WHY_NOT.get(name, "it has no embedding table listed in lmjax/ps/sparse.py")
        raise ValueError(f"ps.sparse_keys=True does not apply to {name}: {why}; models with "
                         f"sparse tables: {', '.join(sorted(SPARSE_TABLES))}")
    return SPARSE_TABLES[name]


def touched_rows(batch: dict) -> np.ndarray:
    """The sorted row ids a batch reads: every id in its inputs, padding included."""
    return np.unique(np.asarray(batch["inputs"])).astype(np.int32)


def gather(table: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 row ids, float32 rows) of a table, the payload of a sparse push."""
    return rows.astype(np.int32), np.ascontiguousarray(np.asarray(table)[rows], np.float32)


def scatter(payload: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The dense table the payload stands for: its rows, zeros elsewhere."""
    rows, values = payload
    out = np.zeros(shape, np.float32)
    out[rows] = values
    return out
