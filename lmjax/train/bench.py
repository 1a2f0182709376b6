"""Throughput benchmark of the real training step: ms/step, tokens/s, FLOPs, MFU, memory.

`python -m lmjax.main bench --workdir=DIR --gin_file=F [--bench_steps=N]` builds the run
exactly as `train` does (same jitted, donated step, mesh, logical-axis rules and input
pipeline) but never writes a checkpoint into DIR: the Checkpointer that `trainer.build`
creates points into a temporary directory that is removed afterwards.

Definitions (what the printed figures mean):

* Step time is measured per step with `jax.block_until_ready` on the step's outputs, so
  it is device time plus dispatch (one step per call: `train.steps_per_call` is not
  applied); drawing the batch happens before the clock starts (in
  one process the batch's transfer is part of the step's dispatch: see `to_global`).
  Throughput (steps/s, tokens/s) uses the *median* step time, which is robust to the
  occasional hiccup on a shared machine; the mean is reported too.
* FLOPs per token follow nanoGPT's `estimate_mfu` (PaLM, appendix B):
  `6 * N + 12 * num_layers * embed_dim * block_size`, where N is the number of
  non-embedding parameters counted from the actual params tree (every weight, bias and
  norm scale of the blocks and the final norm) *plus* the tied output projection
  `padded_vocab * embed_dim`: the lm head is a real matmul on every token even though
  its weights are the token embedding. The token lookup (wte as a gather) and the
  learned position table (wpe) cost no matmul FLOPs and are excluded. This N equals
  nanoGPT's `get_num_params(non_embedding=True)` (with the padded vocabulary).
* The peak is measured, not looked up: a jitted float32 `a @ b` on square matrices on
  one local device, at the default matmul precision the model also uses (TF32 on
  recent NVIDIA GPUs). It is multiplied by the mesh's device count only for real
  accelerators; emulated CPU devices all share the same cores, so on CPU the peak is the
  single-process measurement whatever the device count.
* Peak memory: on accelerators the largest `memory_stats()['peak_bytes_in_use']` over
  the mesh's local devices; on CPU the process's peak RSS. The compiled step's
  `memory_analysis()` (temp, argument, output, alias bytes) is reported where available.
"""

import json
import resource
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from lmjax.data.pipelines import LMData, train_iterator
from lmjax.models import GPTConfig
from lmjax.parallel.mesh import batch_parallelism
from lmjax.train import trainer
from lmjax.train.state import create_state

WARMUP_STEPS = 2  # after the first (compiling) call
PEAK_BUDGET_S = 2.0  # time spent timing the matmul peak, after its warm-up
EMBEDDING_PARAMS = ("wte", "wpe")  # lookups, not matmuls; the lm head is added back
MIN_MATMUL_S = 0.05  # a product shorter than this is dominated by dispatch; grow it
MAX_MATMUL = 8192  # 256 MiB per float32 operand


def benchmark(
    *,
    steps: int,
    workdir: str,
    model_config: GPTConfig,
    data: LMData,
    config: trainer.TrainConfig,
    mesh: Mesh,
    rules,
    on_ready=None,
) -> dict:
    """Times `steps` training steps after a warm-up; prints and returns the figures.

    `workdir` is only named in the report: nothing is saved there (see module docstring).
    """
    del on_ready  # bench records no config, so there is nothing to run before writing
    if steps <= 0:
        raise ValueError(f"--bench_steps must be positive, got {steps}")
    config.validate(batch_parallelism(mesh))
    with tempfile.TemporaryDirectory(prefix="lmjax-bench-") as scratch:
        setup = trainer.build(model_config, config, mesh, rules, scratch)
        try:
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                timing = _time_steps(setup, model_config, data, config, mesh, rules, steps)
        finally:
            setup.checkpoints.close()
    result = _figures(timing, setup.abstract.params, model_config, config, mesh, workdir)
    if jax.process_index() == 0:
        _print(result)
    return result


def _time_steps(setup: trainer.Setup, model_config: GPTConfig, data: LMData,
                config: trainer.TrainConfig, mesh: Mesh, rules, steps: int) -> dict:
    """Compiles, warms up, then times each step to completion; returns raw timings."""
    state = create_state(setup.model, setup.tx, model_config.block_size, config.seed, mesh,
                         rules)
    batches = train_iterator(data.train, model_config.block_size, config.batch_size,
                             config.seed)

    def next_batch() -> dict:
        return trainer.to_global(next(batches), setup.batch_sharding)

    start = time.perf_counter()
    state, metrics = jax.block_until_ready(setup.step_fn(state, next_batch()))
    compile_s = time.perf_counter() - start
    for _ in range(WARMUP_STEPS):
        state, metrics = jax.block_until_ready(setup.step_fn(state, next_batch()))
    times = []
    for _ in range(steps):
        batch = next_batch()  # the host input pipeline stays outside the clock
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(setup.step_fn(state, batch))
        times.append(time.perf_counter() - start)
    return {"times": times, "compile_s": compile_s, "loss": float(metrics["loss"]),
            "compiled_memory": _compiled_memory(setup.step_fn, state, next_batch())}


def _compiled_memory(step_fn, state, batch) -> dict:
    """XLA's buffer sizes for the compiled step; fields differ by backend and version."""
    try:
        stats = step_fn.lower(state, batch).compile().memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return {}
    fields = ("temp", "argument", "output", "alias")
    found = {f"{name}_bytes": getattr(stats, f"{name}_size_in_bytes", None) for name in fields}
    found = {k: int(v) for k, v in found.items() if v is not None}
    if all(f"{name}_bytes" in found for name in fields[:3]):
        # Not subtracting alias: donated outputs reuse argument buffers, so this overcounts.
        found["total_bytes"] = sum(found[f"{name}_bytes"] for name in fields[:3])
    return found


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


def matmul_peak(mesh: Mesh, budget_s: float = PEAK_BUDGET_S) -> dict:
    """Measured float32 matmul FLOP/s of the mesh (see module docstring for CPU)."""
    device = jax.local_devices()[0]
    size, seconds = 1024, 0.0
    while True:  # grow until one product is long enough that dispatch does not matter
        seconds = _time_matmul(device, size, budget_s)
        if seconds >= MIN_MATMUL_S or size >= MAX_MATMUL:
            break
        size *= 2
    per_device = 2 * size**3 / seconds
    scale = 1 if device.platform == "cpu" else mesh.devices.size
    return {"size": size, "per_device": per_device, "flops": per_device * scale}


def _time_matmul(device, size: int, budget_s: float) -> float:
    """Fastest of repeated `a @ b` within `budget_s` (at least 3 repeats after a warm-up)."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.float32), device)
            for k in keys)
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


def _figures(timing: dict, params, model_config: GPTConfig, config: trainer.TrainConfig,
             mesh: Mesh, workdir: str) -> dict:
    """All reported numbers as one flat, JSON-serialisable dict."""
    c = model_config
    median_s, mean_s = statistics.median(timing["times"]), statistics.mean(timing["times"])
    tokens_per_step = config.batch_size * c.block_size
    tokens_per_sec = tokens_per_step / median_s
    per_token = flops_per_token(params, c)
    peak = matmul_peak(mesh)
    memory = peak_memory(mesh)
    achieved = per_token * tokens_per_sec
    return {
        "workdir": workdir,
        "model": {"num_layers": c.num_layers, "num_heads": c.num_heads,
                  "embed_dim": c.embed_dim, "block_size": c.block_size,
                  "padded_vocab": c.padded_vocab, "dtype": c.dtype, "remat": c.remat},
        "batch_size": config.batch_size, "microbatches": config.microbatches,
        "mesh": {name: int(size) for name, size in mesh.shape.items()},
        "platform": jax.local_devices()[0].platform, "devices": int(mesh.devices.size),
        "steps": len(timing["times"]), "compile_s": timing["compile_s"],
        "loss": timing["loss"],
        "median_ms_per_step": median_s * 1e3, "mean_ms_per_step": mean_s * 1e3,
        "steps_per_sec": 1.0 / median_s, "tokens_per_sec": tokens_per_sec,
        "matmul_params": matmul_params(params, c), "flops_per_token": per_token,
        "achieved_flops": achieved, "matmul_size": peak["size"],
        "peak_flops": peak["flops"], "mfu": achieved / peak["flops"],
        "peak_memory_kind": memory["kind"], "peak_memory_bytes": memory["bytes"],
        "compiled_memory": timing["compiled_memory"],
    }


def _print(r: dict) -> None:
    """One metric per line for people, then a single `bench: {json}` line for tools."""
    m, mib = r["model"], 2.0**20
    compiled = r["compiled_memory"]
    lines = [
        (f"model       {m['num_layers']} layers, {m['num_heads']} heads, {m['embed_dim']} wide, "
         f"block {m['block_size']}, vocab {m['padded_vocab']} (padded), {m['dtype']}"),
        (f"batch       {r['batch_size']} global x {m['block_size']} tokens, "
         f"{r['microbatches']} microbatch(es)"),
        f"mesh        {r['mesh']} on {r['devices']} {r['platform']} device(s)",
        f"compile     {r['compile_s']:.2f} s (first step)",
        (f"ms/step     {r['median_ms_per_step']:.2f} median, {r['mean_ms_per_step']:.2f} mean "
         f"over {r['steps']} steps"),
        f"steps/s     {r['steps_per_sec']:.2f}",
        f"tokens/s    {r['tokens_per_sec']:,.0f}",
        f"FLOPs/token {r['flops_per_token']:,} (6 * {r['matmul_params']:,} params + attention)",
        f"achieved    {r['achieved_flops'] / 1e9:.2f} GFLOP/s",
        f"peak        {r['peak_flops'] / 1e9:.2f} GFLOP/s (float32 {r['matmul_size']}^2 matmul)",
        f"MFU         {100 * r['mfu']:.2f} %",
        f"memory      {r['peak_memory_bytes'] / mib:.1f} MiB ({r['peak_memory_kind']})",
    ]
    if "total_bytes" in compiled:
        lines.append(f"compiled    {compiled['total_bytes'] / mib:.1f} MiB temp + argument + "
                     f"output ({compiled['temp_bytes'] / mib:.1f} MiB temp)")
    print("\n".join(lines))
    print("bench: " + json.dumps(r, sort_keys=True), flush=True)
