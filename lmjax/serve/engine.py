"""The serving engine: continuous batching over a fixed number of decode slots.

One KV cache of `slots` rows is allocated once. Every iteration the scheduler picks up
to `slots` jobs; newcomers are prefilled into a free row (interleaved with decoding:
one iteration prefills the newcomers it picked, then runs one decode step for every
picked job); a job that the scheduler stops picking is preempted at a token boundary
and keeps its row until another job needs it, when the written positions of its keys
and values move to host memory (and back into a row when it is picked again). A decode
step gathers only the rows of the jobs it runs (`max_batch` of them), so rows beyond
the running batch hold preempted jobs at no compute cost. Results never depend on the
batch: each row decodes only from its own cache entries and its own seed.

Time is read from `clock`; with a `CostClock` it advances only by the modelled cost of
each prefill, decode step and swap, so a run is deterministic (the benchmark's
machine-independent view of scheduling).

One job never stops the others: any exception while preparing, running or streaming a
job fails that job alone (finish_reason "error", logged with its traceback). Only a
failure outside every job stops the loop; then every waiting job fails, `alive` turns
False and `submit` raises EngineStoppedError.
"""

import collections
import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lmjax.serve.generate import Decoder, SamplingParams, StopChecker, bucket
from lmjax.serve.scheduler import Scheduler

_GREEDY = SamplingParams(temperature=0.0)
log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine holds `max_jobs` jobs already; retry later."""


class PromptTooLongError(ValueError):
    """The prompt does not fit the model's context window."""


class EngineStoppedError(RuntimeError):
    """The engine's loop has stopped (a failure outside any one job); nothing runs."""


@dataclasses.dataclass(eq=False)
class Job:
    prompt: list[int]
    options: SamplingParams
    on_event: Callable[["Job", str, bool], None] | None = None  # (job, new text, finished)
    id: int = 0
    arrival: float = 0.0
    out: list[int] = dataclasses.field(default_factory=list)
    sent: str = ""  # text streamed so far
    finish_reason: str | None = None
    slot: int | None = None
    host_kv: list | None = None  # the row's cache on the host while swapped out
    length: int = 0  # tokens in the cache
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None  # why it failed (finish_reason "error")
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    stops: StopChecker = dataclasses.field(init=False)

    def __post_init__(self):
        self.stops = StopChecker(self.options.stop)  # once per job: it keeps its state

    @property
    def prefilled(self) -> bool:
        return bool(self.out)


@dataclasses.dataclass
class Costs:
    """Seconds each kind of engine work takes, by padded width (measured by `warmup`)."""

    prefill: dict[int, float] = dataclasses.field(default_factory=dict)  # prompt bucket
    decode: dict[int, float] = dataclasses.field(default_factory=dict)  # positions read
    swap_out: dict[int, float] = dataclasses.field(default_factory=dict)  # row bucket
    swap_in: dict[int, float] = dataclasses.field(default_factory=dict)


class CostClock:
    """A deterministic clock: time moves only when the engine charges modelled work."""

    def __init__(self, costs: Costs):
        self.costs, self.now = costs, 0.0

    def __call__(self) -> float:
        return self.now

    def charge(self, kind: str, width: int | None = None) -> None:
        cost = getattr(self.costs, kind)
        self.now += cost if width is None else cost[width]


@dataclasses.dataclass
class EngineStats:
    tokens_generated: int = 0
    swaps_out: int = 0
    swaps_in: int = 0
    preemptions: int = 0  # a job that ran one iteration was not picked for the next
    finished: int = 0
    busy: float = 0.0  # seconds (on `clock`) spent in iterations that ran jobs
    modelled: float = 0.0  # the same work priced by the cost model (`Engine.costs`)
    ttft: list[float] = dataclasses.field(default_factory=list)
    tpot: list[float] = dataclasses.field(default_factory=list)


class Engine:
    """Runs jobs to completion; `step()` is one iteration, `start()` runs it in a thread."""

    def __init__(self, decoder: Decoder, params, scheduler: Scheduler, *, slots: int = 8,
                 max_batch: int | None = None, max_jobs: int = 256,
                 detokenize: Callable[[list[int]], str] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        """`slots` cache rows; at most `max_batch` (default: all) jobs run per iteration.

        Fewer running jobs than rows lets preempted jobs keep their keys and values in
        the cache (FastServe keeps more jobs in GPU memory than it runs) and move to the
        host only when every row is taken.
        """
        self.decoder, self.params, self.scheduler = decoder, params, scheduler
        self.slots, self.max_jobs = slots, max_jobs
        self.max_batch = min(max_batch or slots, slots)
        self.detokenize = detokenize
        self.clock = clock
        self.block = decoder.config.block_size
        self.cache = decoder.new_cache(slots)
        self.owner: list[Job | None] = [None] * slots
        self.jobs: list[Job] = []
        self.stats = EngineStats()
        self._ran: list[Job] = []  # the jobs of the last iteration
        self._inbox: collections.deque[Job] = collections.deque()
        self._cancelled: collections.deque[Job] = collections.deque()
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.error: BaseException | None = None  # what stopped the loop, if anything did
        self.stopped = threading.Event()  # set when the loop ends, for whatever reason
        # Measured by warmup() (a CostClock brings its own); prefill estimates come from here.
        self.costs = clock.costs if isinstance(clock, CostClock) else Costs()
        self._read_row = jax.jit(_read_row, static_argnums=2)
        self._write_row = jax.jit(_write_row, donate_argnums=0)
        # Before warmup: in place only when a gather would copy the whole cache.
        self._in_place_widths = {self.block} if self.max_batch == slots else set()
        self._decode_rows = jax.jit(functools.partial(_decode_rows, decoder), donate_argnums=1,
                                    static_argnames="width")

    def decode_width(self, length: int) -> int:
        """Cache positions a decode step reads when its longest row holds `length`
        tokens: only the written ones, rounded up to a power of two (few compiled shapes)."""
        return min(bucket(length + 1), self.block)

    def _in_place(self, width: int) -> bool:
        """Whether a step of this width runs over every row of the cache in place (reading
        all positions) rather than on a gathered copy of the positions it needs; only
        possible when every row runs, and chosen by `warmup`'s timings of both."""
        return width in self._in_place_widths

    def estimate_decode(self, length: int) -> float:
        """The measured time of a decode step whose longest row holds `length` tokens."""
        return self.costs.decode.get(self.decode_width(length), 0.0)

    # -- submitting -----------------------------------------------------------------
    def submit(self, prompt: list[int], options: SamplingParams, on_event=None,
               arrival: float | None = None) -> Job:
        """Queues a job (thread-safe). Raises PromptTooLongError, QueueFullError or
        EngineStoppedError.

        `arrival` (default: now) is when the request arrived, for its TTFT and JCT."""
        if not prompt:
            raise ValueError("prompt is empty; give at least one token")
        if len(prompt) > self.block:
            raise PromptTooLongError(f"prompt has {len(prompt)} tokens; the context window "
                                     f"is {self.block} tokens")
        with self._wake:
            if self.error is not None:
                raise EngineStoppedError(f"the engine stopped ({_describe(self.error)}); "
                                         "restart the server")
            if self.pending() >= self.max_jobs:
                raise QueueFullError(f"{self.max_jobs} jobs are queued or running; retry later")
            job = Job(list(prompt), options, on_event, next(self._ids),
                      self.clock() if arrival is None else arrival)
            self._inbox.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stops a job at the next token boundary and frees its slot (thread-safe)."""
        with self._wake:
            self._cancelled.append(job)
            self._wake.notify()

    def pending(self) -> int:
        return len(self.jobs) + len(self._inbox)

    def slots_in_use(self) -> int:
        return sum(o is not None for o in self.owner)

    # -- one iteration ----------------------------------------------------------------
    def step(self) -> bool:
        """One iteration; returns False when there was nothing to do."""
        self._admit()
        if not self.jobs:
            return False
        start = self.clock()
        picked = self.scheduler.pick(start, self.max_batch)
        chosen = set(map(id, picked))
        self.stats.preemptions += sum(id(j) not in chosen for j in self._ran
                                      if j.finish_reason is None)
        self._ran = picked
        self._assign_slots(picked)
        decoding = [j for j in picked if j.prefilled]
        # Each job is charged its own work: its prefill, and the decode step it shared.
        used = dict.fromkeys(picked, 0.0)
        for job in picked:
            if not job.prefilled:
                t = self.clock()
                self._prefill_guarded(job)
                used[job] += self.clock() - t
        decoding = [j for j in decoding if j.finish_reason is None]  # a prefill may fail them
        if decoding:
            t = self.clock()
            self._decode_guarded(decoding)
            for job in decoding:
                used[job] += self.clock() - t
        now = self.clock()
        self.stats.busy += now - start
        self.scheduler.account(used, now)
        # Picked jobs end here; a failure may also end jobs that held rows but did not run.
        for job in [j for j in self.jobs if j.finish_reason is not None]:
            self._finish(job, now)
        return True

    def _admit(self) -> None:
        with self._wake:
            arrivals, self._inbox = list(self._inbox), collections.deque()
            cancelled, self._cancelled = list(self._cancelled), collections.deque()
        for job in arrivals:
            self.jobs.append(job)
            self.scheduler.add(job, self.clock(), self.estimate_prefill(len(job.prompt)))
        for job in cancelled:
            if job in self.jobs and job.finish_reason is None:
                job.finish_reason = "cancelled"
                self._finish(job, self.clock())

    def estimate_prefill(self, tokens: int) -> float:
        """The measured time of a prefill of this prompt's padded width (0 before warmup)."""
        return self.costs.prefill.get(min(bucket(tokens), bucket(self.block)), 0.0)

    def _charge(self, kind: str, width: int | None = None) -> None:
        """Books the modelled cost of work just done (and moves a CostClock by it)."""
        cost = getattr(self.costs, kind)
        self.stats.modelled += cost if width is None else cost.get(width, 0.0)
        if isinstance(self.clock, CostClock):
            self.clock.charge(kind, width)

    def _assign_slots(self, picked: list[Job]) -> None:
        chosen = set(map(id, picked))
        for job in picked:
            if job.slot is not None:
                continue
            slot = self._free_slot(chosen)
            job.slot, self.owner[slot] = slot, job
            if job.host_kv is not None:
                self.cache = self._write_row(self.cache, slot, job.host_kv)
                self._charge("swap_in", jax.tree.leaves(job.host_kv)[0].shape[-2])
                job.host_kv = None
                self.stats.swaps_in += 1

    def _free_slot(self, chosen: set[int]) -> int:
        """A free row, or the row of a preempted job whose cache moves to the host."""
        for slot, owner in enumerate(self.owner):
            if owner is None:
                return slot
        idle = [(self.scheduler.rank(o), s) for s, o in enumerate(self.owner)
                if id(o) not in chosen]
        if not idle:
            raise RuntimeError("scheduler picked more jobs than there are slots")
        slot = max(idle)[1]  # the lowest-priority holder, least likely to run again soon
        owner = self.owner[slot]
        # Only the written positions move, rounded up to a power of two (few shapes).
        width = min(bucket(owner.length), self.block)
        owner.host_kv = jax.device_get(self._read_row(self.cache, slot, width))
        self._charge("swap_out", width)
        owner.slot, self.owner[slot] = None, None
        self.stats.swaps_out += 1
        return slot

    # -- one job's failure stays its own ----------------------------------------------------
    def _prefill_guarded(self, job: Job) -> None:
        try:
            self._prefill(job)
        except Exception as err:
            self._fail(job, err)
            self._recover_cache()

    def _decode_guarded(self, jobs: list[Job]) -> None:
        """A decode step of `jobs`; if it raises, each job decodes alone (its tokens do not
        depend on the batch), so only the job at fault fails."""
        try:
            self._decode(jobs)
        except Exception as err:
            if self._recover_cache():
                return
            if len(jobs) == 1:
                self._fail(jobs[0], err)
                return
            for job in jobs:
                if job.finish_reason is None:  # a lost cache may have failed it meanwhile
                    self._decode_guarded([job])

    def _fail(self, job: Job, err: BaseException) -> None:
        log.error("request %d failed (%s); the other requests go on", job.id,
                  _describe(err), exc_info=err)
        job.finish_reason, job.error = "error", _describe(err)

    def _recover_cache(self) -> bool:
        """After a failed compiled call: whether it took the cache with it (a donated
        argument is gone, or the result holds the error). Then a new cache replaces it and
        every job holding a row fails: its keys and values are lost."""
        try:
            if not any(x.is_deleted() for x in jax.tree.leaves(self.cache)):
                jax.block_until_ready(self.cache)
                return False
        except Exception:  # the cache holds the failed computation's error
            pass
        log.error("a failed step lost the KV cache; the jobs holding rows fail")
        self.cache = self.decoder.new_cache(self.slots)
        lost = RuntimeError("its cached keys and values were lost when a step failed")
        for job in self.owner:
            if job is not None and job.finish_reason is None:
                self._fail(job, lost)
        return True

    def _prefill(self, job: Job) -> None:
        width = bucket(len(job.prompt))
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(job.prompt)] = job.prompt
        logits, self.cache = self.decoder.prefill(
            self.params, self.cache, job.slot, tokens, np.zeros(1, np.int32),
            np.array([len(job.prompt)], np.int32))
        job.length = len(job.prompt)
        tokens = self._sample(logits, [job])
        self._charge("prefill", min(width, bucket(self.block)))
        self._emit([job], tokens)

    def _decode(self, jobs: list[Job]) -> None:
        """One decode step of the running jobs, over their rows' written positions only
        (padded to `max_batch` rows, so one compiled shape per width serves every step)."""
        width = self.decode_width(max(job.length for job in jobs))
        if self._in_place(width):
            return self._decode_every_row(jobs, width)
        rows = np.zeros(self.max_batch, np.int32)
        tokens = np.zeros(self.max_batch, np.int32)
        lengths = np.zeros(self.max_batch, np.int32)
        active = np.zeros(self.max_batch, bool)
        for i, job in enumerate(jobs):
            rows[i], tokens[i], lengths[i], active[i] = job.slot, job.out[-1], job.length, True
        padded = jobs + [None] * (self.max_batch - len(jobs))  # padding rows sample greedily
        new, self.cache = self._decode_rows(self.params, self.cache, rows, tokens, lengths,
                                            active, *_sampling_arrays(padded), width=width)
        new = np.asarray(new)
        self._charge("decode", width)
        for job in jobs:
            job.length += 1
        self._emit(jobs, new[: len(jobs)])

    def _decode_every_row(self, jobs: list[Job], width: int) -> None:
        tokens = np.zeros(self.slots, np.int32)
        lengths = np.zeros(self.slots, np.int32)
        active = np.zeros(self.slots, bool)
        by_slot = [None] * self.slots  # every row samples: one compiled shape
        for job in jobs:
            tokens[job.slot], lengths[job.slot], active[job.slot] = job.out[-1], job.length, True
            by_slot[job.slot] = job
        new, self.cache = self.decoder.decode_sample(self.params, self.cache, tokens, lengths,
                                                     active, *_sampling_arrays(by_slot))
        new = np.asarray(new)
        self._charge("decode", width)
        for job in jobs:
            job.length += 1
        self._emit(jobs, new[[job.slot for job in jobs]])

    def _sample(self, logits: jax.Array, jobs: list[Job | None]) -> np.ndarray:
        """One token per row of logits; rows without a job (None) sample greedily."""
        return np.asarray(self.decoder.sample(logits, *_sampling_arrays(jobs)))

    def _emit(self, jobs: list[Job], tokens: np.ndarray) -> None:
        now = self.clock()
        for job, token in zip(jobs, tokens, strict=True):
            try:
                self._emit_one(job, int(token), now)
            except Exception as err:  # its text or its listener failed: it alone ends
                self._fail(job, err)

    def _emit_one(self, job: Job, token: int, now: float) -> None:
        job.out.append(token)
        self.stats.tokens_generated += 1
        if job.first_token_time is None:
            job.first_token_time = now
        text, stopped = self._new_text(job)
        if stopped:
            job.finish_reason = "stop"
        elif len(job.out) >= job.options.max_new_tokens or job.length >= self.block:
            job.finish_reason = "length"
        if job.finish_reason is None and text:
            job.sent += text
            if job.on_event is not None:
                job.on_event(job, text, False)

    def _new_text(self, job: Job) -> tuple[str, bool]:
        """Text safe to stream: never part of a stop string (held back until resolved)."""
        if self.detokenize is None:
            return "", False
        text = self.detokenize(job.out)
        at = job.stops.find(text)
        if at is not None:
            return text[len(job.sent): at], True
        return text[len(job.sent): len(text) - job.stops.held()], False

    def _final_text(self, job: Job) -> str:
        """The rest of the text: up to the stop string, all of it at the length limit."""
        if self.detokenize is None or job.finish_reason in ("cancelled", "error"):
            return ""
        if job.finish_reason == "stop":
            return self._new_text(job)[0]
        return self.detokenize(job.out)[len(job.sent):]

    def _finish(self, job: Job, now: float) -> None:
        try:
            tail = self._final_text(job)
        except Exception as err:
            self._fail(job, err)
            tail = ""
        job.sent += tail
        job.finish_time = now
        if job.slot is not None:
            self.owner[job.slot], job.slot = None, None
        job.host_kv = None
        self.scheduler.remove(job)
        self.jobs.remove(job)
        self.stats.finished += 1
        if job.first_token_time is not None and job.finish_reason not in ("cancelled",
                                                                           "error"):
            self.stats.ttft.append(job.first_token_time - job.arrival)
            if len(job.out) > 1:
                self.stats.tpot.append((now - job.first_token_time) / (len(job.out) - 1))
        job.done.set()
        _notify_finished(job, tail)

    # -- warmup and the background loop -------------------------------------------------
    def warmup(self) -> None:
        """Compiles every prefill width, the decode step and the swaps; times each (the
        median of seven calls after three untimed ones: the first calls after compiling
        run slower than steady state), wall-clock whatever `clock` is."""
        widths, width = [], 16
        while width < self.block:
            widths.append(width)
            width *= 2
        widths.append(bucket(self.block))

        def timed(fn):
            times = []
            for _ in range(10):
                t = time.perf_counter()
                jax.block_until_ready(fn())
                times.append(time.perf_counter() - t)
            return float(np.median(times[3:]))

        def prefill(width):
            logits, self.cache = self.decoder.prefill(
                self.params, self.cache, 0, np.zeros((1, width), np.int32),
                np.zeros(1, np.int32), np.array([min(width, self.block)], np.int32))
            return self._sample(logits, [None])

        def decode(width, in_place):
            zeros = np.zeros(self.max_batch, np.int32)
            active, sampling = np.ones(self.max_batch, bool), [None] * self.max_batch
            if in_place:
                new, self.cache = self.decoder.decode_sample(
                    self.params, self.cache, zeros, zeros, active, *_sampling_arrays(sampling))
            else:  # distinct rows, as a step of running jobs reads them
                rows = np.arange(self.max_batch, dtype=np.int32)
                new, self.cache = self._decode_rows(self.params, self.cache, rows, zeros,
                                                    zeros, active, *_sampling_arrays(sampling),
                                                    width=width)
            return np.asarray(new)

        def swap_out(width):
            return jax.device_get(self._read_row(self.cache, 0, min(width, self.block)))

        def swap_in(rows):
            self.cache = self._write_row(self.cache, 0, rows)
            return self.cache

        costs = Costs()
        for width in tqdm(widths, desc="compile", leave=False):
            costs.prefill[width] = timed(lambda w=width: prefill(w))
        # With every row running, a narrow step on a gathered copy can beat reading the
        # whole cache in place, a wide one cannot (the gather copies what it reads): each
        # width takes whichever was faster. A gather of every full row is never timed.
        every_row = self.max_batch == self.slots
        whole = timed(lambda: decode(self.block, True)) if every_row else float("inf")
        self._in_place_widths = set()
        for width in sorted({min(w, self.block) for w in widths}):
            gathered = float("inf") if every_row and width == self.block else \
                timed(lambda w=width: decode(w, False))
            costs.decode[width] = min(gathered, whole)
            if whole <= gathered:
                self._in_place_widths.add(width)
        for width in widths:
            rows = swap_out(width)
            length = jax.tree.leaves(rows)[0].shape[-2]  # keyed by the positions moved
            costs.swap_out[length] = timed(lambda w=width: swap_out(w))
            costs.swap_in[length] = timed(lambda r=rows: swap_in(r))
        self.costs = costs

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the loop started by `start()` is running."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        try:
            while self._running:
                if not self.step():
                    with self._wake:
                        if not self._inbox and not self._cancelled and self._running:
                            self._wake.wait(timeout=0.5)
        except BaseException as err:  # outside every job: nothing can run any more
            self._stopped_by(err)
        finally:
            self.stopped.set()

    def _stopped_by(self, err: BaseException) -> None:
        """Records why the loop stopped and fails every job, so that none waits forever."""
        log.critical("the engine stopped (%s); every queued and running request fails",
                     _describe(err), exc_info=err)
        with self._wake:
            self.error, self._running = err, False
            jobs, self.jobs = self.jobs + list(self._inbox), []
            self._inbox.clear()
        self.owner = [None] * self.slots
        for job in jobs:
            if not job.done.is_set():
                job.finish_reason = "error"
                job.error = f"the engine stopped ({_describe(err)})"
                job.done.set()
                _notify_finished(job, "")

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stops the loop; with drain, after every queued and running job has finished."""
        deadline = time.monotonic() + timeout
        while drain and self.pending() and self.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        self._running = False
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def run_until_idle(self) -> None:
        """Steps in the calling thread until no job is left (tests, benchmarks)."""
        while self.step():
            pass


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _notify_finished(job: Job, tail: str) -> None:
    """The job's last event; a listener that fails is logged, the job is over anyway."""
    if job.on_event is None:
        return
    try:
        job.on_event(job, tail, True)
    except Exception:
        log.exception("the listener of request %d failed on its last event", job.id)


def _sampling_arrays(jobs: list[Job | None]) -> tuple[np.ndarray, ...]:
    """Per-row sampling arguments of `sample_tokens`; rows without a job are greedy."""
    o = [j.options if j is not None else _GREEDY for j in jobs]
    return (np.array([x.temperature for x in o], np.float32),
            np.array([x.top_k for x in o], np.int32), np.array([x.top_p for x in o], np.float32),
            np.array([x.seed for x in o], np.uint32),
            np.array([len(j.out) if j is not None else 0 for j in jobs], np.int32))


def _decode_rows(decoder: Decoder, params, cache, rows, tokens, lengths, active, *sampling,
                 width: int):
    """`decode_sample` over positions [0, width) of cache rows `rows` (batch,) only (every
    active row's length must be below `width`); writes back the one position each active
    row wrote (inactive rows write nothing, so padding may repeat a row). Reading only
    the written positions keeps a step's memory traffic small: gathering whole rows
    made a step slower when the rows changed from step to step (as under MLFQ).

    Cache arrays are (..., batch, heads, max_length, head_dim): a leading layer axis
    (scanned layers) rides along in the `...`."""
    block = decoder.config.block_size
    part = jax.tree.map(lambda x: x[..., rows, :, :width, :], cache)
    new, part = decoder._decode_sample(params, part, tokens, lengths, active, *sampling)
    at = jnp.where(active, lengths, block)
    index = jnp.arange(rows.shape[0])

    def put(full, row):
        written = row[..., index, :, jnp.minimum(at, width - 1), :]
        return full.at[..., rows, :, at, :].set(written, mode="drop")

    return new, jax.tree.map(put, cache, part)


def _read_row(cache, slot, length: int):
    """Positions [0, length) of one cache row: (..., heads, length, head_dim) per array."""
    return jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x[..., slot, :, :, :], 0, length, axis=-2), cache)


def _write_row(cache, slot, rows):
    """Writes `_read_row`'s arrays back at the start of row `slot`."""

    def write(full, row):
        start = (0,) * (full.ndim - 4) + (slot, 0, 0, 0)
        return jax.lax.dynamic_update_slice(full, jnp.expand_dims(row, -4).astype(full.dtype),
                                            start)

    return jax.tree.map(write, cache, rows)
