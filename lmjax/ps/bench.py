"""Benchmark: the bytes/s the parameter server moves next to the KV store's raw bytes/s.

`python -m lmjax.ps.bench --workdir=DIR` starts a jax_distributed job of 1 server and 1
synchronous worker as processes on 127.0.0.1. First, in the same processes, the raw
store: the worker sets a payload the size of the parameters and the server answers
with one of the same size (set + blocking get, keys deleted as they are read), the
pattern of one push and one pull. Then the parameter server itself for the same number
of rounds, with the model's compute replaced by echoing the parameters so only the transport
path is timed: encoding, status reads, inbox slots, the optax update, publication.
"""

import argparse
import json
import os

import numpy as np

from lmjax.data.config import LMDataConfig
from lmjax.models import GPTConfig
from lmjax.ps.config import PSConfig
from lmjax.ps.roles import RunSpec
from lmjax.ps.worker import param_shapes


def _payload_bytes(spec: RunSpec) -> int:
    return 4 * sum(int(np.prod(s)) for s in param_shapes(spec.model_config).values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--embed_dim", type=int, default=128)
    args = parser.parse_args(argv)
    from lmjax.data.pipelines import load_lm_data
    from lmjax.ps.launch import check_port, supervise

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    data = load_lm_data("tiny_shakespeare", tokenizer_dir=os.path.join(workdir, "tokenizer"))
    model = GPTConfig(vocab_size=data.tokenizer.vocab_size, num_layers=args.num_layers,
                      num_heads=4, embed_dim=args.embed_dim, block_size=64)
    config = PSConfig(model=model, transport="jax_distributed", num_servers=1, num_workers=1,
                      policy="bsp",
                      num_updates=args.updates, batch_size=1, optimizer="sgd",
                      learning_rate=0.0, checkpoint_every=10 * args.updates)
    spec = RunSpec.create(workdir, config, LMDataConfig(), f"127.0.0.1:{check_port(0)}",
                          bench=True)
    path = os.path.join(workdir, "ps_spec.json")
    spec.save(path)
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        os.remove(os.path.join(workdir, "metrics.jsonl"))
    supervise(spec, path)
    return report(workdir, _payload_bytes(spec), args.updates)


def report(workdir: str, size: int, rounds: int) -> dict:
    with open(os.path.join(workdir, "bench_raw.json")) as f:
        raw = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        worker = [r for r in map(json.loads, f) if r["split"] == "worker"][0]
    raw_rate = raw["bytes"] / raw["seconds"]
    ps_rate = (worker["pushed_bytes"] + worker["pulled_bytes"]) / worker["seconds"]
    result = {"payload_bytes": size, "rounds": rounds, "raw_bytes_per_s": raw_rate,
              "ps_bytes_per_s": ps_rate, "ratio": ps_rate / raw_rate}
    print(f"payload {size / 1e6:.2f} MB per push and per pull, {rounds} rounds")
    print(f"raw KV store (set + blocking get):  {raw_rate / 1e6:8.1f} MB/s")
    print(f"parameter server (push + pull):     {ps_rate / 1e6:8.1f} MB/s")
    print(f"ratio: {ps_rate / raw_rate:.2f} (goal: at least 0.70)")
    return result


if __name__ == "__main__":
    main()
