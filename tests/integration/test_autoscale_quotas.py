"""Autoscale, quotas and payment standing end to end: real worker, real beat, real instances.

Usage rows are written the way metering writes them (one row per tenant, metric and
window); everything after that is the real thing: beat's autoscale evaluation, the
workflows it starts, the quota enforcement another service (or metering) triggers by
name, and the instances that stop answering when their tenant is suspended.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from schemas.states import RunStatus, TenantStatus
from tests.stack import ROOT, Stack
from workers.runtime.models import (
    AutoscaleDecision,
    Instance,
    Tenant,
    UsageRecord,
    WorkflowRun,
    utcnow,
)
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

#: Until the integrator adds them to TASK_MODULES, the worker imports the tasks from here.
IMPORTS = '["tasks.autoscale","tasks.quotas","tasks.health"]'


@pytest.fixture(scope="module", params=["embedded", "redis-postgres"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from tests.conftest import build_stack, teardown_stack

    stack = build_stack(request.param, tmp_path_factory.mktemp(f"economics-{request.param}"))
    stack.extra_env.update(
        CUL8ER_IMPORTS=IMPORTS,
        # Beat evaluates autoscale rules every 2 s and sweeps health every 2 s.
        CUL8ER_AUTOSCALE_INTERVAL="2",
        CUL8ER_HEALTH_SWEEP_INTERVAL="2",
        # Metering stays out of the way: this test writes the usage rows itself.
        CUL8ER_METER_INTERVAL="3600",
        CUL8ER_PAYMENT_GRACE="3",
        COLUMNS="200",
    )
    try:
        stack.start_worker("econ", concurrency=2)
        stack.start_beat()
        yield stack
    finally:
        teardown_stack(stack)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def health(endpoint: str) -> int:
    """The HTTP status of an instance's /health (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as response:
            return int(response.status)
    except OSError:
        return 0


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    """The first truthy answer of ``check``; an assertion error after ``timeout`` seconds."""
    return wait_until(
        check,
        timeout=timeout,
        interval=0.25,
        message=f"timed out waiting for {what}",
        error=AssertionError,
    )


def create(stack: Stack, plan: str, prefix: str, **extra: Any) -> dict[str, Any]:
    tenant_id = new_id(prefix)
    made = stack.call(
        "cul8er.tenants.create", name=tenant_id, plan=plan, tenant_id=tenant_id, **extra
    )
    assert made["ok"], made
    assert stack.wait_run(made["workflow_id"])["status"] == RunStatus.SUCCEEDED
    got = stack.call("cul8er.tenants.get", tenant_id=tenant_id)
    assert got["status"] == TenantStatus.ACTIVE
    return got


def add_rows(
    stack: Stack, tenant_id: str, metric: str, value: float, starts: list[dt.datetime], step: int
) -> None:
    with stack.session() as session:
        for start in starts:
            session.add(
                UsageRecord(
                    tenant_id=tenant_id,
                    metric=metric,
                    window_start=start,
                    window_end=start + dt.timedelta(seconds=step),
                    value=value,
                    aggregation="sum",
                )
            )


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.economics", *args],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def decisions(stack: Stack, tenant_id: str, rule: str) -> list[AutoscaleDecision]:
    with stack.session() as session:
        return list(
            session.scalars(
                select(AutoscaleDecision)
                .where(AutoscaleDecision.tenant_id == tenant_id, AutoscaleDecision.rule == rule)
                .order_by(AutoscaleDecision.window_start)
            )
        )


def assert_explained(stack: Stack, tenant_id: str) -> None:
    """``autoscale explain`` shows the action, then the cooldown, with inputs and reasons."""
    explained = cli(stack, "autoscale", "explain", tenant_id, "--json")
    table = cli(stack, "autoscale", "explain", tenant_id, "--last", "3")
    assert explained.returncode == 0, explained.stderr
    view = json.loads(explained.stdout)
    reasons = [d["reason"] for d in view["decisions"] if d["rule"] == "cpu-high"]
    assert any("add_instance 1 → 2" in r for r in reasons)
    assert any(r.startswith("no action: in cooldown until") for r in reasons)
    assert view["decisions"][-1]["inputs"]["threshold"] == 80
    assert table.returncode == 0 and "in cooldown until" in table.stdout


def test_over_its_cpu_threshold_a_tenant_is_scaled_once_then_cools_down(stack: Stack) -> None:
    # Given a starter tenant (2 cores per instance, up to 3) whose own rule adds an instance
    # over 80% CPU for 20 s (cooldown: the default 15 minutes)
    rule = {
        "name": "cpu-high",
        "metric": "cpu_utilization",
        "threshold": 80,
        "window": 20,
        "action": "add_instance",
    }
    got = create(stack, "starter", "hot", metadata={"autoscale": json.dumps([rule])})
    tenant_id = got["tenant_id"]

    # When its instances burn 3.8 cores (190% of one instance, 95% of two) from now on
    now = utcnow().replace(microsecond=0)
    starts = [now + dt.timedelta(seconds=s) for s in range(-30, 180, 5)]
    add_rows(stack, tenant_id, "cpu_seconds", 3.8 * 5, starts, step=5)

    # Then beat's evaluation decides add_instance once, with a change_plan run that succeeds
    [action] = wait_for(
        "an add_instance decision",
        lambda: [d for d in decisions(stack, tenant_id, "cpu-high") if d.action != "none"],
    )
    assert action.action == "add_instance" and action.workflow_id is not None
    assert action.reason.startswith("cpu_utilization 190.0% > 80% for 20 s: add_instance 1 → 2")
    assert action.inputs["instances"] == 1 and action.inputs["samples"] >= 4
    run = stack.wait_run(action.workflow_id)
    assert run["kind"] == "tenant.change_plan" and run["status"] == RunStatus.SUCCEEDED, run

    # and the next evaluations, still over the threshold, decide nothing: in cooldown
    def cooling() -> list[AutoscaleDecision]:
        later = [
            d
            for d in decisions(stack, tenant_id, "cpu-high")
            if d.window_start > action.window_start
        ]
        return later if len(later) >= 3 else []

    later = wait_for("three decisions after the action", cooling)
    assert all(d.action == "none" for d in later)
    assert all(d.reason.startswith("no action: in cooldown until ") for d in later)
    assert [d.action for d in decisions(stack, tenant_id, "cpu-high")].count("add_instance") == 1
    with stack.session() as session:
        changes = session.scalar(
            select(func.count()).where(
                WorkflowRun.tenant_id == tenant_id, WorkflowRun.kind == "tenant.change_plan"
            )
        )
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        assert changes == 1 and tenant.resources["instances"] == 2

    # When an operator asks why, then the decisions come with their inputs and reasons
    assert_explained(stack, tenant_id)

    # and the instance count follows the decision (apply_limits scales to resources.instances)
    with stack.session() as session:
        count = session.scalar(select(func.count()).where(Instance.tenant_id == tenant_id))
    assert count == 2


def test_over_its_request_quota_a_free_tenant_is_suspended_and_stops_answering(
    stack: Stack,
) -> None:
    # Given a free tenant (suspend policy, 10,000 requests a month) whose instance answers
    got = create(stack, "free", "quota")
    tenant_id = got["tenant_id"]
    [instance] = got["instances"]
    assert health(instance["endpoint"]) == 200

    # When metering has recorded 10,234 requests this period
    now = utcnow().replace(microsecond=0)
    add_rows(stack, tenant_id, "requests", 5_117, [now - dt.timedelta(minutes=2)], step=60)
    add_rows(stack, tenant_id, "requests", 5_117, [now - dt.timedelta(minutes=1)], step=60)
    # and enforcement is triggered twice at once (by metering and by a retry)
    sent = [stack.client.send_task("cul8er.quotas.enforce") for _ in range(2)]
    summaries = [result.get(timeout=60) for result in sent]

    # Then one suspend workflow runs, with the reason
    assert sorted(len(s["suspended"]) for s in summaries) == [0, 1]
    with stack.session() as session:
        [run_id] = session.scalars(
            select(WorkflowRun.id).where(
                WorkflowRun.tenant_id == tenant_id, WorkflowRun.kind == "tenant.suspend"
            )
        ).all()
    assert stack.wait_run(run_id)["status"] == RunStatus.SUCCEEDED
    got = stack.call("cul8er.tenants.get", tenant_id=tenant_id)
    assert got["status"] == TenantStatus.SUSPENDED
    assert got["status_reason"] == "quota exceeded: requests 10234 > 10000"
    # and its instance no longer answers
    assert health(instance["endpoint"]) == 0


def enforce_until_suspended(
    stack: Stack, tenant_id: str, timeout: float = 60
) -> list[tuple[dt.datetime, list[str]]]:
    """Enforce for the tenant again and again until a run suspends it: when each answered,
    and whom it suspended, in order."""
    answers: list[tuple[dt.datetime, list[str]]] = []

    def enforce() -> bool:
        sent = stack.client.send_task("cul8er.quotas.enforce", kwargs={"tenant_ids": [tenant_id]})
        suspended = sent.get(timeout=60)["suspended"]
        answers.append((utcnow(), suspended))
        return bool(suspended)

    wait_for("an enforcement that suspends the tenant", enforce, timeout=timeout)
    return answers


def test_a_failed_payment_suspends_the_tenant_after_the_grace(stack: Stack) -> None:
    # Given an active starter tenant
    got = create(stack, "starter", "payer")
    tenant_id = got["tenant_id"]
    # When the payment service reports a failed charge (grace: 3 s here)
    failed = stack.call(
        "cul8er.billing.payment_failed",
        tenant_id=tenant_id,
        invoice_id="inv-77",
        idempotency_key=f"charge-{tenant_id}",
    )
    assert failed["ok"] and failed["payment"] == "failed", failed
    suspend_after = dt.datetime.fromisoformat(failed["suspend_after"])
    # And enforcement runs over and over until one suspends the tenant
    answers = enforce_until_suspended(stack, tenant_id)

    # Then the first enforcement, within the grace, left it running, as did every one
    # before the grace was over
    first_at, first = answers[0]
    assert first_at < suspend_after and first == [], answers
    assert all(suspended == [] for _, suspended in answers[:-1]), answers
    # And the enforcement that suspended it ran once the grace was over
    suspended_at, suspended = answers[-1]
    assert suspended == [tenant_id] and suspended_at >= suspend_after, answers
    with stack.session() as session:
        [run_id] = session.scalars(
            select(WorkflowRun.id).where(
                WorkflowRun.tenant_id == tenant_id, WorkflowRun.kind == "tenant.suspend"
            )
        ).all()
    assert stack.wait_run(run_id)["status"] == RunStatus.SUCCEEDED
    got = stack.call("cul8er.tenants.get", tenant_id=tenant_id)
    assert got["status"] == TenantStatus.SUSPENDED
    assert got["status_reason"] == "payment failed: inv-77 unpaid past the grace period"
    assert all(health(i["endpoint"] or "127.0.0.1:1") == 0 for i in got["instances"])
