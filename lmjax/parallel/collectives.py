"""Counting the collectives of a compiled function, by kind and by the mesh axes they
run over: in the lowered module (what the code asks for: `shard_map`'s psum, all_gather,
psum_scatter, ppermute) and in the optimised HLO (what runs, after XLA's partitioner
inserted its own and its passes combined or rewrote them).

Device ids in replica groups are positions in `mesh.devices.flat`, so a group's axes
are the mesh axes along which its devices' coordinates differ. Bytes are the sizes of
each collective's results: per device in the optimised HLO; in the lowered module the
shapes of a partly manual `shard_map` are whole along its automatic axes. A loop body
(a scanned layer stack, microbatch accumulation) is counted once, as it is written.
"""

import dataclasses
import math
import re
from collections import Counter

import numpy as np
from jax.sharding import Mesh
from jaxlib.mlir import ir

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "collective_permute", "all_to_all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "i1": 1, "i8": 1, "i16": 2,
          "i32": 4, "i64": 8, "ui8": 1, "ui32": 4}
_HLO_OP = re.compile(r"=\s*(?P<shape>.*?)\s(?P<kind>all-reduce|all-gather|reduce-scatter|"
                     r"collective-permute|all-to-all)(?P<start>-start)?\(")
_HLO_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    axes: tuple[str, ...]  # the mesh axes it communicates over, in mesh order
    bytes: int  # size of its results


def summarize(ops: list[Collective]) -> dict[str, dict]:
    """{'all_reduce over tensor': {'count': n, 'bytes': b}, ...}, sorted by name."""
    counts, sizes = Counter(), Counter()
    for op in ops:
        name = f"{op.kind} over {'+'.join(op.axes) or 'nothing'}"
        counts[name] += 1
        sizes[name] += op.bytes
    return {name: {"count": counts[name], "bytes": sizes[name]} for name in sorted(counts)}


def count(ops: list[Collective], kind: str, axes: tuple[str, ...]) -> int:
    return sum(op.kind == kind and op.axes == axes for op in ops)


def axes_of(groups, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which the devices of each group differ (union over groups)."""
    shape = mesh.devices.shape
    varying = set()
    for group in groups:
        coords = np.array([np.unravel_index(int(d), shape) for d in group]).reshape(-1, len(shape))
        varying.update(i for i in range(len(shape)) if len(set(coords[:, i])) > 1)
    return tuple(name for i, name in enumerate(mesh.axis_names) if i in varying)


# ------------------------------------------------------------------ the lowered module


def lowered_collectives(lowered, mesh: Mesh) -> list[Collective]:
    """The collectives of a `jax.jit(...).lower(...)` result, as StableHLO writes them."""
    found = []

    def visit(op):
        name = op.name
        if name.startswith("stablehlo.") and name[len("stablehlo."):] in KINDS:
            found.append(_lowered_op(op, name[len("stablehlo."):], mesh))
        return ir.WalkResult.ADVANCE

    lowered.compiler_ir("stablehlo").operation.walk(visit)
    return found


def _lowered_op(op, kind: str, mesh: Mesh) -> Collective:
    attrs = op.attributes
    if kind == "collective_permute":
        groups = np.asarray(attrs["source_target_pairs"]).tolist()
    else:
        groups = np.asarray(attrs["replica_groups"]).tolist()
    size = sum(_tensor_bytes(str(r.type)) for r in op.results)
    return Collective(kind, axes_of(groups, mesh), size)


def _tensor_bytes(mlir_type: str) -> int:
    """'tensor<8x16xf32>' -> 512."""
    match = re.fullmatch(r"tensor<(?:([\dx]*)x)?([a-z]+\d*)>", mlir_type)
    if match is None:
        return 0
    dims = [int(d) for d in (match.group(1) or "").split("x") if d]
    return math.prod(dims) * _BYTES.get(match.group(2), 0)


# ----------------------------------------------------------------- the optimised HLO


def compiled_collectives(compiled, mesh: Mesh) -> list[Collective]:
    """The collectives of a compiled function's optimised HLO (`compiled.as_text()`)."""
    found = []
    for line in compiled.as_text().splitlines():
        match = _HLO_OP.search(line)
        if match is None:
            continue
        kind = match.group("kind").replace("-", "_")
        shapes = _HLO_SHAPE.findall(match.group("shape"))
        if match.group("start") and kind != "all_reduce":
            shapes = shapes[-1:]  # an async start's tuple holds the operands too
        size = sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(t, 0)
                   for t, dims in shapes)
        found.append(Collective(kind, axes_of(_hlo_groups(line, kind, mesh), mesh), size))
    return found


def _hlo_groups(line: str, kind: str, mesh: Mesh) -> list[list[int]]:
    """The device groups of one HLO instruction, in any of the forms XLA prints."""
    n = mesh.devices.size
    if kind == "collective_permute":
        pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
        return [] if pairs is None else _nested_ints(pairs.group(1) + "}")
    if (explicit := re.search(r"replica_groups=\{(\{[\d,{} ]*\})?\}", line)) is not None:
        return _nested_ints(explicit.group(1)) if explicit.group(1) else [list(range(n))]
    if (iota := re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?",
                          line)) is not None:
        return _iota(iota.group(2), iota.group(3)).reshape(_ints(iota.group(1))).tolist()
    if (named := re.search(r"replica_groups=mesh\[(.*?)\](?:, device_ids=\(\[([\d,]+)\]"
                           r"(?:T\(([\d,]+)\))?\))? \{(.*?)\}", line)) is not None:
        return _mesh_groups(*named.groups(), n)
    raise ValueError(f"cannot read the device groups of: {line.strip()[:200]}")


def _mesh_groups(axes: str, dims: str | None, perm: str | None, reduced: str,
                 n: int) -> list[list[int]]:
    """`mesh['a'=2,'b'=4], device_ids=([2,4]T(1,0)) {'b'}`: devices laid out on the named
    axes, one group per position of the axes not in braces."""
    names = re.findall(r"'([^']+)'=(\d+)", axes)
    sizes = [int(size) for _, size in names]
    ids = _iota(dims or str(n), perm).reshape(sizes)
    over = [i for i, (name, _) in enumerate(names) if f"'{name}'" in reduced]
    rest = [i for i in range(len(names)) if i not in over]
    return ids.transpose(rest + over).reshape(-1, math.prod(sizes[i] for i in over)).tolist()


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = _ints(dims)
    ids = np.arange(math.prod(shape)).reshape(shape)
    return (ids.transpose(_ints(perm)) if perm else ids).reshape(-1)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _nested_ints(text: str) -> list[list[int]]:
    return [_ints(group) for group in re.findall(r"\{([\d, ]*)\}", text)]


# ------------------------------------------------------------------ reports


def step_report(lowered, compiled, mesh: Mesh) -> dict[str, dict]:
    """{'lowered': summary, 'optimised': summary} of one lowered and compiled function."""
    return {"lowered": summarize(lowered_collectives(lowered, mesh)),
            "optimised": summarize(compiled_collectives(compiled, mesh))}


def format_report(report: dict[str, dict], num_layers: int | None, scanned: bool) -> str:
    """A table of a `step_report`: count, MiB and count per layer, lowered and optimised."""
    per_layer = num_layers is not None and not scanned
    lines = [f"{'collectives':<34} {'lowered':>8} {'MiB':>9} {'optimised':>10} {'MiB':>9}"
             + ("   per layer (lowered, optimised)" if per_layer else "")]
    names = sorted(set(report["lowered"]) | set(report["optimised"]))
    empty = {"count": 0, "bytes": 0}
    for name in names:
        low, opt = report["lowered"].get(name, empty), report["optimised"].get(name, empty)
        line = (f"{name:<34} {low['count']:>8} {low['bytes'] / 2**20:>9.3f} "
                f"{opt['count']:>10} {opt['bytes'] / 2**20:>9.3f}")
        if per_layer:
            line += f"   {low['count'] / num_layers:g}, {opt['count'] / num_layers:g}"
        lines.append(line)
    if not names:
        lines.append("(none: one device, or nothing to communicate)")
    if scanned:
        lines.append("(scan_layers: a loop body is written once, so its collectives count "
                     "once for all layers)")
    return "\n".join(lines)
