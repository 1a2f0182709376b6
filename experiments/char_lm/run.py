"""Character LMs on Tiny Shakespeare at matched parameter count and matched wall time.

    python experiments/char_lm/run.py --budget=300 [--models=lstm,gru,gpt]
    python experiments/char_lm/run.py --table   # results.json's table, replotted

LSTM (char-rnn's 2x128, `configs/experiments/char_lstm.gin`), GRU (2 layers of 148,
the same parameter count, `char_gru.gin`) and the training stack's GPT (3 layers, 88
wide, 4 heads, block 128; about the same parameter count) each train for about
`--budget` seconds: a 30-step calibration run measures tokens/s, and the step count is
set from it (the cosine schedule decays over exactly those steps). Reports the final
val loss, tokens/s of the training loop and the parameter count; writes results.json
and loss.png next to this script.

Val loss: the RNNs read nanoGPT's whole val split as 50 contiguous streams with the
carried state (every token once, with all preceding context of its stream); the GPT
averages over 20 fixed batches of random 128-token windows (the GPT recipe's eval),
where early positions see little context. The two protocols are close but not identical.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import REPO, records, train  # noqa: E402

HERE = Path(__file__).resolve().parent
GPT_PARAMS = ["GPTConfig.num_layers=3", "GPTConfig.embed_dim=88", "GPTConfig.num_heads=4",
              "GPTConfig.block_size=128", "GPTConfig.dropout=0.0", "train.batch_size=32",
              "train.learning_rate=2e-3", "train.min_lr=2e-4", "train.warmup_steps=50",
              "train.eval_batches=20", "train.log_every=50", "mesh.cpu_devices=1"]
TOKENS_PER_STEP = {"lstm": 50 * 50, "gru": 50 * 50, "gpt": 32 * 128}  # streams x length
MODELS = {
    "lstm": ("configs/experiments/char_lstm.gin", []),
    "gru": ("configs/experiments/char_gru.gin", ["RNNConfig.hidden_dim=148"]),
    "gpt": ("configs/experiments/shakespeare_char_baby.gin", GPT_PARAMS),
}


def param_count(workdir: Path) -> int:
    from lmjax.train.checkpoint import Checkpointer

    saver = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    meta = saver.manager.item_metadata(saver.latest_step())["state"]["params"]
    saver.close()
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(meta)))


def run(name: str, budget: float, root: Path) -> dict:
    gin_file, params = MODELS[name]
    probe = root / f"{name}_probe"
    shutil.rmtree(probe, ignore_errors=True)
    train(probe, gin_file, params + ["train.num_steps=30", "train.log_every=10",
                                      "train.eval_every=1000", "train.checkpoint_every=1000"])
    rate = records(probe, "train")[-1]["tokens_per_sec"]  # steps 21-30: compiled, warm
    steps = max(100, int(budget * rate / TOKENS_PER_STEP[name]))
    workdir = root / name
    shutil.rmtree(workdir, ignore_errors=True)
    every = max(steps // 5, 1)
    wall = train(workdir, gin_file, params + [
        f"train.num_steps={steps}", f"train.eval_every={every}",
        f"train.checkpoint_every={steps}"])
    train_records, evals = records(workdir, "train"), records(workdir, "eval")
    rates = [r["tokens_per_sec"] for r in train_records[1:]]
    return {"model": name, "steps": steps, "wall_s": wall, "params": param_count(workdir),
            "val_loss": evals[-1]["loss"], "tokens_per_sec": float(np.median(rates)),
            "curve": [(r["step"], r["loss"]) for r in evals]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300, help="seconds of training")
    parser.add_argument("--models", default="lstm,gru,gpt")
    parser.add_argument("--root", default="runs/char_lm")
    parser.add_argument("--table", action="store_true",
                        help="only print the table of results.json (and replot)")
    args = parser.parse_args()
    if args.table:
        results = json.loads((HERE / "results.json").read_text())
    else:
        results = [run(name, args.budget, REPO / args.root) for name in args.models.split(",")]
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
        (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| model | parameters | steps | tokens seen | val loss | tokens/s (training loop) | "
          "wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        seen = r["steps"] * TOKENS_PER_STEP[r["model"]]
        print(f"| {r['model']} | {r['params']:,} | {r['steps']:,} | {seen / 1e6:.1f} M | "
              f"{r['val_loss']:.4f} | {r['tokens_per_sec']:,.0f} | {r['wall_s']:.0f} |")
    plot(results)


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        steps, losses = zip(*r["curve"], strict=True)
        fraction = [s / r["steps"] for s in steps]  # of the shared wall-time budget
        ax.plot(fraction, losses, marker="o", label=f"{r['model']} ({r['params']:,} params)")
    ax.set_xlabel("fraction of the wall-time budget")
    ax.set_ylabel("val loss (nats/char)")
    ax.set_title("Tiny Shakespeare: matched parameters and wall time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "loss.png", dpi=100)


if __name__ == "__main__":
    main()
