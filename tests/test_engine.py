"""The serving engine and its schedulers.

Continuous batching, preemption and KV swapping never change what a request
generates; the schedulers keep their invariants.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lmjax.models import GPT, GPTConfig
from lmjax.serve.engine import Engine, PromptTooLongError, QueueFullError
from lmjax.serve.generate import Decoder, SamplingParams, generate
from lmjax.serve.scheduler import FCFS, SCHEDULERS, SkipJoinMLFQ, make_scheduler

CONFIG = GPTConfig(vocab_size=65, block_size=32, num_layers=2, num_heads=4, embed_dim=32)
ALPHABET = "".join(chr(c) for c in range(48, 48 + 65))


def detokenize(ids):
    return "".join(ALPHABET[i] for i in ids)


@functools.cache
def _setup():
    model = GPT(CONFIG)
    init = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))))
    return Decoder(model), init(jax.random.key(0))["params"]


def _requests():
    rng = np.random.default_rng(3)
    out = []
    for i in range(6):
        prompt = rng.integers(0, 65, int(rng.integers(2, 20))).tolist()
        opts = SamplingParams(max_new_tokens=int(rng.integers(3, 14)),
                              temperature=0.0 if i % 2 else 0.9, top_k=10 * (i % 3),
                              seed=100 + i)
        out.append((prompt, opts))
    return out


def _ticks():
    """A clock that advances one unit per reading: runs are deterministic."""
    counter = itertools.count()
    return lambda: float(next(counter))


@pytest.mark.parametrize("scheduler", [
    {"name": "fcfs"},
    {"name": "mlfq", "base_quantum": 1.0, "num_queues": 3, "starvation": 6.0},
    {"name": "mlfq", "base_quantum": 1.0, "num_queues": 3, "starvation": 6.0, "max_batch": 1},
])
def test_engine_generates_what_generate_does(scheduler):
    """Whatever the batching, preemption and swapping, each request's tokens equal
    generating it alone (max_batch 1 of 2 rows: preempted jobs also wait in the cache)."""
    decoder, params = _setup()
    options = dict(scheduler)
    max_batch = options.pop("max_batch", None)
    engine = Engine(decoder, params, make_scheduler(options.pop("name"), **options), slots=2,
                    max_batch=max_batch, clock=_ticks())
    requests = _requests()
    jobs = [engine.submit(p, o) for p, o in requests]
    engine.run_until_idle()
    for job, (prompt, opts) in zip(jobs, requests, strict=True):
        alone = generate(decoder, params, [prompt], opts)[0]
        assert job.out == alone.tokens
        assert job.finish_reason == "length"
    assert engine.slots_in_use() == 0 and engine.pending() == 0
    if scheduler["name"] == "mlfq":
        assert engine.stats.swaps_out > 0 and engine.stats.swaps_in > 0  # the path ran


def test_streamed_text_and_stop_strings():
    decoder, params = _setup()
    prompt, opts = [5, 6, 7], SamplingParams(max_new_tokens=12, temperature=0)
    free = detokenize(generate(decoder, params, [prompt], opts)[0].tokens)
    stop = free[5:7]
    events = []
    engine = Engine(decoder, params, FCFS(), slots=2, detokenize=detokenize)
    job = engine.submit(prompt, SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,)),
                        on_event=lambda j, text, done: events.append((text, done)))
    plain = engine.submit(prompt, opts, on_event=lambda j, t, d: None)
    engine.run_until_idle()
    assert job.finish_reason == "stop" and job.sent == free[: free.find(stop)]
    assert "".join(t for t, _ in events) == job.sent and events[-1][1]
    assert plain.sent == free and plain.finish_reason == "length"


def test_cancel_frees_the_slot():
    decoder, params = _setup()
    engine = Engine(decoder, params, FCFS(), slots=2)
    job = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=25))
    engine.step()
    engine.step()
    assert engine.slots_in_use() == 1
    engine.cancel(job)
    engine.step()
    assert job.finish_reason == "cancelled" and job.done.is_set()
    assert engine.slots_in_use() == 0 and engine.pending() == 0


def test_queue_full_and_too_long_prompt():
    decoder, params = _setup()
    engine = Engine(decoder, params, FCFS(), slots=2, max_jobs=2)
    with pytest.raises(PromptTooLongError, match="context window is 32"):
        engine.submit(list(range(33)), SamplingParams())
    engine.submit([1], SamplingParams())
    engine.submit([2], SamplingParams())
    with pytest.raises(QueueFullError):
        engine.submit([3], SamplingParams())


# -- scheduler invariants, on a simulated clock ------------------------------------------


def _simulate(scheduler, *, slots=2, jobs=60, dt=0.25, seed=0):
    """Random arrivals and lengths; each iteration takes dt. Returns the pick log."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(0.3, jobs))
    work = (rng.pareto(1.2, jobs) * 2 + 1).astype(int)  # iterations each job needs
    prefill = rng.uniform(0.0, 3.0, jobs)
    now, nxt, left, log = 0.0, 0, {}, []
    while nxt < jobs or left:
        while nxt < jobs and arrivals[nxt] <= now:
            scheduler.add(nxt, now, float(prefill[nxt]))
            left[nxt] = int(work[nxt])
            nxt += 1
        if not left:
            now = float(arrivals[nxt])
            continue
        picked = scheduler.pick(now, slots)
        log.append((now, list(picked), sorted(left)))
        now += dt
        scheduler.account(dict.fromkeys(picked, dt), now)
        for job in picked:
            left[job] -= 1
            if left[job] == 0:
                del left[job]
                scheduler.remove(job)
    return log, prefill


def test_skip_join_never_enters_a_queue_with_a_shorter_quantum():
    mlfq = SkipJoinMLFQ(base_quantum=0.5, num_queues=5, starvation=4.0)
    joined = {}
    original = mlfq._move

    def move(entry, level, now):
        assert mlfq.quanta[level] >= entry.prefill_estimate  # promotions and demotions
        original(entry, level, now)

    mlfq._move = move
    add = mlfq.add

    def record(job, now, estimate):
        add(job, now, estimate)
        joined[job] = mlfq.level_of(job)
        level = joined[job]
        assert mlfq.quanta[level] >= estimate
        assert level == 0 or mlfq.quanta[level - 1] < estimate  # the highest such queue

    mlfq.add = record
    _simulate(mlfq)
    assert len(set(joined.values())) > 1  # estimates really spread over several queues


def test_no_job_waits_past_starvation_plus_one_quantum_without_promotion():
    starvation, dt = 3.0, 0.25
    mlfq = SkipJoinMLFQ(base_quantum=0.5, num_queues=5, starvation=starvation)
    original_pick = mlfq.pick

    def pick(now, capacity):
        for e in mlfq.entries.values():
            if e.level > e.join_level:  # promotable: its wait must stay bounded
                assert now - e.waiting_since <= starvation + mlfq.quanta[0]
        return original_pick(now, capacity)

    mlfq.pick = pick
    _simulate(mlfq, dt=dt)
    assert mlfq.promotions, "the load never starved a job; the test checks nothing"
    # promoted within one iteration of crossing the threshold (1e-9: float time sums)
    assert all(w <= starvation + dt + 1e-9 for _, w in mlfq.promotions)


def test_mlfq_demotes_a_job_that_uses_its_quantum():
    mlfq = SkipJoinMLFQ(base_quantum=1.0, num_queues=3, starvation=100.0)
    mlfq.add("long", 0.0, 0.1)
    assert mlfq.level_of("long") == 0
    mlfq.account({"long": 1.0}, 1.0)
    assert mlfq.level_of("long") == 1
    mlfq.add("short", 1.0, 0.1)
    assert mlfq.pick(1.0, 1) == ["short"]  # the newcomer preempts the demoted job


def test_fcfs_serves_in_arrival_order():
    fcfs = FCFS()
    log, _ = _simulate(fcfs, slots=3)
    started = []
    for _, picked, alive in log:
        assert picked == alive[:3]  # the oldest unfinished jobs run, in arrival order
        started += [job for job in picked if job not in started]
    assert started == list(range(60))


def test_unknown_scheduler_lists_the_known_ones():
    assert SCHEDULERS.names() == ["fcfs", "mlfq"]
    with pytest.raises(KeyError, match="fcfs, mlfq"):
        make_scheduler("sjf")
