"""The serving engine and its schedulers.

Continuous batching, preemption and KV swapping never change what a request
generates; the schedulers keep their invariants.
"""

import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lmjax.models import GPT, GPTConfig
from lmjax.serve.engine import (
    CostClock,
    Costs,
    Engine,
    PromptTooLongError,
    QueueFullError,
    _read_row,
    _sampling_arrays,
    _write_row,
)
from lmjax.serve.generate import Decoder, SamplingParams, generate
from lmjax.serve.scheduler import FCFS, SCHEDULERS, SkipJoinMLFQ, make_scheduler

CONFIG = GPTConfig(vocab_size=65, block_size=32, num_layers=2, num_heads=4, embed_dim=32)
ALPHABET = "".join(chr(c) for c in range(48, 48 + 65))


def detokenize(ids):
    return "".join(ALPHABET[i] for i in ids)


@functools.cache
def _setup(scan_layers: bool = False):
    model = GPT(dataclasses.replace(CONFIG, scan_layers=scan_layers))
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
    {"name": "mlfq", "base_quantum": 1.0, "num_queues": 3, "starvation": 6.0,
     "scan_layers": True},
])
def test_engine_generates_what_generate_does(scheduler):
    """Whatever the batching, preemption and swapping, each request's tokens equal
    generating it alone (max_batch 1 of 2 rows: preempted jobs also wait in the cache;
    scanned layers: one cache stacked over the layers)."""
    options = dict(scheduler)
    decoder, params = _setup(options.pop("scan_layers", False))
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


def test_spare_rows_preempt_without_swapping():
    """More rows than running jobs: preempted jobs wait in their rows, never on the host,
    and still generate exactly what they generate alone."""
    decoder, params = _setup()
    engine = Engine(decoder, params, make_scheduler("mlfq", base_quantum=1.0, num_queues=3,
                                                    starvation=6.0),
                    slots=6, max_batch=2, clock=_ticks())
    requests = _requests()
    jobs = [engine.submit(p, o) for p, o in requests]
    engine.run_until_idle()
    for job, (prompt, opts) in zip(jobs, requests, strict=True):
        assert job.out == generate(decoder, params, [prompt], opts)[0].tokens
    assert engine.stats.preemptions > 0
    assert engine.stats.swaps_out == engine.stats.swaps_in == 0


def _random_cache(decoder, rows, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                        decoder.new_cache(rows))


def test_swap_moves_only_the_written_positions_and_restores_them_exactly():
    decoder, _ = _setup()
    cache = _random_cache(decoder, 3)
    before = jax.device_get(cache)
    host = jax.device_get(_read_row(cache, 1, 16))  # positions 0..15 of row 1
    assert all(c.keys.shape == (CONFIG.num_heads, 16, CONFIG.head_dim) for c in host)
    restored = jax.device_get(_write_row(cache, 2, host))  # into another row
    for old, new in zip(before, restored, strict=True):
        for a, b in ((old.keys, new.keys), (old.values, new.values)):
            np.testing.assert_array_equal(b[2, :, :16], a[1, :, :16])  # bit for bit
            np.testing.assert_array_equal(b[2, :, 16:], a[2, :, 16:])  # rest untouched
            np.testing.assert_array_equal(b[:2], a[:2])


@pytest.mark.parametrize("width", [16, CONFIG.block_size])
def test_decode_over_gathered_rows_equals_decoding_every_row(width):
    """A step over rows [3, 0] (padded by an inactive row), reading their first `width`
    positions only, writes and samples what a step over the whole cache with only those
    rows active does; other rows stay as they were."""
    decoder, params = _setup()
    engine = Engine(decoder, params, FCFS(), slots=4, max_batch=3)
    tokens, lengths = np.array([7, 9, 0], np.int32), np.array([5, 11, 0], np.int32)
    active = np.array([True, True, False])
    jobs = [None] * 3
    new, gathered = engine._decode_rows(params, _random_cache(decoder, 4),
                                        np.array([3, 0, 3], np.int32), tokens, lengths,
                                        active, *_sampling_arrays(jobs), width=width)
    full_tokens = np.zeros(4, np.int32)
    full_lengths = np.zeros(4, np.int32)
    full_tokens[[3, 0]], full_lengths[[3, 0]] = tokens[:2], lengths[:2]
    ref, full = decoder.decode_sample(params, _random_cache(decoder, 4), full_tokens,
                                      full_lengths, np.array([True, False, False, True]),
                                      *_sampling_arrays([None] * 4))
    assert np.asarray(new)[:2].tolist() == np.asarray(ref)[[3, 0]].tolist()
    for a, b in zip(jax.device_get(gathered), jax.device_get(full), strict=True):
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.values, b.values)


def test_cost_clock_charges_the_modelled_work():
    """On a CostClock time moves by the modelled costs only: a 3-token prompt (bucket 16)
    and 5 new tokens take one prefill and four decode steps."""
    decoder, params = _setup()
    costs = Costs(prefill={16: 2.5, 32: 4.0}, decode={16: 1.0, 32: 1.0},
                  swap_out={16: 0.5, 32: 0.5}, swap_in={16: 0.25, 32: 0.25})
    clock = CostClock(costs)
    engine = Engine(decoder, params, FCFS(), slots=2, clock=clock)
    assert engine.estimate_prefill(3) == 2.5 and engine.estimate_prefill(20) == 4.0
    job = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=5))
    engine.run_until_idle()
    assert job.first_token_time == 2.5 and job.finish_time == 6.5 == clock()


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


# -- one job's failure stays its own ------------------------------------------------------


def _unrepresentable(opts: SamplingParams, **fields) -> SamplingParams:
    """Options past SamplingParams' checks, as a bug or a future field could produce."""
    for name, value in fields.items():
        object.__setattr__(opts, name, value)
    return opts


@pytest.mark.parametrize("when", ["first token", "decode step"])
def test_a_job_that_fails_to_sample_fails_alone(when):
    """top_k 2**31 does not fit the sampler's int32 (the reported crash): that job fails,
    in its prefill or in a batched decode step, and the others generate what they
    generate alone; the engine goes on."""
    decoder, params = _setup()
    engine = Engine(decoder, params, FCFS(), slots=4, clock=_ticks())
    requests = _requests()[:3]
    jobs = [engine.submit(p, o) for p, o in requests]
    bad_opts = SamplingParams(max_new_tokens=10, temperature=0.5)
    if when == "first token":
        _unrepresentable(bad_opts, top_k=2**31)
    bad = engine.submit([4, 5, 6], bad_opts)
    engine.step()  # every job prefilled: the bad one, when it fails here, has failed
    if when == "decode step":
        _unrepresentable(bad_opts, top_k=2**31)
    engine.run_until_idle()
    assert bad.finish_reason == "error" and "OverflowError" in bad.error and bad.done.is_set()
    for job, (prompt, opts) in zip(jobs, requests, strict=True):
        assert job.out == generate(decoder, params, [prompt], opts)[0].tokens
        assert job.finish_reason == "length"
    assert engine.slots_in_use() == 0 and engine.pending() == 0
    after = engine.submit([1, 2], SamplingParams(max_new_tokens=2))
    engine.run_until_idle()
    assert after.finish_reason == "length"


def test_a_failing_listener_fails_only_its_job():
    """The server's listener can fail (its event loop closed): that job ends, no other."""
    decoder, params = _setup()
    engine = Engine(decoder, params, FCFS(), slots=2, detokenize=detokenize)

    def broken(job, text, finished):
        raise RuntimeError("event loop is closed")

    bad = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=8), broken)
    good = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=8), lambda j, t, d: None)
    engine.run_until_idle()
    assert bad.finish_reason == "error" and "event loop is closed" in bad.error
    assert good.finish_reason == "length" and len(good.out) == 8
    assert engine.slots_in_use() == 0 and engine.pending() == 0


def test_a_stopped_loop_fails_every_job_and_refuses_new_ones():
    """A failure outside any job stops the loop: nothing waits forever for it, `alive`
    says so, submit refuses, and stop does not wait out its drain timeout."""
    decoder, params = _setup()
    engine = Engine(decoder, params, FCFS(), slots=2)

    def broken_pick(now, capacity):
        raise RuntimeError("scheduler bug")

    engine.scheduler.pick = broken_pick
    ended = []
    jobs = [engine.submit([1, 2], SamplingParams(max_new_tokens=5),
                          lambda job, text, done: ended.append(done)) for _ in range(3)]
    engine.start()
    for job in jobs:
        assert job.done.wait(30), "a job still waits for a loop that has stopped"
        assert job.finish_reason == "error" and "scheduler bug" in job.error
    assert ended == [True] * 3
    assert engine.stopped.wait(5) and not engine.alive
    assert isinstance(engine.error, RuntimeError) and engine.pending() == 0
    from lmjax.serve.engine import EngineStoppedError

    with pytest.raises(EngineStoppedError, match="scheduler bug"):
        engine.submit([1], SamplingParams())
    start = time.monotonic()
    engine.stop(drain=True, timeout=60)
    assert time.monotonic() - start < 5


def test_stop_checker_is_built_once_per_job(monkeypatch):
    """Rebuilding it every token made a long stop list cost every user (the stop strings
    of a request are compiled into automata once, when it is queued)."""
    import lmjax.serve.engine as engine_module

    built = []
    original = engine_module.StopChecker

    def counting(*args, **kwargs):
        built.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "StopChecker", counting)
    decoder, params = _setup()
    engine = Engine(decoder, params, FCFS(), slots=2, detokenize=detokenize)
    jobs = [engine.submit([5, 6, 7], SamplingParams(max_new_tokens=12, temperature=0,
                                                    stop=("never", "seen")))
            for _ in range(2)]
    engine.run_until_idle()
    assert all(len(job.out) == 12 for job in jobs)
    assert len(built) == 2
