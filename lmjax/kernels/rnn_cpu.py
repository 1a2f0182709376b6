"""The LSTM and GRU recurrences as compiled CPU kernels (rnn_cpu.cc), called through
XLA's FFI.

XLA's CPU backend runs a `lax.scan` body as a dozen small kernels per step, and with
small batches and hidden sizes their fixed cost outweighs the arithmetic; a kernel runs
the whole time loop, forward or backward, in one call (see the .cc file). The kernels are
compiled with the machine's C++ compiler on first use (a few seconds) into
`$LMJAX_CACHE_DIR` (default `~/.cache/lmjax`), keyed by the source, the jaxlib version,
the compiler and the CPU, and loaded from there afterwards.

`unavailable_reason()` says why they cannot run here (None when they can); the custom
gradients that wire them into a layer are in lmjax/kernels/recurrence.py. On a mesh each
device runs them on its own batch rows (`_over_batch`).
"""

import ctypes
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
from jax.sharding import PartitionSpec as P

from lmjax.parallel.mesh import BATCH_AXES

SOURCE = os.path.join(os.path.dirname(__file__), "rnn_cpu.cc")
# -funroll-loops: the products' and the cells' loops have fixed lengths, and unrolled they
# made every kernel call faster.
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-funroll-loops", "-std=c++17",
         "-shared", "-fPIC", "-pthread"]
log = logging.getLogger(__name__)


def cache_dir() -> str:
    return os.environ.get("LMJAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "lmjax")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _library_path(compiler: str) -> str:
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read())
    key.update(" ".join([compiler, *FLAGS, jaxlib.__version__, _cpu_model()]).encode())
    return os.path.join(cache_dir(), f"rnn_cpu-{key.hexdigest()[:16]}.so")


def _cpu_model() -> str:
    """-march=native ties the library to this CPU: part of the cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build() -> str:
    """Compiles the kernel unless a cached build exists; returns the library's path.
    Raises RuntimeError with the compiler's message when it cannot."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    path = _library_path(compiler)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Compile to a temporary name and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
    log.info("compiling the RNN CPU kernels into %s (once)", path)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {SOURCE} failed:\n{' '.join(cmd)}\n"
                           f"{result.stderr[-3000:]}")
    os.replace(tmp, path)
    return path


TARGETS = ("LstmForward", "LstmBackward", "GruForward", "GruBackward")


@functools.cache
def unavailable_reason() -> str | None:
    """None once the kernels are compiled, loaded and registered with XLA's CPU backend;
    otherwise why they cannot be (logged once)."""
    if not sys.platform.startswith("linux"):
        reason = f"the kernels are only built on Linux, not {sys.platform}"
    else:
        try:
            library = ctypes.cdll.LoadLibrary(build())
        except (RuntimeError, OSError) as e:
            reason = str(e)
        else:
            for name in TARGETS:
                jax.ffi.register_ffi_target(f"lmjax_{name}",
                                            jax.ffi.pycapsule(getattr(library, name)),
                                            platform="cpu")
            return None
    log.warning("RNN CPU kernels unavailable: %s", reason)
    return reason


def _mask_operand(mask):
    """The mask as a kernel operand and its batch axis: no mask (no padding) is an empty
    array that every device gets whole."""
    return (jnp.zeros((0,), jnp.float32), None) if mask is None else (mask, 1)


def _batch_axes(batch: int) -> tuple[str, ...]:
    """The context mesh's batch axes (`data`, `fsdp`) of size > 1, when they divide
    `batch`; () without a mesh or when they do not."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def _over_batch(fn, args, arg_axes, out_axes):
    """fn(*args) with every array split over the mesh's batch axes (`data`, `fsdp`) when
    the context mesh has them: each device runs the kernel on its own rows (batch rows
    are independent). Without that, XLA's partitioner would run the opaque call on the
    whole batch on every device. arg_axes / out_axes: each array's batch axis, or None
    for one that every device needs whole."""
    batch = next(a.shape[i] for a, i in zip(args, arg_axes, strict=True) if i is not None)
    axes = _batch_axes(batch)
    if not axes:
        return fn(*args)
    mesh = jax.sharding.get_abstract_mesh()

    def spec(axis):
        return P() if axis is None else P(*([None] * axis), axes)

    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(spec, arg_axes)),
                         out_specs=tuple(map(spec, out_axes)), check_vma=False)(*args)


def forward(reverse: bool, save: bool, gx, w, b, h, c, keep, mask):
    """The LSTM recurrence. gx (time, batch, 4 hidden) input projections with b_i; w
    (hidden, 4 hidden); b (4 hidden,) = b_h; h, c (batch, hidden); keep (time, batch)
    float, 0 where the carry resets; mask (time, batch) float or None.

    Returns outs (time, batch, hidden), (h, c) after the last step and, with `save`, the
    residuals acts (time, batch, 4 hidden: activated i, f, g, o), the carries each step
    started from h0s, c0s and tanh of the new cell state (time, batch, hidden) each."""
    mask, mask_axis = _mask_operand(mask)
    res_axes = (1,) * 4 if save else (None,) * 4

    def call(gx, w, b, h, c, keep, mask):
        time, batch, gates = gx.shape
        seq = jax.ShapeDtypeStruct((time, batch, gates // 4), jnp.float32)
        row = jax.ShapeDtypeStruct((batch, gates // 4), jnp.float32)
        res = (jax.ShapeDtypeStruct((time, batch, gates), jnp.float32), seq, seq, seq) if save \
            else (jax.ShapeDtypeStruct((0,), jnp.float32),) * 4
        return jax.ffi.ffi_call("lmjax_LstmForward", (seq, row, row, *res))(
            gx, w, b, h, c, keep, mask, reverse=reverse, save=save)

    outs, h, c, *residuals = _over_batch(call, (gx, w, b, h, c, keep, mask),
                                         (1, None, None, 0, 0, 1, mask_axis),
                                         (1, 0, 0, *res_axes))
    return outs, (h, c), residuals


def backward(reverse: bool, acts, c0s, tcs, keep, mask, d_outs, w, d_h, d_c):
    """Gradients through the recurrence: dz (time, batch, 4 hidden), the gradient of the
    pre-activation gates at every step, and that of the initial (h, c)."""
    mask, mask_axis = _mask_operand(mask)

    def call(acts, c0s, tcs, keep, mask, d_outs, w, d_h, d_c):
        time, batch, hidden = d_outs.shape
        row = jax.ShapeDtypeStruct((batch, hidden), jnp.float32)
        return jax.ffi.ffi_call("lmjax_LstmBackward", (
            jax.ShapeDtypeStruct((time, batch, 4 * hidden), jnp.float32), row, row))(
            acts, c0s, tcs, keep, mask, d_outs, w, d_h, d_c, reverse=reverse)

    dz, d_h, d_c = _over_batch(call, (acts, c0s, tcs, keep, mask, d_outs, w, d_h, d_c),
                               (1, 1, 1, 1, mask_axis, 1, None, 0, 0), (1, 0, 0))
    return dz, (d_h, d_c)


def gru_forward(reverse: bool, save: bool, gx, w, b, h, keep, mask):
    """The GRU recurrence (gates r, z, n). gx (time, batch, 3 hidden) input projections
    with b_i; w (hidden, 3 hidden); b (3 hidden,) = b_h; h (batch, hidden); keep and mask
    as in `forward`. Returns outs (time, batch, hidden), h after the last step and, with
    `save`, the residuals acts (time, batch, 4 hidden: r, z, n and the h-gate of n) and
    the h each step started from, h0s (time, batch, hidden)."""
    mask, mask_axis = _mask_operand(mask)
    res_axes = (1, 1) if save else (None, None)

    def call(gx, w, b, h, keep, mask):
        time, batch, gates = gx.shape
        hidden = gates // 3
        seq = jax.ShapeDtypeStruct((time, batch, hidden), jnp.float32)
        res = (jax.ShapeDtypeStruct((time, batch, 4 * hidden), jnp.float32), seq) if save \
            else (jax.ShapeDtypeStruct((0,), jnp.float32),) * 2
        return jax.ffi.ffi_call("lmjax_GruForward", (
            seq, jax.ShapeDtypeStruct((batch, hidden), jnp.float32), *res))(
            gx, w, b, h, keep, mask, reverse=reverse, save=save)

    outs, h, *residuals = _over_batch(call, (gx, w, b, h, keep, mask),
                                      (1, None, None, 0, 1, mask_axis), (1, 0, *res_axes))
    return outs, h, residuals


def gru_backward(reverse: bool, acts, h0s, keep, mask, d_outs, w, d_h):
    """Gradients through the GRU recurrence: those of the input gates d_gx and of the
    h-gates d_gh (time, batch, 3 hidden each; they differ in the n block) and of the
    initial h."""
    mask, mask_axis = _mask_operand(mask)

    def call(acts, h0s, keep, mask, d_outs, w, d_h):
        time, batch, hidden = d_outs.shape
        gates = jax.ShapeDtypeStruct((time, batch, 3 * hidden), jnp.float32)
        return jax.ffi.ffi_call("lmjax_GruBackward", (
            gates, gates, jax.ShapeDtypeStruct((batch, hidden), jnp.float32)))(
            acts, h0s, keep, mask, d_outs, w, d_h, reverse=reverse)

    return _over_batch(call, (acts, h0s, keep, mask, d_outs, w, d_h),
                       (1, 1, 1, mask_axis, 1, None, 0), (1, 1, 0))
