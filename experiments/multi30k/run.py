"""Multi30k En->De: train (optionally), then score greedy and beam-search translations of
val and test_2016_flickr with sacreBLEU, and plot the loss/BLEU curve.

    python experiments/multi30k/run.py --workdir=runs/multi30k_en_de --train
    python experiments/multi30k/run.py --workdir=runs/multi30k_en_de   # evaluate only

Writes results.json, results.md (the table and example translations) and curve.png
next to this script (or to --out).
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from common import REPO, records, train  # noqa: E402

SPLITS = ("val", "test_2016_flickr")
CONFIG = "configs/experiments/multi30k_en_de.gin"


def machine() -> str:
    import jax

    device = jax.devices()[0]
    kind = device.device_kind if device.platform != "cpu" else platform.processor() or "CPU"
    return f"{device.platform}: {kind}, {os.cpu_count()} CPU cores"


def load(workdir: Path):
    from lmjax import configs
    from lmjax.data.config import TranslationDataConfig
    from lmjax.serve.translate import load_best
    from lmjax.train.config import TrainConfig

    configs.parse([str(workdir / "config.gin")], [])
    return load_best(str(workdir), configs.bound(TrainConfig), configs.bound(TranslationDataConfig))


def score_split(loaded, stem: str, beams: tuple[int, ...], alpha: float) -> dict:
    from lmjax.serve.translate import translate_lines
    from lmjax.train.text_metrics import translation_scores

    folder = Path(os.environ.get("LMJAX_DATA_DIR", REPO.parent / "shared" / "data")) / "multi30k"
    src, tgt = loaded.pair
    sources = (folder / f"{stem}.{src}").read_text("utf-8").splitlines()
    references = (folder / f"{stem}.{tgt}").read_text("utf-8").splitlines()
    out = {}
    for beam in beams:
        start = time.perf_counter()
        hyps = translate_lines(loaded, sources, beam=beam, alpha=alpha, name=stem)
        seconds = time.perf_counter() - start
        out[f"beam{beam}"] = {**translation_scores(hyps, references), "seconds": seconds,
                              "examples": [{"source": s, "reference": r, "hypothesis": h}
                                           for s, r, h in zip(sources[:5], references[:5],
                                                              hyps[:5], strict=True)]}
    return out


def plot(workdir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows, evals = records(workdir, "train"), records(workdir, "eval")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in train_rows], [r["nll"] for r in train_rows], label="train NLL")
    left.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="val NLL")
    left.set_xlabel("step")
    left.set_ylabel("loss (nats/token)")
    left.legend()
    bleu = [r for r in evals if "bleu" in r]
    right.plot([r["step"] for r in bleu], [r["bleu"] for r in bleu], "o-",
               label="val BLEU (greedy, cased sacreBLEU)")
    right.set_xlabel("step")
    right.set_ylabel("BLEU")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(results: dict) -> str:
    rows = ["| split | decoding | BLEU (cased) | BLEU (lowercased) | chrF | seconds |",
            "| --- | --- | --- | --- | --- | --- |"]
    for stem, by_beam in results["splits"].items():
        for name, s in by_beam.items():
            rows.append(f"| {stem} | {'greedy' if name == 'beam1' else name} | {s['bleu']:.2f} "
                        f"| {s['bleu_lc']:.2f} | {s['chrf']:.2f} | {s['seconds']:.0f} |")
    first = next(iter(next(iter(results["splits"].values())).values()))
    rows += ["", f"BLEU signature: `{first['bleu_signature']}`",
             f"lowercased: `{first['bleu_lc_signature']}`",
             f"chrF signature: `{first['chrf_signature']}`"]
    return "\n".join(rows)


def examples(results: dict, beam: int) -> str:
    test = results["splits"]["test_2016_flickr"]
    lines = []
    for i, ex in enumerate(test[f"beam{beam}"]["examples"]):
        lines += [f"- source: {ex['source']}", f"  - reference: {ex['reference']}",
                  f"  - greedy: {test['beam1']['examples'][i]['hypothesis']}",
                  f"  - beam {beam}: {ex['hypothesis']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--train", action="store_true", help="train first (timed)")
    parser.add_argument("--gin_file", default=CONFIG)
    parser.add_argument("--gin_param", action="append", default=[],
                        help="a binding for training; repeatable")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.6)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    timing = args.workdir / "train_time.json"
    if args.train:
        seconds = train(args.workdir, args.gin_file, args.gin_param)
        args.workdir.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps({"seconds": seconds, "machine": machine()}))
    loaded = load(args.workdir)
    results = {"workdir": str(args.workdir), "step": loaded.step, "beam": args.beam,
               "length_penalty": args.alpha,
               "training": json.loads(timing.read_text()) if timing.exists() else None,
               "splits": {stem: score_split(loaded, stem, (1, args.beam), args.alpha)
                          for stem in SPLITS}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    report = f"{table(results)}\n\nExamples (test_2016_flickr):\n\n{examples(results, args.beam)}\n"
    (args.out / "results.md").write_text(report)
    plot(args.workdir, args.out / "curve.png")
    print(report)


if __name__ == "__main__":
    main()
