"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule of microbatches.

A stack of `num_layers` identical layers, parameters stacked on a leading layer axis,
is cut into `stages` consecutive slices of `num_layers // stages` layers; stage s holds
its slice (the rule tables shard the logical `layers` axis over `stage`). The batch is
split into `microbatches`. At tick t (of microbatches + stages - 1) stage s applies its
layers to microbatch t - s and passes the result to stage s + 1 with
`jax.lax.ppermute`; the last stage keeps what comes out. Stages idle at the start and
end of the schedule (the bubble, (stages - 1) / (microbatches + stages - 1) of the
ticks) compute on stale values whose results are never read.

The schedule is a `jax.shard_map` manual over `stage` only: `data`, `fsdp` and `tensor`
stay automatic inside it, so the layers shard as they do unpipelined. Autodiff through
the schedule is the backward pass (a ppermute transposes to the reverse ppermute), so
gradients are the unpipelined model's, summed in another order.

How many microbatches: `microbatches(n)`, a context entered inside the traced (jitted)
function, so that the count is part of what was traced, like its static arguments; the
trainer enters it from `train.pipeline_microbatches`. How many stages: the `stage` axis
of the mesh the model is traced under (`jax.set_mesh`). Dropout keys are folded per
global layer and per microbatch, so the masks depend on the microbatch count but never
on the stage count: any number of stages gives the same numbers as one.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

STAGE = "stage"

# (params of one layer, x (rows, length, embed), positions (rows, length), dropout key or
# None) -> x of the same shape.
Layer = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]

_MICROBATCHES: contextvars.ContextVar[int] = contextvars.ContextVar(
    "pipeline_microbatches", default=1)


@contextlib.contextmanager
def microbatches(count: int) -> Iterator[None]:
    """Pipelined models traced inside this context split their batch into `count`."""
    if count <= 0:
        raise ValueError(f"the pipeline microbatch count must be positive, got {count}; "
                         "fix train.pipeline_microbatches")
    token = _MICROBATCHES.set(count)
    try:
        yield
    finally:
        _MICROBATCHES.reset(token)


def current_microbatches() -> int:
    return _MICROBATCHES.get()


def stage_count(mesh: Mesh | AbstractMesh | None = None) -> int:
    """The size of the `stage` axis of `mesh`, by default of the mesh being traced under
    (`jax.set_mesh`); 1 for a mesh without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else dict(mesh.shape).get(STAGE, 1)


def active() -> bool:
    """Whether a layer stack traced now runs through `run` (more than one stage or
    microbatch); otherwise it runs as it would without this module."""
    return stage_count() > 1 or current_microbatches() > 1


def check_sizes(num_layers: int, batch: int, stages: int, microbatches: int) -> None:
    """Raises ValueError naming the binding to change when the sizes do not divide."""
    if num_layers % stages:
        raise ValueError(f"mesh.stage={stages} does not divide the model's {num_layers} "
                         "layers; choose a stage count that divides num_layers")
    if batch % microbatches:
        raise ValueError(f"a batch of {batch} rows does not split into "
                         f"train.pipeline_microbatches={microbatches}; choose a count "
                         "that divides the batch (per train.microbatches step)")


def split_microbatches(x: jax.Array, count: int) -> jax.Array:
    """(batch, ...) -> (count, batch // count, ...); microbatch i = rows i::count.

    Strided rows keep every microbatch spread over the same data-parallel devices as the
    whole batch (as train/step.py's accumulation microbatches)."""
    return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def join_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of `split_microbatches`: (count, rows, ...) -> (rows * count, ...)."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def run(layer: Layer, params, x: jax.Array, positions: jax.Array, key: jax.Array | None,
        *, stages: int, microbatches: int) -> jax.Array:
    """The layer stack on x (batch, length, embed) through the GPipe schedule.

    `params` has leaves (num_layers, ...); positions (batch, length); `key` (or None
    when deterministic) is folded per global layer and microbatch. Returns x after all
    layers, (batch, length, embed), the same on every stage.
    """
    num_layers = jax.tree.leaves(params)[0].shape[0]
    check_sizes(num_layers, x.shape[0], stages, microbatches)
    xs = split_microbatches(x, microbatches)  # (microbatches, rows, length, embed)
    ps = split_microbatches(positions, microbatches)  # (microbatches, rows, length)
    if stages == 1:
        return join_microbatches(_schedule(layer, params, xs, ps, key, stages=1))

    def program(params, xs, ps, key):
        return _schedule(layer, params, xs, ps, key, stages=stages)

    # Layers split over stage; activations, positions and the key whole on every stage.
    specs = (PartitionSpec(STAGE), PartitionSpec(), PartitionSpec(), PartitionSpec())
    out = jax.shard_map(program, in_specs=specs, out_specs=PartitionSpec(),
                        axis_names={STAGE})(params, xs, ps, key)
    return join_microbatches(out)


def _schedule(layer: Layer, params, xs: jax.Array, ps: jax.Array, key: jax.Array | None,
              *, stages: int) -> jax.Array:
    """One stage's part of the GPipe schedule: xs (microbatches, rows, length, embed) ->
    the last stage's outputs, same shape, on every stage."""
    count = xs.shape[0]
    last = stages - 1
    stage = jax.lax.axis_index(STAGE) if stages > 1 else 0
    apply = _stage_layers(layer, params, key, stage)
    # Typed per stage before the loop: the backward pass then adds the inputs' gradients
    # over stages once, after it, rather than with one psum per tick inside it.
    xs = _varying(xs, stages)

    def tick(state, t):  # state: (rows, length, embed), what this stage works on
        index = jnp.clip(t - stage, 0, count - 1)  # its microbatch (clipped in the bubble)
        state = jnp.where(stage == 0, xs[jnp.minimum(t, count - 1)], state)
        y = apply(state, ps[index], index)
        return _send_forward(y, stages), y

    # ys: (ticks, rows, length, embed); microbatch i leaves the last stage at tick i + last.
    _, ys = jax.lax.scan(tick, jnp.zeros_like(xs[0]), jnp.arange(count + last))
    outputs = ys[last:]  # (microbatches, rows, length, embed)
    if stages == 1:
        return outputs
    # Only the last stage's outputs are real: zero the others' and add (exact, x + 0 = x).
    return jax.lax.psum(jnp.where(stage == last, outputs, 0), STAGE)


def _stage_layers(layer: Layer, params, key: jax.Array | None, stage):
    """(x, positions, microbatch) -> x through this stage's layers (a scan over them)."""
    local = jax.tree.leaves(params)[0].shape[0]

    def apply(x, positions, microbatch):
        def one(x, inputs):
            layer_params, i = inputs
            layer_key = None
            if key is not None:  # per global layer, then per microbatch: no stage count in it
                layer_key = jax.random.fold_in(jax.random.fold_in(key, stage * local + i),
                                               microbatch)
            return layer(layer_params, x, positions, layer_key), None

        x, _ = jax.lax.scan(one, x, (params, jnp.arange(local)))
        return x

    return apply


def _send_forward(x: jax.Array, stages: int) -> jax.Array:
    """Stage s's x to stage s + 1; stage 0 receives zeros (it reads the next microbatch)."""
    if stages == 1:
        return x
    return jax.lax.ppermute(x, STAGE, [(s, s + 1) for s in range(stages - 1)])


def _varying(x: jax.Array, stages: int) -> jax.Array:
    """x typed as differing per stage, as the scan's carry becomes after a ppermute."""
    return x if stages == 1 else jax.lax.pcast(x, STAGE, to="varying")


def bubble_fraction(stages: int, microbatches: int) -> float:
    """The GPipe schedule's idle share of stage-ticks: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def ticks(stages: int, microbatches: int) -> int:
    return microbatches + stages - 1

