"""Every tenant workflow end to end, on the embedded default and on Redis + PostgreSQL."""

from __future__ import annotations

import json
import urllib.request
import uuid

import pytest
from sqlalchemy import func, select

from plugins.provisioners.database_per_tenant import store_exists
from tests.stack import Stack, instance_processes
from workers.runtime.models import AuditEvent, Instance, NetworkAllocation, Tenant
from workers.runtime.settings import Settings

pytestmark = pytest.mark.integration


def health(endpoint: str) -> int:
    """The HTTP status of an instance's /health (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as response:
            return int(response.status)
    except OSError:
        return 0


def cgroup_value(controller: str, name: str, key: str) -> str | None:
    """A cgroup v1 value of an instance, or None when cgroups are not in use."""
    try:
        with open(f"/sys/fs/cgroup/{controller}/cul8er/{name}/{key}") as handle:
            return handle.read().strip()
    except OSError:
        return None


def new_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def start(stack: Stack, task: str, **kwargs) -> dict:
    result = stack.call(task, **kwargs)
    assert result["ok"], result
    return result


def test_tenant_lifecycle_end_to_end(running_stack: Stack) -> None:
    stack = running_stack
    tenant_id = new_id()

    # Given a new tenant on the starter plan
    # When it is created
    created = start(
        stack, "cul8er.tenants.create", name="Acme", plan="starter", tenant_id=tenant_id
    )
    run = stack.wait_run(created["workflow_id"])

    # Then its provision workflow succeeded, step by step, in order
    assert run["status"] == "succeeded", run
    assert [s["name"].rsplit(".", 1)[1] for s in run["steps"]] == [
        "allocate_network",
        "create_instances",
        "apply_limits",
        "create_datastore",
        "health_check",
        "sync_entry",
        "activate",
    ]
    # and apply_limits left the instances create_instances had just made on the same plan
    outputs = {s["name"].rsplit(".", 1)[1]: s["output"] for s in run["steps"]}
    assert outputs["apply_limits"]["unchanged"] is True
    assert outputs["apply_limits"]["instances"] == outputs["create_instances"]["instances"]
    # and the tenant is active with a /24 of the pool and a data store
    got = start(stack, "cul8er.tenants.get", tenant_id=tenant_id)
    assert got["status"] == "active" and got["plan"] == "starter"
    assert got["subnet"].startswith("10.100.") and got["subnet"].endswith("/24")
    settings = Settings(data_dir=stack.data_dir, database_url=stack.database_url)
    assert store_exists(settings, tenant_id)
    # and its one instance is a real process answering /health on loopback
    [instance] = got["instances"]
    assert instance["name"] == f"t-{tenant_id}-app-0"
    assert instance["endpoint"].startswith("127.0.0.1:")
    assert health(instance["endpoint"]) == 200
    assert len(instance_processes(stack.data_dir, instance["name"])) == 1
    assert instance["limits"]["requested"]["cpu_cores"] == 2.0
    quota = cgroup_value("cpu", instance["name"], "cpu.cfs_quota_us")
    if quota is not None:
        assert quota == "200000"

    # When the plan changes to free (scale down)
    changed = start(stack, "cul8er.tenants.change_plan", tenant_id=tenant_id, plan="free")
    assert stack.wait_run(changed["workflow_id"])["status"] == "succeeded"
    # Then the new limits hold on the live instance and the plan is recorded
    got = start(stack, "cul8er.tenants.get", tenant_id=tenant_id)
    assert got["plan"] == "free" and got["status"] == "active"
    assert got["instances"][0]["limits"]["requested"]["memory_mb"] == 512
    if quota is not None:
        assert cgroup_value("cpu", instance["name"], "cpu.cfs_quota_us") == "50000"
        assert cgroup_value("memory", instance["name"], "memory.limit_in_bytes") == str(512 * 2**20)
    assert health(got["instances"][0]["endpoint"]) == 200

    # When it is suspended
    suspended = start(stack, "cul8er.tenants.suspend", tenant_id=tenant_id, reason="unpaid")
    assert stack.wait_run(suspended["workflow_id"])["status"] == "succeeded"
    # Then its instance no longer answers and it is suspended with the reason
    got = start(stack, "cul8er.tenants.get", tenant_id=tenant_id)
    assert got["status"] == "suspended" and got["status_reason"] == "unpaid"
    assert health(instance["endpoint"]) == 0
    assert instance_processes(stack.data_dir, instance["name"]) == []

    # When it is resumed
    resumed = start(stack, "cul8er.tenants.resume", tenant_id=tenant_id)
    assert stack.wait_run(resumed["workflow_id"])["status"] == "succeeded"
    got = start(stack, "cul8er.tenants.get", tenant_id=tenant_id)
    assert got["status"] == "active"
    assert health(got["instances"][0]["endpoint"]) == 200

    # When it is deprovisioned
    gone = start(stack, "cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"
    # Then nothing of it is left: no process, no instance row, no subnet, no data store
    got = start(stack, "cul8er.tenants.get", tenant_id=tenant_id)
    assert got["status"] == "terminated" and got["subnet"] is None and got["instances"] == []
    assert instance_processes(stack.data_dir, instance["name"]) == []
    assert not store_exists(settings, tenant_id)
    with stack.session() as session:
        statuses = session.scalars(
            select(AuditEvent.data)
            .where(AuditEvent.tenant_id == tenant_id, AuditEvent.kind == "tenant.status_changed")
            .order_by(AuditEvent.id)
        ).all()
    assert [s["to"] for s in statuses] == ["active", "active", "suspended", "active", "terminated"]


def test_plan_with_two_instances_and_subnets_never_shared(running_stack: Stack) -> None:
    stack = running_stack
    # Given two tenants, one on a plan with two instances
    a = start(stack, "cul8er.tenants.create", name="Duo", plan="duo", tenant_id=new_id())
    b = start(stack, "cul8er.tenants.create", name="Solo", plan="free", tenant_id=new_id())
    # When both are provisioned at once
    assert stack.wait_run(a["workflow_id"])["status"] == "succeeded"
    assert stack.wait_run(b["workflow_id"])["status"] == "succeeded"
    # Then the first has two healthy instances, and their subnets differ
    ga = start(stack, "cul8er.tenants.get", tenant_id=a["tenant_id"])
    gb = start(stack, "cul8er.tenants.get", tenant_id=b["tenant_id"])
    assert [i["name"][-5:] for i in ga["instances"]] == ["app-0", "app-1"]
    assert all(health(i["endpoint"]) == 200 for i in ga["instances"])
    assert ga["subnet"] != gb["subnet"]
    with stack.session() as session:
        per_subnet = session.execute(
            select(NetworkAllocation.cidr, func.count()).group_by(NetworkAllocation.cidr)
        ).all()
    assert all(count == 1 for _, count in per_subnet)
    for tenant in (a, b):
        gone = start(stack, "cul8er.tenants.deprovision", tenant_id=tenant["tenant_id"])
        assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"


def test_a_busy_tenant_refuses_a_second_change(running_stack: Stack) -> None:
    stack = running_stack
    # Given a tenant whose provision is under way
    created = start(stack, "cul8er.tenants.create", name="Busy", plan="free", tenant_id=new_id())
    # When another change arrives before it finishes
    result = stack.call("cul8er.tenants.suspend", tenant_id=created["tenant_id"])
    # Then it is refused as a conflict naming the running workflow
    assert result["ok"] is False and result["error"]["code"] == "conflict"
    assert created["workflow_id"] in result["error"]["message"]
    assert stack.wait_run(created["workflow_id"])["status"] == "succeeded"
    gone = start(stack, "cul8er.tenants.deprovision", tenant_id=created["tenant_id"])
    assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"


def test_failing_step_compensates_everything(running_stack: Stack, tmp_path) -> None:
    import subprocess
    import sys

    stack = running_stack
    tenant_id = new_id()
    # Given a plan whose instances never become healthy
    created = start(
        stack, "cul8er.tenants.create", name="Broken", plan="unhealthy", tenant_id=tenant_id
    )
    # When its provision runs out of health-check attempts
    run = stack.wait_run(created["workflow_id"])
    # Then the run failed at the health check and compensated in reverse order
    assert run["status"] == "failed"
    assert run["error"]["step"] == "cul8er.tenants.health_check"
    assert "not healthy" in run["error"]["message"]
    compensation = [s["name"].rsplit(".", 1)[1] for s in run["steps"] if s["phase"] == "compensate"]
    assert compensation == ["drop_datastore", "destroy_instances", "release_network", "mark_failed"]
    # and nothing of the tenant is left behind; its status is failed
    with stack.session() as session:
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None and tenant.status == "failed"
        assert "health_check" in (tenant.status_reason or "")
        assert session.scalars(select(Instance).where(Instance.tenant_id == tenant_id)).all() == []
        assert session.get(NetworkAllocation, run["steps"][0]["output"]["subnet"]) is None
    assert instance_processes(stack.data_dir, f"t-{tenant_id}-app-0") == []
    settings = Settings(data_dir=stack.data_dir, database_url=stack.database_url)
    assert not store_exists(settings, tenant_id)
    # and the error is readable in `cul8er workflow show`
    shown = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "workflow", "show", created["workflow_id"]],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "not healthy" in shown.stdout and "health_check" in shown.stdout
    as_json = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli.main",
            "workflow",
            "show",
            created["workflow_id"],
            "--json",
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(as_json.stdout)["status"] == "failed"
