"""Where a run's time goes: exclusive wall-clock seconds per named stage (benchmarks/quantize_speed.py).

Code marks its stages with ``with stage("searches"):`` (or ``@timed("searches")``); nothing is measured
unless a caller collects with ``with record() as seconds:``. Stages nest and are **exclusive**: time spent
in an inner stage is not counted in the outer one, so the stages of a run add up to its wall time (what
no stage covers is the caller's to name). Only the thread that called ``record`` is timed: work spread over
worker threads counts, as wall time, in the stage that waits for it. Off, a stage costs one global lookup.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

_seconds: dict[str, float] | None = None
_stack: list[list[Any]] = []  # [stage name, time its current uninterrupted span started]
_owner: int | None = None  # the thread that records


@contextmanager
def stage(name: str) -> Iterator[None]:
    if _seconds is None or threading.get_ident() != _owner:
        yield
        return
    seconds, now = _seconds, time.perf_counter()
    if _stack:  # pause the enclosing stage
        outer = _stack[-1]
        seconds[outer[0]] = seconds.get(outer[0], 0.0) + now - outer[1]
    _stack.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        inner = _stack.pop()
        seconds[inner[0]] = seconds.get(inner[0], 0.0) + now - inner[1]
        if _stack:
            _stack[-1][1] = now


def timed(name: str) -> Callable[[F], F]:
    """Decorator form of ``stage``."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with stage(name):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap


@contextmanager
def record() -> Iterator[dict[str, float]]:
    """Collect the stages run inside the block: {stage: exclusive seconds}, filled as they finish."""
    global _seconds, _owner
    if _seconds is not None:
        raise RuntimeError("timing.record() does not nest")
    _seconds, _owner = {}, threading.get_ident()
    try:
        yield _seconds
    finally:
        _seconds = None
        _stack.clear()


_baseline = False


@contextmanager
def baseline() -> Iterator[None]:
    """Inside: the speed-ups of issue #16 off, for before/after comparisons in one process
    (benchmarks/quantize_speed.py --compare-before): the column search evaluates every candidate directly,
    the linears are solved one after another with all torch threads, and LTDB learns one linear at a time.
    At one thread the stored forms are the same either way."""
    global _baseline
    saved, _baseline = _baseline, True
    try:
        yield
    finally:
        _baseline = saved


def speedups() -> bool:
    """False inside ``baseline()``."""
    return not _baseline


def one_thread_each(
    fn: Callable[[Any], Any], items: list[Any], cost: Callable[[Any], float] | None = None
) -> Iterator[Any]:
    """``fn`` over ``items`` (results in order): T at a time in worker threads of one torch thread each when
    torch has T > 1 threads, else in the calling thread. Each job then computes exactly what it computes on one
    thread (a result that does not depend on T), and jobs that ran on one thread anyway (LTDB) gain T×.
    ``cost`` (relative work of an item): the costliest start first, so that no large job runs alone at the end.
    Worker threads are not timed (their wall time counts in the caller's stage)."""
    threads = torch.get_num_threads()
    if threads == 1 or len(items) < 2 or _baseline:
        yield from map(fn, items)
        return

    def run(item: Any) -> Any:
        torch.set_num_threads(1)  # the worker's own setting: the caller keeps its threads
        return fn(item)

    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else range(len(items))
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        futures = {i: pool.submit(run, items[i]) for i in order}
        for i in range(len(items)):
            yield futures[i].result()
