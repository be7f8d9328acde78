"""The incus platform against a real Incus (or LXD) daemon and image (no mocks).

Needs the daemon at ``CUL8ER_INCUS_SOCKET`` (default ``/var/lib/incus/unix.socket``) with the
image alias ``CUL8ER_INCUS_IMAGE`` (default ``cul8er-instance``: busybox, ``httpd`` on 8080
serving ``/health``). Missing, the tests skip; with ``CI`` set, they fail.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pylxd = pytest.importorskip("pylxd")

from plugins.platforms.incus import IncusPlatform  # noqa: E402
from schemas.platform import InstanceInfo, InstanceSpec, Limits  # noqa: E402
from workers.pluginhost.contracts import Platform  # noqa: E402
from workers.pluginhost.handles import check_platform  # noqa: E402
from workers.runtime.errors import NotFoundError, PermanentError, TransientError  # noqa: E402
from workers.runtime.waiting import wait_until  # noqa: E402

SOCKET = os.environ.get("CUL8ER_INCUS_SOCKET", "/var/lib/incus/unix.socket")
IMAGE = os.environ.get("CUL8ER_INCUS_IMAGE", "cul8er-instance")
IN_CI = bool(os.environ.get("CI"))
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_V2 = (CGROUP_ROOT / "cgroup.controllers").exists()
#: Never route loopback requests through an HTTP proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
#: How long a booting instance may take to answer its health page (seconds).
BOOT_SECONDS = 15.0


def _daemon_problem() -> str | None:
    """Why these tests cannot run here, or ``None`` when the daemon and image are ready."""
    if not os.path.exists(SOCKET):
        return f"no Incus/LXD socket at {SOCKET} (run scripts/platforms-up.sh)"
    try:
        client = pylxd.Client(endpoint=SOCKET, timeout=10)
    except Exception as exc:  # any failure means: not usable here
        return f"the Incus/LXD daemon at {SOCKET} does not answer: {exc}"
    if not client.images.exists(IMAGE, alias=True):
        return f"image alias {IMAGE!r} is missing on {SOCKET} (run scripts/platforms-up.sh)"
    return None


_PROBLEM = _daemon_problem()
if _PROBLEM is not None:
    if IN_CI:
        pytest.fail(_PROBLEM, pytrace=False)
    pytest.skip(_PROBLEM, allow_module_level=True)


def get(endpoint: str, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET ``path`` on ``endpoint``: (status, body); raises OSError if nothing answers."""
    try:
        with OPENER.open(f"http://{endpoint}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_healthy(endpoint: str, seconds: float = BOOT_SECONDS) -> tuple[int, bytes]:
    """The first answer of ``/health`` while the instance boots, within ``seconds``."""

    def answer() -> tuple[int, bytes] | None:
        try:
            return get(endpoint, "/health")
        except OSError:
            return None

    return wait_until(
        answer,
        timeout=seconds,
        interval=0.2,
        message=f"{endpoint}/health did not answer",
        error=OSError,
    )


def cgroup_value(name: str, controller: str, v1_file: str, v2_file: str) -> str:
    """A file of the container's host cgroup (the container itself has no cgroup tree)."""
    if CGROUP_V2:
        return (CGROUP_ROOT / f"lxc.payload.{name}" / v2_file).read_text().strip()
    return (CGROUP_ROOT / controller / f"lxc.payload.{name}" / v1_file).read_text().strip()


def memory_limit(name: str) -> int:
    """The container's memory limit in bytes as the host kernel holds it."""
    value = cgroup_value(name, "memory", "memory.limit_in_bytes", "memory.max")
    return -1 if value == "max" else int(value)


def cpu_quota_us(name: str) -> int:
    """The container's CFS quota per 100 ms period as the host kernel holds it (-1 unlimited)."""
    if CGROUP_V2:
        quota, period = cgroup_value(name, "cpu", "", "cpu.max").split()
        return -1 if quota == "max" else int(quota) * 100_000 // int(period)
    quota = int(cgroup_value(name, "cpu", "cpu.cfs_quota_us", ""))
    period = int(cgroup_value(name, "cpu", "cpu.cfs_period_us", ""))
    return -1 if quota < 0 else quota * 100_000 // period


def wait_for(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll ``check`` until it holds or ``seconds`` pass; its last result."""
    with contextlib.suppress(TimeoutError):
        return wait_until(check, timeout=seconds, interval=0.1)
    return False


@pytest.fixture(scope="module")
def client() -> Any:
    """A pylxd client of its own, to look at instances behind the platform's back."""
    return pylxd.Client(endpoint=SOCKET, timeout=30)


@pytest.fixture(autouse=True)
def _remove_test_instances(client: Any) -> Iterator[None]:
    """Force-delete every instance of a ``ut*`` tenant after each test."""
    yield
    for instance in client.instances.all(recursion=1):
        if not (instance.config or {}).get("user.cul8er.tenant", "").startswith("ut"):
            continue
        try:
            if instance.status == "Running":
                instance.stop(force=True, wait=True)
            instance.delete(wait=True)
        except pylxd.exceptions.NotFound:
            pass


@pytest.fixture
def platform() -> IncusPlatform:
    return IncusPlatform(socket=SOCKET, image=IMAGE, port=8080, attempts=3, timeout=30.0)


@pytest.fixture
def make_spec() -> Callable[..., InstanceSpec]:
    """``make(**fields)`` → a spec with a fresh ``ut*`` tenant and ``t-<tenant>-app-0`` name."""

    def make(tenant_id: str | None = None, **fields: Any) -> InstanceSpec:
        tenant = tenant_id or f"ut{uuid.uuid4().hex[:10]}"
        return InstanceSpec(name=f"t-{tenant}-app-0", tenant_id=tenant, **fields)

    return make


def test_platform_fulfils_the_contract() -> None:
    # Given the class / When checked against the contract / Then nothing is missing
    check_platform("incus", IncusPlatform)
    assert isinstance(IncusPlatform(socket=SOCKET, image=IMAGE), Platform)


def test_create_runs_with_limits_and_answers_health(
    platform: IncusPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given a spec with limits and labels
    spec = make_spec(limits=Limits(cpu_cores=0.5, memory_mb=128), labels={"plan": "small"})

    # When it is created
    info = platform.create_instance(spec)

    # Then it runs, under the plan's limits in its config and in the host cgroup
    assert info.status == "running"
    assert info.platform == "incus"
    assert info.tenant_id == spec.tenant_id
    assert info.labels == {"plan": "small"}
    assert info.limits_requested == spec.limits
    assert info.limits_applied == {
        "cpu_cores": 0.5,
        "allowance": "50ms/100ms",
        "memory_mb": 128,
        "storage": None,
        "method": "incus",
    }
    instance = client.instances.get(spec.name)
    assert instance.status == "Running"
    assert instance.config["limits.memory"] == "128MiB"
    assert instance.config["limits.cpu.allowance"] == "50ms/100ms"
    assert instance.config["user.cul8er.managed"] == "true"
    assert instance.config["user.cul8er.tenant"] == spec.tenant_id
    assert instance.config["user.cul8er.role"] == "app"
    assert instance.config["user.cul8er.ordinal"] == "0"
    assert instance.config["user.plan"] == "small"
    assert memory_limit(spec.name) == 128 * 2**20
    assert cpu_quota_us(spec.name) == 50_000
    # And its service answers on the loopback proxy port
    assert info.endpoint is not None
    assert info.endpoint == f"127.0.0.1:{instance.config['user.cul8er.host_port']}"
    assert wait_healthy(info.endpoint) == (200, b"ok\n")


def test_create_twice_and_concurrently_makes_one_instance(
    platform: IncusPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given an instance that was created once
    spec = make_spec()
    first = platform.create_instance(spec)

    # When it is created again
    again = platform.create_instance(spec)

    # Then the same instance is returned
    assert again.provider_id == first.provider_id
    assert again.endpoint == first.endpoint

    # Given a new name, When two threads create it at once
    racing = make_spec()
    results: list[InstanceInfo] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            results.append(IncusPlatform(socket=SOCKET, image=IMAGE).create_instance(racing))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    # Then both get the one running instance
    assert errors == []
    assert len(results) == 2
    assert {info.provider_id for info in results} == {results[0].provider_id}
    assert {info.status for info in results} == {"running"}
    assert [info.name for info in platform.list_instances(racing.tenant_id)] == [racing.name]


def test_cpu_is_capped_at_the_host(
    platform: IncusPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given a host with fewer than 8 CPUs
    host_cpus = os.cpu_count() or 1
    if host_cpus >= 8:
        pytest.skip(f"this host has {host_cpus} CPUs: 8 cores are not capped")
    spec = make_spec(limits=Limits(cpu_cores=8, memory_mb=256, storage_gb=1))

    # When an instance asks for 8 cores
    info = platform.create_instance(spec)

    # Then it gets the host's CPUs, and what was asked is recorded
    assert info.limits_requested.cpu_cores == 8
    assert info.limits_applied["cpu_cores"] == float(host_cpus)
    assert info.limits_applied["allowance"] == f"{host_cpus * 100}ms/100ms"
    assert info.limits_applied["storage"] == "unenforced"
    assert cpu_quota_us(spec.name) == host_cpus * 100_000


def test_set_limits_applies_live(
    platform: IncusPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given a running instance with small limits
    spec = make_spec(limits=Limits(cpu_cores=0.5, memory_mb=128))
    info = platform.create_instance(spec)
    pid_before = client.instances.get(spec.name).state().pid

    # When its limits are raised
    changed = platform.set_limits(spec.name, Limits(cpu_cores=1.0, memory_mb=256))

    # Then the host cgroup holds the new values, without a restart
    assert wait_for(lambda: memory_limit(spec.name) == 256 * 2**20)
    assert wait_for(lambda: cpu_quota_us(spec.name) == 100_000)
    assert client.instances.get(spec.name).state().pid == pid_before
    assert changed.status == "running"
    assert changed.endpoint == info.endpoint
    assert changed.limits_requested == Limits(cpu_cores=1.0, memory_mb=256)
    assert changed.limits_applied["allowance"] == "100ms/100ms"
    assert changed.limits_applied["memory_mb"] == 256

    # When the limits are lifted
    platform.set_limits(spec.name, Limits())

    # Then the container is unlimited again
    config = client.instances.get(spec.name).config
    assert "limits.memory" not in config
    assert "limits.cpu.allowance" not in config
    assert wait_for(lambda: cpu_quota_us(spec.name) == -1)


def test_stats_after_a_busy_loop(
    platform: IncusPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given a running instance that burned some CPU
    spec = make_spec()
    platform.create_instance(spec)
    burn = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"
    assert platform.exec(spec.name, ["sh", "-c", burn], timeout=60).exit_code == 0

    # When its stats are read
    stats = platform.stats(spec.name)

    # Then CPU and memory are counted
    assert stats.cpu_seconds > 0
    assert stats.memory_bytes > 0
    assert stats.disk_bytes >= 0
    assert stats.rx_bytes >= 0
    assert stats.tx_bytes >= 0


def test_exec_returns_exit_code_and_output(
    platform: IncusPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given a running instance
    spec = make_spec()
    platform.create_instance(spec)

    # When a command runs in it
    result = platform.exec(spec.name, ["sh", "-c", "echo hi; echo err >&2; exit 3"])

    # Then its exit code and both streams come back
    assert (result.exit_code, result.stdout, result.stderr) == (3, "hi\n", "err\n")

    # And a missing instance is NotFoundError
    with pytest.raises(NotFoundError):
        platform.exec(f"{spec.name}-missing", ["true"])


def test_stop_then_start(platform: IncusPlatform, make_spec: Callable[..., InstanceSpec]) -> None:
    # Given a running, healthy instance
    spec = make_spec()
    info = platform.create_instance(spec)
    assert info.endpoint is not None
    assert wait_healthy(info.endpoint)[0] == 200

    # When it is stopped (twice)
    platform.stop_instance(spec.name)
    platform.stop_instance(spec.name)

    # Then it is listed as stopped and its service no longer answers
    assert [item.status for item in platform.list_instances(spec.tenant_id)] == ["stopped"]
    with pytest.raises(OSError):
        get(info.endpoint, "/health", timeout=2)

    # When it is started again (twice)
    started = platform.start_instance(spec.name)
    assert platform.start_instance(spec.name).provider_id == started.provider_id

    # Then it answers on the same endpoint
    assert started.status == "running"
    assert started.endpoint == info.endpoint
    assert wait_healthy(info.endpoint) == (200, b"ok\n")


def test_list_filters_by_tenant(
    platform: IncusPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given instances of two tenants
    one, two = make_spec(), make_spec()
    platform.create_instance(one)
    platform.create_instance(two)

    # When listed per tenant and all together
    only_one = platform.list_instances(one.tenant_id)
    everything = {info.name for info in platform.list_instances()}

    # Then each tenant sees its own, and the full list holds both
    assert [(info.name, info.tenant_id) for info in only_one] == [(one.name, one.tenant_id)]
    assert {one.name, two.name} <= everything


def test_destroy_is_idempotent(
    platform: IncusPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given a running instance
    spec = make_spec()
    platform.create_instance(spec)

    # When it is destroyed, twice
    platform.destroy_instance(spec.name)
    platform.destroy_instance(spec.name)

    # Then it is gone
    assert not client.instances.exists(spec.name)
    assert platform.list_instances(spec.tenant_id) == []
    with pytest.raises(NotFoundError):
        platform.stats(spec.name)
    # And stopping a missing instance succeeds, while starting one does not
    platform.stop_instance(spec.name)
    with pytest.raises(NotFoundError):
        platform.start_instance(spec.name)


def test_missing_image_is_permanent(
    platform: IncusPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given a spec naming an image alias the daemon does not have
    alias = f"no-such-image-{uuid.uuid4().hex[:8]}"
    spec = make_spec(image=alias)

    # When it is created / Then a PermanentError names the alias, and nothing is left
    with pytest.raises(PermanentError, match=alias):
        platform.create_instance(spec)
    assert not client.instances.exists(spec.name)


def test_refused_request_is_permanent(platform: IncusPlatform) -> None:
    # Given a spec whose name the daemon refuses (a 400 answer)
    spec = InstanceSpec(name="t-ut_bad_name-app-0", tenant_id="utbad")

    # When it is created / Then the daemon's refusal is a PermanentError with its message
    with pytest.raises(PermanentError, match="Invalid instance name") as caught:
        platform.create_instance(spec)
    assert not isinstance(caught.value, NotFoundError)


def test_unreachable_daemon_is_transient_and_quick(make_spec: Callable[..., InstanceSpec]) -> None:
    # Given a platform aimed at a socket nobody listens on
    platform = IncusPlatform(socket="/tmp/nope.sock", image=IMAGE, attempts=3, timeout=2.0)

    # When any operation is called
    started = time.monotonic()
    with pytest.raises(TransientError, match="incus daemon unavailable"):
        platform.create_instance(make_spec())
    with pytest.raises(TransientError):
        platform.list_instances()

    # Then it gave up after its attempts, quickly
    assert time.monotonic() - started < 15
