"""Throughput benchmark of the real training step: compile time, ms/step, tokens/s,
FLOPs, MFU and memory.

`lmjax bench --workdir=DIR --gin_file=F [--bench_steps=N]` builds the run exactly as
`train` does (the same task, jitted and donated step, mesh, logical-axis rules and input
pipeline) and writes nothing: DIR only names the run in the report.

Definitions (what the printed figures mean):

* Compile time is `lower` + `compile` of the step, ahead of the first call, in wall and
  in process CPU seconds (the latter varies less on a shared machine). Step time is
  measured per step with `jax.block_until_ready` on the step's outputs, so it is device
  time plus dispatch (one step per call: `train.steps_per_call` is not applied); drawing
  the batch happens before the clock starts. Throughput uses the *median* step time,
  robust to the occasional hiccup on a shared machine; the mean is reported too.
* FLOPs per token of a GPT follow nanoGPT's `estimate_mfu` (PaLM, appendix B):
  `6 * N + 12 * num_layers * embed_dim * block_size`, where N is the number of
  non-embedding parameters counted from the actual params tree *plus* the tied output
  projection `padded_vocab * embed_dim` (the lm head is a real matmul on every token
  even though its weights are the token embedding); the token lookup (wte) and the
  learned position table (wpe) cost no matmul FLOPs. Other models use the FLOPs XLA
  counts in the compiled step (`cost_analysis`), which is also printed for a GPT; not
  with `scan_layers`, whose loop body XLA counts once (bench those unscanned).
* The peak is measured, not looked up: a jitted `a @ b` on square matrices on one local
  device, in float32 at the default matmul precision (TF32 on recent NVIDIA GPUs) and in
  bfloat16. MFU is against the peak of the dtype the model computes in (`dtype` of its
  config, float32 if it has none); both peaks are printed. The peak is multiplied by the
  mesh's device count only for real accelerators: emulated CPU devices share the same
  cores, so on a CPU it is the single-process measurement whatever the device count.
* Peak memory: on accelerators the largest `memory_stats()['peak_bytes_in_use']` over
  the mesh's local devices; on CPU the process's peak RSS. The compiled step's
  `memory_analysis()` (temp, argument, output, alias bytes) is reported where available.
"""

import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from lmjax.models import GPTConfig
from lmjax.parallel import pipeline
from lmjax.parallel.collectives import format_report, step_report
from lmjax.parallel.mesh import batch_parallelism, to_global
from lmjax.train import trainer
from lmjax.train.config import TrainConfig
from lmjax.train.state import create_state
from lmjax.train.tasks import Task

WARMUP_STEPS = 2  # after the first call
PEAK_BUDGET_S = 2.0  # time spent timing each matmul peak, after its warm-up
EMBEDDING_PARAMS = ("wte", "wpe")  # lookups, not matmuls; the lm head is added back
MIN_MATMUL_S = 0.05  # a product shorter than this is dominated by dispatch; grow it
MAX_MATMUL = 8192  # 256 MiB per float32 operand
PEAK_DTYPES = ("float32", "bfloat16")


def benchmark(*, task: Task, config: TrainConfig, mesh: Mesh, rules, steps: int,
              name: str = "", collectives: bool = False) -> dict:
    """Times `steps` training steps after a warm-up; prints and returns the figures.

    With `collectives`, also counts the step's collectives by kind and mesh axes, in the
    lowered module and in the optimised HLO (lmjax/parallel/collectives.py)."""
    if steps <= 0:
        raise ValueError(f"--bench_steps must be positive, got {steps}")
    config.validate(batch_parallelism(mesh), pipeline.stage_count(mesh))
    setup = trainer.build(task, config, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        timing = _time_steps(setup, config, mesh, rules, steps, collectives)
    items = task.items_per_step(config.batch_size)
    result = _figures(timing, setup.abstract.params, task.config, config, mesh, name, items)
    if collectives:
        result["collectives"] = timing["collectives"]
    if jax.process_index() == 0:
        _print(result)
    return result


def _time_steps(setup: trainer.Setup, config: TrainConfig, mesh: Mesh, rules,
                steps: int, collectives: bool = False) -> dict:
    """Compiles, warms up, then times each step to completion; returns raw timings."""
    state = create_state(setup.task, setup.tx, config.batch_size, config.seed, mesh, rules)
    batches = setup.task.train_iterator(config.batch_size, config.seed)

    def next_batch() -> dict:
        return to_global(next(batches), setup.batch_sharding)

    batch = next_batch()
    start, start_cpu = time.perf_counter(), time.process_time()
    lowered = setup.step_fn.lower(state, batch)
    compiled = lowered.compile()
    # CPU time too: on a shared machine it varies far less than the wall time.
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    counted = step_report(lowered, compiled, mesh) if collectives else None
    for _ in range(1 + WARMUP_STEPS):
        state, metrics = jax.block_until_ready(compiled(state, next_batch()))
    times = []
    for _ in range(steps):
        batch = next_batch()  # the host input pipeline stays outside the clock
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - start)
    return {"times": times, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
            "loss": float(metrics["loss"]),
            "compiled_memory": _compiled_memory(compiled),
            "xla_flops": _xla_flops(compiled), "collectives": counted}


def _compiled_memory(compiled) -> dict:
    """XLA's buffer sizes for the compiled step; fields differ by backend and version."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return {}
    fields = ("temp", "argument", "output", "alias")
    found = {f"{name}_bytes": getattr(stats, f"{name}_size_in_bytes", None) for name in fields}
    found = {k: int(v) for k, v in found.items() if v is not None}
    if all(f"{name}_bytes" in found for name in fields[:3]):
        # Not subtracting alias: donated outputs reuse argument buffers, so this overcounts.
        found["total_bytes"] = sum(found[f"{name}_bytes"] for name in fields[:3])
    return found


def _xla_flops(compiled) -> float | None:
    """FLOPs of one step as XLA counts them in the compiled program (None if unknown)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def matmul_params(params, model_config: GPTConfig) -> int:
    """N of the FLOP count: non-embedding parameters plus the tied lm head (see above)."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = {getattr(key, "key", None) for key in path}
        if not names & set(EMBEDDING_PARAMS):
            total += leaf.size
    return total + model_config.padded_vocab * model_config.embed_dim


def flops_per_token(params, model_config: GPTConfig) -> int:
    """Training FLOPs per token: 6N (forward + backward) plus nanoGPT's attention term."""
    c = model_config
    return 6 * matmul_params(params, c) + 12 * c.num_layers * c.embed_dim * c.block_size


def matmul_peak(mesh: Mesh, dtype: str, budget_s: float = PEAK_BUDGET_S) -> dict:
    """Measured matmul FLOP/s of the mesh in `dtype` (see module docstring for CPU)."""
    device = jax.local_devices()[0]
    size, seconds = 1024, 0.0
    while True:  # grow until one product is long enough that dispatch does not matter
        seconds = _time_matmul(device, size, jnp.dtype(dtype), budget_s)
        if seconds >= MIN_MATMUL_S or size >= MAX_MATMUL:
            break
        size *= 2
    per_device = 2 * size**3 / seconds
    scale = 1 if device.platform == "cpu" else mesh.devices.size
    return {"size": size, "per_device": per_device, "flops": per_device * scale}


def _time_matmul(device, size: int, dtype, budget_s: float) -> float:
    """Fastest of repeated `a @ b` within `budget_s` (at least 3 repeats after a warm-up)."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.device_put(jax.random.normal(k, (size, size), dtype), device) for k in keys)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, b))  # compile
    times, deadline = [], time.perf_counter() + budget_s
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and min(times) < MIN_MATMUL_S and size < MAX_MATMUL:
            break  # too short to be trusted; the caller grows the size
    return min(times)


def peak_memory(mesh: Mesh) -> dict:
    """Peak bytes on the accelerators, or the process's peak RSS on CPU."""
    peaks = []
    for device in mesh.devices.flat:
        if device.process_index == jax.process_index() and device.platform != "cpu":
            stats = device.memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return {"kind": "device_peak_bytes_in_use", "bytes": max(peaks)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"kind": "process_peak_rss", "bytes": int(rss) * scale}


def _flop_count(timing: dict, params, model_config, items_per_step: int) -> tuple[float, str]:
    """(FLOPs per item, how they were counted)."""
    if isinstance(model_config, GPTConfig):
        return flops_per_token(params, model_config), "nanoGPT/PaLM formula"
    if getattr(model_config, "scan_layers", False):
        return float("nan"), "unknown: XLA counts a scanned stack's body once; bench unscanned"
    if timing["xla_flops"] is None:
        return float("nan"), "unknown (XLA gave no count on this backend)"
    return timing["xla_flops"] / items_per_step, "XLA cost analysis"


def _figures(timing: dict, params, model_config, config: TrainConfig, mesh: Mesh,
             name: str, items: int) -> dict:
    """All reported numbers as one flat, JSON-serialisable dict; `items` are the tokens
    (or examples) one step trains on."""
    median_s, mean_s = statistics.median(timing["times"]), statistics.mean(timing["times"])
    per_item, counted = _flop_count(timing, params, model_config, items)
    dtype = str(getattr(model_config, "dtype", "float32"))
    peaks = {d: matmul_peak(mesh, d) for d in PEAK_DTYPES}
    peak = peaks[dtype] if dtype in peaks else peaks["float32"]
    achieved = per_item * items / median_s
    memory = peak_memory(mesh)
    return {
        "workdir": name, "model": {"name": type(model_config).__name__, "dtype": dtype,
                                   **_model_fields(model_config)},
        "batch_size": config.batch_size, "microbatches": config.microbatches,
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
        "platform": jax.local_devices()[0].platform, "devices": int(mesh.devices.size),
        "steps": len(timing["times"]), "compile_s": timing["compile_s"],
        "compile_cpu_s": timing["compile_cpu_s"],
        "loss": timing["loss"],
        "median_ms_per_step": median_s * 1e3, "mean_ms_per_step": mean_s * 1e3,
        "steps_per_sec": 1.0 / median_s, "tokens_per_sec": items / median_s,
        "items_per_step": items, "flops_per_token": per_item, "flops_counted_by": counted,
        "matmul_params": matmul_params(params, model_config)
        if isinstance(model_config, GPTConfig) else None,
        # Not for a scanned stack: cost analysis counts a loop's body once, not per layer.
        "xla_flops_per_step": None if getattr(model_config, "scan_layers", False)
        else timing["xla_flops"], "achieved_flops": achieved,
        "peak_dtype": dtype if dtype in peaks else "float32",
        "peaks": {d: p["flops"] for d, p in peaks.items()},
        "matmul_size": peak["size"], "peak_flops": peak["flops"],
        "mfu": achieved / peak["flops"],
        "peak_memory_kind": memory["kind"], "peak_memory_bytes": memory["bytes"],
        "compiled_memory": timing["compiled_memory"],
    }


def _model_fields(model_config) -> dict:
    keys = ("num_layers", "num_heads", "embed_dim", "block_size", "scan_layers", "remat",
            "attention", "tensor_impl", "sequence_parallel")
    fields = {k: getattr(model_config, k) for k in keys if hasattr(model_config, k)}
    if hasattr(model_config, "padded_vocab"):
        fields["padded_vocab"] = model_config.padded_vocab
    return fields


def _print(r: dict) -> None:
    """One metric per line for people, then a single `bench: {json}` line for tools."""
    m, mib = r["model"], 2.0**20
    compiled = r["compiled_memory"]
    peaks = ", ".join(f"{d} {f / 1e9:.2f}" for d, f in r["peaks"].items())
    shape = ", ".join(f"{k} {v}" for k, v in m.items() if k not in ("name", "dtype"))
    lines = [
        f"model       {m['name']} ({shape}), computes in {m['dtype']}",
        f"batch       {r['batch_size']} global rows, {r['microbatches']} microbatch(es)",
        f"mesh        {r['mesh']} on {r['devices']} {r['platform']} device(s)",
        (f"compile     {r['compile_s']:.2f} s (lower + compile of the step; "
         f"{r['compile_cpu_s']:.2f} s of CPU)"),
        (f"ms/step     {r['median_ms_per_step']:.2f} median, {r['mean_ms_per_step']:.2f} mean "
         f"over {r['steps']} steps"),
        f"tokens/s    {r['tokens_per_sec']:,.0f} ({r['items_per_step']:,} per step)",
        f"FLOPs/token {r['flops_per_token']:,.0f} ({r['flops_counted_by']})",
        f"achieved    {r['achieved_flops'] / 1e9:.2f} GFLOP/s",
        f"peaks       {peaks} GFLOP/s (measured {r['matmul_size']}^2 matmuls)",
        f"MFU         {100 * r['mfu']:.2f} % of the {r['peak_dtype']} peak",
        f"memory      {r['peak_memory_bytes'] / mib:.1f} MiB ({r['peak_memory_kind']})",
    ]
    if r["xla_flops_per_step"]:
        lines.insert(7, f"XLA FLOPs   {r['xla_flops_per_step'] / r['items_per_step']:,.0f} "
                        "per token (cost analysis of the compiled step)")
    if "total_bytes" in compiled:
        lines.append(f"compiled    {compiled['total_bytes'] / mib:.1f} MiB temp + argument + "
                     f"output ({compiled['temp_bytes'] / mib:.1f} MiB temp)")
    if "collectives" in r:
        lines.append(format_report(r["collectives"], m.get("num_layers"),
                                   bool(m.get("scan_layers"))))
    print("\n".join(lines))
    print("bench: " + json.dumps(r, sort_keys=True), flush=True)
