"""``wait_until``: poll a condition until it holds or a deadline passes.

The one deadline loop of the code base: starting an embedded broker, a container coming up,
an exec finishing, a health window, a test waiting on a worker. ``clock`` and ``sleep`` are
injectable so a test can run the loop on a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
    error: type[Exception] = TimeoutError,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """The first truthy value ``check()`` returns, polled every ``interval`` seconds.

    ``check`` runs at least once, even with ``timeout=0``. When ``timeout`` seconds pass
    without a truthy value it raises ``error`` with ``message`` (called then, when it is a
    function, so it can describe the last state seen); an exception from ``check`` itself
    propagates at once.
    """
    deadline = clock() + timeout
    while True:
        value = check()
        if value:
            return value
        remaining = deadline - clock()
        if remaining <= 0:
            text = message() if callable(message) else message
            raise error(f"{text} (waited {timeout:g}s)")
        sleep(min(interval, remaining))
