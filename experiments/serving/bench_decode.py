"""KV-cached decoding against recomputing the whole window for every new token.

Recomputation is the generation `sample` used before the cache (nanoGPT's `generate`):
each token runs the model over a fixed (1, block) window. Both are compiled once and
warmed up; the ratio is measured in the same run.

    python experiments/serving/bench_decode.py --workdir=runs/serve --new_tokens=256
"""

import argparse
import functools
import time

import jax
import numpy as np
from common import DEFAULT_WORKDIR, eval_batches, load

from lmjax.serve.generate import Decoder, SamplingParams, generate


def recompute(model, params, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy, one full forward pass over the (1, block) window per token."""
    block = model.config.block_size

    @functools.partial(jax.jit)
    def next_token(params, window, length):
        return jax.numpy.argmax(model.apply({"params": params}, window)[0, length - 1])

    tokens = list(prompt)
    for _ in range(new_tokens):
        context = tokens[-block:]
        window = np.zeros((1, block), np.int32)
        window[0, : len(context)] = context
        tokens.append(int(next_token(params, window, len(context))))
    return tokens[len(prompt):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load(args.workdir)
    text = loaded.tokenizer.decode(eval_batches(args.workdir)[0]["inputs"][0])
    prompt = [int(i) for i in loaded.tokenizer.encode(text[: args.prompt_tokens])]
    decoder = Decoder(loaded.task.model)
    opts = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)

    def cached():
        return generate(decoder, loaded.params, [prompt], opts)[0].tokens

    def full():
        return recompute(loaded.task.model, loaded.params, prompt, args.new_tokens)

    times = {}
    outputs = {}
    for name, fn in (("kv_cache", cached), ("recompute", full)):
        outputs[name] = fn()  # compile and warm up
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        times[name] = min(runs)
    agree = sum(a == b for a, b in zip(outputs["kv_cache"], outputs["recompute"], strict=True))
    print(f"model: {args.workdir} (block {loaded.task.config.block_size}), prompt "
          f"{len(prompt)} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    for name, seconds in times.items():
        print(f"{name:10s} {seconds:8.3f} s  {args.new_tokens / seconds:8.1f} tokens/s")
    print(f"greedy tokens identical: {agree}/{args.new_tokens}")
    print(f"speedup kv_cache / recompute: {times['recompute'] / times['kv_cache']:.1f}x "
          "(goal >= 10x)")


if __name__ == "__main__":
    main()
