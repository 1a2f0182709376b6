"""The accelerator checks in one command, for a machine with one GPU (about 8 minutes on
an H100/H200):

    python experiments/gpu/check.py [--out=runs/gpu_check] [--skip=tests,train] [--bind=B]

1. the test suite (`python -m pytest -q`) on the GPU;
2. `lmjax bench` of `shakespeare_char.gin` in float32 and in bfloat16;
3. `lmjax bench` of `gpt2_small_bench.gin` without and with remat;
4. the full `shakespeare_char.gin` run in bfloat16 (5000 steps), for its best eval loss.

Each stage runs as its own process under a time limit; its output goes to OUT/NAME.log,
and the bench figures to OUT/NAME.json. At the end it prints the Markdown rows of the
table in experiments/shakespeare_char/README.md and writes them to OUT/table.md, with
the machine's GPU name. Stages that fail or time out are reported as such in the table.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHAR = "configs/experiments/shakespeare_char.gin"
GPT2 = "configs/experiments/gpt2_small_bench.gin"
BF16 = "--gin_param=GPTConfig.dtype='bfloat16'"
# name -> (seconds allowed, lmjax arguments or a command)
STAGES = {
    "tests": (180, [sys.executable, "-m", "pytest", "-q", "-x"]),
    "char_fp32": (40, ["bench", CHAR, "--bench_steps=50"]),
    "char_bf16": (40, ["bench", CHAR, "--bench_steps=50", BF16]),
    "gpt2": (60, ["bench", GPT2, "--bench_steps=20"]),
    "gpt2_remat": (60, ["bench", GPT2, "--bench_steps=20", "--gin_param=GPTConfig.remat=True",
                        "--gin_param=train.batch_size=64"]),
    "train": (120, ["train", CHAR, BF16]),
}


def _command(name: str, spec: list[str], out: Path, bindings: list[str]) -> list[str]:
    if spec[0] == sys.executable:
        return spec
    command, gin_file, *rest = spec
    return [sys.executable, "-m", "lmjax.main", command, f"--workdir={out / name}",
            f"--gin_file={gin_file}", *rest, *[f"--gin_param={b}" for b in bindings]]


def run_stage(name: str, limit: int, command: list[str], out: Path) -> dict:
    """Runs one stage; returns {"ok", "seconds", "bench" or "train"} for the table."""
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = {"ok": code == 0, "code": code, "seconds": round(time.time() - start, 1)}
    text = (out / f"{name}.log").read_text()
    bench = [line for line in text.splitlines() if line.startswith("bench: ")]
    if bench:
        result["bench"] = json.loads(bench[-1][len("bench: "):])
    metrics = out / name / "metrics.jsonl"
    if metrics.exists():
        evals = [json.loads(r) for r in metrics.read_text().splitlines() if '"eval"' in r]
        if evals:
            best = min(evals, key=lambda r: r["loss"])
            result["train"] = {"best_eval_loss": best["loss"], "best_step": best["step"],
                               "steps": evals[-1]["step"]}
    print(f"{name}: exit {code} after {result['seconds']} s", flush=True)
    return result


def table(results: dict, gpu: str) -> str:
    """The README rows: one per bench, one for the run, one for the tests."""
    rows = [f"Measured on {gpu} by `python experiments/gpu/check.py`.", "",
            "| stage | ms/step | tokens/s | MFU (peak) | compile s | best eval loss |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "bench" in r:
            b = r["bench"]
            rows.append(f"| {name} | {b['median_ms_per_step']:.2f} | {b['tokens_per_sec']:,.0f} "
                        f"| {100 * b['mfu']:.1f}% ({b['peak_dtype']}) | {b['compile_s']:.1f} | - |")
        elif "train" in r:
            t = r["train"]
            rows.append(f"| {name} ({t['steps']} steps, {r['seconds']} s) | - | - | - | - | "
                        f"{t['best_eval_loss']:.4f} at step {t['best_step']} |")
        else:
            outcome = "passed" if r["ok"] else f"failed ({r['code']})"
            rows.append(f"| {name} | {outcome} in {r['seconds']} s | - | - | - | - |")
    return "\n".join(rows)


def _gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "a machine without nvidia-smi"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--skip", default="", help="comma-separated stage names")
    parser.add_argument("--bind", action="append", default=[],
                        help="a gin binding added to every lmjax stage (e.g. to try the "
                        "script with a small model on a CPU); repeatable")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STAGES)
    if unknown:
        sys.exit(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    results = {name: run_stage(name, limit, _command(name, spec, out, args.bind), out)
               for name, (limit, spec) in STAGES.items() if name not in skip}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results, _gpu_name())
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
