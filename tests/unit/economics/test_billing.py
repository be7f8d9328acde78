"""Billing: periods, plan parts and pricing as pure functions; invoices on real SQLite and
PostgreSQL (late usage, once-only).

Pricing is checked on plans built in the test, without a database. For the invoices, usage
rows are inserted directly (as metering leaves them) and the invoices are checked against
amounts computed by hand in the tests.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
from sqlalchemy import func, select, update

from schemas.plans import Plan
from schemas.states import TenantStatus
from tasks.billing import close_periods as close_task
from tasks.billing import get_invoice
from workers.economics import billing, periods, pricing
from workers.runtime.db import session_scope
from workers.runtime.models import Invoice, PlanPeriod, Tenant, UsageRecord
from workers.runtime.settings import Settings

UTC = dt.UTC


def at(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def q(value: Decimal) -> Decimal:
    """Rounded to 1/100 of a cent, half up: how the invoice rounds each line."""
    return value.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, process_settings: Callable[..., Settings]) -> str:
    """A migrated database (the settings' database too), with no cul8er process around."""
    return process_settings(request.param).sqlalchemy_url


def add_tenant(
    url: str,
    tenant_id: str,
    anchor: dt.date,
    history: list[tuple[str, dt.datetime, dt.datetime | None]],
    *,
    status: str = TenantStatus.ACTIVE,
    updated_at: dt.datetime | None = None,
) -> None:
    """A tenant and its plan history, as create and change_plan leave them."""
    with session_scope(url) as session:
        first = history[0][1]
        session.add(
            Tenant(
                id=tenant_id,
                name=tenant_id,
                plan=history[-1][0],
                status=status,
                platform="local",
                resources={},
                meta={},
                billing_anchor=anchor,
                created_at=first,
                updated_at=updated_at or first,
            )
        )
        for plan, start, end in history:
            session.add(PlanPeriod(tenant_id=tenant_id, plan=plan, start_at=start, end_at=end))


def add_usage(
    url: str,
    tenant_id: str,
    rows: list[tuple[str, dt.datetime, float]],
    *,
    recorded_at: dt.datetime | None = None,
) -> None:
    """Usage rows ``(metric, window_start, value)`` of one-minute windows."""
    aggregation = {"storage_gb": "max", "memory_gb": "avg"}
    with session_scope(url) as session:
        for metric, start, value in rows:
            record = UsageRecord(
                tenant_id=tenant_id,
                metric=metric,
                window_start=start,
                window_end=start + dt.timedelta(minutes=1),
                value=value,
                aggregation=aggregation.get(metric, "sum"),
            )
            if recorded_at is not None:
                record.recorded_at = recorded_at
            session.add(record)


def invoices(url: str, tenant_id: str | None = None) -> list[Invoice]:
    with session_scope(url) as session:
        query = select(Invoice).order_by(Invoice.tenant_id, Invoice.period_start)
        if tenant_id is not None:
            query = query.where(Invoice.tenant_id == tenant_id)
        return list(session.scalars(query))


def line(lines: list[dict[str, Any]], kind: str, plan: str, metric: str | None) -> dict[str, Any]:
    found = [x for x in lines if (x["kind"], x["plan"], x["metric"]) == (kind, plan, metric)]
    assert len(found) == 1, (kind, plan, metric, lines)
    return found[0]


# -- periods ---------------------------------------------------------------------------------


def test_monthly_periods_from_an_anchor_on_the_31st_clamp_and_come_back() -> None:
    # Given an anchor on January 31st (2026: February has 28 days)
    anchor = dt.date(2026, 1, 31)

    # When the monthly periods are counted from it
    starts = [periods.period_start(anchor, "month", i) for i in range(-1, 6)]

    # Then each starts on the 31st, or the month's last day, never drifting to the 28th
    assert starts == [
        at(2025, 12, 31),
        at(2026, 1, 31),
        at(2026, 2, 28),
        at(2026, 3, 31),
        at(2026, 4, 30),
        at(2026, 5, 31),
        at(2026, 6, 30),
    ]
    # And a leap year's February ends its period on the 29th
    assert periods.period_start(dt.date(2028, 1, 31), "month", 1) == at(2028, 2, 29)
    assert periods.period_start(dt.date(2028, 2, 29), "month", 12) == at(2029, 2, 28)
    assert periods.period_start(dt.date(2028, 2, 29), "month", 48) == at(2032, 2, 29)
    # And every moment falls in exactly the period whose bounds hold it
    assert periods.period_bounds(anchor, "month", at(2026, 2, 27, 23, 59)) == (
        at(2026, 1, 31),
        at(2026, 2, 28),
    )
    assert periods.period_bounds(anchor, "month", at(2026, 2, 28)) == (
        at(2026, 2, 28),
        at(2026, 3, 31),
    )
    assert periods.period_bounds(anchor, "month", at(2026, 3, 30, 12)) == (
        at(2026, 2, 28),
        at(2026, 3, 31),
    )
    assert periods.period_index(anchor, "month", at(2026, 1, 30)) == -1
    for moment in (at(2026, 1, 31), at(2026, 7, 1, 5), at(2027, 2, 28), at(2030, 12, 31, 23)):
        start, end = periods.period_bounds(anchor, "month", moment)
        assert start <= moment < end


def test_short_periods_count_from_the_anchors_midnight() -> None:
    # Given an anchor and a moment 10 h 5 min 30 s after its midnight
    anchor = dt.date(2026, 11, 23)
    moment = at(2026, 11, 23, 10, 5, 30)

    # Then the minute, hour and day periods holding it are the expected ones
    assert periods.period_bounds(anchor, "minute", moment) == (
        at(2026, 11, 23, 10, 5),
        at(2026, 11, 23, 10, 6),
    )
    assert periods.period_index(anchor, "hour", moment) == 10
    assert periods.period_bounds(anchor, "day", moment) == (at(2026, 11, 23), at(2026, 11, 24))
    # And a moment before the anchor falls in a period before it
    assert periods.period_index(anchor, "minute", at(2026, 11, 22, 23, 59, 59)) == -1


def test_due_periods_start_with_the_one_holding_since_and_stop_at_as_of_and_until() -> None:
    anchor = dt.date(2026, 4, 1)
    # Given a tenant that signed up mid-April, asked on July 2nd
    due = periods.due_periods(anchor, "month", since=at(2026, 4, 16, 9), as_of=at(2026, 7, 2))
    # Then April, May and June are due; July is still running
    assert due == [
        (at(2026, 4, 1), at(2026, 5, 1)),
        (at(2026, 5, 1), at(2026, 6, 1)),
        (at(2026, 6, 1), at(2026, 7, 1)),
    ]
    # And a tenant terminated in May has nothing due after May
    ended = periods.due_periods(
        anchor, "month", since=at(2026, 4, 16), as_of=at(2026, 7, 2), until=at(2026, 5, 3)
    )
    assert ended == due[:2]
    # And one run closes at most ``limit`` periods, oldest first
    assert periods.due_periods(
        anchor, "minute", since=at(2026, 4, 1), as_of=at(2026, 4, 2), limit=3
    ) == [
        (at(2026, 4, 1, 0, 0), at(2026, 4, 1, 0, 1)),
        (at(2026, 4, 1, 0, 1), at(2026, 4, 1, 0, 2)),
        (at(2026, 4, 1, 0, 2), at(2026, 4, 1, 0, 3)),
    ]


def test_a_period_splits_at_each_plan_change_and_overlaps_never_bill_twice() -> None:
    # Given a history starter → pro → starter, where the second span overlaps the third
    history: list[tuple[str, dt.datetime, dt.datetime | None]] = [
        ("starter", at(2026, 3, 20), at(2026, 4, 11)),
        ("pro", at(2026, 4, 11), at(2026, 4, 25)),
        ("starter", at(2026, 4, 21), None),
    ]
    # When April is split
    parts = pricing.split_period(at(2026, 4, 1), at(2026, 5, 1), history)
    # Then each stretch is on one plan, the overlap cut at the next span's start
    assert parts == [
        pricing.Part("starter", at(2026, 4, 1), at(2026, 4, 11)),
        pricing.Part("pro", at(2026, 4, 11), at(2026, 4, 21)),
        pricing.Part("starter", at(2026, 4, 21), at(2026, 5, 1)),
    ]
    # And a tenant terminated on the 25th has no part after it
    assert pricing.split_period(at(2026, 4, 1), at(2026, 5, 1), history, until=at(2026, 4, 25))[
        -1
    ] == pricing.Part("starter", at(2026, 4, 21), at(2026, 4, 25))


# -- pricing (pure: no database) -------------------------------------------------------------

#: Plans with round numbers, so each amount below is easy to check by hand.
BASIC = Plan(
    name="basic",
    monthly_price=Decimal(30),
    max_requests_per_month=1000,
    storage_gb=10,
    memory_gb=4,
    overage={"requests": Decimal("0.01"), "storage_gb": Decimal("0.5")},
)
BIG = Plan(
    name="big",
    monthly_price=Decimal(90),
    max_requests_per_month=10_000,
    currency="EUR",
    overage={"requests": Decimal("0.001")},
)
#: Priced on usage, with no quota at all (an enterprise-like plan).
METERED = Plan(name="metered", overage={"requests": Decimal("0.001")})
PLANS = {plan.name: plan for plan in (BASIC, BIG, METERED)}
#: April 2026: a 30-day period.
APRIL = (at(2026, 4, 1), at(2026, 5, 1))


def price(
    parts: list[pricing.Part],
    usage: dict[int, list[pricing.Usage]],
    late: tuple[pricing.Usage, ...] = (),
) -> pricing.Priced:
    """April priced on ``parts`` with the test plans."""
    return pricing.price_period(*APRIL, parts, usage, PLANS.__getitem__, late=late)


def test_a_full_period_within_its_quota_costs_the_monthly_price() -> None:
    # Given a whole April on basic with 500 of its 1000 requests used
    parts = [pricing.Part("basic", *APRIL)]
    priced = price(parts, {0: [pricing.Usage("requests", "sum", Decimal(500))]})
    # Then the base is the monthly price, the requests line bills nothing, in the plan's currency
    base = line(priced.lines, "base", "basic", None)
    assert (base["quantity"], base["amount"], base["unit_price"]) == ("1", "30.0000", "30")
    requests = line(priced.lines, "overage", "basic", "requests")
    assert (requests["quantity"], requests["included"], requests["amount"]) == (
        "500",
        "1000",
        "0.0000",
    )
    assert (priced.total, priced.currency) == (Decimal("30.0000"), "USD")
    assert [x["kind"] for x in priced.lines] == ["base", "overage"]


def test_a_plan_change_prorates_the_base_and_the_included_quota_of_each_part() -> None:
    # Given April on basic for 10 days (a third) and on big for 20 (two thirds)
    parts = [
        pricing.Part("basic", at(2026, 4, 1), at(2026, 4, 11)),
        pricing.Part("big", at(2026, 4, 11), at(2026, 5, 1)),
    ]
    usage = {
        0: [pricing.Usage("requests", "sum", Decimal(400))],
        1: [pricing.Usage("requests", "sum", Decimal(7000))],
    }
    priced = price(parts, usage)
    # Then each base is its share of the monthly price
    assert line(priced.lines, "base", "basic", None)["quantity"] == "0.333333"
    assert line(priced.lines, "base", "basic", None)["amount"] == "10.0000"
    assert line(priced.lines, "base", "big", None)["amount"] == "60.0000"
    # And each part includes its share of the quota: the overage is what is above it
    basic = line(priced.lines, "overage", "basic", "requests")
    assert (basic["included"], basic["amount"]) == ("333.333333", "0.6667")  # 66.67 × 0.01
    big = line(priced.lines, "overage", "big", "requests")
    assert (big["included"], big["amount"]) == ("6666.666667", "0.3333")  # 333.33 × 0.001
    # And the total adds the rounded lines; the currency is the last part's plan's
    assert priced.total == Decimal("71.0000")
    assert priced.currency == "EUR"


def test_levels_are_prorated_like_their_quota_and_unpriced_metrics_are_shown_free() -> None:
    # Given the second half of April on basic, at a 16 GB storage peak and 2 GB of memory
    parts = [pricing.Part("basic", at(2026, 4, 16), at(2026, 5, 1))]
    usage = {
        0: [
            pricing.Usage("storage_gb", "max", Decimal(16)),
            pricing.Usage("memory_gb", "avg", Decimal(2)),
            pricing.Usage("bandwidth_bytes", "sum", Decimal(123)),
        ]
    }
    priced = price(parts, usage)
    # Then storage is 8 GB-months against 5 included: 3 over at 0.5
    storage = line(priced.lines, "overage", "basic", "storage_gb")
    assert (storage["quantity"], storage["included"], storage["amount"]) == ("8", "5", "1.5000")
    # And memory (no price) is shown against its prorated quota, billing nothing
    memory = line(priced.lines, "usage", "basic", "memory_gb")
    assert (memory["quantity"], memory["included"], memory["amount"]) == ("1", "2", "0.0000")
    # And a metric neither priced nor under a quota is shown with nothing included
    bandwidth = line(priced.lines, "usage", "basic", "bandwidth_bytes")
    assert (bandwidth["quantity"], bandwidth["included"]) == ("123", None)
    # And the lines after the base follow the metrics' names
    assert [x["metric"] for x in priced.lines] == [
        None,
        "bandwidth_bytes",
        "memory_gb",
        "storage_gb",
    ]
    assert priced.total == Decimal("16.5000")  # 15 + 1.5


def test_a_priced_metric_without_a_quota_is_billed_on_all_its_usage() -> None:
    # Given a whole April on the metered plan (no quota, no monthly price)
    parts = [pricing.Part("metered", *APRIL)]
    priced = price(parts, {0: [pricing.Usage("requests", "sum", Decimal(5000))]})
    # Then every request is billed
    requests = line(priced.lines, "overage", "metered", "requests")
    assert (requests["included"], requests["amount"]) == ("0", "5.0000")
    assert priced.total == Decimal("5.0000")


def test_late_usage_is_billed_in_full_on_the_last_parts_plan_and_late_levels_are_shown() -> None:
    # Given April on big then basic, and usage of March that arrived after March's invoice
    parts = [
        pricing.Part("big", at(2026, 4, 1), at(2026, 4, 20)),
        pricing.Part("basic", at(2026, 4, 20), at(2026, 5, 1)),
    ]
    first, last = at(2026, 3, 30), at(2026, 3, 30, 0, 1)
    late = (
        pricing.Usage("requests", "sum", Decimal(300), first, last),
        pricing.Usage("storage_gb", "max", Decimal(50), first, last),
    )
    priced = price(parts, {}, late=late)
    # Then the late requests are billed on basic with nothing included, over their windows
    requests = line([x for x in priced.lines if x["late"]], "overage", "basic", "requests")
    assert (requests["included"], requests["amount"]) == ("0", "3.0000")  # 300 × 0.01
    assert (requests["from"], requests["to"]) == (first.isoformat(), last.isoformat())
    # And the late storage level is shown, not billed, though basic prices storage
    storage = line(priced.lines, "usage", "basic", "storage_gb")
    assert (storage["late"], storage["included"], storage["amount"]) == (True, None, "0.0000")
    assert priced.total == Decimal("71.0000")  # 90 × 19/30 + 30 × 11/30 + 3 = 57 + 11 + 3
    # And with no part to bill them on, late usage is left for a later period
    nothing = pricing.Priced(lines=[], total=Decimal("0.0000"), currency="USD")
    assert price([], {}, late=late) == nothing


def test_amounts_round_half_up_and_bytes_are_billed_in_gb() -> None:
    assert pricing.money(Decimal("0.00005")) == Decimal("0.0001")
    assert pricing.money(1.23454) == Decimal("1.2345")
    assert pricing.money("2") == Decimal("2.0000")
    assert pricing.in_billing_units("storage_bytes", Decimal(3 * 1024**3)) == ("storage_gb", 3)
    assert pricing.in_billing_units("memory_bytes", Decimal(1024**3 // 2)) == (
        "memory_gb",
        Decimal("0.5"),
    )
    assert pricing.in_billing_units("requests", Decimal(7)) == ("requests", Decimal(7))


# -- invoices --------------------------------------------------------------------------------


#: Usage of a tenant upgraded from starter to pro on April 11th: on each side of the
#: upgrade, plus a row of May (another period).
UPGRADE_USAGE: list[tuple[str, dt.datetime, float]] = [
    ("requests", at(2026, 4, 2, 10), 30_000),
    ("requests", at(2026, 4, 10, 23, 59), 20_000),
    ("requests", at(2026, 4, 11), 400_000),
    ("requests", at(2026, 4, 30, 23, 59), 300_000),
    ("requests", at(2026, 5, 1), 999),
    ("cpu_seconds", at(2026, 4, 5), 100_000),
    ("cpu_seconds", at(2026, 4, 20), 200_000),
    ("storage_gb", at(2026, 4, 3), 12),
    ("storage_gb", at(2026, 4, 9), 26),
    ("storage_gb", at(2026, 4, 15), 40),
    ("memory_gb", at(2026, 4, 4), 1),
    ("memory_gb", at(2026, 4, 8), 3),
    ("memory_gb", at(2026, 4, 12), 8),
]


def upgrade_total_by_hand(starter: Decimal, pro: Decimal) -> Decimal:
    """The upgraded tenant's April total with each plan's share: every billed line rounded
    on its own, then added, as the invoice does."""
    return (
        q(29 * starter)
        + q(99 * pro)
        + q((50_000 - 100_000 * starter) * Decimal("0.0005"))
        + q((700_000 - 1_000_000 * pro) * Decimal("0.0002"))
        + q(100_000 * Decimal("0.00002"))
        + q(200_000 * Decimal("0.000015"))
        + q((26 - 20) * starter * Decimal("0.10"))
    )


def test_a_mid_period_upgrade_is_priced_part_by_part_as_computed_by_hand(db: str) -> None:
    # Given a tenant on starter from April 1st (a 30-day period), on pro from the 11th
    history: list[tuple[str, dt.datetime, dt.datetime | None]] = [
        ("starter", at(2026, 4, 1), at(2026, 4, 11)),
        ("pro", at(2026, 4, 11), None),
    ]
    add_tenant(db, "acme", dt.date(2026, 4, 1), history)
    add_usage(db, "acme", UPGRADE_USAGE)  # on both sides of the upgrade, and in May

    # When the periods that ended by May 1st 01:00 are closed
    summary = billing.close_periods(at(2026, 5, 1, 1), url=db)

    # Then April has one invoice, priced part by part
    (invoice,) = invoices(db)
    assert summary.inserted == [invoice.id] == [billing.invoice_id("acme", at(2026, 4, 1))]
    assert (invoice.period_start, invoice.period_end) == (at(2026, 4, 1), at(2026, 5, 1))
    assert invoice.currency == "USD"
    lines = invoice.lines
    starter, pro = Decimal(10) / 30, Decimal(20) / 30  # each part's share of the period

    # Base: the monthly price times the share
    assert line(lines, "base", "starter", None)["amount"] == str(q(29 * starter)) == "9.6667"
    assert line(lines, "base", "pro", None)["amount"] == str(q(99 * pro)) == "66.0000"
    # Requests: starter includes 100 000 × 1/3, pro 1 000 000 × 2/3
    requests = line(lines, "overage", "starter", "requests")
    assert (requests["quantity"], requests["included"]) == ("50000", "33333.333333")
    assert requests["unit_price"] == "0.0005"
    assert requests["amount"] == str(q((50_000 - 100_000 * starter) * Decimal("0.0005")))
    assert requests["amount"] == "8.3333"
    requests = line(lines, "overage", "pro", "requests")
    assert (requests["quantity"], requests["included"]) == ("700000", "666666.666667")
    assert requests["amount"] == str(q((700_000 - 1_000_000 * pro) * Decimal("0.0002")))
    assert requests["amount"] == "6.6667"
    # CPU time has no quota: all of it is billed at each plan's price
    assert line(lines, "overage", "starter", "cpu_seconds")["amount"] == "2.0000"  # 1e5 × 2e-5
    assert line(lines, "overage", "pro", "cpu_seconds")["amount"] == "3.0000"  # 2e5 × 1.5e-5
    # Storage: the peak in GB-months against the quota in GB-months (26 vs 20 on starter)
    storage = line(lines, "overage", "starter", "storage_gb")
    assert (storage["quantity"], storage["included"]) == ("8.666667", "6.666667")
    assert storage["amount"] == str(q((26 - 20) * starter * Decimal("0.10"))) == "0.2000"
    assert line(lines, "overage", "pro", "storage_gb")["amount"] == "0.0000"  # 40 < 100 GB
    # Memory has no price: shown (the mean, in GB-months), not billed
    memory = line(lines, "usage", "starter", "memory_gb")
    assert (memory["quantity"], memory["included"], memory["amount"]) == (
        "0.666667",
        "1.333333",
        "0.0000",
    )
    assert line(lines, "usage", "pro", "memory_gb")["quantity"] == "5.333333"
    # And every line names its part; nothing is late; May's row is not in April
    assert {(x["plan"], x["from"], x["to"]) for x in lines} == {
        ("starter", at(2026, 4, 1).isoformat(), at(2026, 4, 11).isoformat()),
        ("pro", at(2026, 4, 11).isoformat(), at(2026, 5, 1).isoformat()),
    }
    assert not any(x["late"] for x in lines)
    # And the total is the sum of the hand-computed lines
    by_hand = upgrade_total_by_hand(starter, pro)
    assert by_hand == Decimal("95.8667")
    assert pricing.money(invoice.total) == by_hand
    assert sum(Decimal(x["amount"]) for x in lines) == by_hand


def test_a_tenant_that_signed_up_mid_period_pays_its_share(db: str) -> None:
    # Given a tenant anchored on April 1st whose starter plan began on April 16th
    add_tenant(db, "half", dt.date(2026, 4, 1), [("starter", at(2026, 4, 16), None)])
    add_usage(db, "half", [("requests", at(2026, 4, 20), 60_000)])

    # When April is closed
    billing.close_periods(at(2026, 5, 1), url=db)

    # Then the base and the included requests are halved
    (invoice,) = invoices(db)
    base = line(invoice.lines, "base", "starter", None)
    assert (base["quantity"], base["amount"], base["from"]) == (
        "0.5",
        "14.5000",
        at(2026, 4, 16).isoformat(),
    )
    requests = line(invoice.lines, "overage", "starter", "requests")
    assert requests["included"] == "50000"
    assert requests["amount"] == "5.0000"  # 10 000 over × 0.0005
    assert pricing.money(invoice.total) == Decimal("19.5000")


def test_late_usage_goes_to_the_next_open_period_once_marked_late(db: str) -> None:
    # Given a tenant upgraded to pro in April, whose April is invoiced
    add_tenant(
        db,
        "late",
        dt.date(2026, 4, 1),
        [("starter", at(2026, 4, 1), at(2026, 4, 20)), ("pro", at(2026, 4, 20), None)],
    )
    add_usage(db, "late", [("requests", at(2026, 4, 25), 1000)])
    billing.close_periods(at(2026, 5, 1), url=db)
    (april,) = invoices(db)

    # When usage of April windows arrives (is recorded now) after April's invoice was made
    add_usage(
        db,
        "late",
        [("requests", at(2026, 4, 28), 5000), ("storage_gb", at(2026, 4, 28), 300)],
    )
    # And May is closed (with May's own usage)
    add_usage(db, "late", [("requests", at(2026, 5, 10), 2000)])
    billing.close_periods(at(2026, 6, 1, 2), url=db)

    # Then April's invoice is unchanged and May's bills the late requests on pro, marked late
    april_again, may = invoices(db)
    assert (april_again.id, april_again.lines) == (april.id, april.lines)
    late = [x for x in may.lines if x["late"]]
    requests = line(late, "overage", "pro", "requests")
    assert (requests["quantity"], requests["included"], requests["amount"]) == (
        "5000",
        "0",
        "1.0000",  # 5 000 × 0.0002, nothing included: April's quota was settled with April
    )
    assert (requests["from"], requests["to"]) == (
        at(2026, 4, 28).isoformat(),
        at(2026, 4, 28, 0, 1).isoformat(),
    )
    # And a late level reading is shown, not billed
    storage = line(late, "usage", "pro", "storage_gb")
    assert (storage["quantity"], storage["amount"]) == ("300", "0.0000")
    # And May's own usage is May's (within the included quota)
    on_time = [x for x in may.lines if not x["late"]]
    assert line(on_time, "overage", "pro", "requests")["quantity"] == "2000"
    assert pricing.money(may.total) == Decimal("100.0000")  # 99 + 1

    # When June is closed with nothing new recorded
    billing.close_periods(at(2026, 7, 1), url=db)
    # Then the late rows are not billed a second time
    june = invoices(db)[-1]
    assert not any(x["late"] for x in june.lines)
    assert pricing.money(june.total) == Decimal("99.0000")


def test_a_tenant_offline_for_three_periods_gets_three_invoices_oldest_first(db: str) -> None:
    # Given a starter tenant anchored on January 31st that was never billed
    add_tenant(db, "away", dt.date(2026, 1, 31), [("starter", at(2026, 1, 31), None)])

    # When billing runs on May 1st
    summary = billing.close_periods(at(2026, 5, 1), url=db)

    # Then the three months that ended are invoiced, each a full period on starter
    found = invoices(db)
    assert [(i.period_start, i.period_end) for i in found] == [
        (at(2026, 1, 31), at(2026, 2, 28)),
        (at(2026, 2, 28), at(2026, 3, 31)),
        (at(2026, 3, 31), at(2026, 4, 30)),
    ]
    assert summary.inserted == [i.id for i in found]
    assert all(pricing.money(i.total) == Decimal("29.0000") for i in found)

    # When billing runs again on May 31st
    billing.close_periods(at(2026, 5, 31), url=db)
    # Then the fourth period follows the third, back on the 31st
    assert [(i.period_start, i.period_end) for i in invoices(db)][-1] == (
        at(2026, 4, 30),
        at(2026, 5, 31),
    )


def test_a_terminated_tenant_is_billed_until_it_ended(db: str) -> None:
    # Given a tenant terminated on April 11th with its plan span never closed
    add_tenant(
        db,
        "gone",
        dt.date(2026, 4, 1),
        [("starter", at(2026, 4, 1), None)],
        status=TenantStatus.TERMINATED,
        updated_at=at(2026, 4, 11),
    )

    # When billing runs months later
    billing.close_periods(at(2026, 8, 1), url=db)

    # Then April is billed for ten days, and nothing after
    (invoice,) = invoices(db)
    assert invoice.period_start == at(2026, 4, 1)
    assert pricing.money(invoice.total) == q(Decimal(29) * 10 / 30)


def test_a_period_still_running_is_never_closed(db: str) -> None:
    # Given a tenant that signed up just now
    now = dt.datetime.now(UTC)
    add_tenant(db, "current", now.date(), [("pro", now, None)])

    # When asked to close "as of" 40 days ahead
    summary = billing.close_periods(now + dt.timedelta(days=40), url=db)

    # Then nothing is invoiced: as_of is never later than now
    assert summary.inserted == []
    assert invoices(db) == []


# -- once only -------------------------------------------------------------------------------


def test_closing_twice_makes_one_invoice_with_a_deterministic_id(db: str) -> None:
    # Given a tenant with a period that ended
    add_tenant(db, "twice", dt.date(2026, 4, 1), [("pro", at(2026, 4, 1), None)])

    # When the close runs twice
    first = billing.close_periods(at(2026, 5, 1), url=db)
    second = billing.close_periods(at(2026, 5, 1), url=db)

    # Then one invoice exists, inserted by the first call only, with the derived ids
    (invoice,) = invoices(db)
    assert first.inserted == [invoice.id] and second.inserted == []
    assert invoice.id == billing.invoice_id("twice", at(2026, 4, 1))
    assert billing.invoice_event_id(invoice.id) == uuid.uuid5(
        billing._EVENT_NS,  # noqa: SLF001 - the id is the contract webhooks key on
        invoice.id,
    )
    assert billing.invoice_id("twice", at(2026, 4, 1)) == invoice.id  # stable across calls


def test_concurrent_closes_make_one_invoice_per_tenant_and_period(db: str) -> None:
    # Given 30 tenants with three due days each and usage in every day
    for n in range(30):
        tenant = f"t{n:02d}"
        add_tenant(db, tenant, dt.date(2026, 4, 1), [("starter", at(2026, 4, 1), None)])
        add_usage(db, tenant, [("requests", at(2026, 4, d, 12), 10_000 * d) for d in (1, 2, 3)])

    # When six closes run at the same moment, in chunks of seven tenants
    barrier = threading.Barrier(6)
    results: list[billing.CloseSummary] = []
    errors: list[BaseException] = []

    def close() -> None:
        try:
            barrier.wait()
            results.append(
                billing.close_periods(at(2026, 4, 4), url=db, period="day", chunk_size=7)
            )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=close) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    # Then every (tenant, day) has exactly one invoice, inserted by exactly one close
    assert errors == []
    inserted = [i for summary in results for i in summary.inserted]
    assert len(inserted) == len(set(inserted)) == 90
    with session_scope(db) as session:
        assert session.scalar(select(func.count()).select_from(Invoice)) == 90
    # And each day's requests are on that day's invoice (a whole period: the full price, and
    # all of starter's 100 000 requests included)
    for invoice in invoices(db):
        requests = line(invoice.lines, "overage", "starter", "requests")
        assert requests["quantity"] == str(10_000 * invoice.period_start.day)
        assert pricing.money(invoice.total) == Decimal("29.0000")


def test_the_close_task_from_beat_claims_its_slot_and_a_redelivery_goes_on(db: str) -> None:
    # Given a tenant with a period that ended
    add_tenant(db, "beat", dt.date(2026, 4, 1), [("pro", at(2026, 4, 1), None)])

    # When beat's message runs, then a second beat's message for the same slot
    first = close_task.apply(task_id="beat-1").get()
    second = close_task.apply(task_id="beat-2").get()
    # And the first message is delivered again (a worker died before acking it)
    again = close_task.apply(task_id="beat-1").get()

    # Then the first closed the periods, the second stood aside, the redelivery found
    # nothing left to do
    assert first["ok"] and first["invoices"] >= 1
    assert second == {"ok": True, "skipped": True, "slot": second["slot"]}
    assert again["ok"] and not again.get("skipped") and again["invoices"] == 0
    # And an explicit as_of runs without a slot, inserting nothing new
    explicit = close_task.apply(kwargs={"as_of": "2026-05-01T00:00:00+00:00"}).get()
    assert explicit["ok"] and explicit["invoices"] == 0
    # And a bad as_of is answered, not retried
    bad = close_task.apply(kwargs={"as_of": "next tuesday"}).get()
    assert bad["ok"] is False and bad["error"]["errors"][0]["field"] == "as_of"


def test_get_invoice_answers_the_invoice_or_not_found(db: str) -> None:
    # Given an invoice
    add_tenant(db, "reader", dt.date(2026, 4, 1), [("starter", at(2026, 4, 1), None)])
    (made,) = billing.close_periods(at(2026, 5, 1), url=db).inserted

    # When it is read, and an unknown and a malformed id are read
    found = get_invoice.apply(kwargs={"invoice_id": made}).get()
    missing = get_invoice.apply(kwargs={"invoice_id": "0" * 32}).get()
    malformed = get_invoice.apply(kwargs={"invoice_id": "nope"}).get()

    # Then the invoice comes back as JSON, the others as errors
    assert found["ok"] and found["invoice_id"] == made and found["total"] == "29.0000"
    assert found["period_start"] == at(2026, 4, 1).isoformat()
    assert [x["kind"] for x in found["lines"]] == ["base"]
    assert missing["ok"] is False and missing["error"]["code"] == "not_found"
    assert malformed["ok"] is False and malformed["error"]["code"] == "validation_error"


def test_events_a_killed_close_left_unpublished_go_out_with_the_next_close(db: str) -> None:
    # Given two tenants whose periods a close invoiced and published
    for tenant in ("out1", "out2"):
        add_tenant(db, tenant, dt.date(2026, 4, 1), [("pro", at(2026, 4, 1), None)])
    first = billing.close_periods(at(2026, 5, 1), url=db)
    assert len(first.inserted) == 2 and first.published == 2
    assert all(i.published_at is not None for i in invoices(db))
    # When a close had died after committing its invoices, before publishing them
    with session_scope(db) as session:
        session.execute(update(Invoice).values(published_at=None))
    # Then the next close inserts nothing and publishes both; the one after, nothing
    second = billing.close_periods(at(2026, 5, 1), url=db)
    assert second.inserted == [] and second.published == 2
    assert all(i.published_at is not None for i in invoices(db))
    assert billing.close_periods(at(2026, 5, 1), url=db).published == 0


def test_the_event_a_close_publishes_is_the_stored_invoice(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a tenant with an upgrade and priced usage in a period that ended
    add_tenant(
        db,
        "event",
        dt.date(2026, 4, 1),
        [("starter", at(2026, 4, 1), at(2026, 4, 11)), ("pro", at(2026, 4, 11), None)],
    )
    add_usage(db, "event", [("requests", at(2026, 4, 3), 150_001.0)])
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(billing, "emit", lambda *args, **kwargs: sent.append(kwargs))

    # When the close publishes its invoice from the rows it inserted
    summary = billing.close_periods(at(2026, 5, 1), url=db)
    # And the same invoice is published again from the table (as a later close would)
    with session_scope(db) as session:
        session.execute(update(Invoice).values(published_at=None))
    assert billing.publish_pending(url=db) == 1

    # Then both events are the same, to the last digit of every amount
    assert summary.published == 1 and len(sent) == 2
    assert sent[0] == sent[1]
    (invoice,) = invoices(db)
    assert sent[0]["data"]["total"] == str(invoice.total)
    assert sent[0]["event_id"] == billing.invoice_event_id(invoice.id)
