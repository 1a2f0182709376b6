"""A worker or a server killed during an asynchronous run: loss, staleness, stalls.

    python experiments/ps/kills.py [--runs 4] [--workdir /tmp/lmjax-ps-kills]
    python experiments/ps/kills.py --summarise DIR [DIR ...]   # workdirs of earlier runs

Runs `python -m lmjax.main ps` with configs/ps/shakespeare_async.gin (1 server, 2 workers,
100 updates): without a fault, with `ps.faults=['worker1@6']` (no restart: the run goes
on with worker 0) and with `ps.faults=['server0@40']` and `ps.max_restarts=1`, and prints
one row per run: where the fault fired, the last update's loss and the mean of the last
10, the largest staleness (updates since the gradient's read), the longest wall-clock gap
between two updates, the most gradients applied from one parameter version, and the
gradients the workers pushed. About 45 s a run on the 2-core CPU (60 s with a restart).
"""

import argparse
import collections
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASYNC = "configs/ps/shakespeare_async.gin"
SCENARIOS = {
    "no fault": [],
    "worker1@6": ["ps.faults=['worker1@6']"],
    "server0@40, restarted": ["ps.faults=['server0@40']", "ps.max_restarts=1"],
}


def run(workdir: str, params: list[str]) -> None:
    cmd = [sys.executable, "-m", "lmjax.main", "ps", f"--workdir={workdir}", "--overwrite",
           f"--gin_file={ASYNC}", "--gin_param=ps.num_updates=100",
           *[f"--gin_param={p}" for p in params]]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")


def summarise(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(workdir, "summary.json")) as f:
        events = json.load(f)["events"]
    train = [r for r in records if r["split"] == "train"]
    workers = [r for r in records if r["split"] == "worker"]  # the workers that finished
    gaps = [b["time"] - a["time"] for a, b in zip(train, train[1:], strict=False)]
    # Async applies one gradient per update, read at version step - 1 - updates_behind.
    sources = collections.Counter(r["step"] - 1 - r["updates_behind"] for r in train)
    fired = [e.split(" at update ")[1] for e in events if e.startswith("killed")]
    return {"run": workdir, "fired at": ", ".join(fired) or "-",
            "final loss": train[-1]["loss"],
            "loss (last 10)": sum(r["loss"] for r in train[-10:]) / 10,
            "max staleness": max(r["staleness"] for r in train),
            "max gap (s)": max(gaps),
            "most from one version": max(sources.values()),
            "gradients pushed": sum(w["gradients"] for w in workers)}


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                                       for v in row.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="runs per scenario")
    parser.add_argument("--workdir", default="/tmp/lmjax-ps-kills")
    parser.add_argument("--summarise", nargs="*", help="only summarise these workdirs")
    args = parser.parse_args()
    if args.summarise:
        print(table([summarise(d) for d in args.summarise]))
        return
    rows = []
    for name, params in SCENARIOS.items():
        for i in range(args.runs):
            workdir = os.path.join(args.workdir, f"{name.split(',')[0]}-{i}")
            run(workdir, params)
            rows.append(summarise(workdir))
            print(rows[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
