"""How others use cul8er: a Celery-only service, the CLI, celery inspect, RabbitMQ."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.stack import ROOT, EmbeddedRedis, Stack

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent


def cli(stack: Stack, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *args],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_external_celery_only_client_creates_a_tenant(running_stack: Stack) -> None:
    stack = running_stack
    broker = stack.broker_url or EmbeddedRedis(stack.data_dir).url
    tenant_id = f"ext{uuid.uuid4().hex[:8]}"
    # When a script with only celery sends cul8er.tenants.create by name
    done = subprocess.run(
        [sys.executable, str(HERE / "external_client.py"), broker, broker, tenant_id],
        capture_output=True,
        text=True,
        timeout=240,
        cwd="/",
    )
    # Then it sees the workflow succeed and the tenant become active, importing no cul8er code
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"workflow": "succeeded", "tenant": "active", "modules": []}
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"


def test_cli_drives_a_tenant_through_its_life(running_stack: Stack) -> None:
    stack = running_stack
    tenant_id = f"cli{uuid.uuid4().hex[:8]}"
    # create --wait --json returns the finished workflow
    made = cli(
        stack,
        "tenant",
        "create",
        "CLI Co",
        "--plan",
        "free",
        "--tenant-id",
        tenant_id,
        "--wait",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["status"] == "succeeded"
    # list and show, as JSON and as tables
    listed = json.loads(cli(stack, "tenant", "list", "--json").stdout)
    assert any(t["tenant_id"] == tenant_id and t["status"] == "active" for t in listed)
    shown = cli(stack, "tenant", "show", tenant_id)
    assert tenant_id in shown.stdout and "active" in shown.stdout and "127.0.0.1:" in shown.stdout
    runs = json.loads(cli(stack, "workflow", "list", "--tenant", tenant_id, "--json").stdout)
    assert [r["kind"] for r in runs] == ["tenant.provision"]
    assert (
        json.loads(
            cli(
                stack, "workflow", "list", "--status", "failed", "--tenant", tenant_id, "--json"
            ).stdout
        )
        == []
    )
    # change-plan, suspend, resume, delete, each waiting for the end
    for args in (
        ["change-plan", tenant_id, "starter"],
        ["suspend", tenant_id],
        ["resume", tenant_id],
        ["delete", tenant_id],
    ):
        step = cli(stack, "tenant", *args, "--wait")
        assert step.returncode == 0, (args, step.stdout, step.stderr)
        assert "succeeded" in step.stdout
    final = json.loads(cli(stack, "tenant", "show", tenant_id, "--json").stdout)
    assert final["status"] == "terminated"
    # a refused change exits non-zero with the reason
    refused = cli(stack, "tenant", "resume", tenant_id)
    assert refused.returncode == 1 and "conflict" in refused.stderr


def test_schema_export_writes_one_schema_per_public_task(
    tmp_path: Path, running_stack: Stack
) -> None:
    out = cli(running_stack, "schema", "export", str(tmp_path / "schemas"))
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "schemas").iterdir())
    assert "cul8er.tenants.create.json" in names and "cul8er.workflows.status.json" in names
    create = json.loads((tmp_path / "schemas" / "cul8er.tenants.create.json").read_text())
    assert set(create["required"]) == {"name", "plan"}
    assert create["additionalProperties"] is False


def test_plain_celery_inspect_works(running_stack: Stack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "inspect", "registered", "--json"],
        env=running_stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    registered = json.loads(out.stdout)
    names = next(iter(registered.values()))
    assert "cul8er.tenants.create" in names and "cul8er.tenants.allocate_network" in names


@pytest.mark.rabbitmq
def test_rabbitmq_smoke(stack_factory) -> None:
    # Given RabbitMQ as the broker (results over rpc://) and PostgreSQL
    stack = stack_factory("rabbitmq")
    stack.start_worker("rabbit", concurrency=2)
    stack.start_beat()
    tenant_id = f"rmq{uuid.uuid4().hex[:8]}"
    # When a tenant is created, changed and deleted
    created = stack.call("cul8er.tenants.create", name="Rabbit", plan="free", tenant_id=tenant_id)
    assert created["ok"], created
    assert stack.wait_run(created["workflow_id"])["status"] == "succeeded"
    # Then it is active with a healthy instance
    got = stack.call("cul8er.tenants.get", tenant_id=tenant_id)
    assert got["status"] == "active" and got["instances"][0]["endpoint"].startswith("127.0.0.1:")
    bad = stack.call("cul8er.tenants.create", name="x", plan="gold")
    assert bad["error"]["errors"][0]["field"] == "plan"
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"
