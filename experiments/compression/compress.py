"""Model compression studies: knowledge distillation on SST-2 and magnitude pruning.

    python experiments/compression/compress.py distill [--seeds=1,2,3]
    python experiments/compression/compress.py prune --model=bert \
        --pretrained=runs/bert_pretrain_offline
    python experiments/compression/compress.py prune --model=gpt
    python experiments/compression/compress.py table   # markdown tables and the plot

`distill` trains the teacher once (default: the BiLSTM-max of sst2_bilstm.gin, the
strongest lmjax SST-2 model trained here without pretraining), then for each seed the
student (default: the CBoW of sst2_cbow.gin) on the labels alone and distilled from the
teacher (`train.task = 'distill'` on the student's config, as sst2_cbow_distill.gin),
with the same recipe, steps and seed; `--augment=K` adds Tang et al.'s transfer set
(`distill.augment`). `prune` trains
one run per target sparsity with `prune.sparsity` (Zhu and Gupta's schedule up to 3/4 of
the run, then the masks stay fixed): the BERT fine-tuned on SST-2 from a pretrained
encoder, or the GPT of shakespeare_char_baby.gin. Every figure is that of the run's last
evaluation, where the final sparsity holds (the best-loss checkpoint of a pruned run may
predate it). Runs append to experiments/compression/results.json; `table` prints the
markdown of experiments/compression/README.md and draws sparsity.png.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import records, save_record, train  # noqa: E402

RESULTS = HERE / "results.json"
# The files lmjax/train/distill.py caches in a student's workdir.
LOGITS, TRANSFER, TRANSFER_LOGITS = "teacher_logits.npy", "transfer.txt", "transfer_logits.npy"
CONFIGS = {
    "teacher": "configs/experiments/sst2_bilstm.gin",
    "student": "configs/experiments/sst2_cbow.gin",
    "bert": "configs/experiments/sst2_bert_finetune.gin",
    "gpt": "configs/experiments/shakespeare_char_baby.gin",
}


def _load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def _save(key: str, record: dict) -> None:
    save_record(RESULTS, key, {**record,
                               "machine": f"{platform.machine()}, {os.cpu_count()} cores"})


def _run(workdir: Path, config: str, params: list[str]) -> dict:
    if (workdir / "metrics.jsonl").exists():
        sys.exit(f"{workdir} exists; remove it or pass another --runs (runs are timed fresh)")
    print(f"training {workdir} ({config})", flush=True)
    wall = train(workdir, config, params)
    return {**records(workdir, "eval")[-1], "wall_s": round(wall, 1)}


def distill(args) -> None:
    """The teacher and the label-only students run once (reused when recorded); the
    distilled students once per (temperature, alpha, seed)."""
    runs, results = Path(args.runs), _load()
    teacher = runs / "teacher"
    if "distill teacher" not in results:
        _save("distill teacher", _run(teacher, args.teacher, args.teacher_param))
    # The CBoW's records predate --student_name and carry no name.
    tag = "" if args.student_name == "cbow" else f"{args.student_name}_"
    student = {"student": args.student_name}
    for seed in map(int, args.seeds.split(",")):
        if f"distill {tag}labels seed{seed}" not in results:
            record = _run(runs / f"labels_{tag}seed{seed}", args.student,
                          [f"train.seed={seed}", *args.gin_param])
            _save(f"distill {tag}labels seed{seed}", {"seed": seed, **student, **record})
        augmented = f"_augment{args.augment}" if args.augment else ""
        name = f"{tag}T{args.T:g}_alpha{args.alpha:g}{augmented}_seed{seed}"
        _reuse_teacher_outputs(runs / f"distilled_{name}", bool(augmented))
        record = _run(runs / f"distilled_{name}", args.student,
                      [f"train.seed={seed}", "train.task='distill'",
                       f"distill.teacher_workdir='{teacher}'", f"distill.temperature={args.T}",
                       f"distill.alpha={args.alpha}", f"distill.augment={args.augment}",
                       *args.gin_param])
        _save(f"distill {name}", {"seed": seed, "alpha": args.alpha, "temperature": args.T,
                                  "augment": args.augment, **student, **record})


def _reuse_teacher_outputs(workdir: Path, augmented: bool) -> None:
    """Copies the teacher's cached logits (and the transfer set, which does not depend on
    the student's seed) from another seed of the same distilled run, so each seed does
    not recompute them."""
    names = [LOGITS, *([TRANSFER, TRANSFER_LOGITS] if augmented else [])]
    stem = workdir.name[: workdir.name.rindex("_seed")]
    for earlier in sorted(workdir.parent.glob(f"{stem}_seed*")):
        if earlier != workdir and all((earlier / n).exists() for n in names):
            workdir.mkdir(parents=True, exist_ok=True)
            for n in names:
                if not (workdir / n).exists():
                    shutil.copy(earlier / n, workdir / n)
            return


def prune(args) -> None:
    runs = Path(args.runs)
    extra = [f"finetune.init_workdir='{args.pretrained}'"] if args.model == "bert" else []
    for sparsity in map(float, args.sparsities.split(",")):
        name = f"{args.model}_sparsity{sparsity:g}"
        record = _run(runs / name, CONFIGS[args.model],
                      [*extra, f"prune.sparsity={sparsity}", *args.gin_param])
        _save(f"prune {name}", {"model": args.model, "target": sparsity, **record})


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def table(args) -> None:
    del args
    results = _load()
    teacher = results.get("distill teacher")
    if teacher:
        print(f"teacher: dev accuracy {teacher['accuracy']:.4f} ({teacher['wall_s']:.0f} s)\n")
        print("| student | seeds | dev accuracy, mean ± std | per seed | wall (s) each |")
        print("| --- | --- | --- | --- | --- |")
        groups: dict[str, list[dict]] = {}
        for key, r in sorted(results.items(), key=lambda item: item[1].get("student", "")):
            if not key.startswith("distill ") or key == "distill teacher":
                continue
            label = f"{r.get('student', 'cbow')}, "
            if "labels seed" in key:
                label += "labels only"
            else:
                label += f"distilled, T={r['temperature']:g}, alpha={r['alpha']:g}"
                if r.get("augment"):
                    label += f", transfer set ({r['augment']} tries an example)"
            groups.setdefault(label, []).append(r)
        for label, rows in groups.items():
            acc = [r["accuracy"] for r in rows]
            print(f"| {label} | {len(rows)} | {_mean_std(acc)} | "
                  f"{', '.join(f'{a:.4f}' for a in acc)} | "
                  f"{statistics.mean(r['wall_s'] for r in rows):.0f} |")
    pruned = sorted((r for k, r in results.items() if k.startswith("prune ")),
                    key=lambda r: (r["model"], r["target"]))
    if pruned:
        print("\n| model | target sparsity | measured | dev accuracy | eval loss | wall (s) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in pruned:
            accuracy = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
            print(f"| {r['model']} | {r['target']:g} | {r.get('sparsity', 0.0):.3f} | "
                  f"{accuracy} | {r['loss']:.4f} | {r['wall_s']:.0f} |")
        _plot(pruned)


def _plot(pruned: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, model, key, label in ((axes[0], "bert", "accuracy", "SST-2 dev accuracy (BERT)"),
                                  (axes[1], "gpt", "loss", "val loss (GPT baby)")):
        rows = [r for r in pruned if r["model"] == model]
        if rows:
            ax.plot([r["target"] for r in rows], [r[key] for r in rows], "o-")
        ax.set_xlabel("kernel sparsity")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "sparsity.png", dpi=120)
    print(f"\nwrote {HERE / 'sparsity.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("distill")
    d.add_argument("--teacher", default=CONFIGS["teacher"])
    d.add_argument("--student", default=CONFIGS["student"])
    d.add_argument("--student_name", default="cbow",
                   help="names the student's runs and records (another student: another name)")
    d.add_argument("--seeds", default="1,2,3")
    d.add_argument("--T", type=float, default=2.0)
    d.add_argument("--alpha", type=float, default=0.5)
    d.add_argument("--augment", type=int, default=0,
                   help="distill.augment: transfer-set sentences tried per training example")
    d.add_argument("--runs", default="runs/compression/distill")
    d.add_argument("--teacher_param", action="append", default=[],
                   help="gin binding for the teacher's run; repeatable")
    p = commands.add_parser("prune")
    p.add_argument("--model", choices=["bert", "gpt"], required=True)
    p.add_argument("--pretrained", default="runs/bert_pretrain_offline")
    p.add_argument("--sparsities", default="0,0.5,0.7,0.9")
    p.add_argument("--runs", default="runs/compression/prune")
    for sub in (d, p):
        sub.add_argument("--gin_param", action="append", default=[],
                         help="gin binding added to every student or pruned run; repeatable")
    commands.add_parser("table")
    args = parser.parse_args()
    {"distill": distill, "prune": prune, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
