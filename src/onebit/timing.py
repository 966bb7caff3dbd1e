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
from contextlib import contextmanager
from typing import Any, TypeVar

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
