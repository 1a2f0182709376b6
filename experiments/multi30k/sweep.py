"""Multi30k En->De: train and score several variants of the configs side by side (each one
a `run.py --train` process), then print one table. Written for a GPU, where several small
runs share the device; on the 2-core CPU run one variant at a time (--parallel=1).

    python experiments/multi30k/sweep.py --out=runs/multi30k_sweep [--only=a,b] [--parallel=9]

Each variant fixes its step count, so a variant's BLEU does not depend on the machine's
speed: a GPU sweep picks the schedule, and the 2-core CPU run of the chosen config is
what the acceptance figure comes from. Writes OUT/sweep.json and OUT/sweep.md after each
variant finishes (partial results survive a time limit) and OUT/NAME/ for each run.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMALL = "configs/experiments/multi30k_en_de.gin"
BASE = "configs/experiments/multi30k_en_de_base.gin"

# name -> (gin file, bindings). The small config (1,000-token batches, 4,000 steps) and
# the 2-core CPU's earlier schedules, whose CPU figures are in README.md: "b4000_s760"
# and "b2000_s1800" repeat CPU runs (test beam BLEU 25.67 and 32.78 there), so a GPU sweep
# shows first that it lands where the CPU did, then which neighbours of the config do
# better at the same step count.
B4000 = ["train.batch_size=4000", "train.warmup_steps=150", "train.eval_every=200",
         "translation.bleu_every=200"]
B2000 = ["train.batch_size=2000", "train.warmup_steps=300", "train.eval_every=450",
         "translation.bleu_every=450"]
VARIANTS = {
    "config": (SMALL, []),
    "b4000_s760": (SMALL, [*B4000, "train.num_steps=760"]),
    "b2000_s1800": (SMALL, [*B2000, "train.num_steps=1800"]),
    "lr7e-4": (SMALL, ["train.learning_rate=7e-4"]),
    "lr1.5e-3": (SMALL, ["train.learning_rate=1.5e-3"]),
    "b500_s8000": (SMALL, ["train.batch_size=500", "train.num_steps=8000",
                           "train.warmup_steps=1200"]),
    # ~20% cheaper a step on the CPU (0.65 against 0.80 s at 2,000 tokens): more steps fit.
    "v6000_s4800": (SMALL, ["translation.vocab_size=6000", "train.num_steps=4800"]),
    "ls0": (SMALL, ["Seq2SeqConfig.label_smoothing=0.0"]),
    # The base model on a GPU: 2,000 steps of 12,000 tokens (~55 epochs).
    "base_s2000": (BASE, ["train.num_steps=2000", "train.max_minutes=5.0"]),
}


def launch(name: str, out: Path, extra: list[str], mem_fraction: float | None):
    gin_file, bindings = VARIANTS[name]
    env = dict(os.environ)
    if mem_fraction:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(mem_fraction)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / "run.py"), "--train", f"--workdir={folder / 'run'}",
               f"--out={folder}", f"--gin_file={gin_file}",
               *[f"--gin_param={b}" for b in [*bindings, *extra]]]
    log = open(folder / "run.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log


def summary(name: str, folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    splits = results["splits"]
    evals = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").open()]
    evals = [r for r in evals if r["split"] == "eval"]
    beam = f"beam{results['beam']}"
    return {"name": name, "bindings": VARIANTS[name][1], "gin_file": VARIANTS[name][0],
            "step": results["step"], "train_seconds": round(results["training"]["seconds"]),
            "machine": results["training"]["machine"],
            "val_nll": round(min(r["loss"] for r in evals), 4),
            "val_greedy": splits["val"]["beam1"]["bleu"], "val_beam": splits["val"][beam]["bleu"],
            "test_greedy": splits["test_2016_flickr"]["beam1"]["bleu"],
            "test_beam": splits["test_2016_flickr"][beam]["bleu"],
            "test_beam_chrf": splits["test_2016_flickr"][beam]["chrf"]}


def table(rows: list[dict]) -> str:
    lines = ["| variant | bindings | step | train s | best val NLL | val greedy | val beam "
             "| test greedy | test beam | test chrF |", "| --- " * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | {', '.join(r['bindings']) or '-'} | {r['step']} "
                     f"| {r['train_seconds']} | {r['val_nll']:.3f} | {r['val_greedy']:.2f} "
                     f"| {r['val_beam']:.2f} | {r['test_greedy']:.2f} | {r['test_beam']:.2f} "
                     f"| {r['test_beam_chrf']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--mem_fraction", type=float, default=None,
                        help="XLA_PYTHON_CLIENT_MEM_FRACTION for each run (GPU)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="a binding added to every variant; repeatable")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    pending, running, rows, failed = list(names), {}, [], []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            running[name] = launch(name, args.out, args.gin_param, args.mem_fraction)
        time.sleep(2)
        for name, (process, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            elapsed = time.perf_counter() - start
            if process.returncode:
                failed.append(name)
                tail = (args.out / name / "run.log").read_text()[-2000:]
                print(f"{name}: FAILED (exit {process.returncode}) at {elapsed:.0f} s\n{tail}",
                      flush=True)
                continue
            rows.append(summary(name, args.out / name))
            print(f"{name}: done at {elapsed:.0f} s, test beam BLEU {rows[-1]['test_beam']:.2f}",
                  flush=True)
            (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))
            (args.out / "sweep.md").write_text(table(rows) + "\n")
    print(table(rows))
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (logs in {args.out}/NAME/run.log)")


if __name__ == "__main__":
    main()
