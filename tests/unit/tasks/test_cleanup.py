"""``cul8er.maintenance.cleanup``: old keys and gone tenants' baselines go, the rest stays."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from sqlalchemy import select

from tasks.maintenance import cleanup
from workers.runtime.db import session_scope
from workers.runtime.models import (
    MeterReading,
    Operation,
    StepRun,
    Tenant,
    WorkerProcess,
    WorkflowRun,
    utcnow,
)
from workers.runtime.settings import Settings


@pytest.fixture
def settings(process_settings: Callable[..., Settings]) -> Settings:
    return process_settings()


def _tenant(tenant_id: str, status: str) -> Tenant:
    now = utcnow()
    return Tenant(
        id=tenant_id,
        name=tenant_id,
        plan="free",
        status=status,
        platform="local",
        resources={},
        meta={},
        billing_anchor=now.date(),
        created_at=now,
        updated_at=now,
    )


def test_cleanup_removes_old_keys_and_gone_baselines_once(settings: Settings) -> None:
    # Given keys older and younger than the retention, and baselines of a live and a gone tenant
    old = utcnow() - dt.timedelta(days=settings.operations_retention_days + 1)
    now = utcnow()
    with session_scope() as session:
        session.add_all([_tenant("live", "active"), _tenant("gone", "terminated")])
        session.add(Operation(key="old", task_name="t", result={}, created_at=old))
        session.add(Operation(key="new", task_name="t", result={}, created_at=now))
        for tenant in ("live", "gone"):
            session.add(
                MeterReading(
                    tenant_id=tenant, source="i", metric="cpu_seconds", value=1.0, taken_at=now
                )
            )
        # worker processes: one gone for two days, one gone as long but still holding a
        # step (its row explains the step's owner), one beating now
        for boot_id, beat_at in (("gone", old), ("holder", old), ("alive", now)):
            session.add(
                WorkerProcess(
                    boot_id=boot_id,
                    node="w@h",
                    host="h",
                    pid=1,
                    namespace="h/b/1",
                    started_at=old,
                    beat_at=beat_at,
                )
            )
        session.add(WorkflowRun(id="r" * 32, kind="k", status="running", input={}))
        session.flush()
        session.add(
            StepRun(
                run_id="r" * 32,
                phase="forward",
                position=0,
                name="s",
                status="running",
                owner_id="holder",
            )
        )

    # When cleanup runs twice
    first = cleanup.apply().get()
    second = cleanup.apply().get()

    # Then the first removes exactly the old key and the gone tenant's baseline; the second nothing
    assert first == {"operations": 1, "meter_readings": 1, "workers": 1}
    assert second == {"operations": 0, "meter_readings": 0, "workers": 0}
    with session_scope() as session:
        assert list(session.scalars(select(Operation.key))) == ["new"]
        assert list(session.scalars(select(MeterReading.tenant_id))) == ["live"]
        assert sorted(session.scalars(select(WorkerProcess.boot_id))) == ["alive", "holder"]
