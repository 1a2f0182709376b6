"""BERT on SST-2: pretrain on the offline corpus, sweep fine-tuning, compare with scratch.

    python experiments/sst2/bert_sweep.py pretrain [--workdir=runs/bert_pretrain_offline]
    python experiments/sst2/bert_sweep.py pretrain --workdir=runs/bert_sst2_continued \
        --config=configs/experiments/bert_pretrain_sst2_continued.gin \
        --gin_param="pretrain_data.init_workdir='runs/bert_pretrain_nonsp'"
    python experiments/sst2/bert_sweep.py sweep --lrs=1e-4,3e-4 --batch_sizes=16,32 --epochs=1
    python experiments/sst2/bert_sweep.py compare --lr=1e-4 --batch_size=32 --seeds=1,2,3
    python experiments/sst2/bert_sweep.py compare --limit=2000 --epochs=10  # fewer labels
    python experiments/sst2/bert_sweep.py table   # all recorded runs as markdown
    python experiments/sst2/bert_sweep.py curve --workdir=runs/bert_pretrain_offline  # PNG

`sweep` fine-tunes the pretrained encoder once per (learning rate, batch size), as the
BERT paper's fine-tuning recipe does (Devlin et al. 2019, A.3: lr in {5e-5, 3e-5, 2e-5},
batch in {16, 32}; Turc et al. 2019 use larger rates, up to 3e-4, for the small models),
for `--epochs` passes over the 67,349 training sentences, and reports the best dev
accuracy and F1 of each run. `compare` trains the chosen setting from the pretrained
encoder and from a random initialisation (configs/experiments/sst2_transformer_scratch.gin,
same size, vocabulary and recipe) over several seeds and prints mean and spread.
Results go to experiments/sst2/bert_results.json (appended, keyed by run) and the table
rows are printed for experiments/sst2/bert.md.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import REPO, save_record  # noqa: E402

RESULTS = HERE / "bert_results.json"
TRAIN_SENTENCES = 67_349
FINETUNE = "configs/experiments/sst2_bert_finetune.gin"
SCRATCH = "configs/experiments/sst2_transformer_scratch.gin"
PRETRAIN = "configs/experiments/bert_pretrain_offline.gin"


def _lmjax(*args: str) -> str:
    cmd = [sys.executable, "-m", "lmjax.main", *args]
    print("$ python -m lmjax.main", " ".join(args), flush=True)
    return subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout


def _evals(workdir: Path) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == "eval"]


def _save(key: str, record: dict) -> None:
    save_record(RESULTS, key, record)


def _train(workdir: Path, config: str, params: list[str]) -> dict:
    if (workdir / "metrics.jsonl").exists():
        sys.exit(f"{workdir} exists; remove it or pass another --runs (runs are timed fresh)")
    flags = [f"--gin_file={config}"] + [f"--gin_param={p}" for p in params]
    start = time.perf_counter()
    _lmjax("train", f"--workdir={workdir}", *flags)
    wall = time.perf_counter() - start
    best = min(_evals(workdir), key=lambda r: r["loss"])
    return {"wall_s": round(wall, 1), "best_step": best["step"], **best}


def _finetune_params(pretrained: Path, lr: float, batch: int, epochs: float, seed: int,
                     limit: int | None = None):
    """Bindings for `epochs` passes over the training sentences (the first `limit` only,
    for the fewer-labels runs)."""
    steps = max(1, round(epochs * (limit or TRAIN_SENTENCES) / batch))
    every = max(1, steps // 4)
    return [f"finetune.init_workdir='{pretrained}'", f"train.learning_rate={lr}",
            f"train.batch_size={batch}", f"train.num_steps={steps}",
            f"train.warmup_steps={steps // 10}", f"train.eval_every={every}",
            f"train.checkpoint_every={every}", "train.eval_batch_size=32",
            f"train.seed={seed}"] + ([f"finetune.limit={limit}"] if limit else [])


def pretrain(args) -> None:
    """Records the last evaluation (the run's end), not the best one."""
    workdir = Path(args.workdir)
    record = {**_train(workdir, args.config, args.gin_param), **_evals(workdir)[-1]}
    _save(f"pretrain {workdir.name}", record)
    curve(args)
    nsp = f"{record['nsp_accuracy']:.3f}" if "nsp_accuracy" in record else "-"  # NSP off
    print(f"| pretrain | {record['step']} | {record['mlm_loss']:.3f} | "
          f"{record['mlm_accuracy']:.3f} | {nsp} | {record['wall_s']:.0f} |")


def curve(args) -> None:
    """Train and held-out MLM (and NSP) accuracy of a pretraining run against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(args.workdir)
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        part = [r for r in rows if r["split"] == split and "mlm_accuracy" in r]
        ax.plot([r["step"] for r in part], [r["mlm_accuracy"] for r in part], style,
                label=f"MLM accuracy ({'held-out' if split == 'eval' else split})")
        if split == "eval" and part and "nsp_accuracy" in part[0]:
            ax.plot([r["step"] for r in part], [r["nsp_accuracy"] for r in part], "s--",
                    label="NSP accuracy (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title(workdir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = HERE / f"{workdir.name}_curve.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def sweep(args) -> None:
    rows = []
    for lr in map(float, args.lrs.split(",")):
        for batch in map(int, args.batch_sizes.split(",")):
            name = f"sweep_lr{lr:g}_bs{batch}_ep{args.epochs:g}"
            params = _finetune_params(Path(args.pretrained), lr, batch, args.epochs, args.seed)
            record = _train(Path(args.runs) / name, FINETUNE, params + args.gin_param)
            _save(name, {"lr": lr, "batch_size": batch, "epochs": args.epochs,
                         "pretrained": args.pretrained, **record})
            rows.append((lr, batch, record))
    print("\n| lr | batch | epochs | best dev accuracy | dev F1 | at step | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for lr, batch, r in rows:
        print(f"| {lr:g} | {batch} | {args.epochs:g} | {r['accuracy']:.4f} | {r['f1']:.4f} | "
              f"{r['best_step']} | {r['wall_s']:.0f} |")


def compare(args) -> None:
    table = {}
    configs = {"pretrained": FINETUNE, "scratch": SCRATCH}
    for label in args.inits.split(","):
        config, accuracies = configs[label], []
        for seed in map(int, args.seeds.split(",")):
            labels = f"_n{args.limit}" if args.limit else ""
            name = (f"{label}_lr{args.lr:g}_bs{args.batch_size}_ep{args.epochs:g}{labels}"
                    f"_seed{seed}")
            key = f"{Path(args.runs).name}/{name}"  # runs of other encoders keep their records
            params = _finetune_params(Path(args.pretrained), args.lr, args.batch_size,
                                      args.epochs, seed, args.limit)
            record = _train(Path(args.runs) / name, config, params + args.gin_param)
            _save(key, {"init": label, "seed": seed, "pretrained": args.pretrained,
                        "limit": args.limit, **record})
            accuracies.append(record["accuracy"])
        table[label] = accuracies
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores")
    print("| encoder | seeds | dev accuracy mean | std | min | max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, acc in table.items():
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {label} | {len(acc)} | {statistics.mean(acc):.4f} | {spread:.4f} | "
              f"{min(acc):.4f} | {max(acc):.4f} |")


def table(args) -> None:
    """Markdown tables of every run recorded in bert_results.json."""
    del args
    results = json.loads(RESULTS.read_text())
    for key, r in sorted(results.items()):
        if key.startswith("pretrain "):
            nsp = f"{r['nsp_accuracy']:.3f}" if "nsp_accuracy" in r else "- (off)"
            print(f"pretraining ({key}): step {r['step']}, MLM loss {r['mlm_loss']:.3f}, MLM "
                  f"accuracy {r['mlm_accuracy']:.3f}, NSP accuracy {nsp}, {r['wall_s']:.0f} s")
    print("\n| lr | batch | epochs | dev accuracy | dev F1 | best step | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key, r in sorted(results.items()):
        if key.startswith("sweep"):
            print(f"| {r['lr']:g} | {r['batch_size']} | {r['epochs']:g} | {r['accuracy']:.4f} | "
                  f"{r['f1']:.4f} | {r['best_step']} | {r['wall_s']:.0f} |")
    groups: dict[str, list[dict]] = {}
    for key, r in results.items():
        if "init" in r:
            groups.setdefault(key.rsplit("_seed", 1)[0], []).append(r)
    print("\n| run | seeds | dev accuracy mean | std | min | max | dev F1 mean | wall (s) each |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in sorted(groups.items()):
        acc = [r["accuracy"] for r in runs]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {name} | {','.join(str(r['seed']) for r in runs)} | "
              f"{statistics.mean(acc):.4f} | {spread:.4f} | {min(acc):.4f} | {max(acc):.4f} | "
              f"{statistics.mean(r['f1'] for r in runs):.4f} | "
              f"{statistics.mean(r['wall_s'] for r in runs):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain")
    c = sub.add_parser("curve")
    for s in (p, c):
        s.add_argument("--workdir", default=str(REPO / "runs" / "bert_pretrain_offline"))
    p.add_argument("--config", default=PRETRAIN,
                   help="the pretraining gin file (e.g. bert_pretrain_sst2_continued.gin)")
    for name in ("sweep", "compare"):
        s = sub.add_parser(name)
        s.add_argument("--pretrained", default=str(REPO / "runs" / "bert_pretrain_offline"))
        s.add_argument("--runs", default=str(REPO / "runs" / "sst2_bert"))
        s.add_argument("--epochs", type=float, default=1.0)
    sweep_p, compare_p = sub.choices["sweep"], sub.choices["compare"]
    sweep_p.add_argument("--lrs", default="1e-4,3e-4")
    sweep_p.add_argument("--batch_sizes", default="16,32")
    sweep_p.add_argument("--seed", type=int, default=1)
    compare_p.add_argument("--lr", type=float, default=1e-4)
    compare_p.add_argument("--batch_size", type=int, default=32)
    compare_p.add_argument("--seeds", default="1,2,3")
    compare_p.add_argument("--inits", default="pretrained,scratch",
                           help="which encoders: pretrained, scratch or both")
    compare_p.add_argument("--limit", type=int, default=None,
                           help="fine-tune on the first N training sentences only")
    for s in sub.choices.values():
        s.add_argument("--gin_param", action="append", default=[])  # added to every run
    sub.add_parser("table")
    args = parser.parse_args()
    commands = {"pretrain": pretrain, "curve": curve, "sweep": sweep, "compare": compare,
                "table": table}
    commands[args.command](args)


if __name__ == "__main__":
    main()
