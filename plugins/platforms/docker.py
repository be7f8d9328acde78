"""The ``docker`` platform: each instance is a container on a Docker engine.

The engine is the source of truth. Every container carries the labels
``cul8er.managed=true``, ``cul8er.tenant``, ``cul8er.role`` and ``cul8er.ordinal``,
plus the limits it was created with, so any worker can find and describe it again.
Every engine call goes through :meth:`DockerPlatform._call`, which retries what may
pass (engine down, 5xx) and converts the SDK's errors into ours.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

import structlog
from pydantic import ValidationError

from plugins.platforms.docker_cgroups import HostCgroups
from schemas.platform import ExecResult, InstanceInfo, InstanceSpec, InstanceStats, Limits
from workers.plugin_api import (
    ConflictError,
    NotFoundError,
    PermanentError,
    TransientError,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import docker
    from tenacity import RetryCallState

    from workers.plugin_api import PluginContext, Settings

__all__ = ["DockerPlatform"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: The label every container cul8er manages carries (value ``true``).
MANAGED_LABEL: Final = "cul8er.managed"
#: The labels naming an instance's tenant, role and ordinal.
TENANT_LABEL: Final = "cul8er.tenant"
ROLE_LABEL: Final = "cul8er.role"
ORDINAL_LABEL: Final = "cul8er.ordinal"
#: The port the service listens on inside the container.
PORT_LABEL: Final = "cul8er.port"
#: The limits requested at creation (JSON), to tell requested from applied later.
LIMITS_LABEL: Final = "cul8er.limits"
#: Where published ports listen on the host: loopback only.
HOST: Final = "127.0.0.1"
#: One CPU in the engine's NanoCpus unit.
NANO: Final = 1_000_000_000
#: The smallest CPU quota the engine accepts (0.01 CPU).
MIN_NANO_CPUS: Final = 10_000_000
MIB: Final = 1024 * 1024
#: How long a stop waits after SIGTERM before the engine kills (seconds).
STOP_TIMEOUT_SECONDS: Final = 5
#: How often waits poll (seconds).
POLL_SECONDS: Final = 0.1
#: Lines of the container log quoted when a container fails to come up.
LOG_TAIL_LINES: Final = 20
#: Engine connections kept open for calls at once (metering reads a chunk's stats at once).
MAX_POOL_SIZE: Final = 32


def _errors_not_retried() -> tuple[type[Exception], ...]:
    """SDK errors about our own arguments: retrying cannot help."""
    import docker.errors

    return (
        docker.errors.InvalidArgument,
        docker.errors.InvalidRepository,
        docker.errors.InvalidConfigFile,
    )


#: The first retry waits about this long (seconds), doubling up to RETRY_MAX_WAIT.
RETRY_FIRST_WAIT: Final = 0.2
RETRY_MAX_WAIT: Final = 2.0


class _EngineUnavailableError(Exception):
    """Internal: an engine call failed in a way that may pass; tenacity retries it."""


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    log.warning("docker_engine_retry", attempt=state.attempt_number, error=str(error))


class DockerPlatform:
    """Instances as containers on a Docker engine, with live-updatable CPU and memory limits."""

    name: ClassVar[str] = "docker"

    def __init__(
        self,
        *,
        base_url: str | None,
        image: str,
        port: int = 8080,
        attempts: int = 3,
        timeout: float = 30.0,
        read_cgroups: bool = True,
    ) -> None:
        self.base_url = base_url
        self.image = image
        self.port = port
        self.attempts = max(1, attempts)
        self.timeout = timeout
        self._client_lock = threading.Lock()
        self._client_obj: docker.DockerClient | None = None
        self._host_cpus: int | None = None
        self._host_memory: int | None = None
        #: Where counters are read from when the engine runs on this host (``None``: the
        #: engine's ``stats`` only).
        self._host_cgroups = HostCgroups() if read_cgroups else None

    @classmethod
    def from_plugin(cls, _config: None, context: PluginContext) -> DockerPlatform:
        """The plugin factory: the platform for cul8er's settings."""
        return cls.from_settings(context.settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerPlatform:
        """The platform for these settings: ``docker_host`` (else DOCKER_HOST), ``docker_image``."""
        return cls(
            base_url=settings.docker_host,
            image=settings.docker_image,
            port=settings.instance_port,
            attempts=settings.engine_attempts,
            timeout=settings.engine_timeout,
        )

    # -- the Platform contract ------------------------------------------------------------

    def create_instance(self, spec: InstanceSpec) -> InstanceInfo:
        """Create and start container ``spec.name``; an existing one is returned (started)."""
        container = self._find(spec.name)
        if container is None:
            container = self._create(spec)
        else:
            self._check_managed(container)
            log.info("instance_found", instance=spec.name, container_id=container.id)
        return self._ensure_running(container)

    def destroy_instance(self, name: str) -> None:
        """Remove the container and its anonymous volumes; a missing one is success."""
        wait_until(
            lambda: self._remove(name),
            timeout=self.timeout,
            interval=POLL_SECONDS,
            message=f"cannot remove container {name}: another removal is still in progress",
            error=ConflictError,
        )
        log.info("instance_destroyed", instance=name)

    def start_instance(self, name: str) -> InstanceInfo:
        """Start a stopped container; a running one is returned as it is."""
        container = self._get(name)
        self._check_managed(container)
        return self._ensure_running(container)

    def stop_instance(self, name: str) -> None:
        """Stop the container (SIGTERM, then SIGKILL after 5 s); stopped or missing is success."""
        try:
            self._call(
                "stop container",
                lambda client: client.api.stop(name, timeout=STOP_TIMEOUT_SECONDS),
                subject=name,
            )
        except NotFoundError:
            return
        log.info("instance_stopped", instance=name)

    def exec(self, name: str, command: list[str], *, timeout: float = 30.0) -> ExecResult:
        """Run ``command`` in the running container; stdout and stderr are kept apart.

        Raises ``TransientError`` if it takes longer than ``timeout``; the command may
        then still be running inside the container.
        """
        if not command:
            raise PermanentError("exec needs a command")
        container = self._get(name)
        exec_id = str(
            self._call(
                "create exec",
                lambda client: client.api.exec_create(
                    container.id, list(command), stdout=True, stderr=True
                )["Id"],
                subject=name,
            )
        )
        stdout, stderr = self._run_exec(name, exec_id, timeout)
        exit_code = self._exit_code(name, exec_id)
        log.info("instance_exec", instance=name, command=command[0], exit_code=exit_code)
        return ExecResult(
            exit_code=exit_code,
            stdout=stdout.decode(errors="replace"),
            stderr=stderr.decode(errors="replace"),
        )

    def stats(self, name: str) -> InstanceStats:
        """CPU seconds, memory without page cache, writable-layer bytes and network bytes.

        One inspect gives the container's id, main process and writable-layer size; the
        counters come from this host's cgroup files when the engine runs here, else from
        the engine's ``stats`` (which waits for its collector's next sample).
        """
        attrs = self._inspect_size(name)
        container_id = str(attrs.get("Id") or "")
        state = attrs.get("State") or {}
        local = (
            self._host_cgroups.read(container_id, int(state.get("Pid") or 0))
            if state.get("Running") and self._host_cgroups is not None
            else None
        )
        if local is None:
            return self._engine_stats(name, container_id, attrs.get("SizeRw"))
        return InstanceStats(
            cpu_seconds=local.cpu_ns / NANO,
            memory_bytes=local.memory_bytes,
            disk_bytes=self._disk_bytes(name, attrs.get("SizeRw")),
            rx_bytes=local.rx_bytes,
            tx_bytes=local.tx_bytes,
        )

    def _engine_stats(self, name: str, container_id: str, size_rw: Any) -> InstanceStats:
        """:meth:`stats` as the engine reports them (one sample, without the pre-sample)."""
        raw: dict[str, Any] = self._call(
            "read stats",
            lambda client: client.api.stats(container_id, stream=False, one_shot=True),
            subject=name,
        )
        cpu_usage = (raw.get("cpu_stats") or {}).get("cpu_usage") or {}
        memory = raw.get("memory_stats") or {}
        details = memory.get("stats") or {}
        # The page cache is reclaimable: cgroup v1 calls it "cache", v2 "inactive_file".
        cache = details.get("cache", details.get("inactive_file", 0))
        memory_bytes = max(0, int(memory.get("usage", 0)) - int(cache))
        networks = raw.get("networks") or {}
        return InstanceStats(
            cpu_seconds=int(cpu_usage.get("total_usage", 0)) / NANO,
            memory_bytes=memory_bytes,
            disk_bytes=self._disk_bytes(name, size_rw),
            rx_bytes=sum(int(net.get("rx_bytes", 0)) for net in networks.values()),
            tx_bytes=sum(int(net.get("tx_bytes", 0)) for net in networks.values()),
        )

    def set_limits(self, name: str, limits: Limits) -> InstanceInfo:
        """Change the container's CPU and memory limits in place, without a restart."""
        container = self._get(name)
        self._check_managed(container)
        host = container.attrs.get("HostConfig") or {}
        plan = self._plan(limits)
        memory = plan["memory_bytes"]
        if memory is None and host.get("Memory"):
            # The engine cannot lift a memory limit live: the host's memory is as good.
            memory = self._memory_total()
        if memory is not None and memory != host.get("Memory"):
            # Both at once, and equal: the engine checks memory <= memory+swap on the new
            # values, so raising above the old swap limit and lowering both work alike.
            self._call(
                "update memory",
                lambda client: client.api.update_container(
                    container.id, mem_limit=memory, memswap_limit=memory
                ),
                subject=name,
            )
        nano_cpus = plan["nano_cpus"]
        if nano_cpus is None and host.get("NanoCpus"):
            # NanoCpus=0 means "unchanged" to the engine; all host cores means no cap.
            nano_cpus = self._cpu_count() * NANO
        if nano_cpus is not None and nano_cpus != host.get("NanoCpus"):
            # docker-py's update() has no nano_cpus, and cpu_quota conflicts with NanoCpus.
            self._call(
                "update cpu",
                lambda client: self._post_update(client, container.id, {"NanoCpus": nano_cpus}),
                subject=name,
            )
        container = self._get(name)
        info = self._info(container, requested=limits)
        log.info(
            "instance_limits_set",
            instance=name,
            applied=info.limits_applied,
            **limits.model_dump(),
        )
        return info

    def list_instances(self, tenant_id: str | None = None) -> list[InstanceInfo]:
        """Every container labelled ``cul8er.managed=true``, optionally only one tenant's."""
        labels = [f"{MANAGED_LABEL}=true"]
        if tenant_id is not None:
            labels.append(f"{TENANT_LABEL}={tenant_id}")
        containers: list[Any] = self._call(
            "list containers",
            lambda client: client.containers.list(
                all=True, filters={"label": labels}, ignore_removed=True
            ),
        )
        infos = [self._info(container) for container in containers]
        return sorted(infos, key=lambda info: info.name)

    # -- engine calls ---------------------------------------------------------------------

    def _client(self) -> docker.DockerClient:
        """The engine client, created on first use (creating it asks the engine's version)."""
        # The SDK is imported on first use, not with the module: it is most of the plugin's
        # load time, and a worker that never talks to Docker need not pay it.
        import docker

        with self._client_lock:
            if self._client_obj is None:
                if self.base_url is None:
                    self._client_obj = docker.from_env(
                        timeout=self.timeout, max_pool_size=MAX_POOL_SIZE
                    )
                else:
                    self._client_obj = docker.DockerClient(
                        base_url=self.base_url, timeout=self.timeout, max_pool_size=MAX_POOL_SIZE
                    )
            return self._client_obj

    def _call(
        self,
        what: str,
        call: Callable[[docker.DockerClient], T],
        *,
        subject: str | None = None,
        attempts: int | None = None,
    ) -> T:
        """Run one engine call, retrying what may pass, and convert its errors into ours.

        ``NotFound`` becomes ``NotFoundError``, a missing image or another 4xx a
        ``PermanentError`` (409 a ``ConflictError``); lost connections, timeouts and 5xx
        are retried, then become ``TransientError``.
        """
        import docker.errors
        import requests.exceptions
        from tenacity import (
            Retrying,
            retry_if_exception_type,
            stop_after_attempt,
            wait_exponential_jitter,
        )

        about = f"{what} {subject}" if subject else what
        not_retried = _errors_not_retried()

        def attempt() -> T:
            try:
                return call(self._client())
            except docker.errors.ImageNotFound as exc:
                raise PermanentError(f"cannot {about}: {exc.explanation or exc}") from exc
            except docker.errors.NotFound as exc:
                raise NotFoundError(f"cannot {about}: {exc.explanation or exc}") from exc
            except docker.errors.APIError as exc:
                if exc.is_server_error() or exc.response is None:
                    raise _EngineUnavailableError(f"{about}: {exc}") from exc
                if exc.status_code == 409:
                    raise ConflictError(f"cannot {about}: {exc.explanation or exc}") from exc
                raise PermanentError(f"cannot {about}: {exc.explanation or exc}") from exc
            except not_retried as exc:
                raise PermanentError(f"cannot {about}: {exc}") from exc
            except (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                docker.errors.DockerException,
                OSError,
            ) as exc:
                # DockerException: the client could not even ask the engine its version
                # (socket missing, daemon starting); OSError: a stream cut mid-read.
                raise _EngineUnavailableError(f"{about}: {exc}") from exc

        retrying = Retrying(
            stop=stop_after_attempt(attempts or self.attempts),
            wait=wait_exponential_jitter(
                max=RETRY_MAX_WAIT, jitter=RETRY_FIRST_WAIT, multiplier=RETRY_FIRST_WAIT
            ),
            retry=retry_if_exception_type(_EngineUnavailableError),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _EngineUnavailableError as exc:
            raise TransientError(f"docker engine unavailable: {exc}") from exc

    @staticmethod
    def _post_update(client: docker.DockerClient, container_id: str, data: dict[str, Any]) -> None:
        api = client.api
        response = api._post_json(api._url("/containers/{0}/update", container_id), data=data)
        # Raises the SDK's APIError (NotFound, 4xx, 5xx) for _call to convert.
        api._raise_for_status(response)

    def _find(self, name: str) -> Any | None:
        """The container called ``name``, or ``None``."""
        try:
            return self._get(name)
        except NotFoundError:
            return None

    def _get(self, name: str) -> Any:
        """The container called ``name``, freshly inspected; ``NotFoundError`` if missing."""
        return self._call(
            "inspect container", lambda client: client.containers.get(name), subject=name
        )

    def _remove(self, name: str) -> bool:
        """One try at removing the container: whether it is gone (not while another removes it)."""
        try:
            self._call(
                "remove container",
                lambda client: client.api.remove_container(name, force=True, v=True),
                subject=name,
            )
        except NotFoundError:
            return True
        except ConflictError as exc:
            # Another caller is removing it already: wait for that removal to finish.
            if "in progress" not in str(exc):
                raise
            return False
        return True

    # -- creating and starting ------------------------------------------------------------

    def _create(self, spec: InstanceSpec) -> Any:
        """Create the container; if a concurrent call created it first, return that one."""
        image = spec.image or self.image
        plan = self._plan(spec.limits)
        labels = {
            **spec.labels,
            MANAGED_LABEL: "true",
            TENANT_LABEL: spec.tenant_id,
            ROLE_LABEL: spec.role,
            ORDINAL_LABEL: str(spec.ordinal),
            PORT_LABEL: str(spec.port),
            LIMITS_LABEL: spec.limits.model_dump_json(exclude_none=True),
        }
        options: dict[str, Any] = {
            "name": spec.name,
            "labels": labels,
            "environment": dict(spec.env),
            "detach": True,
            # busybox sh as PID 1 ignores SIGTERM; an init forwards it and reaps zombies.
            "init": True,
            "restart_policy": {"Name": "unless-stopped"},
            # Loopback only, a random host port: never publish on every interface.
            "ports": {f"{spec.port}/tcp": (HOST, None)},
        }
        if plan["nano_cpus"] is not None:
            options["nano_cpus"] = plan["nano_cpus"]
        if plan["memory_bytes"] is not None:
            options["mem_limit"] = plan["memory_bytes"]
            options["memswap_limit"] = plan["memory_bytes"]
        return wait_until(
            lambda: self._create_or_find(spec, image, options),
            timeout=self.timeout,
            interval=POLL_SECONDS,
            message=f"cannot create container {spec.name}: another create holds the name",
            error=ConflictError,
        )

    def _create_or_find(self, spec: InstanceSpec, image: str, options: dict[str, Any]) -> Any:
        """One try at creating the container: it, the one a concurrent create made, or ``None``.

        ``None`` (try again) when another call holds the name but its container cannot be
        inspected yet: the engine reserves the name first, and that create may still fail.
        """
        try:
            container = self._call(
                "create container",
                lambda client: client.containers.create(image, **options),
                subject=spec.name,
            )
        except ConflictError:
            existing = self._find(spec.name)
            if existing is not None:
                log.info("instance_create_raced", instance=spec.name)
                self._check_managed(existing)
            return existing
        log.info(
            "instance_created",
            instance=spec.name,
            container_id=container.id,
            image=image,
            tenant_id=spec.tenant_id,
        )
        return container

    def _ensure_running(self, container: Any) -> InstanceInfo:
        """Start the container unless it runs, then wait until its port is published."""
        name = container.name
        if container.status != "running":
            self._call(
                "start container", lambda client: client.api.start(container.id), subject=name
            )
            log.info("instance_started", instance=name, container_id=container.id)
        last = container

        def up() -> bool:
            nonlocal last
            last = self._get(name)
            return last.status == "running" and self._port(last) is not None

        def down() -> str:
            # The last state seen, and what the service printed: why it is not up.
            return (
                f"container {name} did not come up (status {last.status}): {self._log_tail(last)}"
            )

        wait_until(
            up, timeout=self.timeout, interval=POLL_SECONDS, message=down, error=TransientError
        )
        return self._info(last)

    def _log_tail(self, container: Any) -> str:
        try:
            raw = self._call(
                "read logs",
                lambda client: client.api.logs(container.id, tail=LOG_TAIL_LINES),
                subject=container.name,
                attempts=1,
            )
        except (TransientError, PermanentError):
            return "(no logs)"
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return text.strip() or "(no output)"

    def _check_managed(self, container: Any) -> None:
        labels = container.labels or {}
        if labels.get(MANAGED_LABEL) != "true":
            raise ConflictError(f"container {container.name} exists but is not managed by cul8er")

    # -- exec and stats -------------------------------------------------------------------

    def _run_exec(self, name: str, exec_id: str, timeout: float) -> tuple[bytes, bytes]:
        """Start the exec and collect its output, giving up after ``timeout`` seconds."""
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                # Starting runs the command: one attempt, a lost answer must not run it twice.
                result["output"] = self._call(
                    "start exec",
                    lambda client: client.api.exec_start(exec_id, demux=True),
                    subject=name,
                    attempts=1,
                )
            except Exception as exc:  # handed to the caller's thread, raised there
                result["error"] = exc

        # The SDK reads exec output without a deadline; a daemon thread bounds our wait.
        worker = threading.Thread(target=run, name=f"docker-exec-{name}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise TransientError(f"exec in {name} timed out after {timeout}s")
        if "error" in result:
            raise result["error"]
        stdout, stderr = result.get("output") or (None, None)
        return stdout or b"", stderr or b""

    def _exit_code(self, name: str, exec_id: str) -> int:
        """The exec's exit code; the engine may need a moment after the output ends."""
        state: dict[str, Any] = {}

        def finished() -> bool:
            nonlocal state
            state = self._call(
                "inspect exec", lambda client: client.api.exec_inspect(exec_id), subject=name
            )
            return not state.get("Running") and state.get("ExitCode") is not None

        wait_until(
            finished,
            timeout=self.timeout,
            interval=POLL_SECONDS,
            message=f"exec in {name} reported no exit code",
            error=TransientError,
        )
        return int(state["ExitCode"])

    def _inspect_size(self, name: str) -> dict[str, Any]:
        """The container's inspect document with its writable-layer size (``SizeRw``)."""

        def inspect_size(client: docker.DockerClient) -> Any:
            api = client.api
            url = api._url("/containers/{0}/json", name)
            return api._result(api._get(url, params={"size": 1}), True)

        attrs: dict[str, Any] = self._call("inspect size", inspect_size, subject=name)
        return attrs

    def _disk_bytes(self, name: str, size: Any) -> int:
        """Bytes in the container's writable layer: the inspected ``SizeRw``, else the
        container list's; 0 if the engine won't say."""
        if size is None:
            rows: list[dict[str, Any]] = self._call(
                "list sizes",
                lambda client: client.api.containers(all=True, filters={"name": name}, size=True),
                subject=name,
            )
            # The name filter matches substrings; keep the exact one.
            size = next(
                (row.get("SizeRw") for row in rows if f"/{name}" in (row.get("Names") or [])),
                None,
            )
        return int(size or 0)

    # -- limits ---------------------------------------------------------------------------

    def _cpu_count(self) -> int:
        """The engine host's CPU count (asked once)."""
        if self._host_cpus is None:
            info: dict[str, Any] = self._call("read engine info", lambda client: client.info())
            self._host_cpus = max(1, int(info.get("NCPU") or 1))
            self._host_memory = int(info.get("MemTotal") or 0) or None
        return self._host_cpus

    def _memory_total(self) -> int:
        """The engine host's memory in bytes (asked once)."""
        self._cpu_count()
        # 1 TiB stands in for "no limit" if the engine does not report its memory.
        return self._host_memory or 1024 * 1024 * MIB

    def _plan(self, limits: Limits) -> dict[str, int | None]:
        """The engine values for ``limits``: CPU capped at the host's cores and floored at 0.01."""
        nano_cpus = None
        if limits.cpu_cores is not None:
            cores = min(limits.cpu_cores, float(self._cpu_count()))
            nano_cpus = max(MIN_NANO_CPUS, round(cores * NANO))
        memory = None if limits.memory_mb is None else limits.memory_mb * MIB
        return {"nano_cpus": nano_cpus, "memory_bytes": memory}

    def _applied(
        self, host: dict[str, Any], requested: Limits
    ) -> dict[str, float | int | str | None]:
        """What the engine enforces, as its HostConfig reports it (0 is unlimited)."""
        nano_cpus = int(host.get("NanoCpus") or 0)
        memory = int(host.get("Memory") or 0)
        return {
            "cpu_cores": nano_cpus / NANO if nano_cpus else None,
            "nano_cpus": nano_cpus or None,
            "memory_mb": memory // MIB if memory else None,
            "storage": "unenforced" if requested.storage_gb is not None else None,
            "method": "docker",
        }

    def _requested(self, labels: dict[str, str], host: dict[str, Any]) -> Limits:
        """The limits asked for: the creation label, unless a later update changed them."""
        try:
            stored = Limits.model_validate_json(labels.get(LIMITS_LABEL) or "{}")
        except ValidationError:
            stored = Limits()
        plan = self._plan(stored)
        if (plan["nano_cpus"] or 0) == int(host.get("NanoCpus") or 0) and (
            plan["memory_bytes"] or 0
        ) == int(host.get("Memory") or 0):
            return stored
        # Labels cannot change after creation: the engine's values are the best record left.
        nano_cpus = int(host.get("NanoCpus") or 0)
        memory = int(host.get("Memory") or 0)
        return Limits(
            cpu_cores=nano_cpus / NANO if nano_cpus else None,
            memory_mb=memory // MIB if memory else None,
            storage_gb=stored.storage_gb,
        )

    # -- describing -----------------------------------------------------------------------

    def _port(self, container: Any) -> int | None:
        """The host port published for the service's port, once the engine has bound it."""
        labels = container.labels or {}
        port = labels.get(PORT_LABEL) or str(self.port)
        ports = ((container.attrs.get("NetworkSettings") or {}).get("Ports")) or {}
        for binding in ports.get(f"{port}/tcp") or []:
            if binding.get("HostPort"):
                return int(binding["HostPort"])
        return None

    def _info(self, container: Any, *, requested: Limits | None = None) -> InstanceInfo:
        labels: dict[str, str] = dict(container.labels or {})
        host = container.attrs.get("HostConfig") or {}
        running = container.status == "running"
        port = self._port(container) if running else None
        if requested is None:
            requested = self._requested(labels, host)
        return InstanceInfo(
            name=container.name,
            tenant_id=labels.get(TENANT_LABEL, ""),
            platform=self.name,
            status="running" if running else "stopped",
            endpoint=f"{HOST}:{port}" if port is not None else None,
            provider_id=container.id,
            limits_requested=requested,
            limits_applied=self._applied(host, requested),
            labels=labels,
        )
