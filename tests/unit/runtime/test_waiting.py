"""``wait_until`` on a fake clock: returns the first truthy value, raises on the deadline."""

from __future__ import annotations

import pytest

from workers.runtime.waiting import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_returns_the_first_truthy_value_and_sleeps_between_polls() -> None:
    clock = FakeClock()
    answers = iter([None, 0, "", {"ok": 1}])
    got = wait_until(lambda: next(answers), timeout=5, interval=0.5, clock=clock, sleep=clock.sleep)
    assert got == {"ok": 1}
    assert clock.slept == [0.5, 0.5, 0.5]


def test_raises_the_given_error_with_the_last_state_once_the_deadline_passes() -> None:
    clock = FakeClock()
    seen: list[int] = []

    def check() -> bool:
        seen.append(len(seen))
        return False

    with pytest.raises(RuntimeError, match=r"still 5 polls \(waited 2s\)"):
        wait_until(
            check,
            timeout=2,
            interval=0.5,
            message=lambda: f"still {len(seen)} polls",
            error=RuntimeError,
            clock=clock,
            sleep=clock.sleep,
        )
    # Polled at 0, 0.5, 1.0, 1.5 and 2.0: the last sleep is cut to the deadline.
    assert len(seen) == 5
    assert clock.now == 102.0


def test_checks_once_even_without_time_and_lets_its_errors_through() -> None:
    clock = FakeClock()
    assert wait_until(lambda: 7, timeout=0, clock=clock, sleep=clock.sleep) == 7
    with pytest.raises(TimeoutError, match="condition"):
        wait_until(lambda: False, timeout=0, clock=clock, sleep=clock.sleep)

    def broken() -> bool:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        wait_until(broken, timeout=10, clock=clock, sleep=clock.sleep)
