"""Billing end to end: real workers, two real beats at once, a real webhook on loopback.

Periods are one minute long (``CUL8ER_BILLING_PERIOD=minute``) and beat closes them every
second, so a test sees beats race over real period ends within about a minute.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select

from schemas.states import TenantStatus
from tests.chaos._faults import log_events
from tests.stack import Stack
from tests.webhook import Receiver, webhook_receiver
from workers.economics import billing, periods, pricing
from workers.runtime.models import Invoice, PlanPeriod, Tenant, UsageRecord, utcnow
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

CLOSE_TASK = "cul8er.billing.close_periods"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as found:
        yield found


def billing_stack(stack: Stack, receiver: Receiver, *, close_interval: str = "1") -> Stack:
    """Workers that serve the billing tasks on one-minute periods, reporting to the webhook."""
    stack.extra_env.update(
        CUL8ER_IMPORTS=json.dumps(["tasks.billing"]),
        CUL8ER_BILLING_PERIOD="minute",
        CUL8ER_BILLING_CLOSE_INTERVAL=close_interval,
        CUL8ER_PLUGIN_CONFIG=json.dumps({"webhook": {"url": receiver.url}}),
    )
    return stack


def add_tenants(stack: Stack, count: int, since: dt.datetime) -> list[str]:
    """Tenants on starter since ``since``; every other one upgraded to pro a minute later,
    each with a request count in every minute since."""
    ids = [f"bill-{n:02d}" for n in range(count)]
    anchor = since.date()
    upgrade = since + dt.timedelta(seconds=61)
    with stack.session() as session:
        for n, tenant_id in enumerate(ids):
            session.add(
                Tenant(
                    id=tenant_id,
                    name=tenant_id,
                    plan="starter",
                    status=TenantStatus.ACTIVE,
                    platform="local",
                    resources={},
                    meta={},
                    billing_anchor=anchor,
                    created_at=since,
                    updated_at=since,
                )
            )
            if n % 2:
                session.add(PlanPeriod(tenant_id=tenant_id, plan="starter", start_at=since))
            else:
                session.add(
                    PlanPeriod(tenant_id=tenant_id, plan="starter", start_at=since, end_at=upgrade)
                )
                session.add(PlanPeriod(tenant_id=tenant_id, plan="pro", start_at=upgrade))
            minute = since.replace(second=0, microsecond=0)
            while minute < utcnow():
                session.add(
                    UsageRecord(
                        tenant_id=tenant_id,
                        metric="requests",
                        window_start=minute + dt.timedelta(seconds=30),
                        window_end=minute + dt.timedelta(seconds=31),
                        value=1000.0 * (n + 1),
                        aggregation="sum",
                    )
                )
                minute += dt.timedelta(minutes=1)
    return ids


def invoices_of(stack: Stack) -> list[Invoice]:
    with stack.session() as session:
        return list(
            session.scalars(select(Invoice).order_by(Invoice.tenant_id, Invoice.period_start))
        )


def delivered(stack: Stack, receiver: Receiver) -> bool:
    """Whether every close has had its events delivered: every invoice is published, the
    webhook has an event under each invoice's key, and at least as many as the closes say
    they emitted (the ``published`` of each ``billing_closed`` line of the worker log)."""
    found = invoices_of(stack)
    events = receiver.of_type("invoice.finalized")
    emitted = sum(entry["published"] for entry in log_events(stack, "billing_closed"))
    return (
        bool(found)
        and all(invoice.published_at is not None for invoice in found)
        and {key for key, _ in events} >= {str(billing.invoice_event_id(i.id)) for i in found}
        and len(events) >= emitted
    )


def expected_periods(
    tenant_ids: list[str], since: dt.datetime, as_of: dt.datetime
) -> set[tuple[str, dt.datetime]]:
    due = periods.due_periods(since.date(), "minute", since=since, as_of=as_of)
    return {(tenant_id, start) for tenant_id in tenant_ids for start, _ in due}


def check_invoices_and_events(
    stack: Stack, receiver: Receiver, wanted: set[tuple[str, dt.datetime]]
) -> list[Invoice]:
    """Exactly the wanted invoices, contiguous, each reported once under its derived key."""
    # Given every close has settled: each invoice published and every event it emitted
    # delivered (a duplicate emission would be counted, and delivered, too)
    wait_until(
        lambda: delivered(stack, receiver),
        timeout=60,
        interval=0.25,
        message="every emitted invoice.finalized at the webhook",
        error=AssertionError,
    )
    found = invoices_of(stack)
    assert {(i.tenant_id, i.period_start) for i in found} >= wanted
    # One invoice per (tenant, period): each period starts where the previous ended
    by_tenant: dict[str, list[Invoice]] = {}
    for invoice in found:
        by_tenant.setdefault(invoice.tenant_id, []).append(invoice)
    for chain in by_tenant.values():
        for before, after in zip(chain, chain[1:], strict=False):
            assert before.period_end == after.period_start
    # And one invoice.finalized per invoice, keyed by the id derived from the invoice id
    events = receiver.of_type("invoice.finalized")
    keys = Counter(key for key, _ in events)
    assert all(count == 1 for count in keys.values()), keys
    assert {key for key, _ in events} == {str(billing.invoice_event_id(i.id)) for i in found}
    for key, event in events:
        data = event["data"]
        assert key == event["event_id"] == str(billing.invoice_event_id(data["invoice_id"]))
        invoice = next(i for i in found if i.id == data["invoice_id"])
        assert data["total"] == str(pricing.money(invoice.total))
        assert data["lines"] == invoice.lines
    return found


@pytest.mark.parametrize("kind", ["embedded", "redis-postgres"])
def test_two_beats_at_once_make_one_invoice_per_tenant_and_period(
    kind: str, stack_factory: Callable[..., Stack], receiver: Receiver
) -> None:
    # Given tenants on one-minute periods for two minutes and a half, half of them
    # upgraded from starter to pro after a minute
    stack = billing_stack(stack_factory(kind), receiver)
    since = utcnow() - dt.timedelta(seconds=150)
    tenant_ids = add_tenants(stack, 6, since)
    stack.start_worker("main", concurrency=4)

    # When two beats run at once, each sending the close every second, past a period end
    beats = [stack.start_beat(), stack.start_beat()]
    started = utcnow()
    boundary = started.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    wanted = expected_periods(tenant_ids, since, boundary)
    try:
        wait_until(
            lambda: {(i.tenant_id, i.period_start) for i in invoices_of(stack)} >= wanted,
            timeout=120,
            interval=0.25,
            message="the periods that ended were not all invoiced",
            error=AssertionError,
        )
    finally:
        for beat in beats:
            stack.kill(beat)

    # Then each tenant has one invoice per period, each reported once to the webhook
    found = check_invoices_and_events(stack, receiver, wanted)
    # And an upgraded tenant's period holding the upgrade has both plans' parts
    upgrade = since + dt.timedelta(seconds=61)
    split = next(
        i for i in found if i.tenant_id == tenant_ids[0] and i.period_start < upgrade < i.period_end
    )
    assert {x["plan"] for x in split.lines if x["kind"] == "base"} == {"starter", "pro"}
    # And both beats did send the close: the second message of a slot stood aside
    worker_log = (stack.data_dir / "worker-main.log").read_text()
    assert "billing_slot_taken" in worker_log


@pytest.mark.parametrize("kind", ["embedded", "redis-postgres"])
def test_the_same_close_delivered_twice_at_once_makes_one_invoice_each(
    kind: str, stack_factory: Callable[..., Stack], receiver: Receiver
) -> None:
    # Given tenants with about three ended periods each, and a worker with four processes
    stack = billing_stack(stack_factory(kind), receiver, close_interval="3600")
    since = utcnow() - dt.timedelta(seconds=170)
    tenant_ids = add_tenants(stack, 8, since)
    stack.start_worker("main", concurrency=4)

    # When one close message is delivered twice at once (a redelivery keeps its task id),
    # and a beat-style close (no as_of) too
    as_of = utcnow()
    sent = [
        stack.client.send_task(CLOSE_TASK, kwargs={"as_of": as_of.isoformat()}, task_id="close-1")
        for _ in range(2)
    ] + [stack.client.send_task(CLOSE_TASK, task_id="beat-1") for _ in range(2)]
    answers = [result.get(timeout=60) for result in sent]

    # Then every delivery answered, and the periods that ended are invoiced once each
    assert all(answer["ok"] for answer in answers), answers
    wanted = expected_periods(tenant_ids, since, as_of)
    assert len(wanted) >= 16
    found = check_invoices_and_events(stack, receiver, wanted)
    assert len({(i.tenant_id, i.period_start) for i in found}) == len(found)

    # When the read task asks for one of them
    answer = stack.call("cul8er.billing.get_invoice", invoice_id=found[0].id)
    # Then it answers the stored invoice
    assert answer["ok"] and answer["total"] == str(pricing.money(found[0].total))
