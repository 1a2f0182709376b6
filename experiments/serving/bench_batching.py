"""Continuous batching against serving one request at a time, same requests, same engine.

Closed loop: `--concurrency` clients each send their next request as soon as the last
one finishes, to an engine with that many decode slots; the reference is one client and
one slot. Prompt lengths are heavy-tailed (common.make_workload); every request asks
for `--new_tokens` tokens, so the run measures throughput rather than one long job's tail.

    python experiments/serving/bench_batching.py --workdir=runs/serve --concurrency=16
"""

import argparse
import threading
import time

import numpy as np
from common import DEFAULT_WORKDIR, eval_text, load, make_workload, prompts_from_text

from lmjax.serve.generate import SamplingParams
from lmjax.serve.server import build_engine


def serve_closed_loop(loaded, requests, concurrency: int, scheduler: str) -> tuple[float, int]:
    """(seconds, tokens) to serve `requests` with `concurrency` clients and slots."""
    engine = build_engine(loaded, slots=concurrency, scheduler=scheduler, max_jobs=10_000,
                          quantize="none")
    engine.start()
    pending = list(enumerate(requests))
    lock, tokens = threading.Lock(), []

    def client():
        while True:
            with lock:
                if not pending:
                    return
                i, (ids, n) = pending.pop(0)
            job = engine.submit(ids, SamplingParams(max_new_tokens=n, temperature=0.8, seed=i))
            job.done.wait()
            with lock:
                tokens.append(len(job.out))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    engine.stop()
    return seconds, sum(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--scheduler", default="fcfs")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    loaded = load(args.workdir)
    text = eval_text(args.workdir, loaded.tokenizer)
    w = make_workload(args.requests, 1.0, args.seed, output_max=256)
    prompts = prompts_from_text(text, w.prompt_lengths, args.seed)
    requests = [([int(t) for t in loaded.tokenizer.encode(p)], args.new_tokens)
                for p in prompts]
    print(f"{args.requests} requests: prompt length mean {w.prompt_lengths.mean():.0f} (max "
          f"{w.prompt_lengths.max()}), {args.new_tokens} new tokens each; {args.scheduler}")
    rows = {}
    for name, concurrency in (("one at a time", 1), (f"concurrency {args.concurrency}",
                                                     args.concurrency)):
        seconds, tokens = serve_closed_loop(loaded, requests, concurrency, args.scheduler)
        rows[name] = tokens / seconds
        print(f"{name:16s} {seconds:7.2f} s  {tokens} tokens  {tokens / seconds:7.1f} tokens/s  "
              f"{args.requests / seconds:6.2f} requests/s")
    ratio = np.divide(*list(rows.values())[::-1])
    print(f"throughput ratio batched / one at a time: {ratio:.1f}x (goal >= 4x)")


if __name__ == "__main__":
    main()
