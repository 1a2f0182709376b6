"""In-process (virtual time) studies of the parameter server; tables and plots.

    python experiments/ps/studies.py {staleness,bounded,backup,ssp_distribution,all} [--out DIR]

Every run is `lmjax.ps.inproc.run_inproc` on the tiny GPT (configs/models/gpt_tiny.gin)
and Tiny Shakespeare; gradients are real, time is virtual (1 unit = one gradient at
slow-down 1). Results go to OUT/results/*.json, plots to OUT/*.png, tables to stdout.
"""

import argparse
import json
import os

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmjax.data.pipelines import eval_batches, load_lm_data  # noqa: E402
from lmjax.models import GPTConfig  # noqa: E402
from lmjax.ps import sharding  # noqa: E402
from lmjax.ps.config import PSConfig  # noqa: E402
from lmjax.ps.inproc import run_inproc  # noqa: E402
from lmjax.train.tasks import LMTask, evaluate  # noqa: E402

TINY = GPTConfig(vocab_size=65, num_layers=2, num_heads=2, embed_dim=32, block_size=32)


def eval_loss(data, params: dict, batches) -> float:
    """The LM task's eval loss of flat parameter-server params over fixed batches."""
    task = LMTask(TINY)
    fn = jax.jit(task.eval_sums)
    return evaluate(task, fn, sharding.unflatten(params), batches, len(batches[0]["inputs"]))[
        "loss"]


def smoothed(records, window=10) -> np.ndarray:
    losses = np.array([r["loss"] for r in records])
    return np.array([losses[max(0, i - window + 1):i + 1].mean() for i in range(len(losses))])


def first_below(values, target) -> int | None:
    hits = np.nonzero(np.asarray(values) <= target)[0]
    return int(hits[0]) if len(hits) else None


def train(result):
    return [r for r in result.records if r["split"] == "train"]


def staleness_study(data, out: str) -> dict:
    """Zhang et al. 2016: lambda = 30 learners, n-softsync, fixed alpha0 vs alpha0 / tau."""
    learners, grads_per_learner = 30, 40
    evals = eval_batches(data.eval, TINY.block_size, 64, 4, seed=1)
    rows, curves = [], {}
    for scaling in ("fixed", "staleness"):
        for n in (1, 15, 30):
            updates = learners * grads_per_learner // (learners // n)  # equal samples
            config = PSConfig(model=TINY, policy="softsync", num_workers=learners, softsync_n=n,
                              num_updates=updates, batch_size=2, optimizer="momentum",
                              learning_rate=0.05, lr_scaling=scaling, delay="lognormal",
                              sigma=0.3, seed=0)
            result = run_inproc(workdir=None, data=data, config=config)
            records = train(result)
            loss = eval_loss(data, result.params, evals)
            staleness = float(np.mean([r["updates_behind"] for r in records]))
            rows.append({"lr": scaling, "n": n, "updates": updates, "eval_loss": loss,
                         "mean_staleness": staleness})
            label = f"{scaling}, n={n}" + (" (diverged)" if not np.isfinite(loss) else "")
            curves[label] = (
                [r["step"] * learners // n for r in records], smoothed(records).tolist())
            print(rows[-1], flush=True)
    sync = {r["lr"]: r["eval_loss"] for r in rows if r["n"] == 1}
    for row in rows:
        row["vs_sync"] = row["eval_loss"] / sync[row["lr"]] - 1
    _plot(curves, "gradients processed", "training loss (10-update mean)",
          "n-softsync, lambda=30", os.path.join(out, "staleness_lr.png"), ylim=(2.8, 4.6))
    return {"rows": rows}


def bounded_study(data, out: str) -> dict:
    """Bounded delay: heterogeneous workers, SSP with s in {0, 1, 2, 4, 8, 16, inf}."""
    target, rows, curves = 3.3, [], {}
    for s in (0, 1, 2, 4, 8, 16, -1):
        config = PSConfig(model=TINY,
                          policy="ssp", staleness_bound=s, num_workers=8, num_updates=320,
                          batch_size=4, optimizer="adam", learning_rate=3e-3,
                          delay="lognormal", sigma=0.3,
                          slowdown=(1, 1, 1, 1, 1.5, 2, 3, 4), seed=0)
        result = run_inproc(workdir=None, data=data, config=config)
        records = train(result)
        curve = smoothed(records, 20)
        hit = first_below(curve, target)
        idle = np.mean([r["idle_fraction"] for r in result.records if r["split"] == "worker"])
        stale = [r["staleness"] for r in records]
        rows.append({"s": "inf" if s < 0 else s, "idle_fraction": float(idle),
                     "updates_to_target": None if hit is None else hit + 1,
                     "time_to_target": None if hit is None else records[hit]["time"],
                     "max_staleness": int(max(stale)), "mean_staleness": float(np.mean(stale))})
        curves[f"s={rows[-1]['s']}"] = ([r["time"] for r in records], curve.tolist())
        print(rows[-1], flush=True)
    _plot(curves, "virtual time", "training loss (20-update mean)",
          f"SSP, 8 heterogeneous workers (target {target})",
          os.path.join(out, "bounded_delay.png"))
    return {"target": target, "rows": rows}


def backup_study(data, out: str) -> dict:
    """Chen et al. 2016: heavy-tailed stragglers; N = 8 gradients per update from N + b."""
    target, rows, curves = 3.3, [], {}
    for b in (0, 1, 2, 4):
        policy = "bsp" if b == 0 else "backup"
        config = PSConfig(model=TINY,
                          policy=policy, num_workers=8 + b, backup_workers=b, num_updates=60,
                          batch_size=4, optimizer="adam", learning_rate=3e-3,
                          delay="lognormal", sigma=1.0, seed=0)
        result = run_inproc(workdir=None, data=data, config=config)
        records = train(result)
        curve = smoothed(records, 5)
        hit = first_below(curve, target)
        rows.append({"workers": f"8+{b}", "updates_to_target": None if hit is None else hit + 1,
                     "time_to_target": None if hit is None else records[hit]["time"],
                     "time_per_update": records[-1]["time"] / len(records)})
        curves[f"8+{b}"] = ([r["time"] for r in records], curve.tolist())
        print(rows[-1], flush=True)
    _plot(curves, "virtual time", "training loss (5-update mean)",
          f"backup workers, lognormal sigma=1 (target {target})",
          os.path.join(out, "backup_workers.png"))
    return {"target": target, "rows": rows}


def ssp_distribution_study(data, out: str) -> dict:
    """Staleness of every applied gradient under SSP over 30 seeds (the test's setup)."""
    micro = GPTConfig(vocab_size=65, num_layers=1, num_heads=1, embed_dim=16, block_size=8)
    rows = []
    for s in (0, 1, 3, 8):
        counts = {}
        for seed in range(30):
            config = PSConfig(model=micro,
                              policy="ssp", staleness_bound=s, num_workers=4, num_updates=40,
                              batch_size=1, optimizer="sgd", learning_rate=0.1,
                              delay="lognormal", sigma=1.0, slowdown=(1.0, 1.0, 2.0, 4.0),
                              seed=seed)
            result = run_inproc(workdir=None, data=data, config=config)
            for r in train(result):
                counts[r["staleness"]] = counts.get(r["staleness"], 0) + 1
        total = sum(counts.values())
        rows.append({"s": s, "gradients": total, "max": max(counts),
                     "distribution": " ".join(f"{k}:{counts[k] / total:.2f}"
                                              for k in sorted(counts))})
        print(rows[-1], flush=True)
    return {"rows": rows}


def _plot(curves: dict, xlabel: str, ylabel: str, title: str, path: str, ylim=None) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


STUDIES = {"staleness": staleness_study, "bounded": bounded_study, "backup": backup_study,
           "ssp_distribution": ssp_distribution_study}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=[*STUDIES, "all"])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
    data = load_lm_data("tiny_shakespeare")
    for name in STUDIES if args.study == "all" else [args.study]:
        result = STUDIES[name](data, args.out)
        with open(os.path.join(args.out, "results", f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"\n{name}\n{table(result['rows'])}\n", flush=True)


if __name__ == "__main__":
    main()
