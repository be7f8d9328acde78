"""The read commands' driver-level views answer what the model views answer, on the same rows.

``workers/cli/views.py`` rebuilds ``describe_tenant``, ``describe_run`` and ``invoice_view``
from plain rows so a read command imports neither SQLAlchemy nor the models. These tests
seed rows through the models and hold both to the same JSON, on SQLite and PostgreSQL,
through the driver and through SQLAlchemy's fallback for URLs the driver path leaves alone.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from decimal import Decimal
from typing import Any

import pytest
import typer
from sqlalchemy import select

from workers.cli import deployment_views, reads, views
from workers.economics.views import invoice_view as model_invoice_view
from workers.economics.views import money as model_money
from workers.engine.views import describe_run as model_describe_run
from workers.engine.views import describe_tenant as model_describe_tenant
from workers.runtime.db import session_scope
from workers.runtime.errors import TransientError
from workers.runtime.models import (
    Approval,
    Deployment,
    Instance,
    Invoice,
    NetworkAllocation,
    StepRun,
    Tenant,
    TenantPlugin,
    UsageRecord,
    WorkerProcess,
    WorkflowRun,
)
from workers.runtime.settings import Settings

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
#: Totals whose rounding to 4 places depends on how the stored number is read back.
TOTALS = [Decimal("12.3457"), Decimal("12"), Decimal("1.00005"), Decimal("1.0001"), Decimal("0")]


def as_json(value: Any) -> str:
    """What ``cul8er … --json`` prints of ``value`` (before rich indents it)."""
    return json.dumps(value, default=str)


def seed(url: str) -> None:
    """Two tenants (one with instances, a subnet, a release), runs with owners and takeovers."""
    with session_scope(url) as session:
        for n, status in enumerate(("active", "suspended")):
            session.add(
                Tenant(
                    id=f"ten{n}",
                    name=f"[bold]Co {n}[/]",
                    plan="starter",
                    status=status,
                    status_reason="unpaid" if n else None,
                    platform="local",
                    resources={"subnet": f"10.0.{n}.0/24", "entry": "127.0.0.1:21000"}
                    if n == 0
                    else {},
                    meta={"owner": "ops"},
                    release={"version": "1.2.0"} if n == 0 else {},
                    billing_anchor=dt.date(2026, 2, 28),
                    created_at=T0 + dt.timedelta(minutes=n),
                    updated_at=T0 + dt.timedelta(minutes=n, microseconds=1),
                )
            )
        session.flush()
        session.add(NetworkAllocation(cidr="10.0.0.0/24", tenant_id="ten0"))
        for name in ("ten0-web-1", "ten0-web-0"):
            session.add(
                Instance(
                    tenant_id="ten0",
                    name=name,
                    platform="local",
                    role="web",
                    ordinal=int(name[-1]),
                    status="running",
                    endpoint=None if name.endswith("1") else "127.0.0.1:21001",
                    limits={"applied": {"cpus": 0.5}},
                    release="1.2.0",
                )
            )
        session.add(
            WorkerProcess(
                boot_id="boot-alive",
                node="w1@host",
                host="host",
                pid=4242,
                namespace="ns",
                beat_at=T0,
            )
        )
        seed_runs(session)
        seed_deployments(session)
        seed_usage(session)
        for n, total in enumerate(TOTALS):
            session.add(
                Invoice(
                    id=f"inv{n}",
                    tenant_id=f"ten{n % 2}",
                    period_start=T0 - dt.timedelta(days=30 * (n + 1)),
                    period_end=T0 - dt.timedelta(days=30 * n),
                    currency="EUR",
                    total=total,
                    status="finalized",
                    lines=[{"kind": "plan", "amount": 9.5}] if n else [],
                    created_at=T0,
                )
            )


def seed_runs(session: Any) -> None:
    takeover = {
        "event": "takeover",
        "reason": "owner_exited",
        "attempt": 1,
        "previous_owner": {"boot_id": "boot-gone", "node": "w0@host", "pid": 7},
        "at": "2026-03-01T12:00:05+00:00",
    }
    for n, (tenant, status) in enumerate(
        (("ten0", "succeeded"), ("ten1", "failed"), (None, "running"))
    ):
        session.add(
            WorkflowRun(
                id=f"run{n}",
                kind="tenant.provision",
                tenant_id=tenant,
                status=status,
                current_step=None if n == 0 else "cul8er.tenants.create_instances",
                error={"step": "x", "code": "boom", "message": "it broke"} if n == 1 else None,
                created_at=T0 + dt.timedelta(seconds=n),
                updated_at=T0 + dt.timedelta(seconds=n),
                finished_at=T0 + dt.timedelta(seconds=9) if n == 0 else None,
            )
        )
    session.flush()
    for position, (owner, history) in enumerate(
        (("boot-alive", [takeover, {"event": "claimed", "attempt": 2}]), ("boot-gone", None))
    ):
        session.add(
            StepRun(
                run_id="run0",
                phase="forward",
                position=position,
                name=f"cul8er.tenants.step{position}",
                status="done",
                attempts=2,
                owner_id=owner,
                heartbeat_at=T0,
                history=history,
                output={"n": position},
                started_at=T0,
                finished_at=T0 + dt.timedelta(seconds=1),
            )
        )


def seed_deployments(session: Any) -> None:
    """A release deployment awaiting approvals, and a plugin deployment over two tenants."""
    stages = [{"name": "canary", "action": "weight", "weight": 10}, {"name": "all"}]
    common: dict[str, Any] = {
        "strategy": "canary",
        "environment": "production",
        "stages": stages,
        "created_at": T0,
        "updated_at": T0,
    }
    session.add(
        Deployment(
            id="dep-release-1",
            tenant_id="ten0",
            status="awaiting_approval",
            release={"version": "1.3.0"},
            previous_release={"version": "1.2.0"},
            stage_state={"before": {"w": 1}, "weight": 10},
            measurements=[{"stage": "canary", "n": 3, "metrics": {"error_rate": 0.0}}],
            timeline=[{"at": "2026-03-01T12:00:00+00:00", "event": "created"}],
            approvals_required=2,
            approval_expires_at=T0 + dt.timedelta(days=1),
            reason={"message": "why not"},
            actor="ops",
            **common,
        )
    )
    session.add(
        Deployment(
            id="dep-plugin-1",
            plugin="log",
            targets=["ten1", "ten0"],
            status="succeeded",
            release={"version": "2.0.0"},
            stage_index=2,
            finished_at=T0 + dt.timedelta(hours=1),
            **common,
        )
    )
    session.flush()
    now = dt.datetime.now(dt.UTC)
    for actor, decision, expires in (
        ("ann", "approve", now - dt.timedelta(hours=1)),
        ("bob", "approve", now + dt.timedelta(days=1)),
        ("cy", "reject", now - dt.timedelta(hours=1)),
    ):
        session.add(
            Approval(
                deployment_id="dep-release-1",
                actor=actor,
                decision=decision,
                created_at=T0 + dt.timedelta(seconds=len(actor)),
                expires_at=expires,
            )
        )
    session.add(
        TenantPlugin(tenant_id="ten1", plugin="log", version="2.0.0", deployment_id="dep-plugin-1")
    )
    session.add(
        TenantPlugin(tenant_id="ten0", plugin="log", version="1.0.0", deployment_id="dep-plugin-1")
    )


def seed_usage(session: Any) -> None:
    """Ten minute-windows of three metrics (sum, avg, max) for one tenant, one for another."""
    for minute in range(10):
        start = T0 + dt.timedelta(minutes=minute)
        for metric, aggregation, value in (
            ("requests", "sum", 100.0 + minute),
            ("cpu_seconds", "avg", 0.25 * minute),
            ("memory_bytes", "max", 1e9 / (minute + 1)),
        ):
            session.add(
                UsageRecord(
                    tenant_id="ten0",
                    metric=metric,
                    aggregation=aggregation,
                    value=value,
                    window_start=start,
                    # One window shorter than the others: the mean is weighted by time.
                    window_end=start + dt.timedelta(seconds=30 if minute == 3 else 60),
                )
            )
    session.add(
        UsageRecord(
            tenant_id="ten1",
            metric="requests",
            aggregation="sum",
            value=1.0,
            window_start=T0,
            window_end=T0 + dt.timedelta(minutes=1),
        )
    )


Opener = Callable[[str], AbstractContextManager[reads.Reader]]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, process_settings: Callable[..., Settings]) -> str:
    """A migrated, seeded database of the test's own, on each backend."""
    settings = process_settings(database=request.param)
    seed(settings.sqlalchemy_url)
    return settings.sqlalchemy_url


@pytest.fixture(params=["driver", "sqlalchemy"])
def opener(request: pytest.FixtureRequest) -> Opener:
    """The way ``reader`` reads: the driver itself, or SQLAlchemy's engine (other URLs)."""
    return reads.reader if request.param == "driver" else reads._sqlalchemy


def model_list_tenants(url: str, status: str | None) -> list[dict[str, Any]]:
    """What ``cul8er tenant list`` printed when it read the models."""
    with session_scope(url) as session:
        query = select(Tenant).order_by(Tenant.created_at.desc())
        if status:
            query = query.where(Tenant.status == status)
        return [
            {
                "tenant_id": t.id,
                "name": t.name,
                "plan": t.plan,
                "status": t.status,
                "platform": t.platform,
                "subnet": t.resources.get("subnet"),
                "created_at": t.created_at.isoformat(),
            }
            for t in session.scalars(query)
        ]


def model_list_runs(
    url: str, tenant: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    """What ``cul8er workflow list`` printed when it read the models."""
    with session_scope(url) as session:
        query = select(WorkflowRun).order_by(WorkflowRun.created_at.desc()).limit(limit)
        if tenant:
            query = query.where(WorkflowRun.tenant_id == tenant)
        if status:
            query = query.where(WorkflowRun.status == status)
        return [
            {
                "workflow_id": r.id,
                "kind": r.kind,
                "tenant_id": r.tenant_id,
                "status": r.status,
                "current_step": r.current_step,
                "created_at": r.created_at.isoformat(),
                "error": (r.error or {}).get("message"),
            }
            for r in session.scalars(query)
        ]


def test_tenants_read_as_the_models_read_them(url: str, opener: Opener) -> None:
    for status in (None, "active", "suspended", "terminated"):
        with opener(url) as read:
            listed = views.list_tenants(read, status)
        assert as_json(listed) == as_json(model_list_tenants(url, status)), status
    for tenant_id in ("ten0", "ten1"):
        with opener(url) as read:
            shown = views.describe_tenant(read, tenant_id)
        with session_scope(url) as session:
            expected = model_describe_tenant(session, session.get(Tenant, tenant_id))
        assert as_json(shown) == as_json(expected), tenant_id


def test_runs_read_as_the_models_read_them(url: str, opener: Opener) -> None:
    for tenant, status, limit in (
        (None, None, 50),
        ("ten0", None, 50),
        (None, "failed", 50),
        ("ten1", "failed", 50),
        (None, None, 1),
    ):
        with opener(url) as read:
            listed = views.list_runs(read, tenant=tenant, status=status, limit=limit)
        assert as_json(listed) == as_json(model_list_runs(url, tenant, status, limit))
    for run_id in ("run0", "run1", "run2"):
        with opener(url) as read:
            shown = views.describe_run(read, run_id)
        with session_scope(url) as session:
            expected = model_describe_run(session, session.get(WorkflowRun, run_id))
        assert as_json(shown) == as_json(expected), run_id
    # and what they hold is there: both owners (one whose process row is gone), the takeover
    with opener(url) as read:
        steps = views.describe_run(read, "run0")["steps"]
    assert [s["owner"] for s in steps] == [
        {"boot_id": "boot-alive", "node": "w1@host", "pid": 4242},
        {"boot_id": "boot-gone", "node": None, "pid": None},
    ]
    assert [t["reason"] for t in steps[0]["takeovers"]] == ["owner_exited"]


def test_usage_reads_as_the_models_read_it(url: str, opener: Opener) -> None:
    from workers.economics.views import metric_views, usage_rows

    minute = dt.timedelta(minutes=1)
    for tenant_id, since, until, metric in (
        ("ten0", T0, T0 + 10 * minute, None),
        # Bounds on window starts: the first one included, the last one not
        ("ten0", T0 + 2 * minute, T0 + 5 * minute, None),
        ("ten0", T0 + 2 * minute + dt.timedelta(microseconds=1), T0 + 5 * minute, "cpu_seconds"),
        (
            "ten0",
            (T0 + 3 * minute).astimezone(dt.timezone(dt.timedelta(hours=2))),
            T0 + 9 * minute,
            None,
        ),
        ("ten1", T0 - minute, T0 + minute, "requests"),
        ("ten1", T0 + minute, T0 + 2 * minute, None),
    ):
        with opener(url) as read:
            shown = views.metric_views(views.usage_rows(read, tenant_id, since, until, metric))
        with session_scope(url) as session:
            expected = metric_views(usage_rows(session, tenant_id, since, until, metric))
        assert as_json(shown) == as_json(expected), (tenant_id, since, until, metric)
    with opener(url) as read:
        assert views.tenant_anchor(read, "ten0") == dt.date(2026, 2, 28)


@pytest.mark.parametrize("period", ["month", "day", "hour", "minute"])
def test_usage_show_starts_where_quotas_start_the_period(period: Any) -> None:
    # usage show takes the period's start from periods.period_bounds, as quotas does
    from workers.economics.periods import period_bounds
    from workers.economics.quotas import period_start

    for anchor in (dt.date(2026, 1, 31), dt.date(2025, 2, 28), dt.date(2026, 3, 1)):
        for now in (T0, T0 + dt.timedelta(days=40, hours=5, minutes=7, seconds=3)):
            assert period_bounds(anchor, period, now)[0] == period_start(anchor, period, now)


def test_invoices_read_as_the_models_read_them(url: str, opener: Opener) -> None:
    for tenant, limit in ((None, 50), ("ten1", 50), (None, 2)):
        with opener(url) as read:
            listed = views.list_invoices(read, tenant=tenant, limit=limit)
        with session_scope(url) as session:
            query = select(Invoice).order_by(Invoice.period_start.desc(), Invoice.id).limit(limit)
            if tenant:
                query = query.where(Invoice.tenant_id == tenant)
            expected = [model_invoice_view(i, lines=False) for i in session.scalars(query)]
        assert as_json(listed) == as_json(expected)
    for n in range(len(TOTALS)):
        with opener(url) as read:
            shown = views.invoice_view(read, views.find_invoice(read, f"inv{n}"), lines=True)
        with session_scope(url) as session:
            expected = model_invoice_view(session.get(Invoice, f"inv{n}"), lines=True)
        assert as_json(shown) == as_json(expected)


def test_deployments_read_as_the_models_read_them(url: str, opener: Opener) -> None:
    from schemas.tasks import ListDeployments
    from workers.delivery.commands import describe, list_deployments

    for filters in ({}, {"tenant_id": "ten0"}, {"plugin": "log"}, {"status": "succeeded"}):
        payload = ListDeployments(**filters)
        with opener(url) as read:
            listed = deployment_views.list_deployments(
                read,
                tenant_id=payload.tenant_id,
                plugin=payload.plugin,
                status=payload.status,
                limit=payload.limit,
            )
        with session_scope(url) as session:
            expected = list_deployments(session, payload)
        assert as_json(listed) == as_json(expected), filters
    for deployment_id in ("dep-release-1", "dep-plugin-1"):
        with opener(url) as read:
            shown = deployment_views.describe(read, deployment_id)
        with session_scope(url) as session:
            expected = describe(session, session.get(Deployment, deployment_id))
        assert as_json(shown) == as_json(expected), deployment_id
    # with what the release one waits for, and the plugin one's tenant on its version
    assert [a["expired"] for a in shown["approvals"]] == [] or shown["moved"] == ["ten1"]


def test_a_deployment_is_found_by_its_id_or_a_unique_prefix(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    with reads.reader(url) as read:
        assert deployment_views.find_id(read, "dep-plugin-1") == "dep-plugin-1"
        assert deployment_views.find_id(read, "dep-r") == "dep-release-1"
        for prefix, what in (("dep-", "2 deployments"), ("nope", "no deployment")):
            with pytest.raises(typer.Exit):
                deployment_views.find_id(read, prefix)
            assert capsys.readouterr().err == f"not_found: {what} matching {prefix!r}\n"


@pytest.mark.parametrize("value", [None, 0, 12, 12.34565, 0.1 + 0.2, Decimal("7.00005"), "3.5"])
def test_money_is_the_economics_money(value: Any) -> None:
    assert views.money(value) == model_money(value)


def test_a_missing_row_is_not_found(
    process_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    process_settings()
    capsys.readouterr()  # the migration's log lines
    with reads.reader() as read:
        for find, what in (
            (views.describe_tenant, "tenant 'nope'"),
            (views.describe_run, "workflow nope"),
            (views.tenant_anchor, "tenant 'nope'"),
            (views.find_invoice, "invoice 'nope'"),
        ):
            with pytest.raises(typer.Exit) as exited:
                find(read, "nope")
            assert exited.value.exit_code == 1
            assert capsys.readouterr().err == f"not_found: {what} does not exist\n"


def test_an_unmigrated_sqlite_file_is_a_transient_error(tmp_path: Any) -> None:
    # Given a data dir that does not exist yet
    url = f"sqlite:///{tmp_path / 'none' / 'cul8er.db'}"
    # When a tenant list reads it
    with pytest.raises(TransientError) as raised, reads.reader(url) as read:
        views.list_tenants(read, None)
    # Then it says so as session_scope did, the folder made on the way
    assert str(raised.value) == "database unavailable: no such table: tenants"
    assert (tmp_path / "none").is_dir()


def test_the_driver_path_takes_plain_urls_only() -> None:
    assert reads._SQLITE.match("sqlite:////srv/var/cul8er.db")
    assert reads._SQLITE.match("sqlite+pysqlite:///var/cul8er.db")
    assert not reads._SQLITE.match("sqlite:///var/c%20d.db")
    assert not reads._SQLITE.match("sqlite:///var/cul8er.db?timeout=5")
    assert reads._POSTGRES.match("postgresql+psycopg://u:p@h:5432/db")
    assert not reads._POSTGRES.match("postgresql+psycopg://u@h/db?sslmode=require")
    assert not reads._POSTGRES.match("postgresql://u@h/db")
