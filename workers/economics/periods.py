"""Billing periods: each tenant's periods, counted from its anchor, purely.

A tenant's periods run from its ``billing_anchor`` (midnight UTC) in steps of
``billing_period``: calendar months from the anchor day (clamped to the month's length,
so an anchor on the 31st bills Jan 31, Feb 28, Mar 31, ...), or days, hours or minutes.
A period ``[start, end)`` is due once ``end <= as_of``.
"""

from __future__ import annotations

import calendar
import datetime as dt
from typing import Final, Literal

__all__ = [
    "MAX_PERIODS_PER_RUN",
    "PeriodKind",
    "due_periods",
    "period_bounds",
    "period_index",
    "period_start",
]

PeriodKind = Literal["month", "day", "hour", "minute"]

#: Periods of one tenant closed by one run; a longer backlog continues in the next run.
MAX_PERIODS_PER_RUN: Final = 400

_FIXED: Final[dict[str, dt.timedelta]] = {
    "day": dt.timedelta(days=1),
    "hour": dt.timedelta(hours=1),
    "minute": dt.timedelta(minutes=1),
}


def _midnight(anchor: dt.date) -> dt.datetime:
    return dt.datetime(anchor.year, anchor.month, anchor.day, tzinfo=dt.UTC)


def period_start(anchor: dt.date, period: PeriodKind, index: int) -> dt.datetime:
    """The start of the ``index``-th period from ``anchor`` (0 starts at the anchor)."""
    if period == "month":
        months = anchor.year * 12 + anchor.month - 1 + index
        year, month0 = divmod(months, 12)
        # Each period is counted from the anchor, never from the last clamped start: an
        # anchor on the 31st comes back to the 31st after February's 28th.
        day = min(anchor.day, calendar.monthrange(year, month0 + 1)[1])
        return dt.datetime(year, month0 + 1, day, tzinfo=dt.UTC)
    return _midnight(anchor) + _FIXED[period] * index


def period_index(anchor: dt.date, period: PeriodKind, moment: dt.datetime) -> int:
    """The index of the period ``moment`` falls in (negative before the anchor)."""
    if period == "month":
        index = (moment.year - anchor.year) * 12 + moment.month - anchor.month
        if period_start(anchor, period, index) > moment:
            index -= 1
        return index
    return (moment - _midnight(anchor)) // _FIXED[period]


def period_bounds(
    anchor: dt.date, period: PeriodKind, moment: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """``[start, end)`` of the period ``moment`` falls in."""
    index = period_index(anchor, period, moment)
    return period_start(anchor, period, index), period_start(anchor, period, index + 1)


def due_periods(
    anchor: dt.date,
    period: PeriodKind,
    *,
    since: dt.datetime,
    as_of: dt.datetime,
    until: dt.datetime | None = None,
    limit: int = MAX_PERIODS_PER_RUN,
) -> list[tuple[dt.datetime, dt.datetime]]:
    """The periods from the one holding ``since`` that ended by ``as_of``, oldest first.

    At most ``limit``; ``until`` (a tenant's end) stops before the first period starting
    at or after it.
    """
    index = period_index(anchor, period, since)
    found: list[tuple[dt.datetime, dt.datetime]] = []
    start = period_start(anchor, period, index)
    while len(found) < limit:
        end = period_start(anchor, period, index + 1)
        if end > as_of or (until is not None and start >= until):
            break
        found.append((start, end))
        index, start = index + 1, end
    return found
