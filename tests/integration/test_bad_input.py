"""Bad input to every public task: a clear error naming the field, no retry, worker unharmed."""

from __future__ import annotations

import pytest

from tests.stack import Stack

pytestmark = pytest.mark.integration

HUGE = "x" * 1_000_000

CASES = [
    # (task, kwargs, fields the error must name)
    ("cul8er.tenants.create", {"name": 42, "plan": "starter"}, {"name"}),
    ("cul8er.tenants.create", {"name": "Acme", "plan": "gold"}, {"plan"}),
    ("cul8er.tenants.create", {"name": "Acme"}, {"plan"}),
    ("cul8er.tenants.create", {"name": "Acme", "plan": "free", "colour": "red"}, {"colour"}),
    ("cul8er.tenants.create", {"name": HUGE, "plan": "free"}, {"name"}),
    (
        "cul8er.tenants.create",
        {"name": "Acme", "plan": "free", "tenant_id": "Bad Id!"},
        {"tenant_id"},
    ),
    (
        "cul8er.tenants.create",
        {"name": "Acme", "plan": "free", "platform": "mainframe"},
        {"platform"},
    ),
    (
        "cul8er.tenants.create",
        {"name": "Acme", "plan": "free", "metadata": {"k": HUGE}},
        {"metadata.k"},
    ),
    ("cul8er.tenants.change_plan", {"tenant_id": "acme"}, {"plan"}),
    ("cul8er.tenants.change_plan", {"tenant_id": ["acme"], "plan": "pro"}, {"tenant_id"}),
    ("cul8er.tenants.suspend", {"tenant_id": "acme", "reason": HUGE}, {"reason"}),
    ("cul8er.tenants.suspend", {}, {"tenant_id"}),
    ("cul8er.tenants.resume", {"tenant_id": 7}, {"tenant_id"}),
    ("cul8er.tenants.deprovision", {"tenant_id": "acme", "force": True}, {"force"}),
    ("cul8er.tenants.get", {"tenant_id": None}, {"tenant_id"}),
    ("cul8er.workflows.status", {"workflow_id": "not-a-run"}, {"workflow_id"}),
    ("cul8er.workflows.status", {"workflow_id": "0" * 32, "verbose": 1}, {"verbose"}),
    (
        "cul8er.tenants.set_environment",
        {"tenant_id": "acme", "environment": "prod"},
        {"environment"},
    ),
    ("cul8er.deployments.create", {"tenant_id": "acme"}, {"release"}),
    (
        "cul8er.deployments.create",
        {"tenant_id": "acme", "release": {"version": "bad version!"}},
        {"release.version"},
    ),
    (
        "cul8er.deployments.create",
        {"tenant_id": "acme", "release": {"version": "2", "settings": {"error_rate": 2}}},
        {"release.settings.error_rate"},
    ),
    (
        "cul8er.deployments.create",
        {"tenant_id": "acme", "release": {"version": "2"}, "strategy": "Big Bang"},
        {"strategy"},
    ),
    (
        "cul8er.deployments.create",
        {"tenant_id": "acme", "release": {"version": "2"}, "strategy_config": []},
        {"strategy_config"},
    ),
    ("cul8er.deployments.get", {"deployment_id": "nope"}, {"deployment_id"}),
    ("cul8er.deployments.list", {"limit": 0}, {"limit"}),
    ("cul8er.deployments.approve", {"deployment_id": "0" * 32}, {"actor"}),
    ("cul8er.deployments.reject", {"deployment_id": "0" * 32, "actor": ""}, {"actor"}),
    (
        "cul8er.deployments.promote",
        {"deployment_id": "0" * 32, "actor": "a", "full": "yes"},
        {"full"},
    ),
    ("cul8er.deployments.pause", {"deployment_id": 5, "actor": "a"}, {"deployment_id"}),
    ("cul8er.deployments.resume", {"actor": "a"}, {"deployment_id"}),
    ("cul8er.deployments.abort", {"deployment_id": "0" * 32, "actor": "a", "x": 1}, {"x"}),
    ("cul8er.deployments.retry", {"deployment_id": "0" * 32, "actor": HUGE}, {"actor"}),
    ("cul8er.deployments.rollback", {"deployment_id": "0" * 33, "actor": "a"}, {"deployment_id"}),
]


@pytest.mark.parametrize(
    ("task", "kwargs", "fields"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_is_rejected_with_the_field(running_stack: Stack, task, kwargs, fields) -> None:
    # When a public task gets bad input
    async_result = running_stack.client.send_task(task, kwargs=kwargs)
    result = async_result.get(timeout=30)
    # Then the answer is a validation error naming the fields, and short
    assert result["ok"] is False
    assert result["error"]["code"] == "validation_error"
    named = {e["field"] for e in result["error"]["errors"]}
    assert fields <= named, named
    assert len(result["error"]["message"]) <= 300
    # and the task was not retried: it ended once, successfully delivering the error
    assert async_result.state == "SUCCESS"
    assert async_result.retries in (0, None)


def test_positional_arguments_are_refused(running_stack: Stack) -> None:
    result = running_stack.client.send_task("cul8er.tenants.get", args=["acme"]).get(timeout=30)
    assert result["ok"] is False and result["error"]["errors"][0]["field"] == "args"


def test_unknown_tenant_and_workflow_are_not_found(running_stack: Stack) -> None:
    assert (
        running_stack.call("cul8er.tenants.get", tenant_id="nobody")["error"]["code"] == "not_found"
    )
    missing = running_stack.call("cul8er.workflows.status", workflow_id="0" * 32)
    assert missing["error"]["code"] == "not_found"
    refused = running_stack.call("cul8er.tenants.suspend", tenant_id="nobody")
    assert refused["error"]["code"] == "not_found"


def test_worker_is_unharmed_after_bad_input(running_stack: Stack) -> None:
    # Given a burst of bad input
    for task, kwargs, _ in CASES:
        running_stack.client.send_task(task, kwargs=kwargs)
    # Then the worker still answers ping and serves a good call
    assert running_stack.client.control.ping(timeout=5)
    good = running_stack.call("cul8er.tenants.create", name="After Bad", plan="nonexistent")
    assert good["error"]["errors"][0]["field"] == "plan"
    ok = running_stack.call("cul8er.workflows.status", workflow_id="f" * 32)
    assert ok["error"]["code"] == "not_found"
