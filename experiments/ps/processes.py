"""Real-process runs: 2 servers and 4 workers on 127.0.0.1 through jax.distributed.

    python experiments/ps/processes.py [--out experiments/ps] [--updates 40]

Runs `python -m lmjax.main ps` with configs/ps/shakespeare_sync.gin and
configs/ps/shakespeare_async.gin (overriding servers, workers and updates): synchronous,
asynchronous, asynchronous with one straggler (worker 3 four times slower), and
asynchronous with worker 1 killed at update 15 and restarted. Prints a table (updates/s,
bytes/s, final loss) and plots the loss curves to OUT/processes.png.
"""

import argparse
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = {
    "sync": ("configs/ps/shakespeare_sync.gin", []),
    "async": ("configs/ps/shakespeare_async.gin", []),
    "async, straggler": ("configs/ps/shakespeare_async.gin", ["ps.slowdown=(1, 1, 1, 4)"]),
    "async, kill+restart": ("configs/ps/shakespeare_async.gin",
                            ["ps.faults=['worker1@15']", "ps.max_restarts=1"]),
}


def run(name: str, gin_file: str, params: list[str], workdir: str, updates: int) -> dict:
    common = ["ps.num_servers=2", "ps.num_workers=4", f"ps.num_updates={updates}"]
    cmd = [sys.executable, "-m", "lmjax.main", "ps", f"--workdir={workdir}", "--overwrite",
           f"--gin_file={gin_file}", *[f"--gin_param={p}" for p in common + params]]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["split"] == "train"]
    workers = [r for r in records if r["split"] == "worker"]
    span = train[-1]["time"] - train[0]["time"]  # from the first update: startup excluded
    moved = (train[-1]["pushed_bytes"] + train[-1]["pulled_bytes"]
             - train[0]["pushed_bytes"] - train[0]["pulled_bytes"])
    events = [line for line in out.stdout.splitlines() if line.startswith("ps: ")]
    return {"run": name, "updates_per_s": (len(train) - 1) / span,
            "MB_per_s": moved / span / 1e6,
            "final_loss_10": sum(r["loss"] for r in train[-10:]) / 10,
            "mean_staleness": sum(r["updates_behind"] for r in train) / len(train),
            "idle": sum(w["idle_fraction"] for w in workers) / max(len(workers), 1),
            "events": "; ".join(e[4:] for e in events) or "-",
            "curve": ([r["step"] for r in train], [r["loss"] for r in train])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--workdir", default="/tmp/lmjax-ps-processes")
    args = parser.parse_args()
    rows = []
    for i, (name, (gin_file, params)) in enumerate(RUNS.items()):
        rows.append(run(name, gin_file, params, os.path.join(args.workdir, str(i)),
                        args.updates))
        print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.plot(*row["curve"], label=row["run"])
    ax.set(xlabel="update", ylabel="training loss (of the applied gradient)",
           title="2 servers, 4 worker processes, tiny GPT")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "processes.png"), dpi=100)
    os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
    with open(os.path.join(args.out, "results", "processes.json"), "w") as f:
        json.dump(rows, f, indent=1)
    keys = [k for k in rows[0] if k != "curve"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])
                                for k in keys) + " |")


if __name__ == "__main__":
    main()
