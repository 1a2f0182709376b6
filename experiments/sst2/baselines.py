"""SST-2 dev accuracy of the non-pretrained baselines: majority class, CBoW, BiLSTM-max.

    python experiments/sst2/baselines.py --models=cbow,bilstm --seeds=1,2,3
    python experiments/sst2/baselines.py --models=bilstm --seeds=1,2,3 \
        --label=bilstm_3ep --gin_param=train.num_steps=3000   # a variant, kept apart
    python experiments/sst2/baselines.py --table   # the recorded runs' table, replotted

Each model trains through the CLI (`configs/experiments/sst2_{model}.gin`) into
`runs/sst2_baselines/{model}_seed{S}`; the reported dev figures are those of the
checkpoint with the lowest dev loss (the one `lmjax eval` reads), so the dev set picks
the checkpoint but not the hyperparameters. Writes results.json and the accuracy plot
next to this script and prints the table rows.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import REPO, records, train  # noqa: E402

from lmjax.data.builders import SST2_TEXT_COLUMNS, read_sst2_tsv  # noqa: E402

HERE = Path(__file__).resolve().parent


def majority() -> dict:
    """Predict the most frequent dev label for every dev sentence."""
    data_dir = Path(os.environ.get("LMJAX_DATA_DIR", REPO.parent / "shared" / "data"))
    labels = [label for label, _ in read_sst2_tsv(data_dir / "sst2" / "dev.tsv",
                                                  SST2_TEXT_COLUMNS["dev"])]
    label, count = Counter(labels).most_common(1)[0]
    positives = sum(labels)
    f1 = 2 * positives / (2 * positives + (len(labels) - positives)) if label == 1 else 0.0
    return {"label": label, "accuracy": count / len(labels), "f1": f1, "examples": len(labels)}


def run_model(model: str, seed: int, root: Path, label: str, params: list[str]) -> dict:
    workdir = root / f"{label}_seed{seed}"
    shutil.rmtree(workdir, ignore_errors=True)  # a leftover run would resume, not retrain
    wall = train(workdir, f"configs/experiments/sst2_{model}.gin",
                 [f"train.seed={seed}", *params])
    evals = records(workdir, "eval")
    best = min(evals, key=lambda r: r["loss"])
    return {"model": label, "seed": seed, "wall_s": wall, "best_step": best["step"],
            "accuracy": best["accuracy"], "f1": best["f1"], "dev_loss": best["loss"],
            "curve": [(r["step"], r["accuracy"]) for r in evals]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cbow,bilstm")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--root", default="runs/sst2_baselines")
    parser.add_argument("--label", help="row name for a variant (default: the model's name)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="a binding added to every run (repeatable)")
    parser.add_argument("--table", action="store_true",
                        help="only print the table of the recorded runs (and replot)")
    args = parser.parse_args()
    out = HERE / "baselines_results.json"
    if args.table:
        results = json.loads(out.read_text())
        print_table(results)
        plot(results)
        return
    results = {"majority": majority(), "runs": []}
    print(f"majority class {results['majority']}")
    for model in args.models.split(","):
        for seed in map(int, args.seeds.split(",")):
            run = run_model(model, seed, REPO / args.root, args.label or model, args.gin_param)
            results["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
    if out.exists():  # keep rows of models not rerun now
        old = json.loads(out.read_text())["runs"]
        ran = {(r["model"], r["seed"]) for r in results["runs"]}
        results["runs"] = [r for r in old if (r["model"], r["seed"]) not in ran] + \
            results["runs"]
    out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    plot(results)


def plot(results: dict) -> None:
    """Dev accuracy against training step, one line per run, majority class dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in results["runs"]:
        steps, accuracy = zip(*run["curve"], strict=True)
        ax.plot(steps, accuracy, marker="o", label=f"{run['model']} seed {run['seed']}")
    ax.axhline(results["majority"]["accuracy"], linestyle="--", color="gray",
               label="majority class")
    ax.set_xlabel("training step (batch 64)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "baselines_accuracy.png", dpi=100)


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def print_table(results: dict) -> None:
    """Per model: the dev figures of the lowest-dev-loss checkpoint (the protocol), and the
    dev accuracy of the last checkpoint (no selection on dev at all)."""
    m = results["majority"]
    print("| model | seeds | dev accuracy (mean, min-max) | dev F1 (mean) | "
          "last checkpoint's dev accuracy | wall per run (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| majority class (label {m['label']}) | - | {m['accuracy']:.4f} | {m['f1']:.4f} | "
          "- | - |")
    for model in dict.fromkeys(r["model"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["model"] == model]
        print(f"| {model} | {len(runs)} | {_spread([r['accuracy'] for r in runs])} | "
              f"{statistics.mean(r['f1'] for r in runs):.4f} | "
              f"{_spread([r['curve'][-1][1] for r in runs])} | "
              f"{statistics.mean(r['wall_s'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
