"""Progress reporting for long loops: rich bars on a terminal, plain periodic lines otherwise, or nothing."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("onebit")

_progress = None  # the active rich Progress, if any


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[None]:
    """Within this context, ``track`` draws rich progress bars (used by the CLI)."""
    global _progress
    if not enabled:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        transient=False,
    ) as p:
        _progress = p
        try:
            yield
        finally:
            _progress = None


def track(items: Iterable[T], description: str, total: int | None = None, transient: bool = False) -> Iterator[T]:
    """Iterate with a progress bar when bars are enabled; otherwise log a line every ~30 s."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _progress is not None:
        task = _progress.add_task(description, total=total)
        for item in items:
            yield item
            _progress.advance(task)
        if transient:
            _progress.remove_task(task)
        return
    last = time.monotonic()
    for i, item in enumerate(items):
        yield item
        if time.monotonic() - last > 30:
            log.info("%s: %d/%s", description, i + 1, total)
            last = time.monotonic()
