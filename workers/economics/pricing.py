"""Pricing: a period's plan parts priced into invoice lines, purely (no database, no I/O).

A period is intersected with the tenant's plan history into parts, each priced on its own
plan: a base line (the monthly price times the part's share of the period), and per metric
a line for its usage in the part against the included quota, prorated the same way. Usage
that arrives after its period was invoiced is priced as ``late`` lines on the plan of the
period that bills it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from schemas.plans import Plan

__all__ = [
    "BYTES_PER_GB",
    "MONEY",
    "Part",
    "Priced",
    "QUANTITY",
    "Span",
    "Usage",
    "ZERO",
    "in_billing_units",
    "money",
    "price_period",
    "split_period",
]

#: Amounts are kept to 1/100 of a cent; quantities shown to a millionth.
MONEY: Final = Decimal("0.0001")
QUANTITY: Final = Decimal("0.000001")
ZERO: Final = Decimal(0)
#: Bytes in a GB, as plans count memory and storage (GiB).
BYTES_PER_GB: Final = Decimal(1024**3)

#: Metrics metered in bytes, billed in GB under the plan's name for them.
_BYTE_METRICS: Final = {
    "disk_bytes": "storage_gb",
    "storage_bytes": "storage_gb",
    "memory_bytes": "memory_gb",
}


#: A stretch of a tenant's plan history: (plan, from, to or ``None`` while it lasts).
Span = tuple[str, dt.datetime, dt.datetime | None]


@dataclass(frozen=True)
class Part:
    """A stretch ``[start, end)`` of a period spent on one plan."""

    plan: str
    start: dt.datetime
    end: dt.datetime


@dataclass(frozen=True)
class Usage:
    """One metric's usage over a part (or late), in billing units.

    ``value`` is the sum for ``sum`` metrics, the peak for ``max`` and the mean for
    ``avg``; bytes are already GB.
    """

    metric: str
    aggregation: str
    value: Decimal
    first: dt.datetime | None = None
    last: dt.datetime | None = None


@dataclass(frozen=True)
class Priced:
    """An invoice's lines (JSON-ready), total and currency."""

    lines: list[dict[str, Any]]
    total: Decimal
    currency: str


def split_period(
    start: dt.datetime,
    end: dt.datetime,
    history: Sequence[Span],
    *,
    until: dt.datetime | None = None,
) -> list[Part]:
    """The parts of ``[start, end)`` on each plan of ``history`` (plan, from, to|None).

    A span is cut at the next span's start, so overlapping history never bills twice;
    ``until`` (a terminated tenant's end) closes an open span.
    """
    spans = sorted(history, key=lambda span: span[1])
    parts: list[Part] = []
    for position, (plan, begins, ends) in enumerate(spans):
        stop = end
        for limit in (ends, until, spans[position + 1][1] if position + 1 < len(spans) else None):
            if limit is not None:
                stop = min(stop, limit)
        lower = max(start, begins)
        if lower < stop:
            parts.append(Part(plan, lower, stop))
    return parts


def in_billing_units(metric: str, value: Decimal) -> tuple[str, Decimal]:
    """A metered metric and value as plans bill them: bytes become GB, under the plan's
    name for them (``storage_bytes`` → ``storage_gb``); any other metric is unchanged."""
    if metric in _BYTE_METRICS:
        return _BYTE_METRICS[metric], value / BYTES_PER_GB
    return metric, value


def money(value: Decimal | float | str) -> Decimal:
    """``value`` as an amount: a Decimal rounded half up to 1/100 of a cent."""
    amount = value if isinstance(value, Decimal) else Decimal(str(value))
    return amount.quantize(MONEY, rounding=ROUND_HALF_UP)


def _quantity(value: Decimal) -> str:
    shown = value.quantize(QUANTITY, rounding=ROUND_HALF_UP).normalize()
    return format(shown, "f")


def _quota(plan: Plan, metric: str) -> Decimal | None:
    """A full period's included amount of ``metric`` on ``plan`` (``None``: unlimited)."""
    quota: float | int | None
    if metric == "requests":
        quota = plan.max_requests_per_month
    elif metric == "storage_gb":
        quota = plan.storage_gb
    elif metric == "memory_gb":
        quota = plan.memory_gb
    elif metric == "cpu_seconds":
        # Plans cap cores, not CPU time: every CPU-second is billed where it has a price.
        quota = 0
    else:
        return None
    return None if quota is None else Decimal(str(quota))


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _line(
    kind: str,
    plan: str,
    metric: str | None,
    span: tuple[str | None, str | None],
    quantity: str,
    included: Decimal | None,
    unit_price: Decimal,
    amount: Decimal,
    *,
    late: bool = False,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "plan": plan,
        "metric": metric,
        "from": span[0],
        "to": span[1],
        "quantity": quantity,
        "included": None if included is None else _quantity(included),
        "unit_price": str(unit_price),
        "amount": str(money(amount)),
        "late": late,
    }


def _share(part: Part, length: Decimal) -> Decimal:
    """The part's share of a period ``length`` microseconds long."""
    return Decimal((part.end - part.start) // dt.timedelta(microseconds=1)) / length


def _base_line(plan: Plan, span: tuple[str | None, str | None], share: Decimal) -> dict[str, Any]:
    """The part's base line: the plan's monthly price times the part's share of the period."""
    return _line(
        "base",
        plan.name,
        None,
        span,
        _quantity(share),
        None,
        plan.monthly_price,
        plan.monthly_price * share,
    )


def _usage_line(
    plan: Plan, span: tuple[str | None, str | None], share: Decimal, used: Usage
) -> dict[str, Any]:
    """One metric's line of a part: an ``overage`` line where the plan prices the metric,
    an informative ``usage`` line (nothing billed) where it does not."""
    quantity = used.value if used.aggregation == "sum" else used.value * share
    quota = _quota(plan, used.metric)
    price = plan.overage.get(used.metric)
    if price is None:
        included = None if quota is None else quota * share
        return _line(
            "usage",
            plan.name,
            used.metric,
            span,
            _quantity(quantity),
            included,
            ZERO,
            ZERO,
        )
    # A priced metric without a quota (enterprise) is invoiced on all its usage.
    included = (quota or ZERO) * share
    return _line(
        "overage",
        plan.name,
        used.metric,
        span,
        _quantity(quantity),
        included,
        price,
        max(ZERO, quantity - included) * price,
    )


def _late_line(plan: Plan, used: Usage) -> dict[str, Any]:
    """A late metric's line: a ``sum`` the plan prices is billed in full, the rest shown."""
    price = plan.overage.get(used.metric)
    billed = used.aggregation == "sum" and price is not None
    return _line(
        "overage" if billed else "usage",
        plan.name,
        used.metric,
        (_iso(used.first), _iso(used.last)),
        _quantity(used.value),
        ZERO if billed else None,
        price if billed and price is not None else ZERO,
        used.value * price if billed and price is not None else ZERO,
        late=True,
    )


def _by_metric(usage: Iterable[Usage]) -> list[Usage]:
    """``usage`` in metric order: the order of an invoice's lines."""
    return sorted(usage, key=lambda u: u.metric)


def price_period(
    start: dt.datetime,
    end: dt.datetime,
    parts: Sequence[Part],
    usage: Mapping[int, Sequence[Usage]],
    plans: Callable[[str], Plan],
    *,
    late: Sequence[Usage] = (),
) -> Priced:
    """Price one period: ``usage`` by part index, ``late`` usage on the last part's plan.

    Per part, with ``share`` = part length / period length:

    - base: ``monthly_price × share``;
    - a ``sum`` metric: its total against ``quota × share``;
    - a ``max``/``avg`` metric (a level, e.g. storage GB): ``level × share`` against
      ``quota × share``, both in unit-periods (GB-months);
    - a metric with an ``overage`` price is an ``overage`` line (the quantity above the
      included amount times the unit price), any other an informative ``usage`` line.

    Late usage includes nothing (its own period's quota was settled with that period):
    ``sum`` metrics are billed in full at the current plan's price; a late level reading
    is shown, not billed.
    """
    length = Decimal((end - start) // dt.timedelta(microseconds=1))
    lines: list[dict[str, Any]] = []
    currency = "USD"
    for position, part in enumerate(parts):
        plan = plans(part.plan)
        currency = plan.currency
        share = _share(part, length)
        # Every line of a part shows its bounds: written out once.
        span = (part.start.isoformat(), part.end.isoformat())
        lines.append(_base_line(plan, span, share))
        lines.extend(
            _usage_line(plan, span, share, used) for used in _by_metric(usage.get(position, ()))
        )
    if late and parts:
        plan = plans(parts[-1].plan)
        lines.extend(_late_line(plan, used) for used in _by_metric(late))
    total = sum((Decimal(line["amount"]) for line in lines), ZERO)
    return Priced(lines=lines, total=money(total), currency=currency)
