"""The local multi-host emulation table: 1 x 8 vs 2 x 4 vs 4 x 2 CPU devices.

    python experiments/multihost/emulate.py [--steps=20] [--out=experiments/multihost]

For each topology (processes x devices per process, always 8 devices in all) it trains
the baby config (configs/experiments/shakespeare_char_baby.gin) for `--steps` steps at
batch 16 on the data-parallel mesh, 1 x 8 as one plain process and the others through
`lmjax launch`, and reads every step's train loss and time from metrics.jsonl
(log_every=1). Then it times the all-reduce of one set of the model's float32 gradients
over the 8 devices in the same topology, as one buffer and as one buffer per parameter
(the step's shape: one tuple all-reduce of an array per parameter): within one process
XLA's CPU runtime copies memory, across processes gloo sends it over TCP on 127.0.0.1.
Writes results.json and results.md (the table in the README) to --out. About 5 minutes
on the 2-core CPU.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

from common import records  # noqa: E402

BABY = "configs/experiments/shakespeare_char_baby.gin"
TOPOLOGIES = ((1, 8), (2, 4), (4, 2))
BATCH = 16
REPEATS = 20  # timed all-reduces


def train(workdir: Path, processes: int, devices: int, steps: int) -> float:
    """Trains the baby config in the topology; returns the wall time (startup included)."""
    params = [f"train.num_steps={steps}", f"train.batch_size={BATCH}", "train.log_every=1",
              f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    command = ["train", f"--workdir={workdir}", f"--gin_file={BABY}",
               *(f"--gin_param={p}" for p in params)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    if processes > 1:
        command = ["launch", f"--num_processes={processes}",
                   f"--devices_per_process={devices}", "--", *command]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lmjax.main", *command], cwd=REPO,
                            env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{processes} x {devices} failed:\n{result.stdout[-3000:]}"
                           f"{result.stderr[-3000:]}")
    return time.perf_counter() - start


def all_reduce_ms(processes: int, devices: int, out: Path) -> dict:
    """Times the gradients' all-reduce in the topology (the `collective` mode below)."""
    command = ["collective", f"--out={out}"]
    if processes > 1:
        command = ["launch", f"--num_processes={processes}",
                   f"--devices_per_process={devices}", "--module=experiments.multihost."
                   "emulate", "--", *command]
        runner = [sys.executable, "-m", "lmjax.main", *command]
    else:
        runner = [sys.executable, "-m", "experiments.multihost.emulate", *command]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(runner, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"all-reduce {processes} x {devices} failed:\n"
                           f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def collective(out: str) -> None:
    """In every process of the job: all-reduces over the 8 devices of the baby model's
    gradients, as one buffer and as one buffer per parameter; process 0 writes the
    median times."""
    from lmjax.lifeline import LAUNCHER_ENV, die_with_parent

    die_with_parent(LAUNCHER_ENV)
    from lmjax.parallel import distributed

    job = distributed.job_from()
    if job is not None:
        distributed.initialize(job)
    import jax
    import numpy as np

    from lmjax.models import GPTConfig
    from lmjax.parallel import make_mesh
    from lmjax.train.state import init_params

    class Shapes:  # init_params reads only `model` and `init_args` of a task
        model = GPTConfig(vocab_size=65, num_layers=4, num_heads=4, embed_dim=128,
                          block_size=64).module()

        def init_args(self):
            return (jax.numpy.zeros((1, 64), jax.numpy.int32),)

    shapes = [x.shape for x in jax.tree.leaves(
        jax.eval_shape(lambda: init_params(Shapes(), jax.random.key(0))))]
    floats = sum(int(np.prod(s)) for s in shapes)
    mesh = make_mesh()
    result = {"floats": floats, "buffers": len(shapes)}
    for name, layout in (("one_buffer_ms", [(floats,)]), ("per_parameter_ms", shapes)):
        result[name] = _time_all_reduce(mesh, layout)
    if jax.process_index() == 0:
        Path(out).write_text(json.dumps(result))


def _time_all_reduce(mesh, shapes) -> float:
    """Median ms of summing one array per shape over the mesh's 8 devices (each holds one
    row), as the step reduces the gradients: XLA makes it one tuple all-reduce."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    rows = NamedSharding(mesh, PartitionSpec("data"))
    grads = [jax.make_array_from_callback((8, *s), rows,
                                          lambda i, s=s: np.ones((1, *s), np.float32))
             for s in shapes]
    reduce = jax.jit(lambda gs: [g.sum(0) for g in gs],
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
    jax.block_until_ready(reduce(grads))  # compile, and gloo's connections
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(reduce(grads))
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def summarise(workdir: Path, wall: float, reduced: dict, reference: list[float]) -> dict:
    train_records = records(workdir, "train")
    losses = [r["loss"] for r in train_records]
    tokens = BATCH * 64
    ms = sorted(1000 * tokens / r["tokens_per_sec"] for r in train_records[2:])
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
    return {"losses": losses, "final_loss": losses[-1], "max_rel_diff_vs_1x8": diff,
            "median_step_ms": ms[len(ms) // 2], "wall_s": wall, "all_reduce": reduced}


def table(results: dict) -> str:
    lines = ["| processes x devices | loss at the last step | max rel. loss diff vs 1x8 | "
             "median step (ms) | all-reduce, gradients as one buffer (ms) | all-reduce, "
             "one buffer per parameter (ms) | wall incl. start (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        reduced = r["all_reduce"]
        lines.append(f"| {name} | {r['final_loss']:.6f} | {r['max_rel_diff_vs_1x8']:.1e} | "
                     f"{r['median_step_ms']:.0f} | {reduced['one_buffer_ms']:.1f} | "
                     f"{reduced['per_parameter_ms']:.1f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="table", choices=["table", "collective"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "experiments" / "multihost"))
    args = parser.parse_args()
    if args.mode == "collective":
        collective(args.out)
        return
    runs, reference = {}, None
    with tempfile.TemporaryDirectory(prefix="lmjax-multihost-") as scratch:
        for processes, devices in TOPOLOGIES:
            name = f"{processes}x{devices}"
            workdir = Path(scratch) / name
            wall = train(workdir, processes, devices, args.steps)
            reduced = all_reduce_ms(processes, devices, Path(scratch) / f"{name}.json")
            reference = reference or [r["loss"] for r in records(workdir, "train")]
            runs[name] = summarise(workdir, wall, reduced, reference)
            print(f"{name}: {json.dumps({k: v for k, v in runs[name].items() if k != 'losses'})}",
                  flush=True)
    results = {"config": BABY, "steps": args.steps, "batch_size": BATCH, "mesh": "data=8",
               "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "runs": runs}
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
