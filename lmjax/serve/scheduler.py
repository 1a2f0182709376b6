"""Iteration-level schedulers for the serving engine, chosen by name.

Every engine iteration asks the scheduler which jobs (at most one per decode slot) run
the next step; jobs join and leave between iterations (Orca's iteration-level
scheduling). `fcfs` serves in arrival order (Orca, vLLM). `mlfq` is FastServe's
skip-join multi-level feedback queue (Wu et al. 2023): quanta double from queue to
queue; a new job skips the queues whose quantum is shorter than its estimated prefill
time; a job that uses up its quantum is demoted; a job waiting longer than the
starvation threshold is promoted back to the queue it joined.
"""

import dataclasses
import heapq
import itertools
from typing import Protocol

from lmjax.registry import Registry


@dataclasses.dataclass(eq=False)
class Entry:
    """The scheduler's view of one job."""

    job: object
    arrival: int  # arrival order
    prefill_estimate: float  # seconds
    level: int = 0
    join_level: int = 0
    used: float = 0.0  # seconds run in the current quantum
    waiting_since: float = 0.0
    order: int = 0  # position within its queue


class Scheduler(Protocol):
    def add(self, job, now: float, prefill_estimate: float) -> None: ...
    def remove(self, job) -> None: ...
    def pick(self, now: float, capacity: int) -> list: ...
    def account(self, ran: dict, now: float) -> None: ...
    def rank(self, job) -> tuple: ...
    def __len__(self) -> int: ...


SCHEDULERS: Registry[type] = Registry("scheduler")


@SCHEDULERS.register("fcfs")
class FCFS:
    """First come, first served, at iteration level: the oldest `capacity` jobs run."""

    def __init__(self, **_unused):
        self.entries: dict[int, Entry] = {}
        self._arrivals = itertools.count()

    def add(self, job, now: float, prefill_estimate: float) -> None:
        self.entries[id(job)] = Entry(job, next(self._arrivals), prefill_estimate)

    def remove(self, job) -> None:
        self.entries.pop(id(job), None)

    def pick(self, now: float, capacity: int) -> list:
        # entries are kept in arrival order (dicts keep insertion order)
        return [e.job for e in itertools.islice(self.entries.values(), capacity)]

    def account(self, ran: dict, now: float) -> None:
        pass

    def rank(self, job) -> tuple:
        """Sort key of a job's priority (smaller runs first)."""
        return (self.entries[id(job)].arrival,)

    def __len__(self) -> int:
        return len(self.entries)


@SCHEDULERS.register("mlfq")
class SkipJoinMLFQ:
    """FastServe's skip-join MLFQ; quanta are base_quantum * 2**level seconds."""

    def __init__(self, *, base_quantum: float, num_queues: int = 6, starvation: float = 1.0,
                 **_unused):
        if base_quantum <= 0 or num_queues < 1 or starvation <= 0:
            raise ValueError("mlfq needs base_quantum > 0, num_queues >= 1, starvation > 0")
        self.quanta = [base_quantum * 2**i for i in range(num_queues)]
        self.starvation = starvation
        self.entries: dict[int, Entry] = {}
        self._arrivals = itertools.count()
        self._order = itertools.count()
        self.promotions: list[tuple[object, float]] = []  # (job, wait when promoted)

    def join_level(self, prefill_estimate: float) -> int:
        """The highest-priority queue whose quantum covers the prefill (skip-join)."""
        for level, quantum in enumerate(self.quanta):
            if quantum >= prefill_estimate:
                return level
        return len(self.quanta) - 1

    def add(self, job, now: float, prefill_estimate: float) -> None:
        level = self.join_level(prefill_estimate)
        self.entries[id(job)] = Entry(job, next(self._arrivals), prefill_estimate, level, level,
                                      0.0, now, next(self._order))

    def remove(self, job) -> None:
        self.entries.pop(id(job), None)

    def pick(self, now: float, capacity: int) -> list:
        for e in self.entries.values():
            wait = now - e.waiting_since
            if wait > self.starvation and e.level > e.join_level:
                self.promotions.append((e.job, wait))
                self._move(e, e.join_level, now)
        ordered = heapq.nsmallest(capacity, self.entries.values(),
                                  key=lambda e: (e.level, e.order))
        return [e.job for e in ordered]

    def rank(self, job) -> tuple:
        e = self.entries[id(job)]
        return (e.level, e.order)

    def account(self, ran: dict, now: float) -> None:
        """Charges each job that ran the seconds of work it used (job -> seconds)."""
        for job, seconds in ran.items():
            e = self.entries.get(id(job))
            if e is None:
                continue
            e.used += seconds
            e.waiting_since = now
            if e.used >= self.quanta[e.level] and e.level < len(self.quanta) - 1:
                self._move(e, e.level + 1, now)

    def _move(self, e: Entry, level: int, now: float) -> None:
        """Enters `level` at the back of its queue with a fresh quantum."""
        e.level, e.used, e.waiting_since, e.order = level, 0.0, now, next(self._order)

    def level_of(self, job) -> int:
        return self.entries[id(job)].level

    def __len__(self) -> int:
        return len(self.entries)


def make_scheduler(name: str, **options) -> Scheduler:
    return SCHEDULERS.get(name)(**options)
