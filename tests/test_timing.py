"""onebit.timing: exclusive stage seconds, on a fake clock (no real time is measured here)."""

from __future__ import annotations

import pytest

from onebit import timing


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nested_stages_are_exclusive_and_add_up(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)

    @timed_search
    def inner() -> int:
        clock.now += 2.0
        return 7

    with timing.record() as secs:
        with timing.stage("fit"):
            clock.now += 1.0
            assert inner() == 7  # 2 s in "searches", not in "fit"
            clock.now += 0.5
            with timing.stage("fit"):  # re-entering the same stage counts once
                clock.now += 0.25
        with timing.stage("layer replay"):
            clock.now += 3.0
    assert secs == {"fit": 1.75, "searches": 2.0, "layer replay": 3.0}
    assert sum(secs.values()) == clock.now  # exclusive: the stages add up to the wall time


def timed_search(fn):
    return timing.timed("searches")(fn)


def test_off_by_default_and_record_does_not_nest(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    with timing.stage("fit"):  # nothing collects: a no-op
        clock.now += 1.0
    with timing.record() as secs:
        with pytest.raises(RuntimeError, match="does not nest"):
            with timing.record():
                pass
    assert secs == {}
    with timing.record() as again:  # usable again after an error inside
        with pytest.raises(ValueError):
            with timing.stage("fit"):
                clock.now += 1.0
                raise ValueError
    assert again == {"fit": 1.0}
