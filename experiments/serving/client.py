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
import dataclasses
import json
import os
import time

import numpy as np
from common import (
    DEFAULT_WORKDIR,
    Workload,
    eval_text,
    load,
    make_workload,
    percentile,
    prompts_from_text,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def make_engine(loaded, slots: int, max_batch: int | None):
    """One compiled, timed engine, reused by every run (runs differ in scheduler and clock)."""
    from lmjax.serve.server import build_engine

    return build_engine(loaded, slots=slots, scheduler="fcfs", max_jobs=100_000,
                        quantize="none", max_batch=max_batch)


def _reset(engine, scheduler: str, clock, args) -> None:
    from lmjax.serve.engine import EngineStats
    from lmjax.serve.scheduler import make_scheduler

    assert not engine.pending() and engine.slots_in_use() == 0
    engine.clock, engine.stats = clock, EngineStats()
    base = max(engine.estimate_prefill(1), engine.estimate_decode(1))
    engine.scheduler = make_scheduler(scheduler, base_quantum=base, num_queues=args.queues,
                                      starvation=args.starvation_quanta * base)


def _options(workload: Workload, i: int):
    from lmjax.serve.generate import SamplingParams

    return SamplingParams(max_new_tokens=int(workload.output_lengths[i]), temperature=0.8,
                          seed=i)


def run_engine(engine, loaded, workload: Workload, prompts: list[str], scheduler: str,
               args, modelled: bool) -> tuple[list[dict], dict]:
    """Submits each request at its arrival time to the in-process engine; one record each.

    modelled: time is the engine's CostClock (each prefill, decode step and swap costs
    what warmup measured), so the run is deterministic and the machine's load cannot
    touch it; otherwise wall-clock time with the engine in its own thread.
    """
    from lmjax.serve.engine import CostClock

    ids = [[int(t) for t in loaded.tokenizer.encode(p)] for p in prompts]
    jobs = []
    if modelled:
        clock = CostClock(engine.costs)
        _reset(engine, scheduler, clock, args)
        i, n = 0, len(prompts)
        while i < n or engine.pending():
            while i < n and workload.arrivals[i] <= clock.now:
                jobs.append(engine.submit(ids[i], _options(workload, i),
                                          arrival=float(workload.arrivals[i])))
                i += 1
            if not engine.step() and i < n:
                clock.now = max(clock.now, float(workload.arrivals[i]))  # idle until then
        start = 0.0
    else:
        _reset(engine, scheduler, time.perf_counter, args)
        engine.start()
        start = time.perf_counter()
        for i, at in enumerate(workload.arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            jobs.append(engine.submit(ids[i], _options(workload, i), arrival=start + float(at)))
        for job in jobs:
            job.done.wait()
        engine.stop()
    end = max(j.finish_time for j in jobs)
    stats = {"preemptions": engine.stats.preemptions, "swaps_out": engine.stats.swaps_out,
             "swaps_in": engine.stats.swaps_in,
             "busy": engine.stats.busy / (end - min(j.arrival for j in jobs)),
             "slowdown": engine.stats.busy / engine.stats.modelled}
    return [{"arrival": j.arrival - start, "first": j.first_token_time - j.arrival,
             "jct": j.finish_time - j.arrival, "tokens": len(j.out),
             "finish": j.finish_time - start} for j in jobs], stats


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


def summarize(records: list[dict], stats: dict | None = None) -> dict:
    wall = max(r["finish"] for r in records) - min(r["arrival"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    tpot = [(r["jct"] - r["first"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    jct = [r["jct"] for r in records]
    return {"requests_per_s": len(records) / wall, "tokens_per_s": tokens / wall,
            "ttft_mean": float(np.mean([r["first"] for r in records])),
            "ttft_p99": percentile([r["first"] for r in records], 99),
            "tpot_mean": float(np.mean(tpot)), "jct_mean": float(np.mean(jct)),
            "jct_p99": percentile(jct, 99), **(stats or {})}


def plot(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, records in results.items():
        jct = np.sort([r["jct"] for r in records])
        ax1.plot(jct, np.arange(1, len(jct) + 1) / len(jct), label=name)
        ax2.scatter([r["tokens"] for r in records], [r["jct"] for r in records], s=5,
                    label=name, alpha=0.5)
    ax1.set(xscale="log", xlabel="job completion time (s)", ylabel="fraction of jobs",
            title="JCT distribution")
    ax2.set(xscale="log", yscale="log", xlabel="output tokens", ylabel="JCT (s)",
            title="JCT by job length")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(summaries: dict[str, dict]) -> None:
    print("| run | req/s | tokens/s | TTFT mean (s) | TTFT p99 (s) | TPOT mean (ms) | "
          "JCT mean (s) | JCT p99 (s) | load | busy | preemptions | swaps out |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in summaries.items():
        print(f"| {name} | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.0f} | "
              f"{s['ttft_mean']:.3f} | {s['ttft_p99']:.3f} | {1000 * s['tpot_mean']:.1f} | "
              f"{s['jct_mean']:.2f} | {s['jct_p99']:.2f} | {s.get('load', float('nan')):.2f} | "
              f"{s.get('busy', float('nan')):.2f} | "
              f"{s.get('preemptions', '-')} | "
              f"{s.get('swaps_out', '-')} |")


def print_ratios(summaries: dict[str, dict]) -> list[dict]:
    """MLFQ over FCFS for each pair of runs on the same trace and clock."""
    ratios = []
    for name, f in summaries.items():
        if not name.startswith("fcfs"):
            continue
        m = summaries.get("mlfq" + name[4:])
        if m:
            r = {"runs": name[5:], "jct_mean": m["jct_mean"] / f["jct_mean"],
                 "jct_p99": m["jct_p99"] / f["jct_p99"]}
            ratios.append(r)
            print(f"{r['runs']}: mlfq / fcfs mean JCT {r['jct_mean']:.2f} (goal <= 0.5), "
                  f"p99 JCT {r['jct_p99']:.2f}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--url", default=None, help="a live server instead of the engine")
    parser.add_argument("--api_key", default=None)
    parser.add_argument("--schedulers", nargs="+", default=["fcfs", "mlfq"])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s (default: --load times the measured capacity)")
    parser.add_argument("--load", type=float, default=0.95,
                        help="offered load rho: arrival rate times the mean work per request "
                             "over the capacity (see _work)")
    parser.add_argument("--slots", type=int, default=16, help="KV cache rows")
    parser.add_argument("--max_batch", type=int, default=4,
                        help="jobs run per decode step (default 4; at most --slots)")
    parser.add_argument("--queues", type=int, default=8, help="MLFQ queues")
    parser.add_argument("--starvation_quanta", type=float, default=5000.0,
                        help="MLFQ starvation threshold in base quanta")
    parser.add_argument("--repeats", type=int, default=2, help="wall-clock runs per scheduler")
    parser.add_argument("--modelled_seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="traces run on the deterministic cost clock (one run each)")
    parser.add_argument("--prompt_min", type=int, default=8)
    parser.add_argument("--prompt_max", type=int, default=64)
    parser.add_argument("--output_min", type=int, default=4)
    parser.add_argument("--output_max", type=int, default=None,
                        help="default: the context left after the longest prompt")
    parser.add_argument("--alpha", type=float, default=1.1, help="Pareto shape of lengths")
    parser.add_argument("--seed", type=int, default=0, help="the wall-clock runs' trace")
    parser.add_argument("--plot", default=os.path.join(HERE, "jct.png"))
    parser.add_argument("--json", default=None, help="write every summary here")
    parser.add_argument("--costs", default=None,
                        help="take the cost model (prefill, decode step, swaps) from this "
                             "--json output instead of measuring it: modelled runs repeat "
                             "exactly")
    parser.add_argument("--concurrent", action="store_true",
                        help="wall clock only: run the schedulers at the same time, each in "
                             "its own process on its own core, --repeats times (cores swap)")
    args = parser.parse_args()
    if args.concurrent:
        if args.url is not None:
            parser.error("--concurrent drives engines in this machine's processes, not --url")
        return run_concurrent(args)
    loaded = load(args.workdir)
    text = eval_text(args.workdir, loaded.tokenizer)
    lengths = _lengths(args, loaded)
    results, summaries = {}, {}
    if args.url is not None:
        workload = make_workload(args.requests, args.rate or 10.0, args.seed, **lengths)
        prompts = prompts_from_text(text, workload.prompt_lengths, args.seed)
        for repeat in range(args.repeats):
            records = run_server(args.url, workload, prompts, args.api_key)
            results.setdefault("server", records)
            summaries[f"server #{repeat + 1}"] = summarize(records)
        print_table(summaries)
        plot(results, args.plot)
        return

    engine = make_engine(loaded, args.slots, args.max_batch)
    if args.costs:
        from lmjax.serve.engine import Costs

        with open(args.costs) as f:
            saved = json.load(f)["costs"]
        engine.costs = Costs(**{k: {int(w): t for w, t in v.items()} if isinstance(v, dict)
                                else v for k, v in saved.items()})
    c = engine.costs
    print(f"costs (ms): decode step of {engine.max_batch} rows reading "
          + ", ".join(f"{w}: {1000 * t:.2f}" for w, t in c.decode.items()) + "; prefill "
          + ", ".join(f"{w}: {1000 * t:.2f}" for w, t in c.prefill.items()) + "; swap out+in "
          + ", ".join(f"{w}: {1000 * (c.swap_out[w] + c.swap_in[w]):.2f}" for w in c.swap_out))
    order = [(seed, True) for seed in args.modelled_seeds] + [
        (args.seed, False)] * args.repeats
    counts, loads = {}, {}
    for seed, modelled in order:  # schedulers alternate, so load drifts hit both
        unit = make_workload(args.requests, 1.0, seed, **lengths)
        prompts = prompts_from_text(text, unit.prompt_lengths, seed)
        capacity = 1.0 / _work(engine, unit)
        overhead = 1.0 if modelled else _overhead(engine, loaded, text, args, lengths, unit,
                                                  prompts, capacity)
        rate = args.rate or args.load * capacity / overhead
        workload = Workload(unit.arrivals / rate, unit.prompt_lengths, unit.output_lengths)
        label = f"modelled seed {seed}" if modelled else "wall"
        if seed not in loads:
            _describe(workload)
        loads[seed] = True
        print(f"{label}: capacity {capacity:.2f} requests/s on the cost clock (this trace's "
              f"mean work per request); wall clock runs {overhead:.2f}x the modelled time; "
              f"offered load {args.load} -> {rate:.2f} requests/s", flush=True)
        for name in args.schedulers:
            counts[(name, label)] = counts.get((name, label), 0) + 1
            key = f"{name} {label}" + ("" if modelled else f" #{counts[(name, label)]}")
            t = time.perf_counter()
            records, stats = run_engine(engine, loaded, workload, prompts, name, args, modelled)
            # the load the trace really offered: its work at the speed this run really had
            offered = rate / capacity * stats["slowdown"]
            summaries[key] = summarize(records, {**stats, "rate": rate, "overhead": overhead,
                                                 "load": offered})
            results.setdefault(f"{name} {label}", records)
            print(f"{key}: {time.perf_counter() - t:.0f} s, JCT mean "
                  f"{summaries[key]['jct_mean']:.3f} p99 {summaries[key]['jct_p99']:.3f}, "
                  f"{stats}", flush=True)
    print_table(summaries)
    ratios = print_ratios(summaries)
    first = {k: v for k, v in results.items() if "modelled" not in k}  # run 1 of each
    plot(first or {k: v for k, v in results.items()
                   if k.endswith(f"seed {args.modelled_seeds[0]}")}, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "costs": dataclasses.asdict(c),
                       "summaries": summaries, "ratios": ratios}, f, indent=1)


def run_concurrent(args) -> None:
    """The schedulers side by side on the wall clock: each in its own process pinned to its
    own core, on the same trace with the same arrival times. This VM's speed drifts by
    20-40% within minutes, so schedulers run one after the other meet different loads;
    side by side they meet the same drift. Repeats rotate which core runs which."""
    import multiprocessing

    cores = sorted(os.sched_getaffinity(0))
    names = args.schedulers
    if len(names) > len(cores):
        raise SystemExit(f"--concurrent runs each scheduler on its own core: {len(names)} "
                         f"schedulers but only {len(cores)} cores")
    context = multiprocessing.get_context("spawn")  # a fresh JAX per process and core
    pipes = []
    for core in cores[: len(names)]:
        ours, theirs = context.Pipe()
        context.Process(target=_concurrent_worker, args=(core, args, theirs),
                        daemon=True).start()
        theirs.close()  # so that a worker's death ends our reads
        pipes.append(ours)
    try:
        _side_by_side(args, names, pipes)
    except (EOFError, ConnectionError):
        raise SystemExit("a side-by-side worker process died (its error is above)") from None


def _side_by_side(args, names: list[str], pipes) -> None:
    results, summaries, ratios = {}, {}, []
    for repeat in range(args.repeats):
        for pipe in pipes:
            pipe.send("calibrate")
        measured = [pipe.recv() for pipe in pipes]  # (capacity, wall / modelled time)
        rate = args.rate or args.load * float(np.mean([c / o for c, o in measured]))
        print(f"pair #{repeat + 1}: capacity " + ", ".join(
            f"{c:.2f} requests/s at {o:.2f}x modelled time" for c, o in measured)
            + f" -> {rate:.2f} requests/s", flush=True)
        shift = repeat % len(names)
        order = names[shift:] + names[:shift]
        start = time.time() + 1.0
        for pipe, name in zip(pipes, order, strict=True):
            pipe.send((name, rate, start))
        keys = []
        for pipe, name, (capacity, overhead) in zip(pipes, order, measured, strict=True):
            records, stats = pipe.recv()
            key = f"{name} side by side #{repeat + 1} (core {stats['core']})"
            summaries[key] = summarize(records, {**stats, "rate": rate, "overhead": overhead,
                                                "load": rate / capacity * stats["slowdown"]})
            results.setdefault(name, records)
            keys.append(key)
        first, second = (summaries[k] for k in sorted(keys))
        ratios.append({"runs": f"side by side #{repeat + 1}",
                       "jct_mean": second["jct_mean"] / first["jct_mean"],
                       "jct_p99": second["jct_p99"] / first["jct_p99"]})
        print(f"pair #{repeat + 1}: {sorted(keys)[1]} / {sorted(keys)[0]} mean JCT "
              f"{ratios[-1]['jct_mean']:.2f}, p99 {ratios[-1]['jct_p99']:.2f}", flush=True)
    for pipe in pipes:
        pipe.send(None)
    print_table(summaries)
    plot(results, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summaries": summaries, "ratios": ratios}, f,
                      indent=1)


def _concurrent_worker(core: int, args, pipe) -> None:
    """One side of `run_concurrent`: calibrates or runs one scheduler when told to."""
    os.sched_setaffinity(0, {core})  # before JAX starts: its thread pools fit one core
    loaded = load(args.workdir)
    engine = make_engine(loaded, args.slots, args.max_batch)
    text, lengths = eval_text(args.workdir, loaded.tokenizer), _lengths(args, loaded)
    unit = make_workload(args.requests, 1.0, args.seed, **lengths)
    prompts = prompts_from_text(text, unit.prompt_lengths, args.seed)
    capacity = 1.0 / _work(engine, unit)
    while (message := pipe.recv()) is not None:
        if message == "calibrate":
            pipe.send((capacity, _overhead(engine, loaded, text, args, lengths, unit,
                                           prompts, capacity)))
            continue
        name, rate, start = message
        workload = Workload(unit.arrivals / rate, unit.prompt_lengths, unit.output_lengths)
        time.sleep(max(0.0, start - time.time()))
        records, stats = run_engine(engine, loaded, workload, prompts, name, args, False)
        pipe.send((records, {**stats, "core": core}))


def _describe(w: Workload) -> None:
    o = w.output_lengths
    print(f"{len(o)} requests; prompt length mean {w.prompt_lengths.mean():.0f} (max "
          f"{w.prompt_lengths.max()}), output length mean {o.mean():.0f} (median "
          f"{np.median(o):.0f}, p99 {np.percentile(o, 99):.0f}, max {o.max()}); the longest "
          f"10% of requests hold {np.sort(o)[-len(o) // 10:].sum() / o.sum():.0%} of the tokens")


def _lengths(args, loaded) -> dict:
    block = loaded.task.config.block_size
    return {"prompt_min": args.prompt_min, "prompt_max": args.prompt_max,
            "output_min": args.output_min,
            "output_max": args.output_max or block - args.prompt_max, "alpha": args.alpha}


def _work(engine, w: Workload) -> float:
    """Mean modelled seconds of work per request of this trace at full batch: its prefill
    plus its decode steps shared by the running batch (`max_batch` jobs per step), each
    priced at the positions the request itself has written by then (a step reads as many
    as its longest row has, so this is a lower bound). One over it is the capacity; the
    mean is this trace's, not the distribution's (whose heavy tail makes a trace's mean
    vary)."""
    return float(np.mean([engine.estimate_prefill(int(p)) + sum(
        engine.estimate_decode(int(p) + k) for k in range(int(o) - 1)) / engine.max_batch
        for p, o in zip(w.prompt_lengths, w.output_lengths, strict=True)]))


def _overhead(engine, loaded, text, args, lengths, unit: Workload, prompts: list[str],
              capacity: float) -> float:
    """How much longer wall-clock time is than modelled time right now (Python between
    steps, sampling, the submitting thread, other jobs on the machine).

    First a saturated FCFS batch (96 requests arriving at once) gives a guess; then the
    first 300 requests of the trace itself arrive at the rate that guess implies, on the
    wall clock with FCFS, and the time the engine was busy over the modelled cost of the
    work it did is the answer (it is that ratio, measured the same way, that the
    wall-clock runs' `load` column uses)."""
    cal = make_workload(96, 1.0, args.seed + 1001, **lengths)
    cal = Workload(np.zeros(96), cal.prompt_lengths, cal.output_lengths)
    cal_prompts = prompts_from_text(text, cal.prompt_lengths, args.seed + 1001)
    span = {}
    for modelled in (True, False):
        records, _ = run_engine(engine, loaded, cal, cal_prompts, "fcfs", args, modelled)
        span[modelled] = max(r["finish"] for r in records) - min(r["arrival"] for r in records)
    guess = span[False] / span[True]
    n = min(300, len(prompts))
    rate = args.load * capacity / guess
    head = Workload(unit.arrivals[:n] / rate, unit.prompt_lengths[:n], unit.output_lengths[:n])
    _, stats = run_engine(engine, loaded, head, prompts[:n], "fcfs", args, False)
    print(f"wall-clock calibration: saturated batch {guess:.2f}x modelled time, first {n} "
          f"requests of the trace {stats['slowdown']:.2f}x", flush=True)
    return stats["slowdown"]


if __name__ == "__main__":
    main()
