"""Every step task delivered twice, at the same moment, leaves one side effect.

The run is created in the ledger without dispatching it; the test then sends
each step's message twice at once (as a redelivery or a second beat would) to
a worker with two processes, and checks the side effects after each step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from plugins.provisioners.database_per_tenant import store_exists
from tasks import workflows as wf
from tests.stack import Stack, instance_processes
from workers.engine import ledger
from workers.engine.workflow import Workflow
from workers.runtime.models import (
    AuditEvent,
    Instance,
    NetworkAllocation,
    Operation,
    StepRun,
    Tenant,
    WorkflowRun,
)
from workers.runtime.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import build_stack, teardown_stack

    stack = build_stack("embedded", tmp_path_factory.mktemp("twice"))
    # Two workers, two processes each: the two copies of a message really run at once.
    stack.start_worker("a", concurrency=2)
    stack.start_worker("b", concurrency=2)
    yield stack
    teardown_stack(stack)


def _insert_run(stack: Stack, workflow: Workflow, tenant_id: str, input: dict) -> str:
    with stack.session() as session:
        run = ledger.new_run(
            session, kind=workflow.kind, tenant_id=tenant_id, input=input, grace=3600
        )
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        tenant.active_workflow_id = run.id
        return run.id


def _deliver_twice(stack: Stack, run_id: str, task: str, phase: str = "forward") -> None:
    kwargs = {"run_id": run_id, "phase": phase}
    stack.client.send_task(task, kwargs=kwargs)
    stack.client.send_task(task, kwargs=kwargs)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with stack.session() as session:
            status = session.scalars(
                select(StepRun.status).where(
                    StepRun.run_id == run_id, StepRun.phase == phase, StepRun.name == task
                )
            ).one()
        if status == "done":
            time.sleep(0.3)  # let the second copy finish too
            return
        time.sleep(0.05)
    raise AssertionError(f"{task} did not finish: {status}")


def _drive(
    stack: Stack, run_id: str, workflow: Workflow, checks: dict[str, Callable[[], None]]
) -> None:
    for task in workflow.forward_tasks:
        _deliver_twice(stack, run_id, task)
        checks.get(task.rsplit(".", 1)[1], lambda: None)()
    with stack.session() as session:
        run = session.get(WorkflowRun, run_id)
        assert run is not None and run.status == "succeeded"
        attempts = session.scalars(select(StepRun.attempts).where(StepRun.run_id == run_id)).all()
    # Each step ran its body once: the second copy found it leased or done.
    assert set(attempts) == {1}


def test_every_tenant_step_twice_leaves_one_side_effect(stack: Stack) -> None:
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    name = f"t-{tenant_id}-app-0"
    settings = Settings(data_dir=stack.data_dir, database_url=stack.database_url)

    def count(model, *where) -> int:
        with stack.session() as session:
            return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

    def status() -> str:
        with stack.session() as session:
            tenant = session.get(Tenant, tenant_id)
            assert tenant is not None
            return tenant.status

    # Given a tenant row and a provision run that nobody dispatched
    stack.add_tenant(tenant_id, "Twice")
    run_id = _insert_run(stack, wf.PROVISION, tenant_id, {"plan": "free"})

    # When each provision step is delivered twice at once
    # Then each leaves exactly one side effect
    _drive(
        stack,
        run_id,
        wf.PROVISION,
        {
            "allocate_network": lambda: (
                count(NetworkAllocation, NetworkAllocation.tenant_id == tenant_id) == 1
                or _fail("subnet")
            ),
            "create_instances": lambda: (
                (
                    len(instance_processes(stack.data_dir, name)) == 1
                    and count(Instance, Instance.tenant_id == tenant_id) == 1
                )
                or _fail("instance")
            ),
            "create_datastore": lambda: store_exists(settings, tenant_id) or _fail("store"),
            "activate": lambda: status() == "active" or _fail("status"),
        },
    )
    assert (
        count(
            AuditEvent,
            AuditEvent.tenant_id == tenant_id,
            AuditEvent.kind == "tenant.status_changed",
        )
        == 1
    )

    # And the same for change plan, suspend, resume and deprovision
    run_id = _insert_run(
        stack, wf.CHANGE_PLAN, tenant_id, {"plan": "starter", "previous_plan": "free"}
    )
    _drive(stack, run_id, wf.CHANGE_PLAN, {})
    with stack.session() as session:
        assert session.get(Tenant, tenant_id).plan == "starter"

    run_id = _insert_run(stack, wf.SUSPEND, tenant_id, {"reason": "test"})
    _drive(
        stack,
        run_id,
        wf.SUSPEND,
        {
            "stop_instances": lambda: (
                instance_processes(stack.data_dir, name) == [] or _fail("stopped")
            ),
        },
    )
    assert status() == "suspended"

    run_id = _insert_run(stack, wf.RESUME, tenant_id, {"reason": ""})
    _drive(
        stack,
        run_id,
        wf.RESUME,
        {
            "start_instances": lambda: (
                len(instance_processes(stack.data_dir, name)) == 1 or _fail("started")
            ),
        },
    )
    assert status() == "active"

    run_id = _insert_run(stack, wf.DEPROVISION, tenant_id, {})
    _drive(
        stack,
        run_id,
        wf.DEPROVISION,
        {
            "destroy_instances": lambda: (
                instance_processes(stack.data_dir, name) == [] or _fail("destroyed")
            ),
            "release_network": lambda: (
                count(NetworkAllocation, NetworkAllocation.tenant_id == tenant_id) == 0
                or _fail("released")
            ),
        },
    )
    assert status() == "terminated"
    assert (
        count(
            AuditEvent,
            AuditEvent.tenant_id == tenant_id,
            AuditEvent.kind == "tenant.status_changed",
        )
        == 5
    )


def _fail(what: str) -> bool:
    raise AssertionError(f"double delivery left a wrong side effect: {what}")


def test_public_task_redelivered_and_repeated_key_make_one_workflow(stack: Stack) -> None:
    # Given one create message delivered twice (same task id, as a broker redelivery)
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    kwargs = {"name": "Once", "plan": "free", "tenant_id": tenant_id}
    task_id = uuid.uuid4().hex
    first = stack.client.send_task("cul8er.tenants.create", kwargs=kwargs, task_id=task_id)
    second = stack.client.send_task("cul8er.tenants.create", kwargs=kwargs, task_id=task_id)
    result = first.get(timeout=30)
    second.get(timeout=30)
    # Then there is one tenant and one provision run
    assert result["ok"], result
    with stack.session() as session:
        runs = session.scalars(
            select(WorkflowRun.id).where(WorkflowRun.tenant_id == tenant_id)
        ).all()
    assert runs == [result["workflow_id"]]

    # Given two calls with one idempotency key at the same moment
    key = uuid.uuid4().hex
    other = f"t{uuid.uuid4().hex[:8]}"
    calls = [
        stack.client.send_task(
            "cul8er.tenants.create",
            kwargs={"name": "Keyed", "plan": "free", "tenant_id": other, "idempotency_key": key},
        )
        for _ in range(2)
    ]
    results = [c.get(timeout=30) for c in calls]
    # Then both answer with the same workflow and only one exists
    assert results[0] == results[1] and results[0]["ok"]
    with stack.session() as session:
        assert session.scalars(
            select(WorkflowRun.id).where(WorkflowRun.tenant_id == other)
        ).all() == [results[0]["workflow_id"]]
        assert session.get(Operation, f"cul8er.tenants.create:{key}") is not None
    for run_id in (result["workflow_id"], results[0]["workflow_id"]):
        assert stack.wait_run(run_id)["status"] == "succeeded"
    for tid in (tenant_id, other):
        done = stack.call("cul8er.tenants.deprovision", tenant_id=tid)
        assert stack.wait_run(done["workflow_id"])["status"] == "succeeded"


def test_compensation_steps_twice_leave_nothing(stack: Stack) -> None:
    # Given a provisioned tenant whose run is forced into compensation by hand
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    created = stack.call("cul8er.tenants.create", name="Undo", plan="free", tenant_id=tenant_id)
    assert stack.wait_run(created["workflow_id"])["status"] == "succeeded"
    stack.add_tenant(tenant_id + "x", "x")
    run_id = _insert_run(stack, wf.PROVISION, tenant_id + "x", {"plan": "free"})
    for task in wf.PROVISION.forward_tasks[:4]:
        _deliver_twice(stack, run_id, task)
    with stack.session() as session:
        session.execute(
            StepRun.__table__.update()
            .where(StepRun.run_id == run_id, StepRun.name == "cul8er.tenants.health_check")
            .values(status="running", attempts=1, owner_id="forced")
        )
        tasks = ledger.fail_step(
            session,
            run_id=run_id,
            phase="forward",
            name="cul8er.tenants.health_check",
            error={"code": "permanent", "message": "forced"},
            grace=3600,
            attempt=1,
            owner="forced",
        )
        assert tasks is not None
    # When each compensation is delivered twice at once
    for task in tasks:
        _deliver_twice(stack, run_id, task, phase="compensate")
    # Then the run failed cleanly and nothing of that tenant is left, the other is untouched
    with stack.session() as session:
        assert session.get(WorkflowRun, run_id).status == "failed"
        assert session.get(Tenant, tenant_id + "x").status == "failed"
        assert (
            session.scalars(
                select(NetworkAllocation).where(NetworkAllocation.tenant_id == tenant_id + "x")
            ).all()
            == []
        )
        assert session.get(Tenant, tenant_id).status == "active"
    assert instance_processes(stack.data_dir, f"t-{tenant_id}x-app-0") == []
    assert len(instance_processes(stack.data_dir, f"t-{tenant_id}-app-0")) == 1
