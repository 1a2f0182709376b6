"""Device meshes with the axes `stage`, `data`, `fsdp` and `tensor`."""

import dataclasses
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lmjax.parallel.rules import RULES, Rules

# `stage` (pipeline parallelism, lmjax/parallel/pipeline.py) is outermost: its traffic is
# one activation per microbatch between neighbours, the lightest, so it takes the slowest
# links; size 1 (the default) leaves every other mesh as it was.
AXES = ("stage", "data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh (gin: `mesh.data = 2`; -1 takes the rest of the devices) and the
    logical-axis rule table (a name in lmjax.parallel.rules.RULES).

    `cpu_devices` splits the host CPU into that many JAX devices (`jax_num_cpu_devices`),
    so a CPU run can be data parallel over its cores. It only affects the CPU backend and
    must be applied before JAX starts one; an explicit
    `--xla_force_host_platform_device_count` in XLA_FLAGS wins over it.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    stage: int = 1  # pipeline stages (GPTConfig.scan_layers; train.pipeline_microbatches)
    rules: str = "fsdp_tensor"
    cpu_devices: int | None = None
    # How a GPT's blocks split over `tensor` in training: "auto" (XLA, from the rules)
    # or "shard_map" (Megatron's collectives written out, lmjax/models/megatron.py);
    # `sequence_parallel` also splits norms, dropout and residuals over the sequence.
    tensor_impl: str = "auto"
    sequence_parallel: bool = False

    def build(self) -> tuple[Mesh, Rules]:
        if self.cpu_devices is not None and _DEVICE_COUNT_FLAG not in os.environ.get(
                "XLA_FLAGS", ""):
            jax.config.update("jax_num_cpu_devices", self.cpu_devices)
        mesh = make_mesh(self.data, self.fsdp, self.tensor, stage=self.stage)
        return mesh, RULES.get(self.rules)

    def configure(self, model):
        """`model` (a model config) with this mesh's tensor-parallel implementation."""
        if model is None or (self.tensor_impl == "auto" and not self.sequence_parallel):
            return model
        if not hasattr(model, "tensor_impl"):
            raise ValueError(f"mesh.tensor_impl={self.tensor_impl!r} / mesh.sequence_parallel "
                             f"apply to GPTConfig models, not {type(model).__name__}; use "
                             "mesh.tensor_impl='auto' (XLA shards it from the logical axes)")
        return dataclasses.replace(model, tensor_impl=self.tensor_impl,
                                   sequence_parallel=self.sequence_parallel)


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Turns {'data': -1, 'fsdp': 2, ...} into concrete sizes; -1 takes the rest of the devices."""
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {unknown}")
    bad = {name: size for name, size in sizes.items() if size == 0 or size < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if num_devices % known:
        raise ValueError(f"mesh {sizes} does not divide the {num_devices} available devices")
    resolved = {name: num_devices // known if size == -1 else size for name, size in sizes.items()}
    if math.prod(resolved.values()) != num_devices:
        raise ValueError(
            f"mesh {resolved} uses {math.prod(resolved.values())} devices but {num_devices} are "
            "available; set one axis to -1 to take the rest"
        )
    return tuple(resolved[name] for name in AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *,
              stage: int = 1) -> Mesh:
    """A mesh over all (or the given) devices with Auto axes, as jit-with-shardings code expects."""
    devices = jax.devices() if devices is None else devices
    sizes = {"stage": stage, "data": data, "fsdp": fsdp, "tensor": tensor}
    shape = resolve_axis_sizes(sizes, len(devices))
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split over `data` and `fsdp` on their leading axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_parallelism(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows -> one global array per key, sharded over data and fsdp.

    In one process the rows are the whole batch, and the NumPy arrays go to the jitted
    step as they are: its `in_shardings` place them while it dispatches, which costs the
    host less than a `jax.device_put` first."""
    if jax.process_count() == 1:
        return batch
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def stacked_sharding(sharding: NamedSharding) -> NamedSharding:
    """`sharding` of batches for arrays with a leading axis of steps before the rows."""
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
