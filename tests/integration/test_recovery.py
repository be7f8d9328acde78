"""Workflows survive a SIGKILLed worker and a lost message."""

from __future__ import annotations

import urllib.request
import uuid

import pytest
from sqlalchemy import select

from tests.stack import instance_processes
from workers.runtime.models import StepRun, WorkflowRun
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration


def _step_status(stack, run_id: str, name: str) -> str | None:
    with stack.session() as session:
        return session.scalars(
            select(StepRun.status).where(StepRun.run_id == run_id, StepRun.name == name)
        ).first()


@pytest.mark.parametrize("kind", ["embedded", "redis-postgres"])
def test_worker_killed_mid_provision_finishes_on_another_worker(stack_factory, kind: str) -> None:
    stack = stack_factory(kind)
    # Given a worker provisioning a tenant whose instance takes seconds to boot
    first = stack.start_worker("doomed", concurrency=1)
    stack.start_beat()
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    name = f"t-{tenant_id}-app-0"
    created = stack.call(
        "cul8er.tenants.create", name="Phoenix", plan="slowboot", tenant_id=tenant_id
    )
    assert created["ok"], created
    run_id = created["workflow_id"]
    wait_until(
        lambda: _step_status(stack, run_id, "cul8er.tenants.create_instances") == "running",
        timeout=30,
        message="create_instances never started",
    )
    # the instance process is spawned and booting (it listens only after 4 s)
    wait_until(
        lambda: instance_processes(stack.data_dir, name),
        timeout=30,
        message=f"no process of instance {name} was spawned",
    )

    # When the worker is SIGKILLed in the middle of create_instances
    stack.kill(first)
    # and another worker takes over
    stack.start_worker("heir", concurrency=2)

    # Then the workflow still finishes
    run = stack.wait_run(run_id, timeout=120)
    assert run["status"] == "succeeded", run
    # with one instance process (adopted, not duplicated) that answers /health
    processes = instance_processes(stack.data_dir, name)
    assert len(processes) == 1
    got = stack.call("cul8er.tenants.get", tenant_id=tenant_id)
    with urllib.request.urlopen(f"http://{got['instances'][0]['endpoint']}/health", timeout=5) as r:
        assert r.status == 200
    create = next(s for s in run["steps"] if s["name"].endswith("create_instances"))
    assert create["attempts"] == 2  # the killed attempt and the one that finished

    # And after deprovision no orphan process is left
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"
    assert instance_processes(stack.data_dir) == []


def test_lost_message_is_resumed_by_reconcile(stack_factory) -> None:
    stack = stack_factory("embedded")
    # Given a provision run whose first message was lost (never sent)
    from tasks import workflows as wf
    from workers.engine import ledger
    from workers.runtime.models import Tenant

    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    stack.add_tenant(tenant_id, "Lost")
    with stack.session() as session:
        run = ledger.new_run(
            session, kind=wf.PROVISION.kind, tenant_id=tenant_id, input={"plan": "free"}, grace=1
        )
        session.get(Tenant, tenant_id).active_workflow_id = run.id
        run_id = run.id
    # When a worker and beat run
    stack.start_worker("w", concurrency=2)
    stack.start_beat()
    # Then reconcile notices the run made no progress and it completes
    assert stack.wait_run(run_id, timeout=60)["status"] == "succeeded"
    with stack.session() as session:
        assert session.get(WorkflowRun, run_id).status == "succeeded"
        assert session.get(Tenant, tenant_id).status == "active"
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"
