"""Quotas and payment standing: periods, policies once per period, grace after a failure.

On real databases (SQLite, and PostgreSQL where it answers); the suspend workflows the
policies start are checked in the ledger, and run end to end by the integration tests.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from schemas.states import Phase, TenantStatus
from tasks import workflows as wf
from tasks.quotas import enforce_quotas, payment_failed, payment_succeeded
from workers.cli.economics import invoice_cli, usage_cli
from workers.economics.plans import load_catalog
from workers.economics.quotas import GIB, excesses, period_start, quota_reason
from workers.runtime.db import session_scope
from workers.runtime.models import AuditEvent, Invoice, Tenant, UsageRecord, WorkflowRun, utcnow
from workers.runtime.settings import Settings

T = TypeVar("T")

PLANS = load_catalog().plans
NOW = dt.datetime(2026, 11, 23, 12, 5, 30, tzinfo=dt.UTC)


# -- periods and excesses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "now", "start"),
    [
        # Monthly from the anchor's day; before it in the month, the previous month's
        (dt.date(2026, 1, 15), NOW, dt.datetime(2026, 11, 15, tzinfo=dt.UTC)),
        (dt.date(2026, 1, 25), NOW, dt.datetime(2026, 10, 25, tzinfo=dt.UTC)),
        # An anchor on the 31st starts short months' periods on their last day
        (
            dt.date(2026, 1, 31),
            dt.datetime(2026, 3, 5, tzinfo=dt.UTC),
            dt.datetime(2026, 2, 28, tzinfo=dt.UTC),
        ),
        # Across the year's end
        (
            dt.date(2025, 6, 20),
            dt.datetime(2026, 1, 3, tzinfo=dt.UTC),
            dt.datetime(2025, 12, 20, tzinfo=dt.UTC),
        ),
        # The start itself belongs to the new period
        (
            NOW.date(),
            NOW.replace(hour=0, minute=0, second=0),
            NOW.replace(hour=0, minute=0, second=0),
        ),
    ],
)
def test_monthly_periods_start_on_the_anchor_day(
    anchor: dt.date, now: dt.datetime, start: dt.datetime
) -> None:
    assert period_start(anchor, "month", now) == start


def test_short_periods_for_tests_and_demos() -> None:
    anchor = dt.date(2026, 1, 1)
    assert period_start(anchor, "day", NOW) == dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
    assert period_start(anchor, "hour", NOW) == dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)
    assert period_start(anchor, "minute", NOW) == dt.datetime(2026, 11, 23, 12, 5, tzinfo=dt.UTC)


def test_excesses_name_the_quota_and_the_amount() -> None:
    free = PLANS["free"]
    assert excesses(free, requests=10_000, storage_bytes=GIB) == []
    found = excesses(free, requests=10_234, storage_bytes=1.5 * GIB)
    assert quota_reason(found) == "quota exceeded: requests 10234 > 10000, storage 1.50 GB > 1 GB"
    # Unlimited quotas are never exceeded
    assert excesses(PLANS["enterprise"], requests=1e12, storage_bytes=1e15) == []


# -- enforcement against a database -----------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, process_settings: Callable[..., Settings]) -> Settings:
    return process_settings(request.param, payment_grace="60")


def add_tenant(tenant_id: str, plan: str, *, anchor: dt.date = dt.date(2026, 11, 1)) -> None:
    with session_scope() as session:
        session.add(
            Tenant(
                id=tenant_id,
                name=tenant_id,
                plan=plan,
                status=TenantStatus.ACTIVE,
                platform="local",
                resources={},
                meta={},
                billing_anchor=anchor,
            )
        )


def add_usage(
    tenant_id: str, metric: str, value: float, *, at: dt.datetime, aggregation: str = "sum"
) -> None:
    with session_scope() as session:
        session.add(
            UsageRecord(
                tenant_id=tenant_id,
                metric=metric,
                window_start=at,
                window_end=at + dt.timedelta(minutes=1),
                value=value,
                aggregation=aggregation,
            )
        )


def runs(tenant_id: str) -> list[WorkflowRun]:
    with session_scope() as session:
        return list(session.scalars(select(WorkflowRun).where(WorkflowRun.tenant_id == tenant_id)))


def audit(tenant_id: str, kind: str) -> list[dict[str, Any]]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(AuditEvent.data).where(
                    AuditEvent.tenant_id == tenant_id, AuditEvent.kind == kind
                )
            )
        )


def tenant(tenant_id: str) -> Tenant:
    with session_scope() as session:
        row = session.get(Tenant, tenant_id)
        assert row is not None
        return row


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """Run each call in its own thread, all released at once; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run, call) for call in calls]
        return [future.result(timeout=120) for future in futures]


def test_over_the_request_quota_a_suspend_plan_is_suspended_once(settings: Settings) -> None:
    # Given a free tenant (suspend policy, 10,000 requests) with 10,234 requests this period
    # and 5,000 in the previous one
    add_tenant("freebie", "free")
    add_usage("freebie", "requests", 5_000, at=dt.datetime(2026, 10, 30, tzinfo=dt.UTC))
    for n, amount in enumerate((6_000, 4_234)):
        add_usage("freebie", "requests", amount, at=NOW - dt.timedelta(minutes=5 - n))

    # When quotas are enforced
    first = enforce_quotas(now=NOW)

    # Then one suspend workflow starts with the reason, and the excess is recorded once
    [run] = runs("freebie")
    assert run.kind == wf.SUSPEND.kind
    assert run.input == {"reason": "quota exceeded: requests 10234 > 10000"}
    assert first.dispatch == [(run.id, Phase.FORWARD, wf.SUSPEND.forward_tasks)]
    assert first.suspended == ["freebie"]
    assert [e["reason"] for e in first.exceeded] == ["quota exceeded: requests 10234 > 10000"]
    assert tenant("freebie").active_workflow_id == run.id
    [event] = audit("freebie", "quota.exceeded")
    assert event["policy"] == "suspend" and event["workflow_id"] == run.id

    # When enforced again in the same period, after the run released the tenant
    with session_scope() as session:
        row = session.get(Tenant, "freebie")
        assert row is not None
        row.active_workflow_id = None
    second = enforce_quotas(now=NOW + dt.timedelta(minutes=1))
    # Then nothing new happens: once per tenant and period
    assert second.exceeded == [] and second.dispatch == [] and len(runs("freebie")) == 1


def test_enforcement_delivered_twice_concurrently_suspends_once(settings: Settings) -> None:
    # Given a free tenant over its storage quota
    add_tenant("twice", "free")
    add_usage("twice", "storage_bytes", 1.5 * GIB, at=NOW, aggregation="max")
    # When two enforcement runs race
    results = concurrently(lambda: enforce_quotas(now=NOW), lambda: enforce_quotas(now=NOW))
    # Then one suspend run, one event
    assert sum(len(r.dispatch) for r in results) == 1
    assert len(runs("twice")) == 1
    assert runs("twice")[0].input == {"reason": "quota exceeded: storage 1.50 GB > 1 GB"}
    assert len(audit("twice", "quota.exceeded")) == 1


def test_a_busy_tenant_is_suspended_by_a_later_run(settings: Settings) -> None:
    # Given a tenant over quota that another workflow owns
    add_tenant("busy", "free")
    add_usage("busy", "requests", 20_000, at=NOW)
    with session_scope() as session:
        row = session.get(Tenant, "busy")
        assert row is not None
        row.active_workflow_id = "a" * 32
    # When enforced: nothing can start, and nothing is marked as handled
    assert enforce_quotas(now=NOW).dispatch == []
    # When the other workflow ended, the next run suspends it
    with session_scope() as session:
        row = session.get(Tenant, "busy")
        assert row is not None
        row.active_workflow_id = None
    assert len(enforce_quotas(now=NOW).dispatch) == 1


def test_throttle_marks_the_tenant_and_a_new_period_lifts_it(settings: Settings) -> None:
    # Given a starter tenant (throttle policy, 100,000 requests) at 150,000 this period
    add_tenant("busyco", "starter")
    add_usage("busyco", "requests", 150_000, at=NOW)
    # When enforced
    result = enforce_quotas(now=NOW)
    # Then it is throttled, not suspended, and the excess is reported
    assert result.dispatch == [] and runs("busyco") == []
    assert tenant("busyco").resources["throttled"] is True
    assert audit("busyco", "quota.exceeded")[0]["policy"] == "throttle"
    # When the next period starts within quota, the throttle is lifted
    enforce_quotas(now=dt.datetime(2026, 12, 1, 0, 1, tzinfo=dt.UTC))
    assert "throttled" not in tenant("busyco").resources
    assert len(audit("busyco", "quota.throttle_lifted")) == 1


def test_bill_overage_only_reports(settings: Settings) -> None:
    add_tenant("bigco", "pro")
    add_usage("bigco", "requests", 2_000_000, at=NOW)
    result = enforce_quotas(now=NOW)
    assert result.dispatch == [] and runs("bigco") == []
    assert "throttled" not in tenant("bigco").resources
    assert [e["policy"] for e in result.exceeded] == ["bill_overage"]


def test_a_failed_payment_suspends_after_the_grace(settings: Settings) -> None:
    # Given an active tenant within its quotas
    add_tenant("payer", "starter")
    # When another service reports a failed payment (grace 60 s here)
    answer = payment_failed.apply(
        kwargs={"tenant_id": "payer", "invoice_id": "inv-1", "idempotency_key": "pf-1"}
    ).get()
    assert answer["ok"] is True and answer["payment"] == "failed"
    # Then nothing happens within the grace
    assert enforce_quotas(now=utcnow()).dispatch == []
    # and a repeated failure does not move the deadline
    payment_failed.apply(kwargs={"tenant_id": "payer", "invoice_id": "inv-2"}).get()
    assert tenant("payer").resources["payment"]["suspend_after"] == answer["suspend_after"]
    # When the grace is over, the tenant is suspended, once
    later = utcnow() + dt.timedelta(seconds=61)
    result = enforce_quotas(now=later)
    [run] = runs("payer")
    assert result.dispatch == [(run.id, Phase.FORWARD, wf.SUSPEND.forward_tasks)]
    assert run.input["reason"] == "payment failed: inv-1, inv-2 unpaid past the grace period"
    with session_scope() as session:
        row = session.get(Tenant, "payer")
        assert row is not None
        row.active_workflow_id = None
    assert enforce_quotas(now=later).dispatch == []
    assert tenant("payer").resources["payment"]["status"] == "suspended"


def test_a_payment_within_the_grace_calls_the_suspension_off(settings: Settings) -> None:
    add_tenant("saved", "starter")
    payment_failed.apply(kwargs={"tenant_id": "saved", "invoice_id": "inv-9"}).get()
    # A payment of another invoice leaves the failure standing
    payment_succeeded.apply(kwargs={"tenant_id": "saved", "invoice_id": "inv-8"}).get()
    assert tenant("saved").resources["payment"]["status"] == "failed"
    # The failed invoice's payment clears it: no suspension after the grace
    done = payment_succeeded.apply(kwargs={"tenant_id": "saved", "invoice_id": "inv-9"}).get()
    assert done["ok"] is True and done["payment"] == "ok"
    assert enforce_quotas(now=utcnow() + dt.timedelta(hours=1)).dispatch == []
    assert runs("saved") == []


def test_payment_tasks_delivered_twice_record_once_and_refuse_bad_input(
    settings: Settings,
) -> None:
    add_tenant("dupe", "starter")
    kwargs = {"tenant_id": "dupe", "invoice_id": "inv-1", "idempotency_key": "same"}
    results = concurrently(
        lambda: payment_failed.apply(kwargs=kwargs).get(),
        lambda: payment_failed.apply(kwargs=kwargs).get(),
    )
    assert results[0] == results[1] and results[0]["ok"] is True
    assert len(audit("dupe", "payment.failed")) == 1
    bad = payment_failed.apply(kwargs={"tenant_id": "Not Valid", "grace": 1}).get()
    assert bad["ok"] is False and bad["error"]["code"] == "validation_error"
    missing = payment_failed.apply(kwargs={"tenant_id": "nobody"}).get()
    assert missing["ok"] is False and missing["error"]["code"] == "not_found"


# -- usage and invoice commands ---------------------------------------------------------------


def test_usage_show_groups_per_metric_with_totals(settings: Settings) -> None:
    # Given a tenant's usage of three metrics
    add_tenant("metered", "starter")
    for n in range(3):
        at = NOW - dt.timedelta(minutes=3 - n)
        add_usage("metered", "requests", 100 + n, at=at)
        add_usage("metered", "storage_bytes", 1000 * (n + 1), at=at, aggregation="max")
        add_usage("metered", "memory_bytes", 10 * (n + 1), at=at, aggregation="avg")
    runner = CliRunner()
    since = (NOW - dt.timedelta(hours=1)).isoformat()
    # When usage show runs over the last hour
    shown = runner.invoke(usage_cli, ["show", "metered", "--from", since, "--json"])
    # Then each metric is totalled by its aggregation
    assert shown.exit_code == 0, shown.output
    totals = {m["metric"]: (m["total"], m["windows"]) for m in json.loads(shown.stdout)["metrics"]}
    assert totals == {
        "memory_bytes": (20.0, 3),
        "requests": (303.0, 3),
        "storage_bytes": (3000.0, 3),
    }
    # and --metric narrows it; the table renders
    only = runner.invoke(usage_cli, ["show", "metered", "--from", since, "--metric", "requests"])
    assert only.exit_code == 0 and "requests" in only.stdout and "memory" not in only.stdout
    assert runner.invoke(usage_cli, ["show", "metered", "--from", "yesterday"]).exit_code == 2


def test_invoice_list_and_show(settings: Settings) -> None:
    line = {
        "kind": "plan",
        "plan": "starter",
        "metric": None,
        "from": "2026-10-01T00:00:00+00:00",
        "to": "2026-11-01T00:00:00+00:00",
        "quantity": "1",
        "included": "0",
        "unit_price": "29",
        "amount": "29.0000",
        "late": False,
    }
    with session_scope() as session:
        session.add(
            Invoice(
                id="inv0001",
                tenant_id="acme",
                period_start=dt.datetime(2026, 10, 1, tzinfo=dt.UTC),
                period_end=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
                currency="USD",
                total=Decimal("29.0000"),
                lines=[line],
            )
        )
    runner = CliRunner()
    listed = runner.invoke(invoice_cli, ["list", "--tenant", "acme", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [(i["invoice_id"], i["total"]) for i in json.loads(listed.stdout)] == [
        ("inv0001", "29.0000")
    ]
    shown = runner.invoke(invoice_cli, ["show", "inv0001", "--json"])
    assert json.loads(shown.stdout)["lines"] == [line]
    table = runner.invoke(invoice_cli, ["show", "inv0001"])
    assert table.exit_code == 0 and "29.0000" in table.stdout
    assert runner.invoke(invoice_cli, ["show", "nope"]).exit_code == 1
