"""Every parallelism strategy on 8 devices, one table: step time, memory per device and
the collectives of the training step; then the pipeline bubble, measured.

    python experiments/parallelism/scaling.py [--models baby gpt2_small] [--steps 3]

Each row is one `lmjax bench --collectives` run in its own process, on 8 devices
(`--xla_force_host_platform_device_count=8` on a CPU: emulated devices that share its
cores, so step times add up the work of all 8 rather than show parallel speed-up).
The bubble comes from bubble.py (run as a step of this command unless --no_bubble).
Writes results.json and table.md (with bubble.json and bubble.md) next to this file.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEVICES = 8

MODELS = {
    "baby": ("configs/experiments/shakespeare_char_baby.gin", []),
    # GPT-2 small's layers at a CPU-sized context: float32 (bfloat16 matmuls are slower
    # than float32 on a CPU), 128 positions; the 50304-column output layer is kept.
    "gpt2_small": ("configs/experiments/gpt2_small_bench.gin",
                   ["GPTConfig.block_size=128", "GPTConfig.dtype='float32'"]),
}
SHARD_MAP = ["mesh.data=2", "mesh.tensor=4", "mesh.tensor_impl='shard_map'"]
STRATEGIES = {
    "data": ["mesh.data=8"],
    "fsdp": ["mesh.data=1", "mesh.fsdp=8"],
    "tensor (auto)": ["mesh.data=2", "mesh.tensor=4"],
    "tensor (shard_map)": SHARD_MAP,
    "tensor + sequence": [*SHARD_MAP, "mesh.sequence_parallel=True"],
    # 16 rows: 4 (2) per data replica, one per pipeline microbatch.
    "pipeline, 2 stages": ["mesh.stage=2", "mesh.data=4", "GPTConfig.scan_layers=True",
                           "train.pipeline_microbatches=4"],
    "pipeline, 4 stages": ["mesh.stage=4", "mesh.data=2", "GPTConfig.scan_layers=True",
                           "train.pipeline_microbatches=8"],
}
COMMON = ["train.batch_size=16", "mesh.cpu_devices=None"]


def bench(model: str, strategy: str, steps: int) -> dict:
    """One `lmjax bench --collectives` run; its figures."""
    gin_file, model_params = MODELS[model]
    params = [*COMMON, *model_params, *STRATEGIES[strategy]]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    args = [sys.executable, "-m", "lmjax.main", "bench", f"--workdir={model}",
            f"--gin_file={gin_file}", f"--bench_steps={steps}", "--collectives",
            *[f"--gin_param={p}" for p in params]]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("bench: "))
    figures = json.loads(line[len("bench: "):])
    pipelined = next((p for p in params if p.startswith("train.pipeline_microbatches=")), "=1")
    return {**figures, "model": model, "model_config": figures["model"], "strategy": strategy,
            "gin_params": params, "pipeline_microbatches": int(pipelined.split("=")[1])}


def _collectives(summary: dict) -> str:
    """'3 all_reduce over tensor (1.2 MiB)' per kind and axes, or '-'."""
    parts = [f"{v['count']} {name} ({v['bytes'] / 2**20:.2f} MiB)" for name, v in summary.items()]
    return "; ".join(parts) or "-"


def _bubble(row: dict) -> str:
    """The GPipe bubble (p - 1) / (m + p - 1) of a pipelined row, '-' for the others."""
    p, m = row["mesh"].get("stage", 1), row["pipeline_microbatches"]
    return "-" if p == 1 else f"{(p - 1) / (m + p - 1):.3f} (p={p}, m={m})"


def table(rows: list[dict]) -> str:
    lines = ["| model | strategy | mesh | ms/step | MiB/device (temp) | collectives as "
             "lowered | collectives after XLA (per device) | bubble, theory |",
             "|---|---|---|---:|---:|---|---|---|"]
    for r in rows:
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        memory = r["compiled_memory"]
        per_device = (f"{memory['total_bytes'] / 2**20:.1f} ({memory['temp_bytes'] / 2**20:.1f})"
                      if "total_bytes" in memory else "n/a")
        lines.append(f"| {r['model']} | {r['strategy']} | {mesh} | "
                     f"{r['median_ms_per_step']:.0f} | {per_device} | "
                     f"{_collectives(r['collectives']['lowered'])} | "
                     f"{_collectives(r['collectives']['optimised'])} | {_bubble(r)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        choices=list(STRATEGIES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--no_bubble", action="store_true",
                        help="keep bubble.md as it is instead of measuring it again")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for strategy in args.strategies:
            print(f"{model}: {strategy} ...", flush=True)
            rows.append(bench(model, strategy, args.steps))
            print(f"  {rows[-1]['median_ms_per_step']:.0f} ms/step", flush=True)
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    if not args.no_bubble:
        print("pipeline bubble (bubble.py) ...", flush=True)
        subprocess.run([sys.executable, str(HERE / "bubble.py")], cwd=REPO, check=True)
    bubble = (HERE / "bubble.md").read_text() if (HERE / "bubble.md").exists() else ""
    text = table(rows) + "\n\n" + bubble.replace("# Pipeline bubble", "## Pipeline bubble", 1)
    (HERE / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
