"""int8 weight-only quantisation for serving: per-output-channel, symmetric.

Dense kernels and embeddings are stored as int8 with one float32 scale per output
channel (scale = max|w| / 127 over the channel's inputs); biases and norms stay float32.
The model still computes in float32: `dequantize` runs inside the compiled decode step,
so only the stored weights shrink (4x for the quantised tensors).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.train.tasks import evaluate

# Dense kernels are (inputs..., outputs...); how many leading axes are inputs, by module.
KERNEL_IN_AXES = {"qkv": 1, "out": 2, "up": 1, "gate": 1, "down": 1}
# Embedding tables are (rows, embed): one scale per row (a vocabulary entry is an
# output channel of the tied output projection; a position's row is read as a whole).
EMBEDDINGS = ("embedding", "wpe")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    """int8 values and float32 scales broadcastable against them."""

    values: jax.Array  # int8
    scale: jax.Array  # float32, size 1 along the reduced (input) axes

    def dequantize(self) -> jax.Array:
        return self.values.astype(jnp.float32) * self.scale


def quantize_array(w: np.ndarray, in_axes: tuple[int, ...]) -> QTensor:
    """Symmetric int8 over `in_axes`, one scale per remaining index (output channel)."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=in_axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return QTensor(jnp.asarray(values), jnp.asarray(scale))


def _reduce_axes(path: tuple[str, ...], leaf) -> tuple[int, ...] | None:
    """Input axes of a quantised parameter, or None for parameters left in float32."""
    name = path[-1]
    if name in EMBEDDINGS:
        return (1,)
    if name == "kernel":
        module = path[-2]
        if module not in KERNEL_IN_AXES:
            raise ValueError(f"no quantisation rule for kernel {'/'.join(path)}; add its "
                             "module to KERNEL_IN_AXES")
        # Scanned layers stack kernels on a leading layer axis: each layer keeps its scales.
        first = 1 if "blocks" in path else 0
        return tuple(range(first, first + KERNEL_IN_AXES[module]))
    return None


def quantize(params) -> dict:
    """fp32 parameter tree -> the same tree with kernels and embeddings as QTensors."""

    def one(path, leaf):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        axes = _reduce_axes(keys, leaf)
        return leaf if axes is None else quantize_array(np.asarray(leaf), axes)

    return jax.tree_util.tree_map_with_path(one, jax.device_get(params))


def dequantize(params) -> dict:
    """The float32 tree a model applies; a tree without QTensors passes through unchanged."""
    return jax.tree.map(lambda x: x.dequantize() if isinstance(x, QTensor) else x, params,
                        is_leaf=lambda x: isinstance(x, QTensor))


def nbytes(params) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)))


def eval_loss(task, params, batches: list[dict]) -> float:
    """The task's eval loss over fixed batches, with (possibly quantised) params
    dequantised inside the compiled step."""
    fn = jax.jit(lambda p, batch, carry: task.eval_sums(dequantize(p), batch, carry))
    rows = len(next(iter(batches[0].values())))
    return evaluate(task, fn, params, batches, rows)["loss"]


def report(task, params, batches: list[dict]) -> dict:
    """Bytes and eval loss of the fp32 parameters and of their int8 quantisation."""
    params = jax.device_get(params)
    qparams = quantize(params)
    fp32_loss, int8_loss = eval_loss(task, params, batches), eval_loss(task, qparams, batches)
    result = {
        "fp32_bytes": nbytes(params),
        "int8_bytes": nbytes(qparams),
        "fp32_eval_loss": fp32_loss,
        "int8_eval_loss": int8_loss,
    }
    result["bytes_ratio"] = result["int8_bytes"] / result["fp32_bytes"]
    result["loss_change_relative"] = (int8_loss - fp32_loss) / fp32_loss
    return result
