"""The ``local`` platform: each instance is a detached process on this host, limited by cgroups.

The process table is the source of truth. Every instance process carries two
environment variables, ``CUL8ER_INSTANCE`` and ``CUL8ER_INSTANCE_STATE``, so a
restarted worker finds it again, and a process spawned by a worker that was
killed before it recorded anything is adopted rather than started twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Final

import structlog
from pydantic import ValidationError

from plugins.platforms._cgroups import CFS_PERIOD_US, Cgroups
from schemas.platform import ExecResult, InstanceInfo, InstanceSpec, InstanceStats, Limits
from workers.plugin_api import NotFoundError, PermanentError, TransientError, wait_until

# psutil and urllib are imported by the methods that use them: loading the plugin (every
# worker does, at boot) need not pay for them before the first instance call.
if TYPE_CHECKING:
    import urllib.request
    from collections.abc import Iterator

    import psutil

    from workers.plugin_api import PluginContext, Settings

__all__ = ["LocalPlatform"]

log = structlog.get_logger(__name__)

#: Valid instance names; they are also file and cgroup names.
NAME_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")
#: Environment variable naming the instance in its process.
INSTANCE_ENV: Final = "CUL8ER_INSTANCE"
#: Environment variable naming the state dir that owns the instance process.
STATE_ENV: Final = "CUL8ER_INSTANCE_STATE"
#: Variables copied from the worker's environment into an instance's.
PASSTHROUGH_ENV: Final = ("PATH", "HOME", "LANG", "PYTHONPATH")
#: The address instances listen on.
HOST: Final = "127.0.0.1"
#: Where cgroup hierarchies are mounted.
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
#: The smallest CFS quota the kernel accepts (microseconds).
MIN_CFS_QUOTA_US: Final = 1_000
#: How long a stop waits after SIGTERM before SIGKILL (seconds).
STOP_GRACE_SECONDS: Final = 5.0
#: How often waits poll (seconds).
POLL_SECONDS: Final = 0.05
#: How long a stats call waits for an instance's ``/metrics`` (seconds).
METRICS_TIMEOUT: Final = 1.0
#: Lines of ``instance.log`` quoted when an instance dies while starting.
LOG_TAIL_LINES: Final = 20
#: The folder that holds the ``plugins`` package: the instances' working directory.
PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]

#: Processes this worker spawned, kept so they can be reaped instead of lingering as zombies.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@functools.cache
def _direct() -> urllib.request.OpenerDirector:
    """An opener that never sends loopback requests through an HTTP proxy (made on first use)."""
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise PermanentError(f"invalid instance name {name!r}: must match {NAME_PATTERN.pattern}")


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is this process's child; others are not ours to reap."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs; a zombie does not."""
    import psutil

    _reap(proc.pid)
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _all_dead(procs: list[psutil.Process]) -> bool:
    """Whether none of ``procs`` runs any more."""
    return not any(_alive(proc) for proc in procs)


def _try_lock(path: Path) -> BinaryIO | None:
    """The lock file at ``path``, open and exclusively locked; ``None`` while another holds it.

    A holder may delete the file before letting go: a lock on a file no longer at ``path``
    guards nothing, so it is dropped as well, and the caller tries again.
    """
    lock = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "rb", buffering=0)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        current = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
    except (BlockingIOError, FileNotFoundError):
        current = False
    except BaseException:
        lock.close()
        raise
    if current:
        return lock
    lock.close()
    return None


def _write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON through a temporary file, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _disk_bytes(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for file in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, file)).st_size
    return total


class LocalPlatform:
    """Instances as detached processes on this host, under cgroup limits where writable."""

    name: ClassVar[str] = "local"

    def __init__(self, *, state_dir: Path, start_timeout: float = 20.0) -> None:
        # The path is part of every instance's environment marker, so pin it once.
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.start_timeout = start_timeout
        self._cgroups = Cgroups(CGROUP_ROOT)

    @classmethod
    def from_plugin(cls, _config: None, context: PluginContext) -> LocalPlatform:
        """The plugin factory: the platform for cul8er's settings."""
        return cls.from_settings(context.settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalPlatform:
        """The platform for these settings: instances under ``data_dir/instances``."""
        return cls(
            state_dir=settings.data_dir / "instances",
            start_timeout=settings.instance_start_timeout,
        )

    # -- the Platform contract ------------------------------------------------------------

    def create_instance(self, spec: InstanceSpec) -> InstanceInfo:
        """Create and start ``spec.name``; an existing instance of that name is returned."""
        _check_name(spec.name)
        with self._locked(spec.name):
            proc = self._find(spec.name)
            stored = self._read_spec(spec.name)
            if proc is not None:
                spec = stored or spec
                pid = self._adopt(spec, proc, write_spec=stored is None)
                event = "instance_found"
            else:
                self._instance_dir(spec.name).mkdir(parents=True, exist_ok=True)
                spec_path = self._instance_dir(spec.name) / "spec.json"
                _write_json(spec_path, spec.model_dump(mode="json"))
                pid = self._spawn(spec)
                event = "instance_created"
        # The boot is awaited outside the lock: a creator frozen while its instance boots
        # must not hold up the worker that takes its step over (it adopts the process).
        self._wait_port(spec.name, pid)
        log.info(event, instance=spec.name, pid=pid, tenant_id=spec.tenant_id)
        return self._info(spec, pid)

    def destroy_instance(self, name: str) -> None:
        """Kill the instance and remove its cgroups, folder and lock; a missing one is success."""
        _check_name(name)
        with self._locked(name) as lock_path:
            killed = self._kill(name, grace=0.0)
            self._cgroups.remove(name)
            shutil.rmtree(self._instance_dir(name), ignore_errors=True)
            # Unlinked while held: waiters on the old file notice and take the new one.
            lock_path.unlink(missing_ok=True)
        log.info("instance_destroyed", instance=name, killed=killed)

    def start_instance(self, name: str) -> InstanceInfo:
        """Start a stopped instance from its ``spec.json``; a running one is returned as it is."""
        _check_name(name)
        with self._locked(name):
            spec = self._require_spec(name)
            proc = self._find(name)
            if proc is not None:
                pid = self._adopt(spec, proc, write_spec=False)
                event = "instance_found"
            else:
                pid = self._spawn(spec)
                event = "instance_started"
        self._wait_port(name, pid)
        log.info(event, instance=name, pid=pid)
        return self._info(spec, pid)

    def stop_instance(self, name: str) -> None:
        """SIGTERM the instance's process group, SIGKILL after a grace; data is kept."""
        _check_name(name)
        with self._locked(name):
            killed = self._kill(name, grace=STOP_GRACE_SECONDS)
        if killed:
            log.info("instance_stopped", instance=name, processes=killed)

    def exec(self, name: str, command: list[str], *, timeout: float = 30.0) -> ExecResult:
        """Run ``command`` in the instance's ``data/`` folder, environment and cgroups."""
        _check_name(name)
        spec = self._require_spec(name)
        if not command:
            raise PermanentError("exec needs a command")
        data = self._instance_dir(name) / "data"
        data.mkdir(parents=True, exist_ok=True)
        argv = self._wrap(name, list(command), memory_mb=spec.limits.memory_mb)
        try:
            done = subprocess.run(
                argv,
                cwd=data,
                env=self._env(spec, instance=False),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TransientError(f"exec in {name} timed out after {timeout}s") from exc
        except OSError as exc:
            raise PermanentError(f"cannot exec {command[0]!r} in {name}: {exc}") from exc
        log.info("instance_exec", instance=name, command=command[0], exit_code=done.returncode)
        return ExecResult(exit_code=done.returncode, stdout=done.stdout, stderr=done.stderr)

    def stats(self, name: str) -> InstanceStats:
        """CPU seconds and RSS of the process tree, bytes on disk, and the service's traffic."""
        _check_name(name)
        self._require_spec(name)
        proc = self._find(name)
        cpu_seconds, memory_bytes, rx_bytes, tx_bytes = 0.0, 0, 0, 0
        if proc is not None:
            cpu_seconds, memory_bytes = self._usage(proc)
            port = self._read_port(name)
            if port is not None:
                rx_bytes, tx_bytes = self._traffic(name, port)
        return InstanceStats(
            cpu_seconds=cpu_seconds,
            memory_bytes=memory_bytes,
            disk_bytes=_disk_bytes(self._instance_dir(name)),
            rx_bytes=rx_bytes,
            tx_bytes=tx_bytes,
        )

    def set_limits(self, name: str, limits: Limits) -> InstanceInfo:
        """Change a running instance's cgroup limits in place; a stopped one only records them."""
        _check_name(name)
        with self._locked(name):
            spec = self._require_spec(name).model_copy(update={"limits": limits})
            proc = self._find(name)
            if proc is not None:
                self._enforce(name, limits, proc.pid)
            directory = self._instance_dir(name)
            _write_json(directory / "spec.json", spec.model_dump(mode="json"))
            _write_json(directory / "limits.json", self._plan(limits))
            log.info(
                "instance_limits_set",
                instance=name,
                running=proc is not None,
                **limits.model_dump(),
            )
            return self._info(spec, proc.pid if proc else None)

    def list_instances(self, tenant_id: str | None = None) -> list[InstanceInfo]:
        """Every instance folder with a ``spec.json``, optionally only one tenant's."""
        if not self.state_dir.is_dir():
            return []
        found = self._scan()
        infos = []
        for directory in sorted(self.state_dir.iterdir()):
            if not directory.is_dir() or not NAME_PATTERN.fullmatch(directory.name):
                continue
            spec = self._read_spec(directory.name)
            if spec is None or (tenant_id is not None and spec.tenant_id != tenant_id):
                continue
            proc = self._leader(found.get(directory.name, []))
            infos.append(self._info(spec, proc.pid if proc else None))
        return infos

    # -- processes ------------------------------------------------------------------------

    def _scan(self, name: str | None = None) -> dict[str, list[psutil.Process]]:
        """Live instance processes of this state dir, by instance name."""
        import psutil

        state = str(self.state_dir)
        found: dict[str, list[psutil.Process]] = {}
        # A crashed child's environment can no longer be read, so the scan below
        # would never see it: reap our own exited children first.
        for pid in list(_CHILDREN):
            _reap(pid)
        for proc in psutil.process_iter(["environ", "status"]):
            env = proc.info.get("environ") or {}
            instance = env.get(INSTANCE_ENV)
            if env.get(STATE_ENV) != state or instance is None:
                continue
            if name is not None and instance != name:
                continue
            if proc.info.get("status") == psutil.STATUS_ZOMBIE:
                _reap(proc.pid)
                continue
            found.setdefault(instance, []).append(proc)
        return found

    @staticmethod
    def _leader(procs: list[psutil.Process]) -> psutil.Process | None:
        """The instance's main process: its session leader, else the oldest."""
        for proc in procs:
            with contextlib.suppress(OSError):
                if os.getsid(proc.pid) == proc.pid:
                    return proc
        live = [proc for proc in procs if _alive(proc)]
        return min(live, key=lambda proc: proc.create_time()) if live else None

    def _find(self, name: str) -> psutil.Process | None:
        return self._leader(self._scan(name).get(name, []))

    def _spawn(self, spec: InstanceSpec) -> int:
        """Start the instance process under its limits; the caller waits until it listens."""
        directory = self._instance_dir(spec.name)
        (directory / "data").mkdir(parents=True, exist_ok=True)
        (directory / "port").unlink(missing_ok=True)
        self._enforce(spec.name, spec.limits, None)
        argv = self._wrap(
            spec.name,
            [*self._command(spec), "--name", spec.name, "--dir", str(directory), "--port", "0"],
        )
        with (directory / "instance.log").open("ab") as output:
            try:
                child = subprocess.Popen(
                    argv,
                    cwd=PROJECT_ROOT,
                    env=self._env(spec, instance=True),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise PermanentError(f"cannot start instance {spec.name}: {exc}") from exc
        _CHILDREN[child.pid] = child
        self._enforce(spec.name, spec.limits, child.pid)
        _write_json(directory / "limits.json", self._plan(spec.limits))
        log.info("instance_spawned", instance=spec.name, pid=child.pid, argv=argv)
        return child.pid

    def _adopt(self, spec: InstanceSpec, proc: psutil.Process, *, write_spec: bool) -> int:
        """Take over a live instance, finishing what a killed worker left undone; its pid."""
        directory = self._instance_dir(spec.name)
        directory.mkdir(parents=True, exist_ok=True)
        if write_spec:
            _write_json(directory / "spec.json", spec.model_dump(mode="json"))
        if not (directory / "limits.json").exists():
            self._enforce(spec.name, spec.limits, proc.pid)
            _write_json(directory / "limits.json", self._plan(spec.limits))
        return int(proc.pid)

    def _wait_port(self, name: str, pid: int) -> int:
        """The port the instance wrote; it may be booting still, or die trying."""
        import psutil

        # Kept before polling: reaping drops the child from _CHILDREN, with its exit code.
        child = _CHILDREN.get(pid)
        try:
            proc: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:
            proc = None

        def listening() -> int | None:
            port = self._read_port(name)
            if port is None and (proc is None or not _alive(proc)):
                code = child.returncode if child is not None else None
                raise PermanentError(
                    f"instance {name} exited before listening (exit code {code}): "
                    f"{self._log_tail(name)}"
                )
            return port

        port = wait_until(
            listening,
            timeout=self.start_timeout,
            interval=POLL_SECONDS,
            message=f"instance {name} did not listen",
            error=TransientError,
        )
        return port

    def _kill(self, name: str, *, grace: float) -> int:
        """Stop every process of the instance: SIGTERM, then SIGKILL after ``grace`` seconds."""
        procs = self._scan(name).get(name, [])
        if not procs:
            return 0
        if grace > 0:
            self._signal(procs, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):  # still alive: the SIGKILL below
                wait_until(
                    functools.partial(_all_dead, procs), timeout=grace, interval=POLL_SECONDS
                )
        self._signal([proc for proc in procs if _alive(proc)], signal.SIGKILL)
        wait_until(
            functools.partial(_all_dead, procs),
            timeout=STOP_GRACE_SECONDS,
            interval=POLL_SECONDS,
            message=f"instance {name} did not die after SIGKILL",
            error=TransientError,
        )
        return len(procs)

    @staticmethod
    def _signal(procs: list[psutil.Process], signum: signal.Signals) -> None:
        own_group = os.getpgrp()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(proc.pid)
                # Never signal our own group: only instances get a session of their own.
                if group == proc.pid and group != own_group:
                    os.killpg(group, signum)
                else:
                    os.kill(proc.pid, signum)

    @staticmethod
    def _usage(proc: psutil.Process) -> tuple[float, int]:
        """CPU seconds (with reaped children) and RSS bytes of the process tree."""
        import psutil

        cpu_seconds, rss = 0.0, 0
        try:
            times = proc.cpu_times()
            cpu_seconds = times.user + times.system + times.children_user + times.children_system
            rss = proc.memory_info().rss
            children = proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0, 0
        for child in children:
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                cpu_seconds += times.user + times.system
                rss += child.memory_info().rss
        return cpu_seconds, rss

    @staticmethod
    def _traffic(name: str, port: int) -> tuple[int, int]:
        """Bytes in and out as the instance's ``/metrics`` counts them; 0 if it won't say."""
        import http.client

        url = f"http://{HOST}:{port}/metrics"
        try:
            with _direct().open(url, timeout=METRICS_TIMEOUT) as response:
                data = json.load(response)
            return int(data.get("rx_bytes", 0)), int(data.get("tx_bytes", 0))
        except (OSError, ValueError, AttributeError, http.client.HTTPException) as exc:
            log.debug("instance_metrics_unreachable", instance=name, port=port, error=str(exc))
            return 0, 0

    # -- limits ---------------------------------------------------------------------------

    def _plan(self, limits: Limits) -> dict[str, float | int | str | None]:
        """What ``limits`` amount to on this host (``None`` is unlimited)."""
        host_cores = float(os.cpu_count() or 1)
        cores = None if limits.cpu_cores is None else min(limits.cpu_cores, host_cores)
        storage = None if limits.storage_gb is None else "unenforced"
        method = self._cgroups.mode
        if method == "none":
            return {
                "cpu_cores": None if cores is None else "unenforced",
                "memory_mb": limits.memory_mb,
                "storage": storage,
                "method": "rlimit",
            }
        return {
            "cpu_cores": cores,
            "memory_mb": limits.memory_mb,
            "storage": storage,
            "method": method,
        }

    def _enforce(self, name: str, limits: Limits, pid: int | None) -> None:
        """Write the limits to the cgroups (and move ``pid`` in), or set RLIMIT_AS on ``pid``."""
        import psutil

        memory_bytes = None if limits.memory_mb is None else limits.memory_mb * 1024 * 1024
        try:
            if self._cgroups.mode != "none":
                cores = self._plan(limits)["cpu_cores"]
                quota = None
                if cores is not None:
                    quota = max(MIN_CFS_QUOTA_US, int(float(cores) * CFS_PERIOD_US))
                self._cgroups.apply(name, cpu_quota_us=quota, memory_bytes=memory_bytes)
                if pid is not None:
                    self._cgroups.join(name, pid)
            elif pid is not None:
                value = resource.RLIM_INFINITY if memory_bytes is None else memory_bytes
                process = psutil.Process(pid)
                # Only the soft limit: raising a hard limit again would need CAP_SYS_RESOURCE.
                _soft, hard = process.rlimit(resource.RLIMIT_AS)
                if hard != resource.RLIM_INFINITY:
                    value = min(value, hard) if value != resource.RLIM_INFINITY else hard
                process.rlimit(resource.RLIMIT_AS, (value, hard))
        except psutil.NoSuchProcess:
            log.info("instance_exited_before_limits", instance=name, pid=pid)
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.EINVAL, errno.EPERM):
                raise PermanentError(f"cannot apply limits {limits} to {name}: {exc}") from exc
            raise TransientError(f"cannot apply limits to {name}: {exc}") from exc
        except psutil.AccessDenied as exc:
            raise PermanentError(f"cannot apply limits {limits} to {name}: {exc}") from exc

    # -- files and commands ---------------------------------------------------------------

    def _instance_dir(self, name: str) -> Path:
        return self.state_dir / name

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Hold the instance's exclusive lock; the kernel drops it if we are killed."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / f"{name}.lock"
        lock = wait_until(
            functools.partial(_try_lock, path),
            # A create holds the lock while the instance boots, so wait longer than that.
            timeout=self.start_timeout + 2 * STOP_GRACE_SECONDS + 30,
            interval=POLL_SECONDS,
            message=f"instance {name} is busy (locked)",
            error=TransientError,
        )
        with lock:
            yield path

    def _read_spec(self, name: str) -> InstanceSpec | None:
        path = self._instance_dir(name) / "spec.json"
        try:
            return InstanceSpec.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
        except ValidationError as exc:
            raise PermanentError(f"corrupt {path}: {exc}") from exc

    def _require_spec(self, name: str) -> InstanceSpec:
        spec = self._read_spec(name)
        if spec is None:
            raise NotFoundError(f"no local instance named {name!r}")
        return spec

    def _read_port(self, name: str) -> int | None:
        try:
            return int((self._instance_dir(name) / "port").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _log_tail(self, name: str) -> str:
        try:
            with (self._instance_dir(name) / "instance.log").open("rb") as file:
                file.seek(0, os.SEEK_END)
                file.seek(max(0, file.tell() - 8192))
                text = file.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no instance.log)"
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:]) or "(instance.log is empty)"

    @staticmethod
    def _command(spec: InstanceSpec) -> list[str]:
        if spec.image is None:
            return [sys.executable, "-m", "plugins.platforms.instance_server"]
        argv = shlex.split(spec.image.replace("{python}", sys.executable))
        if not argv:
            raise PermanentError(f"instance {spec.name} has an empty image command")
        return argv

    def _env(self, spec: InstanceSpec, *, instance: bool) -> dict[str, str]:
        """The instance's environment; only the instance process itself gets the state marker."""
        env = {key: os.environ[key] for key in PASSTHROUGH_ENV if key in os.environ}
        env.update(spec.env)
        env[INSTANCE_ENV] = spec.name
        if instance:
            env[STATE_ENV] = str(self.state_dir)
        else:
            # An exec'd command must not look like the instance to the process scan.
            env.pop(STATE_ENV, None)
        return env

    def _wrap(self, name: str, argv: list[str], *, memory_mb: int | None = None) -> list[str]:
        """Prefix ``argv`` with a shell that joins the instance's cgroups, then execs it."""
        files = self._cgroups.procs_files(name)
        steps = [f"{{ echo $$ > {shlex.quote(str(file))}; }} 2>/dev/null" for file in files]
        if not files and memory_mb is not None:
            steps.append(f"ulimit -S -v {memory_mb * 1024} 2>/dev/null")
        if not steps:
            return argv
        return ["/bin/sh", "-c", "; ".join([*steps, 'exec "$@"']), "sh", *argv]

    def _info(self, spec: InstanceSpec, pid: int | None) -> InstanceInfo:
        port = self._read_port(spec.name) if pid is not None else None
        try:
            applied = json.loads((self._instance_dir(spec.name) / "limits.json").read_text())
        except (FileNotFoundError, ValueError):
            applied = {}
        return InstanceInfo(
            name=spec.name,
            tenant_id=spec.tenant_id,
            platform=self.name,
            status="running" if pid is not None else "stopped",
            endpoint=f"{HOST}:{port}" if port is not None else None,
            provider_id=str(pid) if pid is not None else None,
            limits_requested=spec.limits,
            limits_applied=applied,
            labels=spec.labels,
        )
