"""The GPipe schedule's bubble, measured, next to the theoretical (p - 1) / (m + p - 1).

    python experiments/parallelism/bubble.py            # p = 2 and 4, writes bubble.json/.md
    python experiments/parallelism/bubble.py --stages 4 --microbatches 4 8 16 32

Method. One forward and backward pass of the pipelined GPT layer stack
(`lmjax.parallel.pipeline.run` over `transformer.block_layer`) is timed for several
microbatch counts m at a fixed stage count p and a fixed microbatch size, so that every
tick of the schedule does the same work. Its time is then T(m) = (m + p - 1) * t_tick +
c: a least-squares fit gives the steady-state cost of one tick, t_tick, and the fixed
cost c (splitting the batch, the final psum, the call). Of the measured T(m), the
stages sit in the bubble for (p - 1) * t_tick, so the measured bubble is
(p - 1) * t_tick / T(m); it falls short of theory by the share of c in T(m), and the
fit's residuals show whether a tick really costs the same at every m.

What it means on the 2-core CPU: the p stages are emulated CPU devices sharing two
cores, and in an SPMD schedule every stage computes at every tick (idle stages compute
on stale values that are thrown away). So a bubble tick costs wall time here exactly as
it would on p real accelerators, but the p stages' work is serialised over two cores
rather than run side by side: t_tick is the time of all p stages' work for one tick, and
the absolute times say nothing about an accelerator's. The fractions are what carries
over. `rows(...)` is importable (the scaling study merges these rows into its table).
"""

import os

if __name__ == "__main__":  # emulated devices must be set before jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lmjax.models import GPT, GPTConfig
from lmjax.models.transformer import block_layer
from lmjax.parallel import RULES, make_mesh, pipeline

HERE = Path(__file__).resolve().parent
# 8 layers (2 per stage at p = 4), 128 wide: a tick is milliseconds of matmuls on the CPU,
# well above the per-tick loop overhead.
MODEL = GPTConfig(vocab_size=65, block_size=64, num_layers=8, num_heads=4, embed_dim=128,
                  scan_layers=True)
ROWS = 4  # per microbatch: the batch is ROWS * m


def _stack_params(config: GPTConfig):
    """The scanned GPT's `blocks` parameters, (num_layers, ...) leaves."""
    tokens = jnp.zeros((1, config.block_size), jnp.int32)
    params = jax.jit(lambda: nn.unbox(GPT(config).init(jax.random.key(0), tokens)["params"]))()
    return params["blocks"]


def pipeline_step(config: GPTConfig, stages: int, microbatches: int, rows: int):
    """A compiled, warmed-up call running one forward + backward pass of the pipelined
    layer stack (p = `stages` emulated devices, m = `microbatches` of `rows` rows) to
    completion."""
    if jax.device_count() < stages:
        raise ValueError(f"{stages} stages need {stages} devices, found {jax.device_count()}; "
                         "set XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:stages], stage=stages)
    rules = RULES.get("fsdp_tensor")
    layer = block_layer(config, deterministic=True)
    shape = (microbatches * rows, config.block_size, config.embed_dim)
    x = jax.random.normal(jax.random.key(1), shape)  # (batch, length, embed)
    positions = jnp.broadcast_to(jnp.arange(config.block_size), shape[:2])

    def loss(params, x):
        out = pipeline.run(layer, params, x, positions, None, stages=stages,
                           microbatches=microbatches)
        return jnp.mean(out ** 2)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = _stack_params(config)
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

        def call() -> None:
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                jax.block_until_ready(step(params, x))

        call()  # compile
        call()  # warm up
    return call


def pipeline_seconds(calls: Sequence, repeats: int) -> tuple[list[float], list[float]]:
    """The fastest of `repeats` wall times of each call, and the fastest process CPU
    times. The calls take turns, so a neighbour's load on the shared cores falls on all
    of them alike; the minimum is the run least disturbed by it. CPU time counts the
    work done, not the waiting for a busy core, so it varies less on a loaded machine."""
    wall, cpu = [float("inf")] * len(calls), [float("inf")] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            wall[i] = min(wall[i], time.perf_counter() - start)
            cpu[i] = min(cpu[i], time.process_time() - start_cpu)
    return wall, cpu


def fit_tick(ticks: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """Least squares of seconds = ticks * t_tick + fixed: (t_tick, fixed)."""
    slope, intercept = np.polyfit(np.asarray(ticks, float), np.asarray(seconds, float), 1)
    return float(slope), float(intercept)


def rows(stages: int, microbatches: Sequence[int], *, config: GPTConfig = MODEL,
         rows_per_microbatch: int = ROWS, repeats: int = 5) -> list[dict]:
    """One record per microbatch count: times, the fit, measured and theoretical bubble."""
    if len(microbatches) < 3:
        raise ValueError("the fit needs at least 3 microbatch counts")
    calls = [pipeline_step(config, stages, m, rows_per_microbatch) for m in microbatches]
    seconds, cpu_seconds = pipeline_seconds(calls, repeats)
    ticks = [pipeline.ticks(stages, m) for m in microbatches]
    tick, fixed = fit_tick(ticks, seconds)
    cpu_tick, cpu_fixed = fit_tick(ticks, cpu_seconds)
    out = []
    for m, n, t, cpu in zip(microbatches, ticks, seconds, cpu_seconds, strict=True):
        theory = pipeline.bubble_fraction(stages, m)
        wall_bubble, cpu_bubble = (stages - 1) * tick / t, (stages - 1) * cpu_tick / cpu
        out.append({
            "stages": stages, "microbatches": m, "ticks": n, "bubble_theory": theory,
            "m_at_least_4p": m >= 4 * stages,
            "seconds": t, "tick_seconds": tick, "fixed_seconds": fixed,
            "bubble_measured": wall_bubble, "relative_error": wall_bubble / theory - 1,
            "cpu_seconds": cpu, "cpu_tick_seconds": cpu_tick, "cpu_fixed_seconds": cpu_fixed,
            "bubble_measured_cpu_time": cpu_bubble,
            "relative_error_cpu_time": cpu_bubble / theory - 1,
        })
    return out


def markdown(records: list[dict]) -> str:
    head = ("| p | m | ticks | bubble theory (p-1)/(m+p-1) | wall T(m) ms | wall T/ticks ms | "
            "bubble, wall | vs theory | CPU T(m) ms | CPU T/ticks ms | bubble, CPU time | "
            "vs theory |\n" + "| --- " * 12 + "|\n")
    lines = [
        f"| {r['stages']} | {r['microbatches']} | {r['ticks']} | {r['bubble_theory']:.3f} | "
        f"{1e3 * r['seconds']:.0f} | {1e3 * r['seconds'] / r['ticks']:.1f} | "
        f"{r['bubble_measured']:.3f} | {100 * r['relative_error']:+.1f}% | "
        f"{1e3 * r['cpu_seconds']:.0f} | {1e3 * r['cpu_seconds'] / r['ticks']:.1f} | "
        f"{r['bubble_measured_cpu_time']:.3f} | {100 * r['relative_error_cpu_time']:+.1f}% |"
        for r in records]
    return head + "\n".join(lines) + "\n"


def _worst(records: list[dict], key: str) -> float:
    return max((abs(r[key]) for r in records if r["m_at_least_4p"]), default=float("nan"))


def report(records: list[dict], repeats: int) -> str:
    """bubble.md: what was measured, how, on what, and the table."""
    fits = "; ".join(
        f"p={p}: t_tick {1e3 * r['tick_seconds']:.1f} ms, c {1e3 * r['fixed_seconds']:.0f} ms "
        f"(CPU time: {1e3 * r['cpu_tick_seconds']:.1f} ms, {1e3 * r['cpu_fixed_seconds']:.0f} ms)"
        for p, r in {r["stages"]: r for r in records}.items())
    return f"""# Pipeline bubble of the GPipe schedule: measured and theoretical

Command: `python experiments/parallelism/bubble.py` (5-10 minutes on the 2-core CPU),
{jax.device_count()} emulated CPU devices, jax {jax.__version__}. Each time is the fastest
of {repeats} forward + backward passes of the pipelined layer stack of a
{MODEL.num_layers}-layer, {MODEL.embed_dim}-wide GPT (block {MODEL.block_size},
{ROWS} rows per microbatch, so the batch grows with m and every tick does the same
work); the calls for the different m take turns, so other load on the shared cores
falls on all of them alike.

Per p, a least-squares fit T(m) = (m + p - 1) * t_tick + c gives the cost of one tick
({fits}), and the measured bubble is (p - 1) * t_tick / T(m): the share of the measured
time that the schedule's fill and drain ticks take. A fixed cost c > 0 (the call, the
split, the last psum) makes it fall short of theory; T(m)/ticks staying flat over m is
the direct sign that a bubble tick costs as much as a useful one. The fit is done twice:
on wall time, and on the process's CPU time (all threads), which counts the work done
rather than the waiting for cores that other jobs hold.

What this means on this machine: the p stages are emulated devices on two shared cores,
and in the SPMD schedule every stage computes at every tick (an idle stage works on
stale values that are thrown away). So a bubble tick costs time here as it would on p
accelerators, but the stages' work is serialised over two cores instead of running side
by side: t_tick is all p stages' work for one tick, the absolute times say nothing about
an accelerator's, and only the fractions carry over. The machine was shared with other
jobs while this ran, so wall times are noisy. Largest deviation from theory at m >= 4p:
{100 * _worst(records, "relative_error"):.1f}% on wall time,
{100 * _worst(records, "relative_error_cpu_time"):.1f}% on CPU time.

{markdown(records)}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=None,
                        help="default: p, 2p, 4p, 8p for each stage count p")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "bubble"), help="writes OUT.json, OUT.md")
    args = parser.parse_args()
    records = []
    for p in args.stages:
        counts = args.microbatches or [p, 2 * p, 4 * p, 8 * p]
        records += rows(p, counts, repeats=args.repeats)
        print(markdown([r for r in records if r["stages"] == p]), flush=True)
    Path(args.out + ".json").write_text(json.dumps(records, indent=1) + "\n")
    Path(args.out + ".md").write_text(report(records, args.repeats))
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
