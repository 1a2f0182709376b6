"""Push compression, pull rows and sparse keys: bytes moved against loss.

    python experiments/ps/compression.py [--quick] [--no-processes]

Three parts, one table each in experiments/ps/compression.md (written by this script,
with results/compression.json and compression.png):

1. In-process (virtual time, deterministic): the tiny GPT (configs/models/gpt_tiny.gin)
   on Tiny Shakespeare, 4 workers and 2 server shards, bsp and async, every ps.compression
   with and without error feedback; the same number of gradients in every run. Push and
   pull bytes per gradient, and the held-out loss of the final parameters.
2. Real processes (jax.distributed on 127.0.0.1): a few of those settings; wall time from
   the start signal until the mean loss of 20 consecutive updates reaches a target.
3. Sparse keys: the SST-2 CBoW classifier (configs/experiments/sst2_cbow.gin's model),
   bsp, dense against ps.sparse_keys; bytes moved and dev accuracy.

The servers run plain SGD: error feedback's residual is meant to add back, in later
steps, exactly the gradient mass compression dropped, which holds for SGD's linear update;
Adam rescales every entry by its own history, so a delayed large residual entry gets a
full-size step (the lost first attempt at this study saw error feedback hurt with Adam).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# This file's name shadows the `compression` package jax imports: drop its folder.
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import jax  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmjax.data.config import ClassifyDataConfig  # noqa: E402
from lmjax.data.pipelines import load_lm_data  # noqa: E402
from lmjax.models import CBoWConfig, GPTConfig  # noqa: E402
from lmjax.ps.config import PSConfig  # noqa: E402
from lmjax.ps.inproc import run_inproc  # noqa: E402
from lmjax.ps.worker import make_task  # noqa: E402
from lmjax.train.registry import classify_data  # noqa: E402
from lmjax.train.tasks import evaluate  # noqa: E402

TINY = GPTConfig(vocab_size=65, num_layers=2, num_heads=2, embed_dim=32, block_size=32)
CODECS = [("none", False), ("bf16", False), ("bf16", True), ("topk", False), ("topk", True),
          ("randk", False), ("randk", True), ("sign", False), ("sign", True),
          ("qsgd", False), ("qsgd", True)]
PROCESS_RUNS = [("bsp", "none", False), ("bsp", "topk", True), ("async", "none", False),
                ("async", "topk", True), ("async", "topk", False), ("async", "sign", True)]
FRACTION, LEVELS, LR, BATCH = 0.01, 4, 0.2, 8


def gpt_config(policy: str, codec: str, feedback: bool, gradients: int) -> PSConfig:
    updates = gradients // 4 if policy == "bsp" else gradients
    return PSConfig(model=TINY, policy=policy, num_workers=4, num_servers=2,
                    num_updates=updates, batch_size=BATCH, optimizer="sgd", learning_rate=LR,
                    compression=codec, compression_fraction=FRACTION, qsgd_levels=LEVELS,
                    error_feedback=feedback)


def held_out(task, params: dict) -> dict:
    from lmjax.ps import sharding

    batches = task.eval_batches(64, 8, seed=0)
    eval_fn = jax.jit(task.eval_sums)
    return evaluate(task, eval_fn, sharding.unflatten(params), batches, 64)


def totals(result) -> tuple[int, int, int]:
    workers = [r for r in result.records if r["split"] == "worker"]
    return (sum(r["gradients"] for r in workers), sum(r["pushed_bytes"] for r in workers),
            sum(r["pulled_bytes"] for r in workers))


def inproc_rows(data, gradients: int) -> list[dict]:
    rows = []
    for policy in ("bsp", "async"):
        for codec, feedback in CODECS:
            config = gpt_config(policy, codec, feedback, gradients)
            began = time.time()
            result = run_inproc(workdir=None, data=data, config=config)
            count, pushed, pulled = totals(result)
            train = [r for r in result.records if r["split"] == "train"]
            loss = held_out(make_task(config, data), result.params)["loss"]
            rows.append({"policy": policy, "compression": codec, "error_feedback": feedback,
                         "gradients": count, "updates": len(train),
                         "push_bytes_per_gradient": pushed / count,
                         "pull_bytes_per_gradient": pulled / count,
                         "held_out_loss": float(loss), "seconds": time.time() - began,
                         "curve": [r["loss"] for r in train]})
            print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    for row in rows:  # ratios against the uncompressed run of the same policy
        base = next(r for r in rows if r["policy"] == row["policy"]
                    and r["compression"] == "none")
        row["push_ratio"] = base["push_bytes_per_gradient"] / row["push_bytes_per_gradient"]
        row["loss_gap"] = row["held_out_loss"] / base["held_out_loss"] - 1
    return rows


def process_row(policy: str, codec: str, feedback: bool, gradients: int, target: float,
                workdir: str) -> dict:
    config = gpt_config(policy, codec, feedback, gradients)
    params = {"ps.num_servers": 2, "ps.num_workers": 4, "ps.policy": repr(policy),
              "ps.num_updates": config.num_updates, "ps.batch_size": BATCH,
              "ps.optimizer": "'sgd'", "ps.learning_rate": LR, "ps.compression": repr(codec),
              "ps.compression_fraction": FRACTION, "ps.qsgd_levels": LEVELS,
              "ps.error_feedback": feedback, "ps.checkpoint_every": 10_000}
    cmd = [sys.executable, "-m", "lmjax.main", "ps", f"--workdir={workdir}", "--overwrite",
           "--gin_file=configs/ps/shakespeare_sync.gin",
           *[f"--gin_param={k}={v}" for k, v in params.items()]]
    began = time.time()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{cmd} failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["split"] == "train"]
    losses = np.convolve([r["loss"] for r in train], np.ones(20) / 20, mode="valid")
    hit = np.nonzero(losses <= target)[0]
    reached = train[int(hit[0]) + 19]["time"] if hit.size else None
    last = train[-1]
    return {"policy": policy, "compression": codec, "error_feedback": feedback,
            "updates": len(train), "seconds_to_target": reached,
            "seconds_all": last["time"], "wall_with_startup": time.time() - began,
            "push_bytes": last["pushed_bytes"], "pull_bytes": last["pulled_bytes"],
            "final_loss_20": float(losses[-1])}


def sparse_rows(workdir: str, updates: int) -> list[dict]:
    data_config = ClassifyDataConfig(name="sst2", vocab_size=8000, max_length=64,
                                     lowercase=True)
    data = classify_data(data_config, workdir)
    rows = []
    for sparse_keys in (False, True):
        config = PSConfig(model=CBoWConfig(), task="classify", policy="bsp", num_workers=4,
                          num_servers=2, num_updates=updates, batch_size=16, optimizer="adam",
                          learning_rate=3e-3, sparse_keys=sparse_keys)
        began = time.time()
        result = run_inproc(workdir=None, data=data, config=config)
        count, pushed, pulled = totals(result)
        task = make_task(config, data)
        dev = evaluate(task, jax.jit(task.eval_sums), _unflatten(result.params),
                       task.eval_batches(128, 100, 0), 128)
        rows.append({"sparse_keys": sparse_keys, "gradients": count,
                     "push_bytes_per_gradient": pushed / count,
                     "pull_bytes_per_gradient": pulled / count,
                     "dev_accuracy": dev["accuracy"], "dev_loss": dev["loss"],
                     "seconds": time.time() - began})
        print(rows[-1], flush=True)
    return rows


def _unflatten(params):
    from lmjax.ps import sharding

    return sharding.unflatten(params)


def machine() -> str:
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores of {cpu} ({platform.system()}, no GPU), load average "
            f"{load} at the end (other jobs share the machine when it exceeds the cores)")


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def diverged(loss: float) -> bool:
    """NaN, or a loss above 20 (about 3x the uniform guess over 65 characters)."""
    return not np.isfinite(loss) or loss > 20


def loss_text(loss: float) -> str:
    return f"diverged ({loss:.3g})" if diverged(loss) else f"{loss:.3f}"


def codec_name(row: dict) -> str:
    extra = {"topk": f" {FRACTION:.0%}", "randk": f" {FRACTION:.0%}",
             "qsgd": f" s={LEVELS}"}.get(row["compression"], "")
    return row["compression"] + extra + (" + EF" if row["error_feedback"] else "")


def markdown(results: dict) -> str:
    args = results["settings"]
    lines = [
        "# Push compression, pull caching and sparse keys: measured",
        "",
        f"Written by `python experiments/ps/compression.py{args['flags']}` in "
        f"{results['seconds'] / 60:.1f} min on {results['machine']}.",
        "",
        f"## In process: {args['gradients']} gradients, tiny GPT, 4 workers, 2 servers",
        "",
        f"SGD on the servers (learning rate {LR}), batch {BATCH} per worker. Bytes are what "
        "the workers pushed and pulled, per gradient; the ratio is against `none` under "
        "the same policy; held-out loss: 8 fixed batches of 64 windows of the validation "
        "text, final parameters; gap: against `none`.",
        "",
        "| policy | compression | push bytes / gradient | push ratio | pull bytes / gradient "
        "| held-out loss | gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["inproc"]:
        gap = "-" if diverged(r["held_out_loss"]) else f"{r['loss_gap']:+.1%}"
        lines.append(f"| {r['policy']} | {codec_name(r)} | {r['push_bytes_per_gradient']:,.0f} "
                     f"| {r['push_ratio']:.1f}x | {r['pull_bytes_per_gradient']:,.0f} "
                     f"| {loss_text(r['held_out_loss'])} | {gap} |")
    if results["processes"]:
        lines += [
            "", "## Real processes: wall time to a target loss", "",
            f"2 server and 4 worker processes, {args['process_gradients']} gradients; "
            f"target: the mean loss of 20 consecutive updates at or below "
            f"{args['target']}; seconds from the start signal (after every process joined "
            "and compiled).", "",
            "| policy | compression | updates | seconds to target | seconds for all "
            "| pushed MB | pulled MB | last 20 loss |",
            "|---|---|---|---|---|---|---|---|"]
        for r in results["processes"]:
            lines.append(f"| {r['policy']} | {codec_name(r)} | {r['updates']} "
                         f"| {fmt(r['seconds_to_target'], 1)} | {r['seconds_all']:.1f} "
                         f"| {r['push_bytes'] / 1e6:.2f} | {r['pull_bytes'] / 1e6:.2f} "
                         f"| {fmt(r['final_loss_20'])} |")
    lines += [
        "", f"## Sparse keys: SST-2 CBoW, bsp, {args['sparse_updates']} updates", "",
        "CBoW (300-wide embeddings of an 8,000-piece vocabulary, 512 hidden), 4 workers of "
        "16 sentences, 2 servers, Adam 3e-3 (exact with sparse keys: see lmjax/ps/sparse.py); "
        "dev: all 872 sentences.", "",
        "| keys | push bytes / gradient | pull bytes / gradient | total ratio "
        "| dev accuracy | dev loss |", "|---|---|---|---|---|---|"]
    dense = results["sparse"][0]
    for r in results["sparse"]:
        ratio = ((dense["push_bytes_per_gradient"] + dense["pull_bytes_per_gradient"])
                 / (r["push_bytes_per_gradient"] + r["pull_bytes_per_gradient"]))
        lines.append(f"| {'sparse rows' if r['sparse_keys'] else 'dense'} "
                     f"| {r['push_bytes_per_gradient']:,.0f} "
                     f"| {r['pull_bytes_per_gradient']:,.0f} | {ratio:.1f}x "
                     f"| {r['dev_accuracy']:.4f} | {r['dev_loss']:.4f} |")
    lines += ["", "## The issue's acceptance points, checked on these numbers", ""]
    lines += [f"- {line}" for line in acceptance(results)]
    lines += ["", "![compression](compression.png)", ""]
    return "\n".join(lines)


def acceptance(results: dict) -> list[str]:
    """Top-k 1% + EF: >= 20x fewer push bytes than none, held-out loss within 5%; the gap
    without EF; sparse keys: >= 5x fewer bytes, dev accuracy within 1 point."""
    out = []
    for policy in ("bsp", "async"):
        rows = {(r["compression"], r["error_feedback"]): r for r in results["inproc"]
                if r["policy"] == policy}
        ef, plain = rows[("topk", True)], rows[("topk", False)]
        holds = ef["push_ratio"] >= 20 and abs(ef["loss_gap"]) <= 0.05
        without = ("the run diverged" if diverged(plain["held_out_loss"])
                   else f"the gap is {plain['loss_gap']:+.1%}")
        out.append(f"{policy}: top-k 1% + EF moves {ef['push_ratio']:.1f}x fewer push bytes "
                   f"than none, held-out loss {ef['loss_gap']:+.1%} against none: "
                   f"{'holds' if holds else 'does not hold'}; without EF {without}.")
    dense, rows = results["sparse"]
    ratio = ((dense["push_bytes_per_gradient"] + dense["pull_bytes_per_gradient"])
             / (rows["push_bytes_per_gradient"] + rows["pull_bytes_per_gradient"]))
    points = 100 * abs(rows["dev_accuracy"] - dense["dev_accuracy"])
    holds = ratio >= 5 and points <= 1
    out.append(f"SST-2 CBoW: sparse keys move {ratio:.1f}x fewer bytes (push + pull) than "
               f"dense, dev accuracy {points:.2f} points apart: "
               f"{'holds' if holds else 'does not hold'}.")
    return out


def plot(results: dict, path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy, marker in (("bsp", "o"), ("async", "s")):
        rows = [r for r in results["inproc"] if r["policy"] == policy
                and not diverged(r["held_out_loss"])]
        axes[0].scatter([r["push_bytes_per_gradient"] for r in rows],
                        [r["held_out_loss"] for r in rows], marker=marker, label=policy)
        for r in rows:
            axes[0].annotate(codec_name(r), (r["push_bytes_per_gradient"], r["held_out_loss"]),
                             fontsize=6)
    axes[0].set(xscale="log", xlabel="push bytes per gradient",
                ylabel="held-out loss after the same gradients", title="tiny GPT, SGD servers")
    axes[0].legend()
    for r in results["inproc"]:
        if r["policy"] == "async" and (r["compression"], r["error_feedback"]) in (
                ("none", False), ("topk", True), ("topk", False), ("sign", True)):
            curve = np.convolve(r["curve"], np.ones(50) / 50, mode="valid")
            axes[1].plot(curve, label=codec_name(r))
    axes[1].set(xlabel="update (async: one gradient each)", ylim=(2.0, 4.5),
                ylabel="training loss (mean of 50 updates)",
                title="async runs (a diverging run leaves the top)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few gradients per run: checks the script, measures nothing")
    parser.add_argument("--no-processes", action="store_true", help="skip the real processes")
    parser.add_argument("--target", type=float, default=3.0)
    parser.add_argument("--workdir", default="/tmp/lmjax-ps-compression")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the table and plot from results/compression.json")
    args = parser.parse_args()
    if args.report:
        with open(os.path.join(HERE, "results", "compression.json")) as f:
            write_outputs(json.load(f))
        return
    began = time.time()
    gradients, process_gradients, sparse_updates = ((64, 64, 4) if args.quick
                                                    else (1600, 800, 250))
    data = load_lm_data("tiny_shakespeare")
    results = {"settings": {"gradients": gradients, "process_gradients": process_gradients,
                            "sparse_updates": sparse_updates, "target": args.target,
                            "flags": "".join(f" --{k.replace('_', '-')}" for k in
                                             ("quick", "no_processes") if getattr(args, k))}}
    results["inproc"] = inproc_rows(data, gradients)
    results["processes"] = [] if args.no_processes else [
        process_row(*run, process_gradients, args.target,
                    os.path.join(args.workdir, "-".join(map(str, run))))
        for run in PROCESS_RUNS]
    for row in results["processes"]:
        print(row, flush=True)
    results["sparse"] = sparse_rows(os.path.join(args.workdir, "sst2"), sparse_updates)
    results["seconds"] = time.time() - began
    results["machine"] = machine()
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compression.json"), "w") as f:
        f.write(compact_json(results))
    write_outputs(results)


def compact_json(results: dict) -> str:
    """One line a key, one line a row of a list: the loss curves stay readable in a diff."""
    def value(v):
        if isinstance(v, list):
            return "[\n  " + ",\n  ".join(json.dumps(row) for row in v) + "\n ]"
        return json.dumps(v)
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {value(v)}" for k, v in results.items()) + "\n}\n"


def write_outputs(results: dict) -> None:
    plot(results, os.path.join(HERE, "compression.png"))
    with open(os.path.join(HERE, "compression.md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
