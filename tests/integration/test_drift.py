"""Drift: a missing instance is recreated; an orphan is reported, and pruned on request."""

from __future__ import annotations

import urllib.request
import uuid

import pytest

from plugins.platforms.local import LocalPlatform
from schemas.platform import InstanceSpec
from tests.stack import Stack, instance_processes

pytestmark = pytest.mark.integration


def test_missing_instances_come_back_and_orphans_are_pruned(running_stack: Stack) -> None:
    stack = running_stack
    platform = LocalPlatform(state_dir=stack.data_dir / "instances")
    tenant_id = f"d{uuid.uuid4().hex[:8]}"
    created = stack.call("cul8er.tenants.create", name="Drift", plan="free", tenant_id=tenant_id)
    assert stack.wait_run(created["workflow_id"])["status"] == "succeeded"
    name = f"t-{tenant_id}-app-0"

    # Given its instance vanished behind cul8er's back, and a stray instance with our labels
    platform.destroy_instance(name)
    ghost = f"t-ghost{uuid.uuid4().hex[:6]}-app-0"
    platform.create_instance(InstanceSpec(name=ghost, tenant_id="ghost-tenant"))

    # When the platforms are reconciled (report only)
    report = stack.client.send_task("cul8er.platforms.reconcile").get(timeout=120)

    # Then the missing instance is recreated and answers, and the orphan is reported, not touched
    assert {"platform": "local", "instance": name, "tenant_id": tenant_id} in report["recreated"]
    assert any(o["instance"] == ghost for o in report["orphans"])
    assert report["pruned"] == []
    assert len(instance_processes(stack.data_dir, name)) == 1
    assert len(instance_processes(stack.data_dir, ghost)) == 1
    got = stack.call("cul8er.tenants.get", tenant_id=tenant_id)
    with urllib.request.urlopen(f"http://{got['instances'][0]['endpoint']}/health", timeout=5) as r:
        assert r.status == 200

    # When reconciled with prune
    report = stack.client.send_task("cul8er.platforms.reconcile", kwargs={"prune": True}).get(
        timeout=120
    )
    # Then the orphan is destroyed and the tenant's instance left alone
    assert any(o["instance"] == ghost for o in report["pruned"])
    assert instance_processes(stack.data_dir, ghost) == []
    assert len(instance_processes(stack.data_dir, name)) == 1
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"
