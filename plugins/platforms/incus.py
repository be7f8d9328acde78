"""The ``incus`` platform: each instance is a system container on an Incus (or LXD) daemon.

The daemon is the source of truth. Every instance carries ``user.cul8er.*`` config keys
(tenant, role, ordinal, the requested limits and the host port of its ``web`` proxy device),
so a restarted worker finds everything it needs on the container itself.

Limits: memory is ``limits.memory=<n>MiB`` and CPU a hard CFS quota,
``limits.cpu.allowance=<n>ms/100ms`` (``"50%"`` would only set soft shares), capped at the
daemon host's CPU count. Both apply live. The service is published on the host at
``127.0.0.1:<host_port>`` by a ``proxy`` device, never on the bridge.
"""

from __future__ import annotations

import functools
import json
import os
import socket as socket_module
import threading
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar
from urllib.parse import quote

import structlog
from pydantic import ValidationError

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

    from pylxd.exceptions import LXDAPIException
    from tenacity import wait_exponential_jitter

    from workers.plugin_api import PluginContext, Settings

__all__ = ["IncusPlatform"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Where the host reaches an instance's service: its ``proxy`` device listens here only.
HOST: Final = "127.0.0.1"
#: Prefix of every config key cul8er writes on an instance.
KEY_PREFIX: Final = "user.cul8er."
#: Marks an instance as cul8er's; ``list_instances`` only sees instances that carry it.
MANAGED_KEY: Final = "user.cul8er.managed"
#: The host port of the instance's ``web`` proxy device.
HOST_PORT_KEY: Final = "user.cul8er.host_port"
#: The limits the caller asked for, as JSON, so that later reads can report them.
LIMITS_KEY: Final = "user.cul8er.limits"
#: The proxy device that publishes the instance's service on the host's loopback.
PROXY_DEVICE: Final = "web"
#: The CFS period the CPU allowance is expressed in (milliseconds).
CPU_PERIOD_MS: Final = 100
#: Daemon status values that count as running; everything else is stopped.
RUNNING_STATES: Final = frozenset({"Running", "Frozen"})
#: How often waits for a concurrent operation poll (seconds).
POLL_SECONDS: Final = 0.2


@functools.cache
def _unreachable() -> tuple[type[Exception], ...]:
    """Exceptions that mean the daemon could not be reached or did not answer in time.

    pylxd and requests are imported here, at the first daemon call, not when the plugin loads.
    """
    import requests.exceptions
    from pylxd.exceptions import ClientConnectionFailed

    return (
        ClientConnectionFailed,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
    )


class _DaemonFailedError(Exception):
    """A 5xx answer to a request itself (not a failed operation): worth another attempt."""

    def __init__(self, error: LXDAPIException) -> None:
        super().__init__(str(error))
        self.error = error


def _backoff() -> wait_exponential_jitter:
    """0.2 s doubling up to 2 s, with up to 0.2 s of jitter, between attempts."""
    from tenacity import wait_exponential_jitter

    return wait_exponential_jitter(multiplier=0.2, max=2, jitter=0.2)


def _free_port() -> int:
    """A TCP port that is free on the host's loopback right now."""
    with socket_module.socket(socket_module.AF_INET, socket_module.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _endpoint_url(socket: str) -> str:
    """The pylxd endpoint for ``socket``: a unix socket path, or an http(s) URL as it is."""
    if socket.startswith("/"):
        # Given a path that does not exist, pylxd would take it for a URL and fail with an
        # "Invalid URL" error; spelled out, a missing socket is a connection failure.
        return f"http+unix://{quote(socket, safe='')}"
    return socket


def _running(instance: Any) -> bool:
    return bool(instance.status in RUNNING_STATES)


class IncusPlatform:
    """Instances as Incus/LXD system containers, limited by the daemon's cgroups."""

    name: ClassVar[str] = "incus"

    def __init__(
        self,
        *,
        socket: str,
        image: str,
        port: int = 8080,
        attempts: int = 3,
        timeout: float = 30.0,
    ) -> None:
        self.socket = socket
        self.image = image
        self.port = port
        self.attempts = max(1, attempts)
        self.timeout = timeout
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._host_cpus: int | None = None
        self._wait = _backoff()

    @classmethod
    def from_plugin(cls, _config: None, context: PluginContext) -> IncusPlatform:
        """The plugin factory: the platform for cul8er's settings."""
        return cls.from_settings(context.settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> IncusPlatform:
        """The platform for these settings: the daemon at ``incus_socket``."""
        return cls(
            socket=settings.incus_socket,
            image=settings.incus_image,
            port=settings.instance_port,
            attempts=settings.engine_attempts,
            timeout=settings.engine_timeout,
        )

    # -- the Platform contract ------------------------------------------------------------

    def create_instance(self, spec: InstanceSpec) -> InstanceInfo:
        """Create and start ``spec.name``; an existing instance of that name is returned."""
        existing = self._find(spec.name)
        if existing is None:
            created = self._create(spec)
            if not created:
                log.info("instance_create_lost_race", instance=spec.name)
        else:
            self._check_managed(existing)
            log.info("instance_found", instance=spec.name, status=existing.status)
        instance = self._ensure_running(spec.name)
        return self._info(instance)

    def destroy_instance(self, name: str) -> None:
        """Force-stop and delete the instance with its storage; a missing one is success."""
        instance = self._find(name)
        if instance is None:
            return
        try:
            if _running(instance):
                self._call("stop", name, lambda: instance.stop(force=True, wait=True))
            self._call("delete", name, lambda: instance.delete(wait=True))
        except NotFoundError:
            return
        log.info("instance_destroyed", instance=name)

    def start_instance(self, name: str) -> InstanceInfo:
        """Start a stopped instance; a running one is returned as it is."""
        instance = self._get(name)
        self._check_managed(instance)
        return self._info(self._ensure_running(name))

    def stop_instance(self, name: str) -> None:
        """Stop the instance at once (its data stays); a stopped or missing one is success."""
        instance = self._find(name)
        if instance is None or not _running(instance):
            return
        try:
            self._call("stop", name, lambda: instance.stop(force=True, wait=True))
        except NotFoundError:
            return
        except PermanentError:
            # A concurrent stop won the race: "already stopped" is what we wanted.
            again = self._find(name)
            if again is not None and _running(again):
                raise
        log.info("instance_stopped", instance=name)

    def exec(self, name: str, command: list[str], *, timeout: float = 30.0) -> ExecResult:
        """Run ``command`` in the instance; waits at most ``timeout`` seconds for it."""
        if not command:
            raise PermanentError("exec needs a command")
        instance = self._get(name)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                # Only an unreachable daemon is retried: the command has not run then.
                outcome["result"] = self._call(
                    "exec", name, lambda: instance.execute(list(command)), retry_failed=False
                )
            except BaseException as exc:  # handed to the calling thread below
                outcome["error"] = exc

        worker = threading.Thread(target=run, name=f"incus-exec-{name}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise TransientError(f"exec in {name} timed out after {timeout}s")
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        log.info("instance_exec", instance=name, command=command[0], exit_code=result.exit_code)
        return ExecResult(
            exit_code=int(result.exit_code),
            stdout=str(result.stdout or ""),
            stderr=str(result.stderr or ""),
        )

    def stats(self, name: str) -> InstanceStats:
        """CPU seconds, memory, root-disk usage and traffic, as the daemon reports them."""
        instance = self._get(name)
        state = self._call("state", name, instance.state)
        cpu = state.cpu or {}
        memory = state.memory or {}
        disk = state.disk or {}
        rx_bytes = tx_bytes = 0
        for interface, data in (state.network or {}).items():
            if interface == "lo":
                continue
            counters = (data or {}).get("counters") or {}
            rx_bytes += int(counters.get("bytes_received", 0))
            tx_bytes += int(counters.get("bytes_sent", 0))
        return InstanceStats(
            cpu_seconds=int(cpu.get("usage", 0)) / 1e9,
            memory_bytes=int(memory.get("usage", 0)),
            # The dir pool reports no disk usage at all.
            disk_bytes=int((disk.get("root") or {}).get("usage", 0)),
            rx_bytes=rx_bytes,
            tx_bytes=tx_bytes,
        )

    def set_limits(self, name: str, limits: Limits) -> InstanceInfo:
        """Change the instance's memory and CPU quota in place; the daemon applies them live."""
        # Re-fetched on purpose: saving a stale object drops the volatile idmap keys the
        # daemon added at start, which it refuses ("Volatile idmap keys can't be deleted").
        instance = self._get(name)
        self._check_managed(instance)
        config = dict(instance.config)
        for key, value in self._limit_config(limits).items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        config[LIMITS_KEY] = limits.model_dump_json()
        instance.config = config
        self._call("save", name, lambda: instance.save(wait=True))
        log.info("instance_limits_set", instance=name, **limits.model_dump())
        return self._info(self._get(name))

    def list_instances(self, tenant_id: str | None = None) -> list[InstanceInfo]:
        """Every instance marked ``user.cul8er.managed``, optionally only one tenant's."""
        instances = self._call("list", "*", lambda: self._api().instances.all(recursion=1))
        infos = []
        for instance in sorted(instances, key=lambda item: item.name):
            config = instance.config or {}
            if config.get(MANAGED_KEY) != "true":
                continue
            if tenant_id is not None and config.get(f"{KEY_PREFIX}tenant") != tenant_id:
                continue
            infos.append(self._info(instance))
        return infos

    # -- the daemon -----------------------------------------------------------------------

    def _api(self) -> Any:
        """The pylxd client, connected on first use (a connection failure is retried)."""
        if self._client is None:
            import pylxd

            with self._client_lock:
                if self._client is None:
                    self._client = pylxd.Client(
                        endpoint=_endpoint_url(self.socket), timeout=self.timeout
                    )
        return self._client

    def _call(
        self,
        action: str,
        name: str,
        call: Callable[[], T],
        *,
        retry_failed: bool = True,
    ) -> T:
        """Make one daemon call, retried while the daemon is unreachable, errors mapped to ours.

        ``NotFound`` becomes ``NotFoundError``, a 409 ``ConflictError``, other 4xx answers and
        failed operations (a bad image, an invalid config) ``PermanentError``. An unreachable
        daemon, a timeout or a 5xx answer is retried, then becomes ``TransientError``.
        """
        from pylxd.exceptions import LXDAPIException, NotFound
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

        unreachable = _unreachable()
        retryable: tuple[type[BaseException], ...] = unreachable
        if retry_failed:
            retryable = (*unreachable, _DaemonFailedError)

        def attempt() -> T:
            self._api()
            try:
                return call()
            except NotFound:
                raise
            except LXDAPIException as exc:
                # A failed background operation comes back as 200 with the daemon's error;
                # only a 5xx answer to the request itself means the daemon is unwell.
                if exc.response is not None and exc.response.status_code >= 500:
                    raise _DaemonFailedError(exc) from exc
                raise

        try:
            for try_ in Retrying(
                stop=stop_after_attempt(self.attempts),
                wait=self._wait,
                retry=retry_if_exception_type(retryable),
                reraise=True,
            ):
                with try_:
                    return attempt()
        except NotFound as exc:
            raise NotFoundError(f"no incus instance named {name!r}: {exc}") from exc
        except _DaemonFailedError as exc:
            raise TransientError(f"incus daemon unavailable ({action} {name}): {exc}") from exc
        except unreachable as exc:
            # A fresh client on the next call: the daemon may come back at another socket.
            self._client = None
            raise TransientError(
                f"incus daemon unavailable at {self.socket} ({action} {name}): {exc}"
            ) from exc
        except LXDAPIException as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 409:
                raise ConflictError(f"incus {action} {name} conflicts: {exc}") from exc
            raise PermanentError(f"incus {action} {name} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover  (tenacity reraises)

    def _find(self, name: str) -> Any | None:
        """The instance, or ``None`` if there is none of that name."""
        try:
            return self._get(name)
        except NotFoundError:
            return None

    def _get(self, name: str) -> Any:
        return self._call("get", name, lambda: self._api().instances.get(name))

    def _check_managed(self, instance: Any) -> None:
        if (instance.config or {}).get(MANAGED_KEY) != "true":
            raise ConflictError(f"incus instance {instance.name!r} is not managed by cul8er")

    def _host_cpu_count(self) -> int:
        """The daemon host's CPU count (what a CFS quota can use at most)."""
        if self._host_cpus is None:
            try:
                resources = self._call("resources", "*", lambda: self._api().resources)
                self._host_cpus = int(resources["cpu"]["total"])
            except (PermanentError, KeyError, TypeError, ValueError):
                # The daemon does not say: it runs on this host (unix socket).
                self._host_cpus = os.cpu_count() or 1
        return self._host_cpus

    # -- creating -------------------------------------------------------------------------

    def _create(self, spec: InstanceSpec) -> bool:
        """Create ``spec.name`` stopped; ``False`` when a concurrent create made it first."""
        alias = spec.image or self.image
        self._check_image(alias)
        inner_port = spec.port if "port" in spec.model_fields_set else self.port
        host_port = _free_port()
        config = {f"user.{key}": value for key, value in spec.labels.items()}
        config.update({f"environment.{key}": value for key, value in spec.env.items()})
        config.update(
            {
                MANAGED_KEY: "true",
                f"{KEY_PREFIX}tenant": spec.tenant_id,
                f"{KEY_PREFIX}role": spec.role,
                f"{KEY_PREFIX}ordinal": str(spec.ordinal),
                f"{KEY_PREFIX}labels": json.dumps(spec.labels, sort_keys=True),
                HOST_PORT_KEY: str(host_port),
                LIMITS_KEY: spec.limits.model_dump_json(),
            }
        )
        config.update(
            {key: value for key, value in self._limit_config(spec.limits).items() if value}
        )
        definition = {
            "name": spec.name,
            "type": "container",
            "source": {"type": "image", "alias": alias},
            "config": config,
            "devices": {
                PROXY_DEVICE: {
                    "type": "proxy",
                    "listen": f"tcp:{HOST}:{host_port}",
                    "connect": f"tcp:{HOST}:{inner_port}",
                }
            },
        }
        try:
            self._call(
                "create",
                spec.name,
                lambda: self._api().instances.create(definition, wait=True),
            )
        except PermanentError:
            # Two creates of one name: the daemon refuses the second one (a 409, or a failed
            # operation on its unique name). The instance exists then; anything else is ours.
            existing = self._find(spec.name)
            if existing is None:
                raise
            self._check_managed(existing)
            return False
        log.info(
            "instance_created",
            instance=spec.name,
            tenant_id=spec.tenant_id,
            image=alias,
            host_port=host_port,
        )
        return True

    def _check_image(self, alias: str) -> None:
        """Refuse an image alias the daemon does not have, naming it (the daemon would not)."""
        try:
            self._call("image", alias, lambda: self._api().images.get_by_alias(alias))
        except NotFoundError as exc:
            raise PermanentError(f"incus image alias {alias!r} not found on the daemon") from exc

    def _ensure_running(self, name: str) -> Any:
        """Start the instance unless it runs; waits out a concurrent create or start."""
        instance: Any = None
        busy: PermanentError | None = None

        def running() -> bool:
            nonlocal instance, busy
            instance = self._get(name)
            if _running(instance):
                return True
            try:
                self._call("start", name, functools.partial(instance.start, wait=True))
            except NotFoundError:
                raise
            except PermanentError as exc:
                # Busy with another operation (a create still unpacking, a concurrent start)
                # or started meanwhile: look again until the deadline.
                busy = exc
                return False
            log.info("instance_started", instance=name)
            busy = None
            instance = self._get(name)
            return _running(instance)

        wait_until(
            running,
            timeout=self.timeout,
            interval=POLL_SECONDS,
            message=lambda: f"instance {name} did not start: {busy or 'not running'}",
            error=PermanentError,
        )
        return instance

    # -- limits ---------------------------------------------------------------------------

    def _limit_config(self, limits: Limits) -> dict[str, str | None]:
        """The daemon config keys for ``limits``; ``None`` removes a key (unlimited)."""
        allowance = self._allowance(limits)
        return {
            "limits.memory": None if limits.memory_mb is None else f"{limits.memory_mb}MiB",
            "limits.cpu.allowance": allowance,
        }

    def _allowance(self, limits: Limits) -> str | None:
        cores = self._cores(limits)
        if cores is None:
            return None
        # A hard CFS quota; the kernel refuses quotas under 1 ms.
        quota_ms = max(1, int(cores * CPU_PERIOD_MS))
        return f"{quota_ms}ms/{CPU_PERIOD_MS}ms"

    def _cores(self, limits: Limits) -> float | None:
        if limits.cpu_cores is None:
            return None
        return min(limits.cpu_cores, float(self._host_cpu_count()))

    def _plan(self, limits: Limits) -> dict[str, float | int | str | None]:
        """What ``limits`` amount to on this daemon (``None`` is unlimited)."""
        return {
            "cpu_cores": self._cores(limits),
            "allowance": self._allowance(limits),
            "memory_mb": limits.memory_mb,
            # The dir pool has no quotas: a root disk size would be ignored.
            "storage": None if limits.storage_gb is None else "unenforced",
            "method": "incus",
        }

    # -- reading --------------------------------------------------------------------------

    def _info(self, instance: Any) -> InstanceInfo:
        config: dict[str, str] = dict(instance.config or {})
        try:
            requested = Limits.model_validate_json(config.get(LIMITS_KEY) or "{}")
        except ValidationError:
            requested = Limits()
        try:
            labels = json.loads(config.get(f"{KEY_PREFIX}labels") or "{}")
        except ValueError:
            labels = {}
        host_port = config.get(HOST_PORT_KEY)
        running = _running(instance)
        return InstanceInfo(
            name=instance.name,
            tenant_id=config.get(f"{KEY_PREFIX}tenant", ""),
            platform=self.name,
            status="running" if running else "stopped",
            endpoint=f"{HOST}:{host_port}" if running and host_port else None,
            provider_id=config.get("volatile.uuid") or instance.name,
            limits_requested=requested,
            limits_applied=self._plan(requested),
            labels={str(key): str(value) for key, value in labels.items()},
        )
