"""The sender's due times (pure): on a shared grid, never early, never drifting."""

from __future__ import annotations

import math

import pytest

from batch.pacing import TICK_S, wake_at


def test_a_chunk_is_never_due_early_and_at_most_one_tick_late() -> None:
    started = 1234.5678
    for i in range(1, 2000):
        position_s = i * 0.128
        due = started + position_s
        wake = wake_at(started, position_s, 1.0)
        assert due <= wake < due + TICK_S + 1e-9
        # On the grid: sessions due within one tick wake together.
        assert math.isclose(wake / TICK_S, round(wake / TICK_S), abs_tol=1e-6)


def test_lateness_does_not_accumulate_over_an_hour() -> None:
    started = 17.003
    hour = wake_at(started, 3600.0, 1.0)
    assert hour - (started + 3600.0) == pytest.approx(0.0, abs=TICK_S)


@pytest.mark.parametrize("pace", [0.5, 1.0, 4.0, 40.0])
def test_the_pace_scales_the_due_time(pace: float) -> None:
    wake = wake_at(100.0, 12.8, pace)
    assert 100.0 + 12.8 / pace <= wake < 100.0 + 12.8 / pace + TICK_S + 1e-9


def test_without_a_grid_the_due_time_is_exact() -> None:
    assert wake_at(10.0, 1.28, 2.0, tick_s=0.0) == 10.64
