"""Autoscale: rules, the decision (HPA-like timing) and one decision row per slot.

The decisions run against real databases (SQLite, and PostgreSQL where it answers); the
workflows they start are checked in the ledger, and dispatched by the integration tests.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError
from sqlalchemy import delete, select
from typer.testing import CliRunner

from schemas.autoscale import AutoscaleRule
from schemas.states import Phase, RunStatus, TenantStatus
from tasks import workflows as wf
from tasks.autoscale import EVALUATE, evaluate_slot
from workers.cli.economics import autoscale_cli, beat_cli
from workers.economics.autoscale import TenantState, UsageWindow, decide, measure, resolve_rules
from workers.economics.plans import load_catalog
from workers.runtime.db import session_scope
from workers.runtime.models import (
    AuditEvent,
    AutoscaleDecision,
    Instance,
    Operation,
    Tenant,
    UsageRecord,
    WorkflowRun,
    utcnow,
)
from workers.runtime.schedule import claim_slot
from workers.runtime.settings import Settings

T = TypeVar("T")

NOW = dt.datetime(2026, 11, 23, 12, 5, 30, tzinfo=dt.UTC)
PLANS = load_catalog().plans
STARTER = PLANS["starter"]
CPU_HIGH = AutoscaleRule(
    name="cpu-high", metric="cpu_utilization", threshold=80, window=60, action="add_instance"
)
CPU_LOW = AutoscaleRule(
    name="cpu-low",
    metric="cpu_utilization",
    comparison="below",
    threshold=20,
    window=60,
    action="remove_instance",
)


def windows(
    per_second: float, *, seconds: int, now: dt.datetime = NOW, step: int = 10
) -> list[UsageWindow]:
    """Metering rows of ``step`` s each over the last ``seconds``, at ``per_second`` each."""
    end = now.replace(second=now.second - now.second % step)
    return [
        UsageWindow(
            start=end - dt.timedelta(seconds=s + step),
            end=end - dt.timedelta(seconds=s),
            value=per_second * step,
        )
        for s in range(0, seconds, step)
    ]


def state(instances: int = 1, **extra: Any) -> TenantState:
    return TenantState(tenant_id="acme", plan=STARTER, instances=instances, **extra)


def run_decide(rule: AutoscaleRule, st: TenantState, rows: list[UsageWindow]) -> Any:
    return decide(
        rule,
        st,
        rows,
        now=NOW,
        plans=PLANS,
        default_cooldown=900,
        default_stabilization=300,
    )


# -- the decision ---------------------------------------------------------------------------


def test_over_the_cpu_threshold_adds_one_instance_with_the_reason() -> None:
    # Given a starter tenant (2 cores) using 1.9 cores for the last minute
    rows = windows(1.9, seconds=60)
    # When its cpu-high rule is decided
    decision = run_decide(CPU_HIGH, state(), rows)
    # Then it adds one instance and says why, with the inputs it saw
    assert decision.action == "add_instance" and decision.instances == 2
    assert decision.reason == "cpu_utilization 95.0% > 80% for 60 s: add_instance 1 → 2"
    assert decision.inputs["value"] == pytest.approx(95.0)
    assert decision.inputs["samples"] == 6 and decision.inputs["threshold"] == 80


def test_below_the_threshold_nothing_happens() -> None:
    decision = run_decide(CPU_HIGH, state(), windows(0.4, seconds=60))
    assert decision.action == "none"
    assert decision.reason.startswith("no action: below threshold (cpu_utilization 20.0% ≤ 80%")


def test_within_the_cooldown_nothing_happens_and_the_end_is_named() -> None:
    # Given the tenant's last autoscale action 5 minutes ago (cooldown 15 min)
    last = NOW - dt.timedelta(minutes=5)
    decision = run_decide(
        CPU_HIGH, state(last_action_at=last, last_action_rule="cpu-high"), windows(1.9, seconds=60)
    )
    # Then the condition holds, but no action until the cooldown ends
    assert decision.action == "none"
    until = (last + dt.timedelta(seconds=900)).isoformat(timespec="seconds")
    assert decision.reason == f"no action: in cooldown until {until} (last action by rule cpu-high)"
    # and after it, the rule acts again
    later = run_decide(
        CPU_HIGH,
        state(last_action_at=NOW - dt.timedelta(seconds=901), last_action_rule="cpu-high"),
        windows(1.9, seconds=60),
    )
    assert later.action == "add_instance"


def test_at_max_instances_and_at_the_floor_nothing_happens() -> None:
    # starter: 2 cores per instance, at most 3 instances; 3 × 2 × 95% = 5.7 cores
    assert (
        run_decide(CPU_HIGH, state(3), windows(5.7, seconds=60)).reason
        == "no action: at max_instances 3"
    )
    low = run_decide(CPU_LOW, state(1), windows(0.01, seconds=600))
    assert low.reason == "no action: at min instances 1 (plan starter)"


def test_scale_down_waits_for_the_whole_stabilization_window() -> None:
    # Given two instances idle for the last 2 minutes only (busy before)
    rows = windows(0.1, seconds=120) + [
        UsageWindow(w.start - dt.timedelta(seconds=120), w.end - dt.timedelta(seconds=120), 30.0)
        for w in windows(0.1, seconds=180)
    ]
    # When cpu-low (below 20%) is decided: not yet, the 300 s stabilization has not passed
    early = run_decide(CPU_LOW, state(2), rows)
    assert early.action == "none"
    assert "for only 120 s of the 300 s stabilization window" in early.reason
    # When they have been idle for over 5 minutes, one instance goes
    settled = run_decide(CPU_LOW, state(2), windows(0.1, seconds=330))
    assert settled.action == "remove_instance" and settled.instances == 1
    assert settled.reason.startswith("cpu_utilization 2.5% < 20% for 330 s: remove_instance 2 → 1")


def test_a_busy_tenant_and_plan_actions() -> None:
    upgrade = AutoscaleRule(
        name="rps-high",
        metric="requests_per_second",
        threshold=100,
        window=60,
        action="upgrade_plan",
        target_plan="pro",
    )
    rows = windows(150, seconds=60)
    busy = run_decide(upgrade, state(busy_with="abc"), rows)
    assert busy.reason == "no action: tenant busy with workflow abc"
    moved = run_decide(upgrade, state(), rows)
    assert moved.action == "upgrade_plan" and moved.target_plan == "pro"
    assert (
        moved.reason == "requests_per_second 150.00/s > 100/s for 60 s: upgrade_plan starter → pro"
    )
    # A downgrade to a plan with fewer max_instances than the tenant runs is refused
    down = upgrade.model_copy(update={"action": "downgrade_plan", "target_plan": "free"})
    assert run_decide(down, state(2), windows(150, seconds=400)).reason == (
        "no action: 2 instances exceed plan free's max_instances 1"
    )


def test_no_usage_and_unlimited_plans_explain_themselves() -> None:
    assert run_decide(CPU_HIGH, state(), []).reason == "no action: no usage data in the last 60 s"
    enterprise = TenantState(tenant_id="big", plan=PLANS["enterprise"], instances=1)
    assert run_decide(CPU_HIGH, enterprise, windows(9, seconds=60)).reason == (
        "no action: plan enterprise sets no cpu_cores quota"
    )


def test_memory_is_a_time_weighted_mean_of_the_plan_quota() -> None:
    # Given 1 GiB for 50 s and 3 GiB for 10 s on a 4 GB instance
    gib = 1024**3
    rows = [
        UsageWindow(NOW - dt.timedelta(seconds=60), NOW - dt.timedelta(seconds=10), 1 * gib),
        UsageWindow(NOW - dt.timedelta(seconds=10), NOW, 3 * gib),
    ]
    # Then memory utilisation is (50 × 1 + 10 × 3) / 60 GiB of 4 GiB
    assert measure("memory_utilization", STARTER, 1, rows) == pytest.approx(80 / 60 / 4 * 100)


def test_tenant_rules_override_the_plans_by_name() -> None:
    own = [
        {
            "name": "cpu-high",
            "metric": "cpu_utilization",
            "threshold": 50,
            "window": 30,
            "action": "add_instance",
            "cooldown": 60,
        }
    ]
    # As a list and as a JSON string (sign-up metadata holds only scalars)
    for meta in ({"autoscale": own}, {"autoscale": json.dumps(own)}):
        rules, problems = resolve_rules(STARTER, meta)
        assert problems == []
        assert {r.name: r.threshold for r in rules} == {"cpu-high": 50, "cpu-low": 20}
    # An invalid tenant rule is reported; the plan's rules still apply
    rules, problems = resolve_rules(STARTER, {"autoscale": [{"name": "x", "metric": "disk"}]})
    assert [r.name for r in rules] == ["cpu-high", "cpu-low"] and "invalid" in problems[0]


def test_plan_actions_need_a_target_and_instance_actions_none() -> None:
    with pytest.raises(ValidationError, match="needs target_plan"):
        AutoscaleRule(name="up", metric="cpu_utilization", threshold=1, action="upgrade_plan")
    with pytest.raises(ValidationError, match="takes no target_plan"):
        AutoscaleRule(
            name="add",
            metric="cpu_utilization",
            threshold=1,
            action="add_instance",
            target_plan="pro",
        )


# -- evaluation against a database --------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, process_settings: Callable[..., Settings]) -> Settings:
    return process_settings(request.param)


def add_tenant(
    tenant_id: str, plan: str = "starter", *, instances: int = 1, meta: dict | None = None
) -> None:
    with session_scope() as session:
        session.add(
            Tenant(
                id=tenant_id,
                name=tenant_id,
                plan=plan,
                status=TenantStatus.ACTIVE,
                platform="local",
                resources={},
                meta=meta or {},
                billing_anchor=NOW.date(),
            )
        )
        session.flush()
        for n in range(instances):
            session.add(
                Instance(
                    tenant_id=tenant_id,
                    name=f"t-{tenant_id}-app-{n}",
                    platform="local",
                    role="app",
                    ordinal=n,
                    status="running",
                    endpoint=None,
                )
            )


def add_cpu(tenant_id: str, cores: float, *, seconds: int = 600, now: dt.datetime = NOW) -> None:
    """cpu_seconds rows of 60 s windows over the last ``seconds``, ``cores`` busy."""
    with session_scope() as session:
        for w in windows(cores, seconds=seconds, now=now, step=60):
            session.add(
                UsageRecord(
                    tenant_id=tenant_id,
                    metric="cpu_seconds",
                    window_start=w.start,
                    window_end=w.end,
                    value=w.value,
                    aggregation="sum",
                )
            )


def decisions(tenant_id: str) -> list[AutoscaleDecision]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(AutoscaleDecision)
                .where(AutoscaleDecision.tenant_id == tenant_id)
                .order_by(AutoscaleDecision.window_start, AutoscaleDecision.rule)
            )
        )


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """Run each call in its own thread, all released at once; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run, call) for call in calls]
        return [future.result(timeout=120) for future in futures]


def test_a_slot_decides_once_and_starts_one_change_then_cools_down(settings: Settings) -> None:
    # Given a starter tenant running 1.9 of its 2 cores for 10 minutes, and an idle one
    add_tenant("hot")
    add_tenant("idle")
    add_cpu("hot", 1.9)
    add_cpu("idle", 0.1)
    slot = NOW.replace(second=0)

    # When the slot is evaluated
    first = evaluate_slot(slot, now=NOW)

    # Then the hot tenant gets exactly one add_instance decision and one change_plan run
    assert first.actions == 1 and first.decisions == 4
    hot = {d.rule: d for d in decisions("hot")}
    assert hot["cpu-high"].action == "add_instance"
    assert hot["cpu-high"].reason == "cpu_utilization 95.0% > 80% for 300 s: add_instance 1 → 2"
    assert hot["cpu-low"].reason == (
        "no action: above threshold (cpu_utilization 95.0% ≥ 20% over 300 s)"
    )
    run_id = hot["cpu-high"].workflow_id
    assert first.dispatch == [(run_id, Phase.FORWARD, wf.CHANGE_PLAN.forward_tasks)]
    with session_scope() as session:
        run = session.get(WorkflowRun, run_id)
        tenant = session.get(Tenant, "hot")
        assert run is not None and tenant is not None
        assert run.kind == "tenant.change_plan" and run.status == RunStatus.RUNNING
        assert run.input["plan"] == "starter" and run.input["instances"] == 2
        assert tenant.active_workflow_id == run_id and tenant.resources["instances"] == 2
        kinds = session.scalars(select(AuditEvent.kind).where(AuditEvent.tenant_id == "hot"))
        assert sorted(kinds) == ["autoscale.decided", "tenant.change_plan.requested"]
    # and the idle tenant's decisions say why nothing happened
    idle = {d.rule: d.reason for d in decisions("idle")}
    assert idle["cpu-high"].startswith("no action: below threshold (cpu_utilization 5.0% ≤ 80%")
    assert idle["cpu-low"] == "no action: at min instances 1 (plan starter)"

    # When the same slot is evaluated again (a second beat)
    again = evaluate_slot(slot, now=NOW + dt.timedelta(seconds=5))
    # Then nothing new is decided or started
    assert again.skipped and again.actions == 0 and len(decisions("hot")) == 2

    # When the change finished and the next slots come, still over the threshold
    with session_scope() as session:
        hot_tenant = session.get(Tenant, "hot")
        assert hot_tenant is not None
        hot_tenant.active_workflow_id = None
    for minutes in (1, 2):
        later = NOW + dt.timedelta(minutes=minutes)
        add_cpu("hot", 3.8, seconds=60, now=later)
        assert evaluate_slot(later.replace(second=0), now=later).actions == 0
    # Then each says it is in cooldown until 15 minutes after the action
    cooled = [d for d in decisions("hot") if d.rule == "cpu-high"][1:]
    until = (NOW + dt.timedelta(minutes=15)).isoformat(timespec="seconds")
    assert [d.reason for d in cooled] == [
        f"no action: in cooldown until {until} (last action by rule cpu-high)"
    ] * 2
    assert all(d.workflow_id is None for d in cooled)


def test_a_slot_delivered_twice_concurrently_decides_once(settings: Settings) -> None:
    # Given a tenant over its threshold
    add_tenant("twice")
    add_cpu("twice", 1.9)
    slot = NOW.replace(second=0)
    # When two deliveries of the same slot run at the same moment
    results = concurrently(
        lambda: evaluate_slot(slot, now=NOW), lambda: evaluate_slot(slot, now=NOW)
    )
    # Then there is one decision per rule and one workflow run, dispatched by one of them
    assert sum(r.actions for r in results) == 1
    assert sum(len(r.dispatch) for r in results) == 1
    assert sorted(d.rule for d in decisions("twice")) == ["cpu-high", "cpu-low"]
    with session_scope() as session:
        runs = session.scalars(select(WorkflowRun.id).where(WorkflowRun.tenant_id == "twice"))
        assert len(list(runs)) == 1
        assert session.get(Operation, f"{EVALUATE}:{slot.isoformat()}") is not None


def test_a_tenant_busy_with_another_workflow_is_not_taken(settings: Settings) -> None:
    # Given a hot tenant that a provision run still owns
    add_tenant("owned")
    add_cpu("owned", 1.9)
    with session_scope() as session:
        tenant = session.get(Tenant, "owned")
        assert tenant is not None
        tenant.active_workflow_id = "f" * 32
    # When its rules are evaluated
    result = evaluate_slot(NOW.replace(second=0), now=NOW)
    # Then no run starts, and the decision says who holds the tenant
    assert result.actions == 0
    high = next(d for d in decisions("owned") if d.rule == "cpu-high")
    assert high.reason == f"no action: tenant busy with workflow {'f' * 32}"


def test_autoscale_explain_and_beat_status_read_the_database(settings: Settings) -> None:
    # Given a tenant with a tenant-specific rule and one evaluated slot
    own = [
        {
            "name": "cpu-high",
            "metric": "cpu_utilization",
            "threshold": 50,
            "window": 120,
            "action": "add_instance",
        }
    ]
    add_tenant("shown", meta={"autoscale": own})
    add_cpu("shown", 1.9)
    now = utcnow()
    slot = now.replace(second=0, microsecond=0)
    evaluate_slot(slot, now=NOW)
    claim_slot("cul8er.health.sweep", now.replace(microsecond=0))
    runner = CliRunner()

    # When autoscale explain runs, as JSON and as a table
    shown = runner.invoke(autoscale_cli, ["explain", "shown", "--json"])
    table = runner.invoke(autoscale_cli, ["explain", "shown", "--last", "5"])

    # Then it lists the effective rules and the decisions with inputs and reasons
    assert shown.exit_code == 0, shown.output
    view = json.loads(shown.stdout)
    assert [r["threshold"] for r in view["rules"]] == [50, 20]
    high = next(d for d in view["decisions"] if d["rule"] == "cpu-high")
    assert high["action"] == "add_instance" and high["inputs"]["value"] == pytest.approx(95.0)
    assert "add_instance 1 → 2" in high["reason"]
    assert table.exit_code == 0 and "cpu-high" in table.stdout and "add_instance" in table.stdout
    assert runner.invoke(autoscale_cli, ["explain", "nobody"]).exit_code == 1

    # When beat status runs
    status = runner.invoke(beat_cli, ["status", "--json"])
    assert status.exit_code == 0, status.output
    entries = {e["task"]: e for e in json.loads(status.stdout)}
    # Then each entry names its schedule; claimed slots are shown with whether they are overdue
    assert entries["cul8er.autoscale.evaluate"]["last_slot"] == slot.isoformat()
    assert entries["cul8er.autoscale.evaluate"]["overdue"] is False
    assert entries["cul8er.health.sweep"]["overdue"] is False
    assert entries["cul8er.workflows.tick"]["last_slot"] is None
    assert entries["cul8er.maintenance.cleanup"]["schedule"].startswith("crontab: 30 3")
    # and an entry whose last slot is long past is overdue
    with session_scope() as session:
        session.execute(delete(Operation).where(Operation.key.like("cul8er.health.sweep:%")))
    claim_slot("cul8er.health.sweep", now - dt.timedelta(hours=1))
    entries = {
        e["task"]: e for e in json.loads(runner.invoke(beat_cli, ["status", "--json"]).stdout)
    }
    assert entries["cul8er.health.sweep"]["overdue"] is True
    # and the table for people renders (narrow here: cells wrap)
    table = runner.invoke(beat_cli, ["status"])
    assert table.exit_code == 0 and "overdue '-'" in table.stdout


# -- health sweep -----------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[str]:
    """A real instance HTTP server on loopback; yields its endpoint."""
    from plugins.platforms.instance_server import InstanceServer

    httpd = InstanceServer(0, name="probe-me", unhealthy=False)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def closed_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def set_endpoints(tenant_id: str, endpoints: list[str | None], status: str = "running") -> None:
    with session_scope() as session:
        for row in session.scalars(select(Instance).where(Instance.tenant_id == tenant_id)):
            row.endpoint, row.status = endpoints[row.ordinal], status


def statuses(tenant_id: str) -> list[str]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(Instance.status)
                .where(Instance.tenant_id == tenant_id)
                .order_by(Instance.ordinal)
            )
        )


def test_the_sweep_records_status_changes_once(settings: Settings, server: str) -> None:
    from tasks.health import sweep, sweep_once

    # Given an active tenant with one answering instance and one that answers nothing
    add_tenant("probed", instances=2)
    set_endpoints("probed", [server, closed_port()])
    # and a tenant a workflow owns, whose instance does not answer either
    add_tenant("moving", instances=1)
    set_endpoints("moving", [None])
    with session_scope() as session:
        moving = session.get(Tenant, "moving")
        assert moving is not None
        moving.active_workflow_id = "b" * 32

    # When the sweep runs twice at once (two beats, one slot)
    results = concurrently(lambda: sweep.apply().get(), lambda: sweep.apply().get())

    # Then one of them probed; the silent instance is unhealthy, with one audit event
    assert sorted(r["skipped"] for r in results) == [False, True]
    [done] = [r for r in results if not r["skipped"]]
    assert done["probed"] == 2 and done["unhealthy"] == 1
    assert statuses("probed") == ["running", "unhealthy"]
    [event] = audit_events("probed", "instance.status_changed")
    assert event["instance"] == "t-probed-app-1" and event["to"] == "unhealthy"
    # and the owned tenant's instance is left to its workflow
    assert statuses("moving") == ["running"]

    # When the instance answers again, the next sweep records it running; then nothing changes
    set_endpoints("probed", [server, server], status="unhealthy")
    first = sweep_once()
    assert statuses("probed") == ["running", "running"] and len(first["changes"]) == 2
    assert sweep_once()["changes"] == []


def audit_events(tenant_id: str, kind: str) -> list[dict[str, Any]]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(AuditEvent.data).where(
                    AuditEvent.tenant_id == tenant_id, AuditEvent.kind == kind
                )
            )
        )
