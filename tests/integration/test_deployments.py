"""Releases rolled over tenants' instances through a real HAProxy, end to end.

Real ``celery worker`` and ``beat`` processes on the embedded broker and SQLite, real
local instances (the shipped instance server, made good or bad by release settings), a
real HAProxy driven through its runtime API, and a load generator on the tenant's
127.0.0.1 entry point. The test talks to cul8er as another service does: public tasks by
name; it reads the database, HAProxy's own counters and the load generator's records.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import build_stack, teardown_stack
from tests.loadgen import LoadGenerator
from tests.stack import Stack, instance_processes
from workers.runtime.models import AuditEvent, Deployment, Instance, Tenant
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

IN_CI = bool(os.environ.get("CI"))

#: Canary walks 10 → 30 → 50 → 70 → 90 → 100 with short pauses and a short gate each step.
FAST_CANARY: dict[str, Any] = {
    "interval_seconds": 0.3,
    "analysis": {"interval_seconds": 0.4, "count": 2, "probes": 3},
}
#: A gate that looks at once and often enough to catch a bad release at the first step.
FAST_GATE: dict[str, Any] = {"interval_seconds": 0.4, "count": 2, "probes": 4}


def _need_haproxy() -> None:
    if shutil.which("haproxy") is None:
        message = "haproxy is not installed (scripts/setup.sh services installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def delivery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with HAProxy, a worker and beat; production needs two approvals (4 s TTL)."""
    _need_haproxy()
    stack = build_stack("embedded", tmp_path_factory.mktemp("delivery"))
    stack.extra_env.update(
        CUL8ER_PRODUCTION_APPROVALS="2",
        CUL8ER_APPROVAL_TTL="6",
        CUL8ER_HEALTH_WINDOW="5",
    )
    try:
        stack.start_haproxy()
        stack.start_worker("d1", concurrency=3)
        stack.start_beat()
        yield stack
    finally:
        teardown_stack(stack)


# -- helpers ----------------------------------------------------------------------------------


def make_tenant(
    stack: Stack, tenant_id: str, *, plan: str = "duo", env: str = "development"
) -> str:
    """An active tenant with its entry point; the entry's address."""
    result = stack.call(
        "cul8er.tenants.create", name=tenant_id, tenant_id=tenant_id, plan=plan, environment=env
    )
    assert result["ok"], result
    run = stack.wait_run(result["workflow_id"])
    assert run["status"] == "succeeded", run
    with stack.session() as session:
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        entry = tenant.resources.get("entry")
    assert entry and entry.startswith("127.0.0.1:"), entry
    return str(entry)


def deploy(
    stack: Stack,
    tenant_id: str,
    version: str,
    strategy: str,
    config: dict[str, Any] | None = None,
    **settings: float,
) -> dict[str, Any]:
    result = stack.call(
        "cul8er.deployments.create",
        tenant_id=tenant_id,
        release={"version": version, "settings": settings},
        strategy=strategy,
        strategy_config=config or {},
        actor="ci",
    )
    assert result["ok"], result
    return result


def row(stack: Stack, deployment_id: str) -> Deployment:
    with stack.session() as session:
        found = session.get(Deployment, deployment_id)
        assert found is not None
        session.expunge(found)
        return found


def wait_status(
    stack: Stack, deployment_id: str, *statuses: str, timeout: float = 90
) -> Deployment:
    seen: list[Deployment] = []

    def reached() -> bool:
        seen.append(row(stack, deployment_id))
        return seen[-1].status in statuses

    wait_until(
        reached,
        timeout=timeout,
        interval=0.2,
        message=lambda: f"deployment {deployment_id} is {seen[-1].status}: {seen[-1].reason}",
        error=AssertionError,
    )
    return seen[-1]


def instances(stack: Stack, tenant_id: str) -> list[Instance]:
    with stack.session() as session:
        rows = session.scalars(
            select(Instance).where(Instance.tenant_id == tenant_id).order_by(Instance.name)
        ).all()
        for r in rows:
            session.expunge(r)
        return list(rows)


def running_names(stack: Stack, tenant_id: str) -> set[str]:
    """Instance processes of the tenant running on the local platform right now."""
    names = set()
    for process in instance_processes(stack.data_dir):
        name = process.environ().get("CUL8ER_INSTANCE", "")
        if name.startswith(f"t-{tenant_id}-"):
            names.add(name)
    return names


def weights(dep: Deployment) -> list[int]:
    """The canary weights read back from HAProxy after each weight stage, in order."""
    return [
        e["read_back"]["canary"]
        for e in dep.timeline
        if e.get("event") == "stage_done" and e.get("action") == "set_weight"
    ]


def events(stack: Stack, tenant_id: str) -> list[AuditEvent]:
    with stack.session() as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.tenant_id == tenant_id).order_by(AuditEvent.id)
        ).all()
        for r in rows:
            session.expunge(r)
        return list(rows)


# -- canary -----------------------------------------------------------------------------------


def test_a_healthy_canary_walks_every_weight_and_promotes_with_zero_failed_requests(
    delivery: Stack,
) -> None:
    entry = make_tenant(delivery, "canary-ok")
    first = deploy(delivery, "canary-ok", "1", "direct")
    wait_status(delivery, first["deployment_id"], "succeeded")
    # While a healthy canary of release 2 rolls out under steady load
    with LoadGenerator(f"http://{entry}/", rate=25) as load:
        result = deploy(delivery, "canary-ok", "2", "canary", FAST_CANARY)
        dep = wait_status(delivery, result["deployment_id"], "succeeded", "rolled_back")
        time.sleep(0.5)
    # Then it walked 10 → 30 → 50 → 70 → 90 → 100 as HAProxy reports, and promoted
    assert dep.status == "succeeded", dep.reason
    assert weights(dep) == [10, 30, 50, 70, 90, 100]
    assert len(dep.measurements) == 12
    assert all(m["judgement"] == "pass" for m in dep.measurements)
    # and no request failed, at 20+ requests/s, reaching both releases along the way
    assert load.rate_achieved() >= 20, load.rate_achieved()
    assert load.failures == [], load.failures[:5]
    assert {"1", "2"} <= set(load.by_version()), load.by_version()
    # and the tenant runs release 2 on its own instances only, with no canary left
    rows = instances(delivery, "canary-ok")
    assert [(r.role, r.release) for r in rows] == [("app", "2"), ("app", "2")]
    assert running_names(delivery, "canary-ok") == {r.name for r in rows}
    # Observers heard the deployment's events (the log observer writes each one)
    observed = _observed(delivery, result["deployment_id"])
    assert {"deployment.started", "deployment.stage_changed", "deployment.promoted"} <= observed
    described = delivery.call("cul8er.tenants.get", tenant_id="canary-ok")
    assert described["release"]["version"] == "2"
    assert {i["release"] for i in described["instances"]} == {"2"}
    assert described["entry"] == entry


def test_a_bad_canary_rolls_back_on_its_own_leaving_stable_alone(delivery: Stack) -> None:
    entry = make_tenant(delivery, "canary-bad")
    deploy(delivery, "canary-bad", "1", "direct")
    wait_status(delivery, _last(delivery, "canary-bad"), "succeeded")
    with LoadGenerator(f"http://{entry}/", rate=25) as load:
        result = deploy(
            delivery,
            "canary-bad",
            "2",
            "canary",
            {"interval_seconds": 0.2, "analysis": FAST_GATE},
            error_rate=0.5,
        )
        dep = wait_status(delivery, result["deployment_id"], "rolled_back", "succeeded")
        rolled_back_at = time.monotonic()
        time.sleep(1.0)
    assert dep.status == "rolled_back"
    # The failing measurement is on the deployment, and the reason names it
    failed = [m for m in dep.measurements if m.get("judgement") == "fail"]
    assert failed and failed[-1]["metrics"]["error_rate"] > 0.1
    assert dep.reason is not None and dep.reason["code"] == "gate_failed"
    assert dep.reason["measurement"]["judgement"] == "fail"
    # Traffic went back to stable at once (read back from HAProxy), before any cleanup
    restored = [e for e in dep.timeline if e["event"] == "traffic_restored"]
    assert restored and restored[0]["read_back"] == {"stable": 100, "canary": 0}
    assert restored[0]["seconds_after_measurement"] < 2
    # No instance of release 2 is left, in the database or on the platform
    rows = instances(delivery, "canary-bad")
    assert [(r.role, r.release) for r in rows] == [("app", "1"), ("app", "1")]
    assert running_names(delivery, "canary-bad") == {r.name for r in rows}
    # and after the rollback every request is served by release 1 without failing
    after = [r for r in load.results if r.sent_at > rolled_back_at]
    assert after and all(r.ok and r.version == "1" for r in after)


def _observed(stack: Stack, deployment_id: str) -> set[str]:
    """Event types the log observer wrote for the deployment, from the workers' logs."""
    seen = set()
    for path in stack.data_dir.glob("worker-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"event_observed"' in line and deployment_id in line:
                seen.add(json.loads(line)["event_type"])
    return seen


def _last(stack: Stack, tenant_id: str) -> str:
    with stack.session() as session:
        found = session.scalars(
            select(Deployment.id)
            .where(Deployment.tenant_id == tenant_id)
            .order_by(Deployment.created_at.desc())
        ).first()
        assert found is not None
        return found


# -- the other strategies ---------------------------------------------------------------------


def test_blue_green_serves_a_preview_then_switches_with_zero_failures(delivery: Stack) -> None:
    entry = make_tenant(delivery, "bluegreen")
    with LoadGenerator(f"http://{entry}/", rate=25) as load:
        result = deploy(
            delivery,
            "bluegreen",
            "2",
            "blue_green",
            {"pre_promotion_analysis": FAST_GATE, "scale_down_delay_seconds": 0.5},
        )
        # It waits for a person after the pre-promotion analysis; the preview answers as 2
        held = wait_status(delivery, result["deployment_id"], "paused")
        assert "promotion" in (held.reason or {}).get("message", "")
        preview = LoadGenerator(f"http://{entry}/", rate=10, headers={"X-Cul8er-Preview": "true"})
        with preview:
            time.sleep(1)
        assert set(preview.by_version()) == {"2"}, preview.by_version()
        # while everyone else is still served by the stable release
        assert "2" not in load.by_version(), load.by_version()
        promoted = delivery.call(
            "cul8er.deployments.promote", deployment_id=result["deployment_id"], actor="ops"
        )
        assert promoted["ok"], promoted
        dep = wait_status(delivery, result["deployment_id"], "succeeded", "rolled_back")
        time.sleep(0.5)
    assert dep.status == "succeeded", dep.reason
    assert load.failures == [], load.failures[:5]
    assert [r.release for r in instances(delivery, "bluegreen")] == ["2", "2"]


def test_rolling_replaces_batch_by_batch_with_zero_failures(delivery: Stack) -> None:
    entry = make_tenant(delivery, "rolling")
    with LoadGenerator(f"http://{entry}/", rate=25) as load:
        result = deploy(delivery, "rolling", "2", "rolling", {"max_surge": 1, "max_unavailable": 0})
        dep = wait_status(delivery, result["deployment_id"], "succeeded", "rolled_back")
        time.sleep(0.5)
    assert dep.status == "succeeded", dep.reason
    batches = [e["batch_size"] for e in dep.timeline if e.get("action") == "replace"]
    assert batches == [1, 1]
    assert load.failures == [], load.failures[:5]
    rows = instances(delivery, "rolling")
    assert [(r.role, r.release) for r in rows] == [("app", "2"), ("app", "2")]


def test_direct_replaces_everything_with_zero_failures(delivery: Stack) -> None:
    entry = make_tenant(delivery, "direct")
    with LoadGenerator(f"http://{entry}/", rate=25) as load:
        result = deploy(delivery, "direct", "2", "direct")
        dep = wait_status(delivery, result["deployment_id"], "succeeded", "rolled_back")
        time.sleep(0.5)
    assert dep.status == "succeeded", dep.reason
    assert load.failures == [], load.failures[:5]
    assert [r.release for r in instances(delivery, "direct")] == ["2", "2"]


def test_ab_test_sends_only_requests_with_the_header_to_the_new_release(delivery: Stack) -> None:
    entry = make_tenant(delivery, "abtest")
    deploy(delivery, "abtest", "1", "direct")
    wait_status(delivery, _last(delivery, "abtest"), "succeeded")
    result = deploy(
        delivery,
        "abtest",
        "2",
        "ab_test",
        {"header": "X-Beta", "value": "yes", "analysis": FAST_GATE, "promote": "manual"},
    )
    wait_status(delivery, result["deployment_id"], "paused")
    with (
        LoadGenerator(f"http://{entry}/", rate=15, headers={"X-Beta": "yes"}) as beta,
        LoadGenerator(f"http://{entry}/", rate=15) as others,
    ):
        time.sleep(1.5)
    assert set(beta.by_version()) == {"2"}, beta.by_version()
    assert set(others.by_version()) == {"1"}, others.by_version()
    assert beta.failures == [] and others.failures == []
    promoted = delivery.call(
        "cul8er.deployments.promote", deployment_id=result["deployment_id"], actor="ops"
    )
    assert promoted["ok"], promoted
    dep = wait_status(delivery, result["deployment_id"], "succeeded", "rolled_back")
    assert dep.status == "succeeded", dep.reason
    with LoadGenerator(f"http://{entry}/", rate=15) as after:
        time.sleep(1)
    assert set(after.by_version()) == {"2"}


# -- approvals --------------------------------------------------------------------------------


def test_production_waits_for_two_distinct_approvers(delivery: Stack) -> None:
    make_tenant(delivery, "prod-ok", env="production")
    result = deploy(delivery, "prod-ok", "2", "direct")
    deployment_id = result["deployment_id"]
    assert result["status"] == "awaiting_approval"
    time.sleep(1)
    # Nothing starts before approval
    assert row(delivery, deployment_id).status == "awaiting_approval"
    assert all(r.release is None for r in instances(delivery, "prod-ok"))
    first = delivery.call("cul8er.deployments.approve", deployment_id=deployment_id, actor="alice")
    again = delivery.call("cul8er.deployments.approve", deployment_id=deployment_id, actor="alice")
    assert first["ok"] and again["ok"]
    assert row(delivery, deployment_id).status == "awaiting_approval"
    second = delivery.call("cul8er.deployments.approve", deployment_id=deployment_id, actor="bob")
    assert second["ok"] and second["approvals"] == ["alice", "bob"]
    dep = wait_status(delivery, deployment_id, "succeeded", "rolled_back")
    assert dep.status == "succeeded", dep.reason
    approvals = [
        (e.kind, e.data["actor"])
        for e in events(delivery, "prod-ok")
        if e.kind == "deployment.approved"
    ]
    assert approvals == [
        ("deployment.approved", "alice"),
        ("deployment.approved", "alice"),
        ("deployment.approved", "bob"),
    ]


def test_an_expired_approval_window_refuses_the_deployment(delivery: Stack) -> None:
    make_tenant(delivery, "prod-late", env="production")
    result = deploy(delivery, "prod-late", "2", "direct")
    deployment_id = result["deployment_id"]
    delivery.call("cul8er.deployments.approve", deployment_id=deployment_id, actor="alice")
    time.sleep(7)  # past CUL8ER_APPROVAL_TTL
    late = delivery.call("cul8er.deployments.approve", deployment_id=deployment_id, actor="bob")
    assert late["ok"] is False
    assert late["error"]["code"] in ("conflict",)
    dep = wait_status(delivery, deployment_id, "expired", timeout=20)
    assert dep.status == "expired"
    kinds = [(e.kind, e.data.get("actor")) for e in events(delivery, "prod-late")]
    assert ("deployment.approved", "alice") in kinds
    assert ("deployment.approval_expired", "alice") in kinds
    assert ("deployment.expired", "cul8er") in kinds
    assert all(r.release is None for r in instances(delivery, "prod-late"))


# -- abort, retry, rollback -------------------------------------------------------------------


def test_abort_rolls_back_and_retry_after_abort_succeeds(delivery: Stack) -> None:
    make_tenant(delivery, "abort-retry")
    result = deploy(
        delivery, "abort-retry", "2", "canary", {"interval_seconds": None, "analysis": None}
    )
    deployment_id = result["deployment_id"]
    wait_status(delivery, deployment_id, "paused")
    assert any(r.role == "canary" for r in instances(delivery, "abort-retry"))
    aborted = delivery.call("cul8er.deployments.abort", deployment_id=deployment_id, actor="ops")
    assert aborted["ok"], aborted
    dep = wait_status(delivery, deployment_id, "aborted")
    # No new-release instance is left behind
    assert [r.role for r in instances(delivery, "abort-retry")] == ["app", "app"]
    assert len(running_names(delivery, "abort-retry")) == 2
    # Aborting again, with nothing in progress, is refused and changes nothing
    again = delivery.call("cul8er.deployments.abort", deployment_id=deployment_id, actor="ops")
    assert again["ok"] is False and again["error"]["code"] == "conflict"
    assert row(delivery, deployment_id).status == "aborted"
    assert len(running_names(delivery, "abort-retry")) == 2
    # Retry after abort runs it again, and promote --full finishes it
    retried = delivery.call("cul8er.deployments.retry", deployment_id=deployment_id, actor="ops")
    assert retried["ok"], retried
    wait_status(delivery, deployment_id, "paused")
    full = delivery.call(
        "cul8er.deployments.promote", deployment_id=deployment_id, actor="ops", full=True
    )
    assert full["ok"], full
    dep = wait_status(delivery, deployment_id, "succeeded", "rolled_back")
    assert dep.status == "succeeded", dep.reason
    assert [r.release for r in instances(delivery, "abort-retry")] == ["2", "2"]


def test_fast_rollback_after_a_completed_promotion(delivery: Stack) -> None:
    entry = make_tenant(delivery, "undo")
    deploy(delivery, "undo", "1", "direct")
    wait_status(delivery, _last(delivery, "undo"), "succeeded")
    second = deploy(delivery, "undo", "2", "direct")
    wait_status(delivery, second["deployment_id"], "succeeded")
    with LoadGenerator(f"http://{entry}/", rate=25) as load:
        started = time.monotonic()
        back = delivery.call(
            "cul8er.deployments.rollback", deployment_id=second["deployment_id"], actor="ops"
        )
        assert back["ok"], back
        assert back["rollback_of"] == second["deployment_id"]
        dep = wait_status(delivery, back["deployment_id"], "succeeded")
        took = time.monotonic() - started
        time.sleep(0.3)
    assert dep.rollback_of == second["deployment_id"] and dep.release["version"] == "1"
    assert [r.release for r in instances(delivery, "undo")] == ["1", "1"]
    assert load.failures == []
    assert took < 30, took


def test_an_unhealthy_stable_release_does_not_block_a_healthy_canary(delivery: Stack) -> None:
    make_tenant(delivery, "sick-stable")
    deploy(delivery, "sick-stable", "1", "direct", error_rate=0.4)
    wait_status(delivery, _last(delivery, "sick-stable"), "succeeded")
    result = deploy(delivery, "sick-stable", "2", "canary", FAST_CANARY)
    dep = wait_status(delivery, result["deployment_id"], "succeeded", "rolled_back")
    assert dep.status == "succeeded", dep.reason


def test_a_second_deployment_is_refused_with_the_id_of_the_first(delivery: Stack) -> None:
    make_tenant(delivery, "one-at-a-time")
    first = deploy(
        delivery, "one-at-a-time", "2", "canary", {"interval_seconds": None, "analysis": None}
    )
    second = delivery.call(
        "cul8er.deployments.create",
        tenant_id="one-at-a-time",
        release={"version": "3"},
        strategy="direct",
    )
    assert second["ok"] is False
    assert first["deployment_id"] in second["error"]["message"]
    delivery.call("cul8er.deployments.abort", deployment_id=first["deployment_id"], actor="ci")
    wait_status(delivery, first["deployment_id"], "aborted")


def test_a_bad_strategy_config_names_the_field_and_starts_nothing(delivery: Stack) -> None:
    make_tenant(delivery, "bad-config")
    result = delivery.call(
        "cul8er.deployments.create",
        tenant_id="bad-config",
        release={"version": "2"},
        strategy="canary",
        strategy_config={"step_weight": -5},
    )
    assert result["ok"] is False
    assert result["error"]["code"] == "validation_error"
    assert "strategy_config.step_weight" in {e["field"] for e in result["error"]["errors"]}
    with delivery.session() as session:
        assert (
            session.scalars(select(Deployment).where(Deployment.tenant_id == "bad-config")).all()
            == []
        )


# -- deliveries twice -------------------------------------------------------------------------


def test_each_deploy_step_delivered_twice_concurrently_has_one_side_effect(
    delivery: Stack,
) -> None:
    make_tenant(delivery, "twice")
    result = deploy(delivery, "twice", "2", "canary", {"interval_seconds": None, "analysis": None})
    deployment_id = result["deployment_id"]
    wait_status(delivery, deployment_id, "paused")
    run_id = row(delivery, deployment_id).workflow_id
    # The advance step, woken by a promote and delivered twice more at the same moment
    kwargs = {"run_id": run_id, "phase": "forward"}
    for _ in "ab":
        delivery.client.send_task("cul8er.deployments.advance", kwargs=kwargs)
    delivery.call("cul8er.deployments.promote", deployment_id=deployment_id, actor="ops", full=True)
    dep = wait_status(delivery, deployment_id, "succeeded", "rolled_back")
    assert dep.status == "succeeded", dep.reason
    done = [e["stage"] for e in dep.timeline if e["event"] == "stage_done"]
    assert len(done) == len(set(done)), done
    assert [(r.role, r.release) for r in instances(delivery, "twice")] == [("app", "2")] * 2
    assert len(running_names(delivery, "twice")) == 2
    # The rollback step, delivered twice at once after an abort, rolls back once
    second = deploy(delivery, "twice", "3", "canary", {"interval_seconds": None, "analysis": None})
    wait_status(delivery, second["deployment_id"], "paused")
    run_id = row(delivery, second["deployment_id"]).workflow_id
    delivery.call("cul8er.deployments.abort", deployment_id=second["deployment_id"], actor="ops")
    for _ in "ab":
        delivery.client.send_task(
            "cul8er.deployments.roll_back", kwargs={"run_id": run_id, "phase": "compensate"}
        )
    dep = wait_status(delivery, second["deployment_id"], "aborted")
    time.sleep(1)
    aborted = [e for e in events(delivery, "twice") if e.kind == "deployment.aborted"]
    assert len(aborted) == 1
    assert [e["event"] for e in row(delivery, second["deployment_id"]).timeline].count(
        "aborted"
    ) == 1
    assert [(r.role, r.release) for r in instances(delivery, "twice")] == [("app", "2")] * 2
    assert len(running_names(delivery, "twice")) == 2


# -- the entry point through the tenant's life ------------------------------------------------


def test_the_entry_point_stays_put_through_plan_change_suspend_and_resume(
    delivery: Stack,
) -> None:
    entry = make_tenant(delivery, "steady", plan="starter")

    def serves() -> bool:
        with LoadGenerator(f"http://{entry}/", rate=10) as probe:
            time.sleep(0.5)
        return probe.count > 0 and not probe.failures

    assert serves()
    for task, kwargs in (
        ("cul8er.tenants.change_plan", {"plan": "pro"}),
        ("cul8er.tenants.suspend", {"reason": "test"}),
        ("cul8er.tenants.resume", {}),
    ):
        result = delivery.call(task, tenant_id="steady", **kwargs)
        assert result["ok"], result
        assert delivery.wait_run(result["workflow_id"])["status"] == "succeeded"
        with delivery.session() as session:
            tenant = session.get(Tenant, "steady")
            assert tenant is not None
            assert tenant.resources.get("entry") == entry, (task, tenant.resources)
    # After the resume the instances listen on new ports; the same address reaches them
    assert serves()


# -- the CLI ----------------------------------------------------------------------------------


def test_the_cli_deploys_shows_lists_and_rolls_back(delivery: Stack) -> None:
    from tests.integration.test_external_and_cli import cli

    make_tenant(delivery, "by-cli")
    created = cli(
        delivery,
        *("deploy", "create", "by-cli", "--version", "7", "--strategy", "canary"),
        *("--config", json.dumps(FAST_CANARY), "--actor", "ops", "--wait", "--json"),
    )
    assert created.returncode == 0, created.stderr
    view = json.loads(created.stdout)
    assert view["status"] == "succeeded" and view["version"] == "7"
    assert [
        e["read_back"]["canary"] for e in view["timeline"] if e.get("action") == "set_weight"
    ] == [
        10,
        30,
        50,
        70,
        90,
        100,
    ]
    shown = cli(delivery, "deploy", "show", view["deployment_id"][:8])
    assert shown.returncode == 0 and "weight-100" in shown.stdout and "succeeded" in shown.stdout
    listed = json.loads(cli(delivery, "deploy", "list", "--tenant", "by-cli", "--json").stdout)
    assert [d["deployment_id"] for d in listed] == [view["deployment_id"]]
    # A bad strategy config is refused with the field named, exit code 1
    bad = cli(
        delivery,
        *("deploy", "create", "by-cli", "--version", "8", "--config", '{"step_weight": 0}'),
    )
    assert bad.returncode == 1 and "strategy_config.step_weight" in bad.stderr + bad.stdout
    # Rolling back the first release a tenant got is refused: there is nothing before it
    back = cli(delivery, "deploy", "rollback", view["deployment_id"], "--json")
    assert back.returncode == 1 and "nothing to go back to" in back.stdout
