"""The LSTM and GRU recurrences as compiled CPU kernels (rnn_cpu.cc), called through
XLA's FFI; `gradient_sums`, the weight, bias and lookup-table gradients summed over
all timesteps in one pass over the gates' gradient; `softmax_xent`, the output layer
with its softmax cross-entropy and their gradients; and `matmul`, the input projections
of all timesteps and their input gradients (a few percent faster than XLA's product at
char-rnn's size).

XLA's CPU backend runs a `lax.scan` body as a dozen small kernels per step, and at
char-rnn's size their fixed cost outweighs the arithmetic; a kernel runs the whole time
loop in one call (see the .cc file). They are compiled with the machine's C++ compiler on
first use (a few seconds) into `$LMJAX_CACHE_DIR` (default `~/.cache/lmjax`), keyed by
the source, the jaxlib version and the compiler, and loaded from there afterwards.

`available()` says whether the kernels can be used; `rnn.kernel_lstm`, `rnn.lstm_scan`
and `rnn.recurrent_scan` (for the GRU) use them for float32 on the CPU, and the layers
fall back to their XLA scans and products elsewhere (GPUs, other dtypes, no compiler; the
reason is logged once).
`LMJAX_RNN_KERNEL=0` turns them off for a process, and `with rnn_cpu.disabled():` for
what is traced inside the block.
"""

import contextlib
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
# -funroll-loops: the products' and the cells' fixed-length loops, unrolled, made each
# kernel call faster (forward, backward and GradientSums alike, paired call by call).
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


@functools.cache
def available() -> bool:
    """True once the kernels are compiled, loaded and registered with XLA's CPU backend."""
    if os.environ.get("LMJAX_RNN_KERNEL", "1") == "0":
        return False
    if not sys.platform.startswith("linux"):
        log.warning("RNN CPU kernels: only built on Linux; using the XLA scan")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(build())
    except (RuntimeError, OSError) as e:
        log.warning("RNN CPU kernels unavailable, using the XLA scan: %s", e)
        return False
    for name in ("LstmForward", "LstmBackward", "GruForward", "GruBackward", "GradientSums",
                 "SoftmaxXentForward", "SoftmaxXentBackward", "Matmul"):
        jax.ffi.register_ffi_target(f"lmjax_{name}", jax.ffi.pycapsule(getattr(library, name)),
                                    platform="cpu")
    return True


_disabled = False


@contextlib.contextmanager
def disabled():
    """Functions traced inside this block use the XLA scan (A/B timings, tests)."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


def usable(*arrays) -> bool:
    """Whether the kernel applies: float32 operands on the CPU backend."""
    return (not _disabled and jax.default_backend() == "cpu"
            and all(a.dtype == jnp.float32 for a in arrays) and available())


def _require() -> None:
    if not available():
        raise RuntimeError("the RNN CPU kernels are not available (see the logged reason); "
                           "check rnn_cpu.usable() before calling it")


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


def forward(reverse: bool, save: bool, gx, w, b, h, c, keep, mask, ids=None):
    """The recurrence. gx (time, batch, 4 hidden) input projections with b_i, or with ids
    (time, batch) int32 a (vocab, 4 hidden) table of them, looked up in the kernel; w
    (hidden, 4 hidden); b (4 hidden,) = b_h; h, c (batch, hidden); keep (time, batch)
    float, 0 where the carry resets; mask (time, batch) float or None.

    Returns outs (time, batch, hidden), (h, c) after the last step and, with `save`, the
    residuals acts (time, batch, 4 hidden: activated i, f, g, o), the carries each step
    started from h0s, c0s and tanh of the new cell state (time, batch, hidden) each."""
    _require()
    mask, mask_axis = _mask_operand(mask)
    res_axes = (1,) * 4 if save else (None,) * 4
    ids, gx_axis = (jnp.zeros((0,), jnp.int32), 1) if ids is None else (ids, None)
    ids_axis = None if gx_axis else 1

    def call(gx, w, b, h, c, keep, mask, ids):
        (time, batch), gates = keep.shape, gx.shape[-1]
        seq = jax.ShapeDtypeStruct((time, batch, gates // 4), jnp.float32)
        row = jax.ShapeDtypeStruct((batch, gates // 4), jnp.float32)
        res = (jax.ShapeDtypeStruct((time, batch, gates), jnp.float32), seq, seq, seq) if save \
            else (jax.ShapeDtypeStruct((0,), jnp.float32),) * 4
        return jax.ffi.ffi_call("lmjax_LstmForward", (seq, row, row, *res))(
            gx, w, b, h, c, keep, mask, ids, reverse=reverse, save=save)

    outs, h, c, *residuals = _over_batch(call, (gx, w, b, h, c, keep, mask, ids),
                                         (gx_axis, None, None, 0, 0, 1, mask_axis, ids_axis),
                                         (1, 0, 0, *res_axes))
    return outs, (h, c), residuals


def backward(reverse: bool, acts, c0s, tcs, keep, mask, d_outs, w, d_h, d_c):
    """Gradients through the recurrence: dz (time, batch, 4 hidden), the gradient of the
    pre-activation gates at every step, and that of the initial (h, c)."""
    _require()
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
    _require()
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
    _require()
    mask, mask_axis = _mask_operand(mask)

    def call(acts, h0s, keep, mask, d_outs, w, d_h):
        time, batch, hidden = d_outs.shape
        gates = jax.ShapeDtypeStruct((time, batch, 3 * hidden), jnp.float32)
        return jax.ffi.ffi_call("lmjax_GruBackward", (
            gates, gates, jax.ShapeDtypeStruct((batch, hidden), jnp.float32)))(
            acts, h0s, keep, mask, d_outs, w, d_h, reverse=reverse)

    return _over_batch(call, (acts, h0s, keep, mask, d_outs, w, d_h),
                       (1, 1, 1, mask_axis, 1, None, 0), (1, 1, 0))


def _summed_over_batch(call, *args):
    """call(*args) for arrays (time, batch, ...) whose results are sums over time and
    batch: with the batch split over the mesh, each device sums its own rows and the
    parts are added. 1-D arguments (empty placeholders) go to every device whole."""
    axes = _batch_axes(args[0].shape[1])
    if not axes:
        return call(*args)
    specs = tuple(P(None, axes) if a.ndim > 1 else P() for a in args)  # empty: absent
    return jax.shard_map(lambda *a: jax.lax.psum(call(*a), axes),
                         mesh=jax.sharding.get_abstract_mesh(), in_specs=specs,
                         out_specs=P(), check_vma=False)(*args)


def gradient_sums(d, inputs=(), ids=None, vocab: int = 0):
    """Sums over time and batch of a gradient d (time, batch, n), from one pass over d:
    for each of up to two inputs a (time, batch, m), a^T d (m, n) (a weight gradient);
    the sum of d (n,) (a bias gradient); and with ids (time, batch) int32, the (vocab, n)
    table with d's rows added into the rows of their ids (a lookup's gradient).

    Returns (the products as a list, the sum, the table or None)."""
    _require()
    n = d.shape[-1]
    empty = jnp.zeros((0,), jnp.float32)
    a1, a2 = (*inputs, empty, empty)[:2]
    shapes = [jax.ShapeDtypeStruct((a.shape[-1], n) if a.size else (0,), jnp.float32)
              for a in (a1, a2)]
    with_table = ids is not None
    shapes += [jax.ShapeDtypeStruct((n,), jnp.float32),
               jax.ShapeDtypeStruct((vocab, n) if with_table else (0,), jnp.float32)]
    ids = ids.astype(jnp.int32) if with_table else jnp.zeros((0,), jnp.int32)
    call = jax.ffi.ffi_call("lmjax_GradientSums", shapes)
    c1, c2, sums, table = _summed_over_batch(call, d, a1, a2, ids)
    return [c1, c2][:len(inputs)], sums, (table if with_table else None)


def matmul(xs, w, transposed: bool = False):
    """xs (time, batch, k) @ w (k, n), or with `transposed` w given as (n, k) and used as
    its transpose -> (time, batch, n)."""
    _require()

    def call(xs, w):
        n = w.shape[0 if transposed else 1]
        return jax.ffi.ffi_call("lmjax_Matmul", jax.ShapeDtypeStruct((*xs.shape[:-1], n),
                                                                    jnp.float32))(
            xs, w, transposed=transposed)

    return _over_batch(lambda xs, w: (call(xs, w),), (xs, w), (1, None), (1,))[0]


def softmax_xent(x, w, b, targets):
    """The output layer's per-token cross-entropy: x (time, batch, in), w (in, vocab), b
    (vocab,), targets (time, batch) int -> losses (time, batch) of logits x w + b, and the
    softmax probabilities (time, batch, vocab) that `softmax_xent_grads` takes."""
    _require()
    targets = targets.astype(jnp.int32)

    def call(x, w, b, targets):
        time, batch, _ = x.shape
        return jax.ffi.ffi_call("lmjax_SoftmaxXentForward", (
            jax.ShapeDtypeStruct((time, batch), jnp.float32),
            jax.ShapeDtypeStruct((time, batch, w.shape[1]), jnp.float32)))(x, w, b, targets)

    return _over_batch(call, (x, w, b, targets), (1, None, None, 1), (1, 1))


def softmax_xent_grads(x, w, probs, targets, g):
    """Gradients of sum(g * losses) of `softmax_xent`: dx (time, batch, in), dw (in,
    vocab), db (vocab,); g (time, batch)."""
    _require()
    targets = targets.astype(jnp.int32)

    def call(x, w, probs, targets, g):
        shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                  jax.ShapeDtypeStruct(w.shape, jnp.float32),
                  jax.ShapeDtypeStruct(w.shape[1:], jnp.float32))
        return jax.ffi.ffi_call("lmjax_SoftmaxXentBackward", shapes)(x, w, probs, targets, g)

    axes = _batch_axes(x.shape[1])
    if not axes:
        return call(x, w, probs, targets, g)

    def part(*args):
        dx, dw, db = call(*args)
        return dx, jax.lax.psum(dw, axes), jax.lax.psum(db, axes)

    rows = P(None, axes)
    return jax.shard_map(part, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(rows, P(), rows, rows, rows), out_specs=(rows, P(), P()),
                         check_vma=False)(x, w, probs, targets, g)
