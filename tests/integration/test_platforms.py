"""The tenant lifecycle on the real Docker engine and the real Incus daemon.

Skipped with a reason when an engine is absent locally; CI starts both
(scripts/platforms-up.sh) and fails these tests if they cannot run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from tests.stack import ROOT, Stack
from workers.runtime.models import NetworkAllocation
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

IN_CI = bool(os.environ.get("CI"))
INCUS_SOCKET = "/var/lib/incus/unix.socket"


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def docker_client():  # noqa: ANN201
    import docker

    try:
        client = docker.from_env(timeout=10)
        client.ping()
        client.images.get("cul8er/instance:latest")
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable engine here"
        _skip_or_fail(
            f"no Docker engine with image cul8er/instance:latest ({exc}); "
            "run scripts/platforms-up.sh"
        )
    return client


def incus_client():  # noqa: ANN201
    import pylxd

    try:
        client = pylxd.Client(endpoint=INCUS_SOCKET)
        client.images.get_by_alias("cul8er-instance")
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable daemon here"
        _skip_or_fail(
            f"no Incus daemon with image cul8er-instance ({exc}); run scripts/platforms-up.sh"
        )
    return client


def engine_limits(platform: str, name: str) -> dict[str, int]:
    """CPU (in nano-CPUs) and memory (bytes) as the engine itself reports them."""
    if platform == "docker":
        host = docker_client().containers.get(name).attrs["HostConfig"]
        return {"nano_cpus": int(host["NanoCpus"]), "memory": int(host["Memory"])}
    config = incus_client().instances.get(name).config
    quota, period = config["limits.cpu.allowance"].split("/")
    nano = int(int(quota.removesuffix("ms")) / int(period.removesuffix("ms")) * 1e9)
    return {"nano_cpus": nano, "memory": int(config["limits.memory"].removesuffix("MiB")) * 2**20}


def engine_has(platform: str, name: str) -> bool:
    if platform == "docker":
        import docker

        try:
            docker_client().containers.get(name)
        except docker.errors.NotFound:
            return False
        return True
    return bool(incus_client().instances.exists(name))


def health(endpoint: str, timeout: float = 30) -> int:
    """The status of the first successful answer to ``/health`` (the instance may be booting)."""

    def answer() -> int | None:
        try:
            with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as response:
                return int(response.status)
        except OSError:
            return None

    return wait_until(
        answer, timeout=timeout, interval=0.3, message=f"{endpoint}/health did not answer"
    )


def subnets(stack: Stack, tenant_id: str) -> list[NetworkAllocation]:
    """The subnets allocated to the tenant."""
    with stack.session() as session:
        return list(
            session.scalars(
                select(NetworkAllocation).where(NetworkAllocation.tenant_id == tenant_id)
            )
        )


def first_failure(stack: Stack, run_id: str, step: str, timeout: float) -> dict:
    """The step (a name ending in ``step``) of the run, once it has failed at least once."""
    view: dict = {}

    def failed() -> dict | None:
        nonlocal view
        view = stack.call("cul8er.workflows.status", workflow_id=run_id)
        found = next(s for s in view["steps"] if s["name"].endswith(step))
        return found if found["attempts"] >= 1 and found["error"] else None

    return wait_until(
        failed, timeout=timeout, interval=0.3, message=lambda: f"{step} never failed: {view}"
    )


@pytest.fixture(scope="module", params=["docker", "incus"])
def platform_stack(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Stack]:
    from tests.conftest import build_stack, teardown_stack

    platform = request.param
    (docker_client if platform == "docker" else incus_client)()
    stack = build_stack("embedded", tmp_path_factory.mktemp(platform))
    stack.extra_env.update(
        CUL8ER_DEFAULT_PLATFORM=platform,
        CUL8ER_HEALTH_WINDOW="20",
        CUL8ER_STEP_MAX_ATTEMPTS="6",
        # A daemon that is shutting down can leave a call hanging: keep each one short.
        CUL8ER_ENGINE_TIMEOUT="5",
    )
    stack.start_worker(platform, concurrency=2)
    stack.start_beat()
    stack.platform = platform  # type: ignore[attr-defined]
    yield stack
    # Whatever a failed test left on the engine for this stack's tenants goes too.
    from workers.pluginhost.handles import get_platform
    from workers.runtime.models import Tenant
    from workers.runtime.settings import Settings

    with stack.session() as session:
        ours = set(session.scalars(select(Tenant.id)))
    engine = get_platform(platform, Settings(data_dir=stack.data_dir))
    for info in engine.list_instances():
        if info.tenant_id in ours:
            engine.destroy_instance(info.name)
    teardown_stack(stack)


def test_tenant_lifecycle_on_a_real_engine(platform_stack: Stack) -> None:
    stack = platform_stack
    platform = stack.platform  # type: ignore[attr-defined]
    tenant_id = f"p{uuid.uuid4().hex[:8]}"
    name = f"t-{tenant_id}-app-0"
    ncpu = os.cpu_count() or 1

    # Given a tenant created on starter on this platform
    created = stack.call(
        "cul8er.tenants.create",
        name="Engine",
        plan="starter",
        tenant_id=tenant_id,
        platform=platform,
    )
    assert created["ok"], created
    run = stack.wait_run(created["workflow_id"], timeout=180)
    assert run["status"] == "succeeded", run
    # Then its container exists with starter limits and answers a health probe on loopback
    got = stack.call("cul8er.tenants.get", tenant_id=tenant_id)
    [instance] = got["instances"]
    assert instance["name"] == name and instance["platform"] == platform
    assert instance["endpoint"].startswith("127.0.0.1:")
    assert health(instance["endpoint"]) == 200
    limits = engine_limits(platform, name)
    assert limits["memory"] == 4096 * 2**20
    assert limits["nano_cpus"] == int(min(2, ncpu) * 1e9)

    # When the plan changes to pro
    changed = stack.call("cul8er.tenants.change_plan", tenant_id=tenant_id, plan="pro")
    assert stack.wait_run(changed["workflow_id"], timeout=180)["status"] == "succeeded"
    # Then the engine reports the new limits (8 cores asked, capped at the host's), both recorded
    limits = engine_limits(platform, name)
    assert limits["memory"] == 16384 * 2**20
    assert limits["nano_cpus"] == int(min(8, ncpu) * 1e9)
    got = stack.call("cul8er.tenants.get", tenant_id=tenant_id)
    recorded = got["instances"][0]["limits"]
    assert recorded["requested"]["cpu_cores"] == 8.0
    assert recorded["applied"]["cpu_cores"] == float(min(8, ncpu))

    # When it is metered
    from workers.pluginhost.handles import get_platform
    from workers.runtime.settings import Settings

    engine = get_platform(platform, Settings(data_dir=stack.data_dir))
    engine.exec(name, ["sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
    stats = engine.stats(name)
    # Then CPU seconds and memory come from the engine
    assert stats.cpu_seconds > 0 and stats.memory_bytes > 0

    # When it is deprovisioned
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"], timeout=180)["status"] == "succeeded"
    # Then the container is gone and the subnet is free
    assert not engine_has(platform, name)
    assert subnets(stack, tenant_id) == []


def test_steps_twice_and_a_killed_worker_leave_one_container(platform_stack: Stack) -> None:
    stack = platform_stack
    platform = stack.platform  # type: ignore[attr-defined]
    tenant_id = f"k{uuid.uuid4().hex[:8]}"
    name = f"t-{tenant_id}-app-0"
    # Given create_instances delivered twice at once for one run
    created = stack.call(
        "cul8er.tenants.create", name="Twice", plan="free", tenant_id=tenant_id, platform=platform
    )
    for _ in range(2):
        stack.client.send_task(
            "cul8er.tenants.create_instances",
            kwargs={"run_id": created["workflow_id"], "phase": "forward"},
        )
    # and a worker SIGKILLed while the provision runs, another worker taking over
    time.sleep(0.5)
    doomed = stack.processes[0]
    stack.kill(doomed)
    stack.processes.remove(doomed)
    stack.start_worker(f"{platform}-heir", concurrency=2)
    # Then the workflow finishes with exactly one container for the name
    run = stack.wait_run(created["workflow_id"], timeout=240)
    assert run["status"] == "succeeded", run
    assert engine_has(platform, name)
    if platform == "docker":
        same = docker_client().containers.list(
            all=True, filters={"label": f"cul8er.tenant={tenant_id}"}
        )
        assert [c.name for c in same] == [name]
    else:
        same = [
            i.name
            for i in incus_client().instances.all()
            if i.config.get("user.cul8er.tenant") == tenant_id
        ]
        assert same == [name]
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"], timeout=180)["status"] == "succeeded"
    assert not engine_has(platform, name)


def _daemon(platform: str) -> psutil.Process | None:
    """The engine's main daemon process (not Incus's per-device ``incusd fork…`` helpers)."""
    wanted = "dockerd" if platform == "docker" else "incusd"
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if not cmd or Path(cmd[0]).name != wanted:
            continue
        if len(cmd) == 1 or cmd[1].startswith("-"):  # subcommands (forkproxy, waitready…) aren't it
            return proc
    return None


@contextlib.contextmanager
def engine_down(platform: str) -> Iterator[None]:
    """Stop the engine's daemon; on exit, bring it back with the project's own script."""
    daemon = _daemon(platform)
    assert daemon is not None, f"{platform} daemon not found"
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=60)
    try:
        yield
    finally:
        restore_engine()


def restore_engine() -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "platforms-up.sh")],
        check=True,
        capture_output=True,
        timeout=600,
    )


def test_engine_down_during_a_step_then_back_and_down_for_good(platform_stack: Stack) -> None:
    stack = platform_stack
    platform = stack.platform  # type: ignore[attr-defined]
    # Given the engine is down when a tenant is created
    tenant_id = f"e{uuid.uuid4().hex[:8]}"
    with engine_down(platform):
        created = stack.call(
            "cul8er.tenants.create",
            name="Down",
            plan="free",
            tenant_id=tenant_id,
            platform=platform,
        )
        # When create_instances has failed at least once
        step = first_failure(stack, created["workflow_id"], "create_instances", timeout=120)
        assert step["error"]["code"] == "transient"
    # Then once the engine is back, the step retries and the workflow completes
    run = stack.wait_run(created["workflow_id"], timeout=240)
    assert run["status"] == "succeeded", run
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"], timeout=180)["status"] == "succeeded"

    # Given the engine stays down
    tenant_id = f"f{uuid.uuid4().hex[:8]}"
    with engine_down(platform):
        created = stack.call(
            "cul8er.tenants.create",
            name="Gone",
            plan="free",
            tenant_id=tenant_id,
            platform=platform,
        )
        run = stack.wait_run(created["workflow_id"], timeout=240)
    # Then the workflow fails after its retries and compensates
    assert run["status"] == "failed", run
    assert "gave up after" in run["error"]["message"]
    assert [s["name"].rsplit(".", 1)[1] for s in run["steps"] if s["phase"] == "compensate"] == [
        "release_network",
        "mark_failed",
    ]
    got = stack.call("cul8er.tenants.get", tenant_id=tenant_id)
    assert got["status"] == "failed" and got["subnet"] is None
