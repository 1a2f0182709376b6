"""Benchmark client: Poisson arrivals, heavy-tailed prompt and output lengths, per scheduler.

Drives the engine in this process (default) or a live server (`--url`, streaming
completions, so time to first token is measured at the client). Reports throughput
(requests/s, tokens/s), time to first token (TTFT), time per output token (TPOT) and
mean and p99 job completion time (JCT, arrival to last token), and plots them.

    python experiments/serving/client.py --workdir=runs/serve --schedulers fcfs mlfq
    python experiments/serving/client.py --url=http://127.0.0.1:8000 --rate=20
"""

import argparse
import asyncio
import json
import os
import time

import numpy as np
from common import DEFAULT_WORKDIR, Workload, load, make_workload, percentile, prompts_from_text

HERE = os.path.dirname(os.path.abspath(__file__))


def run_engine(loaded, workload: Workload, prompts: list[str], scheduler: str, slots: int,
               starvation_quanta: float, max_batch: int | None) -> list[dict]:
    """Submits each request at its arrival time to an in-process engine; one record each."""
    from lmjax.serve.generate import SamplingParams
    from lmjax.serve.server import build_engine

    engine = build_engine(loaded, slots=slots, scheduler="fcfs", max_jobs=100_000,
                          quantize="none", max_batch=max_batch)
    base = max(engine.estimate_prefill(1), engine.decode_seconds)
    from lmjax.serve.scheduler import make_scheduler

    engine.scheduler = make_scheduler(scheduler, base_quantum=base,
                                      starvation=starvation_quanta * base)
    engine.start()
    jobs, start = [], time.perf_counter()
    for i, (at, prompt) in enumerate(zip(workload.arrivals, prompts, strict=True)):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        ids = [int(t) for t in loaded.tokenizer.encode(prompt)]
        opts = SamplingParams(max_new_tokens=int(workload.output_lengths[i]), temperature=0.8,
                              seed=i)
        jobs.append(engine.submit(ids, opts))
    for job in jobs:
        job.done.wait()
    engine.stop()
    print(f"{scheduler}: {engine.stats.preemptions} preemptions, {engine.stats.swaps_out} swaps "
          f"to host, {engine.stats.swaps_in} back")
    return [{"arrival": j.arrival - start, "first": j.first_token_time - j.arrival,
             "jct": j.finish_time - j.arrival, "tokens": len(j.out),
             "finish": j.finish_time - start} for j in jobs]


async def _one_http(client, url, prompt, max_tokens, seed, start, at) -> dict:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    sent = time.perf_counter()
    first, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter()
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"arrival": sent - start, "first": first - sent, "jct": end - sent, "tokens": tokens,
            "finish": end - start}


def run_server(url: str, workload: Workload, prompts: list[str], api_key: str | None):
    import httpx

    async def main():
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=1000)
        async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
            start = time.perf_counter()
            return await asyncio.gather(*(
                _one_http(client, url, p, int(n), i, start, float(at)) for i, (p, n, at) in
                enumerate(zip(prompts, workload.output_lengths, workload.arrivals, strict=True))))

    return asyncio.run(main())


def summarize(records: list[dict]) -> dict:
    wall = max(r["finish"] for r in records) - min(r["arrival"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    tpot = [(r["jct"] - r["first"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    jct = [r["jct"] for r in records]
    return {"requests_per_s": len(records) / wall, "tokens_per_s": tokens / wall,
            "ttft_mean": float(np.mean([r["first"] for r in records])),
            "ttft_p99": percentile([r["first"] for r in records], 99),
            "tpot_mean": float(np.mean(tpot)), "jct_mean": float(np.mean(jct)),
            "jct_p99": percentile(jct, 99)}


def plot(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, records in results.items():
        jct = np.sort([r["jct"] for r in records])
        ax1.plot(jct, np.arange(1, len(jct) + 1) / len(jct), label=name)
        ax2.scatter([r["tokens"] for r in records], [r["jct"] for r in records], s=8,
                    label=name, alpha=0.7)
    ax1.set(xscale="log", xlabel="job completion time (s)", ylabel="fraction of jobs",
            title="JCT distribution")
    ax2.set(xscale="log", yscale="log", xlabel="output tokens", ylabel="JCT (s)",
            title="JCT by job length")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(summaries: dict[str, dict]) -> None:
    print("| scheduler | req/s | tokens/s | TTFT mean (s) | TTFT p99 (s) | TPOT mean (ms) | "
          "JCT mean (s) | JCT p99 (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in summaries.items():
        print(f"| {name} | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.0f} | "
              f"{s['ttft_mean']:.3f} | {s['ttft_p99']:.3f} | {1000 * s['tpot_mean']:.1f} | "
              f"{s['jct_mean']:.2f} | {s['jct_p99']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--url", default=None, help="a live server instead of the engine")
    parser.add_argument("--api_key", default=None)
    parser.add_argument("--schedulers", nargs="+", default=["fcfs", "mlfq"])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s (default: --load times the measured capacity)")
    parser.add_argument("--load", type=float, default=1.5,
                        help="offered work over the engine's capacity (see _rate_for_load)")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--starvation_quanta", type=float, default=5000.0,
                        help="MLFQ starvation threshold in base quanta")
    parser.add_argument("--max_batch", type=int, default=None,
                        help="jobs run per iteration (default: --slots)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt_min", type=int, default=8)
    parser.add_argument("--prompt_max", type=int, default=64)
    parser.add_argument("--output_min", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=os.path.join(HERE, "jct.png"))
    args = parser.parse_args()
    loaded = load(args.workdir)
    text = "".join(loaded.tokenizer.decode(row) for b in loaded.eval_batches
                   for row in b["inputs"])
    rate = args.rate or _rate_for_load(loaded, args)
    workload = make_workload(args.requests, rate, args.seed, **_lengths(args, loaded))
    prompts = prompts_from_text(text, workload.prompt_lengths, args.seed)
    print(f"{args.requests} requests, Poisson rate {rate:.2f}/s; prompt length mean "
          f"{workload.prompt_lengths.mean():.0f} (max {workload.prompt_lengths.max()}), output "
          f"length mean {workload.output_lengths.mean():.0f} (median "
          f"{np.median(workload.output_lengths):.0f}, max {workload.output_lengths.max()})")
    results, summaries = {}, {}
    for repeat in range(args.repeats):  # schedulers alternate, so load drifts hit both
        for name in args.schedulers if args.url is None else ["server"]:
            if args.url is None:
                records = run_engine(loaded, workload, prompts, name, args.slots,
                                     args.starvation_quanta, args.max_batch)
            else:
                records = run_server(args.url, workload, prompts, args.api_key)
            results.setdefault(name, records)
            summaries[f"{name} #{repeat + 1}"] = summarize(records)
    print_table(summaries)
    for repeat in range(args.repeats):
        f, m = summaries.get(f"fcfs #{repeat + 1}"), summaries.get(f"mlfq #{repeat + 1}")
        if f and m:
            print(f"run {repeat + 1}: mlfq / fcfs mean JCT {m['jct_mean'] / f['jct_mean']:.2f} "
                  f"(goal <= 0.5), p99 JCT {m['jct_p99'] / f['jct_p99']:.2f}")
    plot(results, args.plot)
    print(f"plot: {args.plot}")


def _lengths(args, loaded) -> dict:
    return {"prompt_min": args.prompt_min, "prompt_max": args.prompt_max,
            "output_min": args.output_min, "output_max": loaded.model.config.block_size // 2}


def _rate_for_load(loaded, args) -> float:
    """Requests/s that keep the engine `load` busy: a request costs its prefill (measured
    cost model) plus its share of the decode steps (one step serves every slot)."""
    from lmjax.serve.server import build_engine

    engine = build_engine(loaded, slots=args.slots, scheduler="fcfs", max_jobs=1,
                          quantize="none", max_batch=args.max_batch)
    w = make_workload(10_000, 1.0, args.seed + 1, **_lengths(args, loaded))
    prefill = np.mean([engine.estimate_prefill(int(n)) for n in w.prompt_lengths[:1000]])
    per_request = prefill + w.output_lengths.mean() * engine.decode_seconds / engine.max_batch
    print(f"decode step {1000 * engine.decode_seconds:.1f} ms for {args.slots} slots, mean "
          f"prefill {1000 * prefill:.1f} ms: capacity {1 / per_request:.1f} requests/s")
    return args.load / per_request


if __name__ == "__main__":
    main()
