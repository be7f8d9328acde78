"""The docker platform against the real Docker engine on this machine (no mocks).

Needs the engine (``DOCKER_HOST`` or the local socket) and the ``cul8er/instance:latest``
image (busybox httpd serving ``/health``); both come from ``scripts/platforms-up.sh``.
Without them these tests skip, or fail when ``CI`` is set.
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
from typing import Any

import docker
import docker.errors
import pytest
import requests.exceptions
from structlog.testing import capture_logs

from plugins.platforms.docker import DockerPlatform
from schemas.platform import InstanceInfo, InstanceSpec, Limits
from workers.pluginhost.contracts import Platform
from workers.pluginhost.handles import check_platform
from workers.runtime.errors import NotFoundError, PermanentError, TransientError
from workers.runtime.settings import Settings
from workers.runtime.waiting import wait_until

IN_CI = bool(os.environ.get("CI"))
IMAGE = os.environ.get("CUL8ER_DOCKER_IMAGE", "cul8er/instance:latest")
MIB = 1024 * 1024
#: Never route loopback requests through an HTTP proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _engine_problem() -> str | None:
    """Why these tests cannot run here, or ``None`` if the engine and image are ready."""
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        return f"the Docker engine does not answer ({exc}); run scripts/platforms-up.sh"
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        return f"the image {IMAGE} is missing; build it with scripts/platforms-up.sh"
    finally:
        client.close()
    return None


_PROBLEM = _engine_problem()
if _PROBLEM is not None:
    if IN_CI:
        pytest.fail(f"docker platform tests cannot run in CI: {_PROBLEM}", pytrace=False)
    pytest.skip(_PROBLEM, allow_module_level=True)


def get(endpoint: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``path`` on ``endpoint``: (status, body); raises OSError if nothing answers."""
    try:
        with OPENER.open(f"http://{endpoint}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_healthy(endpoint: str, within: float = 10.0) -> tuple[int, bytes]:
    """GET /health until it answers (httpd may still be starting); the first answer."""

    def answer() -> tuple[int, bytes] | None:
        try:
            return get(endpoint, "/health")
        except OSError:
            return None

    return wait_until(
        answer,
        timeout=within,
        interval=0.2,
        message=f"{endpoint}/health did not answer",
        error=OSError,
    )


def health_fails(endpoint: str) -> bool:
    try:
        get(endpoint, "/health", timeout=1.0)
    except OSError:
        return True
    return False


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    engine = docker.from_env(timeout=30)
    yield engine
    engine.close()


def _purge(client: Any) -> None:
    """Remove every container of a unit-test tenant (``cul8er.tenant`` starting ``ut``)."""
    for container in client.containers.list(
        all=True, filters={"label": "cul8er.managed=true"}, ignore_removed=True
    ):
        if (container.labels or {}).get("cul8er.tenant", "").startswith("ut"):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True, v=True)


@pytest.fixture(autouse=True)
def _cleanup(client: Any) -> Iterator[None]:
    yield
    _purge(client)


@pytest.fixture
def platform() -> DockerPlatform:
    return DockerPlatform(base_url=None, image=IMAGE, port=8080, attempts=3, timeout=30.0)


@pytest.fixture
def make_spec() -> Callable[..., InstanceSpec]:
    """Specs of fresh unit-test tenants: ``t-ut<random>-app-0``."""

    def make(tenant_id: str | None = None, **overrides: Any) -> InstanceSpec:
        tenant = tenant_id or f"ut{uuid.uuid4().hex[:8]}"
        values: dict[str, Any] = {
            "name": f"t-{tenant}-app-0",
            "tenant_id": tenant,
            "limits": Limits(cpu_cores=0.5, memory_mb=128),
            "labels": {"cul8er.plan": "unit"},
        }
        values.update(overrides)
        return InstanceSpec(**values)

    return make


def host_config(client: Any, name: str) -> dict[str, Any]:
    attrs: dict[str, Any] = client.api.inspect_container(name)
    return attrs


def named(client: Any, name: str) -> list[Any]:
    """Containers whose name is exactly ``name``."""
    return [c for c in client.containers.list(all=True, filters={"name": name}) if c.name == name]


def test_satisfies_the_platform_contract(platform: DockerPlatform) -> None:
    # Given the docker platform class and an instance of it
    # When the registry checks it against the contract
    check_platform("docker", DockerPlatform)
    # Then it passes and the instance is a Platform
    assert isinstance(platform, Platform)
    assert DockerPlatform.name == "docker"


def test_from_settings_reads_engine_image_and_retry_knobs() -> None:
    # Given settings naming an engine, an image and the retry knobs
    settings = Settings(
        docker_host="unix:///run/x.sock",
        docker_image="img:1",
        instance_port=9000,
        engine_attempts=5,
        engine_timeout=12.0,
    )
    # When the platform is built from them
    built = DockerPlatform.from_settings(settings)
    # Then it carries each of them
    assert (built.base_url, built.image, built.port) == ("unix:///run/x.sock", "img:1", 9000)
    assert (built.attempts, built.timeout) == (5, 12.0)


def test_create_applies_plan_limits_and_serves_health(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given a spec with 0.5 CPU and 128 MiB
    spec = make_spec(limits=Limits(cpu_cores=0.5, memory_mb=128))
    # When the instance is created
    info = platform.create_instance(spec)
    # Then a running container carries the limits, our labels and a loopback endpoint
    attrs = host_config(client, spec.name)
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert attrs["HostConfig"]["Memory"] == 128 * MIB
    assert attrs["HostConfig"]["MemorySwap"] == 128 * MIB
    assert attrs["HostConfig"]["Init"] is True
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    labels = attrs["Config"]["Labels"]
    assert labels["cul8er.managed"] == "true"
    assert labels["cul8er.tenant"] == spec.tenant_id
    assert (labels["cul8er.role"], labels["cul8er.ordinal"]) == ("app", "0")
    assert labels["cul8er.plan"] == "unit"
    assert info.status == "running"
    assert info.platform == "docker"
    assert info.tenant_id == spec.tenant_id
    assert info.provider_id == attrs["Id"]
    assert info.endpoint is not None and info.endpoint.startswith("127.0.0.1:")
    binding = attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"
    assert info.endpoint == f"127.0.0.1:{binding['HostPort']}"
    assert info.limits_requested == spec.limits
    assert info.limits_applied["cpu_cores"] == 0.5
    assert info.limits_applied["nano_cpus"] == 500_000_000
    assert info.limits_applied["memory_mb"] == 128
    assert info.limits_applied["method"] == "docker"
    # And its service answers GET /health on the published port
    assert wait_healthy(info.endpoint) == (200, b"ok\n")


def test_create_twice_returns_the_same_container(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given an instance that was created once
    spec = make_spec()
    first = platform.create_instance(spec)
    # When it is created again (a redelivered task)
    second = platform.create_instance(spec)
    # Then the same container is returned and no other exists
    assert second.provider_id == first.provider_id
    assert second.endpoint == first.endpoint
    assert len(named(client, spec.name)) == 1


def test_create_restarts_a_stopped_instance(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given an instance that was created, then stopped
    spec = make_spec()
    first = platform.create_instance(spec)
    platform.stop_instance(spec.name)
    # When it is created again
    again = platform.create_instance(spec)
    # Then the same container runs again and answers
    assert again.provider_id == first.provider_id
    assert again.status == "running"
    assert again.endpoint is not None
    assert wait_healthy(again.endpoint)[0] == 200


def test_concurrent_creates_make_one_container(
    make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given two workers about to create the same instance at once
    spec = make_spec()
    barrier = threading.Barrier(2)
    results: list[InstanceInfo] = []
    errors: list[BaseException] = []

    def create() -> None:
        worker_platform = DockerPlatform(base_url=None, image=IMAGE)
        barrier.wait()
        try:
            results.append(worker_platform.create_instance(spec))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    # When both create it
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Then both succeed with the one container there is
    assert errors == []
    assert len(results) == 2
    assert results[0].provider_id == results[1].provider_id
    assert len(named(client, spec.name)) == 1
    assert all(info.status == "running" for info in results)


def test_cpu_request_above_host_cores_is_capped(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given a host with fewer cores than requested
    host_cores = int(client.info()["NCPU"])
    wanted = float(max(8, host_cores * 4))
    spec = make_spec(limits=Limits(cpu_cores=wanted, memory_mb=256, storage_gb=1))
    # When the instance is created
    info = platform.create_instance(spec)
    # Then the engine got the host's cores, and both numbers are recorded
    assert host_config(client, spec.name)["HostConfig"]["NanoCpus"] == host_cores * 10**9
    assert info.limits_requested.cpu_cores == wanted
    assert info.limits_applied == {
        "cpu_cores": float(host_cores),
        "nano_cpus": host_cores * 10**9,
        "memory_mb": 256,
        "storage": "unenforced",
        "method": "docker",
    }
    # And a later listing still knows what was requested
    (listed,) = platform.list_instances(spec.tenant_id)
    assert listed.limits_requested.cpu_cores == wanted
    assert listed.limits_applied["cpu_cores"] == float(host_cores)


def test_set_limits_updates_the_running_container_in_place(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given a running instance with 0.5 CPU and 128 MiB
    spec = make_spec(limits=Limits(cpu_cores=0.5, memory_mb=128))
    platform.create_instance(spec)
    started_at = host_config(client, spec.name)["State"]["StartedAt"]
    # When its limits are raised (memory above the old swap limit)
    raised = platform.set_limits(spec.name, Limits(cpu_cores=1.0, memory_mb=256))
    # Then the engine reports the new values, without a restart
    attrs = host_config(client, spec.name)
    assert attrs["HostConfig"]["NanoCpus"] == 1_000_000_000
    assert attrs["HostConfig"]["Memory"] == 256 * MIB
    assert attrs["State"]["StartedAt"] == started_at
    assert attrs["State"]["Running"] is True
    assert raised.limits_applied["cpu_cores"] == 1.0
    assert raised.limits_applied["memory_mb"] == 256
    assert raised.limits_requested == Limits(cpu_cores=1.0, memory_mb=256)
    # When they are lowered again
    lowered = platform.set_limits(spec.name, Limits(cpu_cores=0.25, memory_mb=64))
    # Then the engine follows, still without a restart, and the service still answers
    attrs = host_config(client, spec.name)
    assert attrs["HostConfig"]["NanoCpus"] == 250_000_000
    assert attrs["HostConfig"]["Memory"] == 64 * MIB
    assert attrs["State"]["StartedAt"] == started_at
    assert lowered.limits_applied["memory_mb"] == 64
    assert lowered.endpoint is not None
    assert wait_healthy(lowered.endpoint)[0] == 200
    # And a listing reports the new limits as requested too
    (listed,) = platform.list_instances(spec.tenant_id)
    assert listed.limits_requested == Limits(cpu_cores=0.25, memory_mb=64)


def test_stats_count_cpu_and_memory(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given a running instance that has burnt some CPU
    spec = make_spec(limits=Limits(cpu_cores=1.0, memory_mb=128))
    platform.create_instance(spec)
    busy = platform.exec(
        spec.name,
        ["sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"],
        timeout=60,
    )
    assert busy.exit_code == 0
    # When its stats are read
    stats = platform.stats(spec.name)
    # Then CPU seconds and memory are counted
    assert stats.cpu_seconds > 0
    assert stats.memory_bytes > 0
    assert stats.disk_bytes >= 0
    assert stats.rx_bytes >= 0 and stats.tx_bytes >= 0


def test_stats_count_the_writable_layer(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given an instance that wrote 1 MiB into its filesystem
    spec = make_spec()
    platform.create_instance(spec)
    wrote = platform.exec(
        spec.name, ["dd", "if=/dev/zero", "of=/tmp/blob", "bs=1024", "count=1024"]
    )
    assert wrote.exit_code == 0
    # When its stats are read
    stats = platform.stats(spec.name)
    # Then the disk bytes include the file
    assert stats.disk_bytes >= MIB


def test_stats_from_this_hosts_cgroups_match_the_engines(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given a running instance on an engine of this host
    spec = make_spec()
    platform.create_instance(spec)
    attrs = platform._inspect_size(spec.name)
    assert platform._host_cgroups is not None
    if platform._host_cgroups.read(attrs["Id"], int(attrs["State"]["Pid"])) is None:
        pytest.skip("the engine's cgroups are not readable from here")
    engine_only = DockerPlatform(base_url=None, image=IMAGE, read_cgroups=False)
    # When its stats are read from the files, then from the engine
    first = platform.stats(spec.name)
    engine = engine_only.stats(spec.name)
    last = platform.stats(spec.name)
    # Then the engine's counters lie between two readings of the files
    assert first.cpu_seconds <= engine.cpu_seconds <= last.cpu_seconds
    assert first.rx_bytes <= engine.rx_bytes <= last.rx_bytes
    assert first.tx_bytes <= engine.tx_bytes <= last.tx_bytes
    assert engine.disk_bytes == first.disk_bytes
    assert first.memory_bytes > 0 and engine.memory_bytes > 0


def test_stats_of_a_stopped_instance_come_from_the_engine(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given a stopped instance (no process, no cgroup)
    spec = make_spec()
    platform.create_instance(spec)
    platform.stop_instance(spec.name)
    # When its stats are read
    stats = platform.stats(spec.name)
    # Then they are read anyway: nothing running, nothing counted in memory
    assert stats.memory_bytes == 0
    assert stats.disk_bytes >= 0


def test_exec_returns_exit_code_and_output(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given a running instance
    spec = make_spec()
    platform.create_instance(spec)
    # When a command that writes to both streams and fails is run
    result = platform.exec(spec.name, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    # Then its exit code and both outputs come back apart
    assert result.exit_code == 3
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    # And a successful command reports 0
    assert platform.exec(spec.name, ["cat", "/www/health"]).stdout == "ok\n"


def test_exec_times_out(platform: DockerPlatform, make_spec: Callable[..., InstanceSpec]) -> None:
    # Given a running instance
    spec = make_spec()
    platform.create_instance(spec)
    # When a command outlives its timeout
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        platform.exec(spec.name, ["sleep", "30"], timeout=1.0)
    # Then the caller gets control back at the timeout
    assert time.monotonic() - started < 5


def test_stop_then_start(platform: DockerPlatform, make_spec: Callable[..., InstanceSpec]) -> None:
    # Given a running, answering instance
    spec = make_spec()
    info = platform.create_instance(spec)
    assert info.endpoint is not None
    assert wait_healthy(info.endpoint)[0] == 200
    # When it is stopped (twice: a redelivery)
    started = time.monotonic()
    platform.stop_instance(spec.name)
    platform.stop_instance(spec.name)
    # Then it stopped promptly (init forwards SIGTERM) and no longer answers
    assert time.monotonic() - started < 5
    assert health_fails(info.endpoint)
    (listed,) = platform.list_instances(spec.tenant_id)
    assert listed.status == "stopped"
    assert listed.endpoint is None
    # When it is started (twice)
    again = platform.start_instance(spec.name)
    assert platform.start_instance(spec.name).provider_id == again.provider_id
    # Then it answers again, on its (possibly new) port
    assert again.status == "running"
    assert again.provider_id == info.provider_id
    assert again.endpoint is not None
    assert wait_healthy(again.endpoint) == (200, b"ok\n")


def test_list_instances_filters_by_tenant(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec]
) -> None:
    # Given two tenants with one and two instances
    one = make_spec()
    two_a = make_spec()
    two_b = make_spec(two_a.tenant_id, name=f"t-{two_a.tenant_id}-app-1", ordinal=1)
    for spec in (one, two_a, two_b):
        platform.create_instance(spec)
    # When instances are listed per tenant and in all
    first = platform.list_instances(one.tenant_id)
    second = platform.list_instances(two_a.tenant_id)
    everything = {info.name for info in platform.list_instances()}
    # Then each tenant sees only its own, and the full list has them all
    assert [info.name for info in first] == [one.name]
    assert [info.name for info in second] == [two_a.name, two_b.name]
    assert {one.name, two_a.name, two_b.name} <= everything
    assert all(info.tenant_id == two_a.tenant_id for info in second)
    assert second[1].labels["cul8er.ordinal"] == "1"
    assert platform.list_instances(f"ut{uuid.uuid4().hex[:8]}") == []


def test_destroy_removes_and_is_idempotent(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given a running instance
    spec = make_spec()
    platform.create_instance(spec)
    # When it is destroyed, twice
    platform.destroy_instance(spec.name)
    platform.destroy_instance(spec.name)
    # Then the container is gone and the tenant has no instances
    assert named(client, spec.name) == []
    assert platform.list_instances(spec.tenant_id) == []


def test_operations_on_a_missing_instance(platform: DockerPlatform) -> None:
    # Given a name no container has
    name = f"t-ut{uuid.uuid4().hex[:8]}-app-0"
    # When each operation is called on it
    # Then stop and destroy succeed, and the others say it is not there
    platform.stop_instance(name)
    platform.destroy_instance(name)
    with pytest.raises(NotFoundError):
        platform.start_instance(name)
    with pytest.raises(NotFoundError):
        platform.exec(name, ["true"])
    with pytest.raises(NotFoundError):
        platform.stats(name)
    with pytest.raises(NotFoundError):
        platform.set_limits(name, Limits(cpu_cores=1))


def test_missing_image_is_permanent(
    platform: DockerPlatform, make_spec: Callable[..., InstanceSpec], client: Any
) -> None:
    # Given a spec whose image the engine does not have
    missing = f"cul8er/missing-{uuid.uuid4().hex[:8]}:nope"
    spec = make_spec(image=missing)
    # When the instance is created
    with pytest.raises(PermanentError, match=missing) as raised:
        platform.create_instance(spec)
    # Then it fails for good, naming the image, and leaves nothing behind
    assert not isinstance(raised.value, NotFoundError)
    assert named(client, spec.name) == []


def test_unreachable_engine_is_transient_after_its_attempts(
    make_spec: Callable[..., InstanceSpec],
) -> None:
    # Given a platform aimed at a socket nothing listens on
    platform = DockerPlatform(base_url="unix:///tmp/nope.sock", image=IMAGE, attempts=3)
    # When an instance is created
    started = time.monotonic()
    with (
        capture_logs() as logs,
        pytest.raises(TransientError, match="docker engine unavailable"),
    ):
        platform.create_instance(make_spec())
    # Then it gave up after its three quick attempts (two retries between them)
    assert time.monotonic() - started < 10
    assert [entry["attempt"] for entry in logs if entry["event"] == "docker_engine_retry"] == [1, 2]
