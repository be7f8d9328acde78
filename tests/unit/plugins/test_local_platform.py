"""The local platform, with real instance processes under ``tmp_path`` (no mocks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from plugins.platforms.local import LocalPlatform
from schemas.platform import InstanceInfo, InstanceSpec, Limits
from workers.pluginhost.contracts import Platform
from workers.pluginhost.handles import check_platform
from workers.runtime.errors import NotFoundError, PermanentError
from workers.runtime.waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Never route loopback requests through an HTTP proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(endpoint: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` on ``endpoint``: (status, body); raises OSError if nothing answers."""
    try:
        with OPENER.open(f"http://{endpoint}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def instance_processes(state_dir: Path, name: str) -> list[psutil.Process]:
    """Live (non-zombie) processes that carry this instance's markers."""
    found = []
    for proc in psutil.process_iter(["environ", "status"]):
        env = proc.info.get("environ") or {}
        if (
            env.get("CUL8ER_INSTANCE_STATE") == str(state_dir.resolve())
            and env.get("CUL8ER_INSTANCE") == name
            and proc.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(proc)
    return found


def cgroup_dirs(name: str) -> list[Path]:
    """Where the platform puts this instance's cgroups on this host (v2 or v1)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT / "cul8er" / name]
    return [CGROUP_ROOT / tree / "cul8er" / name for tree in ("cpu", "memory")]


def require_cgroups(info: InstanceInfo) -> None:
    """Skip a cgroup assertion on hosts where the platform fell back to rlimits."""
    method = info.limits_applied.get("method")
    if not str(method).startswith("cgroup"):
        pytest.skip(f"cgroups are not writable on this host (limits method {method!r})")


def cpu_quota_us(name: str) -> int:
    """The instance's CFS quota as the kernel holds it (-1 is unlimited)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        quota = (CGROUP_ROOT / "cul8er" / name / "cpu.max").read_text().split()[0]
        return -1 if quota == "max" else int(quota)
    return int((CGROUP_ROOT / "cpu" / "cul8er" / name / "cpu.cfs_quota_us").read_text())


def memory_limit(name: str) -> int:
    """The instance's memory limit in bytes as the kernel holds it."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return int((CGROUP_ROOT / "cul8er" / name / "memory.max").read_text())
    return int((CGROUP_ROOT / "memory" / "cul8er" / name / "memory.limit_in_bytes").read_text())


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return (tmp_path / "instances").resolve()


@pytest.fixture
def platform(state_dir: Path) -> Iterator[LocalPlatform]:
    """A platform over ``state_dir``; every instance it holds is destroyed afterwards."""
    platform = LocalPlatform(state_dir=state_dir, start_timeout=15.0)
    yield platform
    names = {info.name for info in platform.list_instances()}
    if state_dir.is_dir():
        names |= {path.name for path in state_dir.iterdir() if path.is_dir()}
    for name in names:
        platform.destroy_instance(name)


@pytest.fixture
def spec() -> Callable[..., InstanceSpec]:
    """``make(**fields)`` → a spec with a unique name, so parallel runs never share cgroups."""

    def make(**fields: object) -> InstanceSpec:
        values: dict[str, object] = {"name": f"ut-{uuid.uuid4().hex[:10]}", "tenant_id": "acme"}
        values.update(fields)
        return InstanceSpec.model_validate(values)

    return make


def test_local_platform_fulfils_the_contract() -> None:
    # Given the platform class / When the registry checks it / Then it passes
    check_platform("local", LocalPlatform)
    assert isinstance(LocalPlatform(state_dir=Path("unused")), Platform)


def test_create_serves_health_on_loopback_only(platform, spec) -> None:
    # Given a spec with the default instance server
    wanted = spec(labels={"role": "web"})

    # When the instance is created
    info = platform.create_instance(wanted)

    # Then it runs, answers /health on 127.0.0.1 and listens nowhere else
    assert info.status == "running"
    assert info.platform == "local"
    assert info.labels == {"role": "web"}
    assert info.endpoint is not None and info.endpoint.startswith("127.0.0.1:")
    status, body = get(info.endpoint, "/health")
    assert status == 200
    assert json.loads(body) == {"status": "ok", "name": wanted.name}
    listening = [
        conn.laddr
        for conn in psutil.Process(int(info.provider_id or 0)).net_connections("tcp")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}
    status, body = get(info.endpoint, "/metrics")
    metrics = json.loads(body)
    assert metrics["requests"] >= 2 and metrics["rx_bytes"] > 0 and metrics["tx_bytes"] > 0


def test_create_twice_returns_the_same_process(platform, spec, state_dir) -> None:
    # Given a running instance
    wanted = spec()
    first = platform.create_instance(wanted)

    # When it is created again (a redelivered task)
    second = platform.create_instance(wanted)

    # Then the same process is returned and no second one exists
    assert second.provider_id == first.provider_id
    assert second.endpoint == first.endpoint
    assert len(instance_processes(state_dir, wanted.name)) == 1


def test_concurrent_creates_from_threads_make_one_process(platform, spec, state_dir) -> None:
    # Given one spec and four threads released together
    wanted = spec()
    barrier = threading.Barrier(4)
    results: list[InstanceInfo] = []
    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            results.append(platform.create_instance(wanted))
        except BaseException as exc:  # collected, then asserted below
            errors.append(exc)

    # When they all create the instance at once
    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Then they all get the one same process
    assert errors == []
    assert len({info.provider_id for info in results}) == 1
    assert len(instance_processes(state_dir, wanted.name)) == 1


def test_concurrent_creates_from_processes_make_one_process(platform, spec, state_dir) -> None:
    # Given two separate worker-like processes about to create the same instance
    wanted = spec()
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from plugins.platforms.local import LocalPlatform
        from schemas.platform import InstanceSpec
        platform = LocalPlatform(state_dir=Path(sys.argv[1]), start_timeout=15.0)
        info = platform.create_instance(InstanceSpec.model_validate_json(sys.argv[2]))
        sys.stdout.write("PID=" + str(info.provider_id) + "\\n")
        """
    )
    argv = [sys.executable, "-c", script, str(state_dir), wanted.model_dump_json()]

    # When both run at once
    runs = [
        subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=60) for run in runs]

    # Then both report the same pid, and exactly one instance process exists
    assert [run.returncode for run in runs] == [0, 0], outputs
    pids = {line for out, _ in outputs for line in out.splitlines() if line.startswith("PID=")}
    assert len(pids) == 1, outputs
    procs = instance_processes(state_dir, wanted.name)
    assert [f"PID={proc.pid}" for proc in procs] == list(pids)


def test_a_new_platform_object_finds_the_instance(platform, spec, state_dir) -> None:
    # Given an instance created by one platform object (one worker)
    wanted = spec(tenant_id="globex")
    created = platform.create_instance(wanted)

    # When a fresh object over the same state dir looks (a restarted worker)
    again = LocalPlatform(state_dir=state_dir)
    listed = again.list_instances()
    recreated = again.create_instance(wanted)

    # Then it sees the running instance and returns it instead of starting another
    assert [(info.name, info.status, info.provider_id) for info in listed] == [
        (wanted.name, "running", created.provider_id)
    ]
    assert recreated.provider_id == created.provider_id
    assert again.list_instances(tenant_id="globex")[0].name == wanted.name
    assert again.list_instances(tenant_id="initech") == []


def test_a_booting_process_of_a_killed_worker_is_adopted(platform, spec, state_dir) -> None:
    # Given a worker that spawned a slow-booting instance, then was SIGKILLed mid-create
    wanted = spec(image="{python} -m plugins.platforms.instance_server --startup-delay 3")
    script = (
        "import sys; from pathlib import Path;"
        "from plugins.platforms.local import LocalPlatform;"
        "from schemas.platform import InstanceSpec;"
        "LocalPlatform(state_dir=Path(sys.argv[1])).create_instance("
        "InstanceSpec.model_validate_json(sys.argv[2]))"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script, str(state_dir), wanted.model_dump_json()], cwd=ROOT
    )
    try:
        wait_until(
            lambda: instance_processes(state_dir, wanted.name),
            timeout=20,
            message="the worker spawned no instance process",
        )
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    orphan = instance_processes(state_dir, wanted.name)
    assert len(orphan) == 1
    assert not (state_dir / wanted.name / "port").exists()

    # When another worker creates the same instance
    info = platform.create_instance(wanted)

    # Then it waits for the orphan to listen and adopts it rather than starting a second one
    assert info.provider_id == str(orphan[0].pid)
    assert get(info.endpoint or "", "/health")[0] == 200
    assert len(instance_processes(state_dir, wanted.name)) == 1


def test_set_limits_changes_the_cgroup_live(platform, spec) -> None:
    # Given a running instance with 1 core and 256 MB
    wanted = spec(limits=Limits(cpu_cores=1, memory_mb=256))
    created = platform.create_instance(wanted)
    require_cgroups(created)
    assert cpu_quota_us(wanted.name) == 100_000
    assert memory_limit(wanted.name) == 256 * 1024 * 1024

    # When its limits are changed
    info = platform.set_limits(wanted.name, Limits(cpu_cores=0.5, memory_mb=128))

    # Then the kernel holds the new values and the process was not restarted
    assert cpu_quota_us(wanted.name) == 50_000
    assert memory_limit(wanted.name) == 128 * 1024 * 1024
    assert info.provider_id == created.provider_id
    assert info.limits_requested == Limits(cpu_cores=0.5, memory_mb=128)
    assert info.limits_applied["cpu_cores"] == 0.5
    assert info.limits_applied["memory_mb"] == 128
    assert get(info.endpoint or "", "/health")[0] == 200


def test_more_cores_than_the_host_has_are_capped(platform, spec) -> None:
    # Given a host with N cores and a request for 4N
    cores = os.cpu_count() or 1
    wanted = spec(limits=Limits(cpu_cores=cores * 4, memory_mb=512, storage_gb=1))

    # When the instance is created
    info = platform.create_instance(wanted)

    # Then the request is recorded as is and what was applied is capped at N
    assert info.limits_requested.cpu_cores == cores * 4
    require_cgroups(info)
    assert info.limits_applied["cpu_cores"] == float(cores)
    assert info.limits_applied["memory_mb"] == 512
    assert info.limits_applied["storage"] == "unenforced"
    assert cpu_quota_us(wanted.name) == cores * 100_000
    persisted = json.loads((platform.state_dir / wanted.name / "limits.json").read_text())
    assert persisted == info.limits_applied


def test_set_limits_of_a_missing_instance_is_not_found(platform) -> None:
    # Given no instance / When limits are set / Then NotFoundError
    with pytest.raises(NotFoundError):
        platform.set_limits("ut-missing", Limits(cpu_cores=1))


def test_stats_count_cpu_memory_disk_and_traffic(platform, spec) -> None:
    # Given a running instance that burned a second of CPU
    info = platform.create_instance(spec())
    assert get(info.endpoint or "", "/burn?seconds=1", timeout=30)[0] == 200

    # When its stats are read
    stats = platform.stats(info.name)

    # Then the CPU time, memory, disk and traffic show it
    assert stats.cpu_seconds >= 0.5
    assert stats.memory_bytes > 0
    assert stats.disk_bytes > 0
    assert stats.rx_bytes > 0 and stats.tx_bytes > 0


def test_exec_returns_output_and_exit_code(platform, spec) -> None:
    # Given a running instance with its own env
    info = platform.create_instance(spec(env={"GREETING": "hello"}))

    # When a command runs in it
    result = platform.exec(info.name, ["sh", "-c", 'echo "$GREETING"; pwd; echo oops >&2; exit 3'])

    # Then its output, working directory (the instance's data/) and exit code come back
    assert result.exit_code == 3
    assert result.stdout.splitlines() == ["hello", str(platform.state_dir / info.name / "data")]
    assert result.stderr == "oops\n"


def test_exec_in_a_missing_instance_is_not_found(platform) -> None:
    # Given no instance / When a command runs / Then NotFoundError
    with pytest.raises(NotFoundError):
        platform.exec("ut-missing", ["true"])


def test_stop_then_start(platform, spec) -> None:
    # Given a running instance
    info = platform.create_instance(spec())
    assert get(info.endpoint or "", "/health")[0] == 200

    # When it is stopped (twice: stopping is idempotent)
    platform.stop_instance(info.name)
    platform.stop_instance(info.name)

    # Then it no longer answers, is listed as stopped, and reads zero CPU and memory
    with pytest.raises(OSError):
        get(info.endpoint or "", "/health", timeout=1)
    assert [i.status for i in platform.list_instances()] == ["stopped"]
    stopped = platform.stats(info.name)
    assert (stopped.cpu_seconds, stopped.memory_bytes) == (0.0, 0)

    # When it is started again
    started = platform.start_instance(info.name)

    # Then it answers again, and starting once more returns it as it is
    assert started.status == "running"
    assert get(started.endpoint or "", "/health")[0] == 200
    assert platform.start_instance(info.name).provider_id == started.provider_id


def test_start_of_a_missing_instance_is_not_found(platform) -> None:
    # Given no spec / When started / Then NotFoundError; stopping it is a no-op
    with pytest.raises(NotFoundError):
        platform.start_instance("ut-missing")
    platform.stop_instance("ut-missing")


def test_destroy_removes_process_dir_and_cgroups(platform, spec, state_dir) -> None:
    # Given a running instance with limits
    info = platform.create_instance(spec(limits=Limits(cpu_cores=1, memory_mb=256)))
    pid = int(info.provider_id or 0)

    # When it is destroyed, twice
    platform.destroy_instance(info.name)
    platform.destroy_instance(info.name)

    # Then the process, its folder, its lock and its cgroups are gone
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert instance_processes(state_dir, info.name) == []
    assert not (state_dir / info.name).exists()
    assert not (state_dir / f"{info.name}.lock").exists()
    assert [path for path in cgroup_dirs(info.name) if path.exists()] == []
    assert platform.list_instances() == []


def test_an_image_that_exits_is_a_permanent_error(platform, spec) -> None:
    # Given an image that exits at once
    wanted = spec(image="/bin/false")

    # When it is created / Then PermanentError, and nothing is left running
    with pytest.raises(PermanentError, match="exited before listening"):
        platform.create_instance(wanted)
    assert instance_processes(platform.state_dir, wanted.name) == []


def test_an_unhealthy_instance_answers_503(platform, spec) -> None:
    # Given an image that runs the server in unhealthy mode
    wanted = spec(image="{python} -m plugins.platforms.instance_server --unhealthy")

    # When it is created and probed
    info = platform.create_instance(wanted)
    status, body = get(info.endpoint or "", "/health")

    # Then it runs but answers 503
    assert info.status == "running"
    assert status == 503
    assert json.loads(body)["status"] == "unhealthy"


@pytest.mark.parametrize("name", ["Upper", "-dash", "under_score", "a/b", "", "a" * 101])
def test_a_bad_name_is_a_permanent_error(platform, spec, name) -> None:
    # Given a name that is not a lowercase slug / When created / Then PermanentError
    with pytest.raises(PermanentError, match="invalid instance name"):
        platform.create_instance(spec(name=name))
    with pytest.raises(PermanentError):
        platform.destroy_instance(name)


def test_without_cgroups_memory_falls_back_to_rlimit(monkeypatch, spec, state_dir) -> None:
    # Given a host where no cgroup hierarchy is mounted
    from plugins.platforms import local

    monkeypatch.setattr(local, "CGROUP_ROOT", state_dir.parent / "no-cgroups")
    platform = LocalPlatform(state_dir=state_dir)
    wanted = spec(limits=Limits(cpu_cores=1, memory_mb=512))
    try:
        # When an instance is created and its memory limit raised
        info = platform.create_instance(wanted)
        soft, _hard = psutil.Process(int(info.provider_id or 0)).rlimit(psutil.RLIMIT_AS)
        raised = platform.set_limits(wanted.name, Limits(memory_mb=1024))
        raised_soft, _ = psutil.Process(int(info.provider_id or 0)).rlimit(psutil.RLIMIT_AS)

        # Then memory is an address-space rlimit, CPU is unenforced, and the record says so
        assert info.limits_applied == {
            "cpu_cores": "unenforced",
            "memory_mb": 512,
            "storage": None,
            "method": "rlimit",
        }
        assert soft == 512 * 1024 * 1024
        assert raised.limits_applied["memory_mb"] == 1024
        assert raised_soft == 1024 * 1024 * 1024
        assert get(info.endpoint or "", "/health")[0] == 200
    finally:
        platform.destroy_instance(wanted.name)
