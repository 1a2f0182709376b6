"""Reproduces experiments/shakespeare_char: train, time, benchmark, plot.

    python experiments/shakespeare_char/run.py --config=baby [--workdir=runs/shakespeare_char_baby]

Prepares the data first (not timed), then times the training command as a user runs
it, runs the step benchmark on the same config, writes `loss_<config>.png` beside this
file and prints the table row used in README.md. With `--reference` (baby config, torch
installed) it then times `torch_reference.py` on the same machine and prints the ratio of
the two wall times, the figure the speed goal is stated in.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONFIGS = {
    "baby": "configs/experiments/shakespeare_char_baby.gin",
    "gpu": "configs/experiments/shakespeare_char.gin",
}


def _lmjax(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmjax.main", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)


def _records(workdir: Path) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot(records: list[dict], name: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        rows = [r for r in records if r["split"] == split]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], style, label=split,
                markersize=3, linewidth=1)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title=f"shakespeare_char {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    path = HERE / f"loss_{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=sorted(CONFIGS), default="baby")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--reference", action="store_true",
                        help="also time the PyTorch reference (baby config) and print the ratio")
    args = parser.parse_args()
    workdir = Path(args.workdir or REPO / "runs" / f"shakespeare_char_{args.config}")
    if workdir.exists():
        sys.exit(f"{workdir} exists; remove it or pass another --workdir (this times a fresh run)")
    from lmjax.data import builders

    builders.prepare("tiny_shakespeare")  # not part of the timed command
    flags = [f"--gin_file={CONFIGS[args.config]}"] + [f"--gin_param={p}" for p in args.gin_param]
    start = time.perf_counter()
    done = _lmjax("train", f"--workdir={workdir}", *flags).stdout.strip().splitlines()[-1]
    wall = time.perf_counter() - start
    print(done)
    bench = _lmjax("bench", f"--workdir={workdir}", *flags, "--bench_steps=50").stdout
    figures = json.loads(bench.split("bench: ", 1)[1].splitlines()[0])
    records = _records(workdir)
    evals = [r for r in records if r["split"] == "eval"]
    plot = _plot(records, args.config)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| config | device | final eval loss | best eval loss | wall (s) | ms/step | "
          "tokens/s | MFU |")
    print(f"| {args.config} | {figures['platform']} x{figures['devices']} | "
          f"{evals[-1]['loss']:.4f} | {min(r['loss'] for r in evals):.4f} | {wall:.0f} | "
          f"{figures['median_ms_per_step']:.1f} | {figures['tokens_per_sec']:,.0f} | "
          f"{100 * figures['mfu']:.1f}% |")
    print(f"plot: {plot.relative_to(REPO)}")
    if args.reference:
        _compare_with_reference(wall)


def _compare_with_reference(wall: float) -> None:
    """Times the PyTorch reference's whole command and prints lmjax's wall over its wall."""
    cmd = [sys.executable, str(HERE / "torch_reference.py")]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout
    reference = time.perf_counter() - start
    print(out.strip().splitlines()[-1])
    print(f"wall: lmjax {wall:.1f} s, PyTorch reference {reference:.1f} s; "
          f"lmjax / reference = {wall / reference:.2f} (goal: at most 0.5)")


if __name__ == "__main__":
    main()
