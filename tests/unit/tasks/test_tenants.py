"""``cul8er.tenants.create``, sent and delivered as a worker would, on SQLite and PostgreSQL.

A client sends the task by name to the (private Redis) broker; the message is taken off its
queue and run through Celery's worker request. The database and the queues are then read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

import tasks.steps  # noqa: F401  (the step tasks the create's chain names)
import tasks.tenants  # noqa: F401  (registers cul8er.tenants.create)
import workers.pluginhost.calls as plugin_calls
from tasks import workflows as wf
from tests.unit.engine.harness import Broker
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.models import (
    AuditEvent,
    Operation,
    PlanPeriod,
    StepRun,
    Tenant,
    WorkflowRun,
)
from workers.runtime.settings import Settings

CREATE = "cul8er.tenants.create"


@pytest.fixture
def settings(configure: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> Settings:
    made = configure()
    # A fresh process's plugin registry, booted on this test's database before any task
    # runs, as a worker boots it at start (create reads it from inside its transaction).
    monkeypatch.setattr(plugin_calls, "_registry", None)
    plugin_calls.registry()
    return made


def create(broker: Broker, **kwargs: Any) -> dict[str, Any]:
    """Send ``cul8er.tenants.create`` as a client would and deliver it; its stored result."""
    sent = app.send_task(CREATE, kwargs=kwargs)
    message = broker.take(CREATE)
    assert message.headers["id"] == sent.id
    broker.deliver(message)
    result: dict[str, Any] = broker.result(sent.id)
    return result


def count(model: type, *where: Any) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_a_valid_create_records_the_tenant_and_its_run_and_sends_the_first_step(
    settings: Settings, broker: Broker
) -> None:
    # When a tenant is created under an idempotency key
    result = create(broker, name="Acme Corp.", plan="free", idempotency_key="signup-1")

    # Then the answer names the tenant (its id derived from the name) and the run
    assert result["ok"] is True
    assert result["tenant_id"] == "acme-corp"
    assert result["status"] == "provisioning"
    run_id = result["workflow_id"]
    with session_scope() as session:
        tenant = session.get(Tenant, "acme-corp")
        assert tenant is not None
        assert (tenant.name, tenant.plan, tenant.status) == ("Acme Corp.", "free", "provisioning")
        assert (tenant.platform, tenant.placement) == ("local", "container_per_tenant")
        assert tenant.active_workflow_id == run_id
        run = session.get(WorkflowRun, run_id)
        assert run is not None
        assert (run.kind, run.tenant_id, run.status, run.phase) == (
            wf.PROVISION.kind,
            "acme-corp",
            "running",
            "forward",
        )
        assert run.input == {"plan": "free"}
        steps = session.scalars(
            select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.position)
        ).all()
        assert [s.name for s in steps] == wf.PROVISION.forward_tasks
        assert {(s.phase, s.status, s.attempts) for s in steps} == {("forward", "pending", 0)}
        # the plan history starts, the request is audited, the answer is kept under the key
        periods = session.scalars(select(PlanPeriod).where(PlanPeriod.tenant_id == "acme-corp"))
        assert [p.plan for p in periods] == ["free"]
        audit = session.scalars(select(AuditEvent).where(AuditEvent.tenant_id == "acme-corp"))
        assert [a.kind for a in audit] == ["tenant.provision.requested"]
        operation = session.get(Operation, f"{CREATE}:signup-1")
        assert operation is not None
        assert operation.result == result and operation.tenant_id == "acme-corp"

    # And exactly one message left: the run's first step, carrying the rest as its chain
    [sent] = broker.sent()
    assert sent.task == wf.PROVISION.forward_tasks[0]
    assert sent.kwargs == {"run_id": run_id, "phase": "forward"}
    assert sent.chain_tasks == wf.PROVISION.forward_tasks[1:]


def test_a_repeated_create_with_the_same_key_answers_with_the_same_operation(
    settings: Settings, broker: Broker
) -> None:
    # Given a create that was answered
    first = create(broker, name="Acme", plan="free", idempotency_key="signup-2")
    assert first["ok"] is True
    [chain] = broker.sent()

    # When the same call comes again (a client that timed out sends it again)
    again = create(broker, name="Acme", plan="free", idempotency_key="signup-2")

    # Then it gets the first answer, and nothing is created twice
    assert again == first
    assert count(Tenant) == 1
    assert count(WorkflowRun) == 1
    assert count(Operation) == 1
    assert count(StepRun) == len(wf.PROVISION.forward_tasks)
    # While no step of the run has started, the repeat sends the run's chain again (the
    # first call may have died between its commit and its send); the ledger turns a
    # duplicate away
    repeated = broker.sent()
    assert [m.task for m in repeated] == [chain.task, chain.task]
    assert {m.kwargs["run_id"] for m in repeated} == {first["workflow_id"]}
    assert [m.chain_tasks for m in repeated] == [chain.chain_tasks] * 2

    # When the first step has run and a third call with the key comes
    assert broker.run_next(chain.task) == {"subnet": "10.100.0.0/24"}
    broker.take(chain.task)  # the duplicate chain, not needed here
    [next_step] = broker.sent()
    third = create(broker, name="Acme", plan="free", idempotency_key="signup-2")

    # Then it answers the same and sends nothing: the run is under way
    assert third == first
    assert broker.sent() == [next_step]
    assert count(WorkflowRun) == 1


def test_the_same_name_under_another_key_is_a_conflict_not_a_second_tenant(
    settings: Settings, broker: Broker
) -> None:
    assert create(broker, name="Acme", plan="free", idempotency_key="a")["ok"] is True
    broker.take()  # the first run's chain

    other = create(broker, name="Acme", plan="free", idempotency_key="b")

    assert other["ok"] is False
    assert other["error"]["code"] == "conflict"
    assert "'acme' exists already" in other["error"]["message"]
    assert count(Tenant) == 1 and count(WorkflowRun) == 1
    # A rejection is not kept under its key, and nothing is sent
    assert count(Operation) == 1
    assert broker.sent() == []


#: Rejected by the payload model: the message lists each field with pydantic's words.
MODEL_ERRORS = [
    ({"plan": "free"}, "name"),
    ({"name": "Acme", "plan": 3}, "plan"),
    ({"name": "Acme", "plan": "free", "tenant_id": "Not Valid"}, "tenant_id"),
    # a union's member tags are not part of the path
    ({"name": "Acme", "plan": "free", "metadata": {"tier": [1]}}, "metadata.tier"),
    ({"name": "Acme", "plan": "free", "colour": "red"}, "colour"),
    ({"name": "Acme", "plan": "free", "idempotency_key": ""}, "idempotency_key"),
]
#: Rejected by the service: the catalog, the active plugins, the reserved names.
SERVICE_ERRORS = [
    ({"name": "Acme", "plan": "platinum"}, "plan"),
    ({"name": "Acme", "plan": "free", "platform": "mars"}, "platform"),
    ({"name": "Acme", "plan": "free", "provisioner": "nope"}, "provisioner"),
    ({"name": "!!!", "plan": "free"}, "name"),
    ({"name": "Pool", "plan": "free", "tenant_id": "shared-pool"}, "tenant_id"),
]


@pytest.mark.parametrize(("kwargs", "field"), MODEL_ERRORS + SERVICE_ERRORS)
def test_bad_input_is_rejected_naming_the_field(
    settings: Settings, broker: Broker, kwargs: dict[str, Any], field: str
) -> None:
    # When a create with bad input is sent (under a key, so a fix can be sent under it)
    result = create(broker, **{"idempotency_key": "bad-1", **kwargs})

    # Then it is rejected, naming the field, and nothing is recorded, sent or retried
    assert result["ok"] is False
    assert result["error"]["code"] == "validation_error"
    assert [e["field"] for e in result["error"]["errors"]] == [field]
    if (kwargs, field) in MODEL_ERRORS:
        assert result["error"]["message"].startswith(f"invalid arguments for {CREATE}: {field}: ")
    assert count(Tenant) == 0 and count(WorkflowRun) == 0 and count(Operation) == 0
    assert broker.sent() == []
    if "idempotency_key" not in kwargs:
        # the rejection is not the key's answer: the corrected call goes through
        fixed = create(broker, name="Acme", plan="free", idempotency_key="bad-1")
        assert fixed["ok"] is True and count(Tenant) == 1


def test_positional_arguments_are_rejected(settings: Settings, broker: Broker) -> None:
    sent = app.send_task(CREATE, args=["Acme", "free"])
    broker.run_next(CREATE)

    result = broker.result(sent.id)
    assert result["ok"] is False
    assert result["error"]["errors"] == [{"field": "args", "message": "positional arguments given"}]
    assert count(Tenant) == 0 and broker.sent() == []
