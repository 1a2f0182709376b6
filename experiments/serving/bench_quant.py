"""int8 weight-only quantisation: parameter bytes and eval loss before and after.

The eval loss is over the fixed eval batches the training run used (Tiny Shakespeare,
nanoGPT's val split).

    python experiments/serving/bench_quant.py --workdir=runs/serve
"""

import argparse
import json

from common import DEFAULT_WORKDIR, eval_batches, load

from lmjax.serve import quant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = parser.parse_args()
    loaded = load(args.workdir)
    batches = eval_batches(args.workdir)
    r = quant.report(loaded.task, loaded.params, batches)
    rows = sum(b["inputs"].size for b in batches)
    print(f"model: {args.workdir} (step {loaded.step}); eval over {rows} tokens")
    print(f"fp32 parameters {r['fp32_bytes']:>10,d} bytes   eval loss {r['fp32_eval_loss']:.4f}")
    print(f"int8 parameters {r['int8_bytes']:>10,d} bytes   eval loss {r['int8_eval_loss']:.4f}")
    print(f"bytes ratio int8 / fp32: {r['bytes_ratio']:.1%} (goal <= 30%)")
    print(f"eval-loss change: {r['loss_change_relative']:+.3%} relative (goal < 1%)")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
