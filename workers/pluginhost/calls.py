"""Plugins as Celery task modules: one task per contract operation, routed per plugin.

Loading a plugin adds its module to the app's ``include`` and registers
``plugins.<name>.<operation>`` on the app, so every worker that boots serves it. Tasks go
to ``plugins.<name>`` (general workers consume those queues too) or, for an untrusted
plugin, to the sandbox queue, whose worker runs under Celery time limits,
``max_memory_per_child`` and rlimits. An untrusted plugin's message that reaches any other
worker is sent on to the sandbox with the same task id, so it never runs outside it.
"""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING, Any, Final

import structlog
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.exceptions import TimeoutError as CeleryTimeoutError

from schemas.manifest import PluginType
from workers.pluginhost import callstats
from workers.pluginhost.contracts import operations
from workers.pluginhost.registry import PluginRegistry, PluginUnavailableError
from workers.pluginhost.signatures import is_internal, signature
from workers.pluginhost.tenancy import tenant_of
from workers.runtime.app import app
from workers.runtime.errors import Cul8erError, PermanentError, PluginError, TransientError
from workers.runtime.queues import Queue
from workers.runtime.settings import get_settings
from workers.runtime.task import Cul8erTask

if TYPE_CHECKING:
    from collections.abc import Callable

    from schemas.plugins import SecretValue
    from workers.pluginhost.registry import Served

__all__ = [
    "WORKER_SIGNALS",
    "booted",
    "call_served",
    "connect_worker_signals",
    "invoke",
    "registry",
    "route_task",
    "worker_role",
]

log = structlog.get_logger(__name__)

#: Queues of a general worker: it also serves every trusted plugin's own queue.
_GENERAL: Final = frozenset({Queue.LIFECYCLE.value, Queue.DEFAULT.value})

_registry: PluginRegistry | None = None
#: What this process is: ``None`` outside a worker, else the queues it consumes.
_worker: dict[str, Any] = {"queues": None, "sandbox": False}


def registry() -> PluginRegistry:
    """This process's plugin registry, booted on first use."""
    global _registry
    if _registry is None:
        fresh = PluginRegistry(get_settings())
        fresh.on_serve(_register)
        _registry = fresh
        fresh.boot()
    return _registry


def booted() -> PluginRegistry | None:
    """This process's registry if it has booted, else ``None`` (never boots it)."""
    return _registry


def worker_role() -> str:
    """``sandbox``, ``worker`` or ``client`` (not a worker: CLI, beat, tests)."""
    if _worker["queues"] is None:
        return "client"
    return "sandbox" if _worker["sandbox"] else "worker"


# -- tasks ------------------------------------------------------------------------------------


class PluginTask(Cul8erTask):
    """A contract operation of one plugin: the caller waits on its result.

    acks_late with reject_on_worker_lost (global): a worker that dies mid-call gets the message
    redelivered, which is safe because every contract operation is idempotent. Untrusted
    plugins turn reject_on_worker_lost off: a sandbox process killed for overrunning must
    fail the call, not loop on it.
    """


def _register(served: Served) -> None:
    """Add the plugin's module to ``include`` and one task per operation to the app."""
    module = served.loaded.module.__name__
    include = list(app.conf.include or ())
    if module not in include:
        app.conf.include = [*include, module]
    settings = get_settings()
    for op in operations(served.loaded.manifest.type):
        name = f"plugins.{served.name}.{op}"
        if name in app.tasks or is_internal(served.loaded.manifest.type, op):
            continue
        options: dict[str, Any] = {"name": name, "base": PluginTask, "bind": True}
        if not served.trusted:
            options.update(
                reject_on_worker_lost=False,
                max_retries=0,
                time_limit=settings.sandbox_time_limit,
                soft_time_limit=max(1.0, settings.sandbox_time_limit - 1),
            )
        app.task(**options)(_task_body(served.name, op))


def _task_body(plugin: str, op: str) -> Any:
    def run(self: PluginTask, **kwargs: Any) -> dict[str, Any]:
        return _run(self, plugin, op, kwargs)

    run.__name__ = op
    run.__doc__ = f"Call {op} of plugin {plugin!r}."
    return run


def _run(task: PluginTask, plugin: str, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from workers.runtime.redaction import redact

    reg = registry()
    structlog.contextvars.bind_contextvars(plugin=plugin, operation=op)
    try:
        served = reg.get(plugin)
        if not served.trusted and worker_role() == "worker":
            # Came by a queue a general worker serves (a plain client's default queue):
            # hand it to the sandbox under the same id, so the caller's result still arrives.
            task.app.send_task(
                task.name, kwargs=kwargs, task_id=task.request.id, queue=served.queue
            )
            log.info("plugin_call_sent_to_sandbox")
            raise Ignore()
        if is_internal(served.loaded.manifest.type, op):
            raise PermanentError(f"plugins.{plugin}.{op} is in-process only")
        value = _call_here(reg, served, op, kwargs)
        answer = signature(served.loaded.manifest.type, op).dump_result(value)
        return {"ok": True, "result": redact(answer)}
    except Ignore:
        raise
    except MemoryError:
        limit = get_settings().sandbox_memory_mb
        error = {
            "code": "resource_limit",
            "message": f"plugin {plugin!r} ran out of memory in {op} (limit {limit} MiB)",
        }
    except SoftTimeLimitExceeded:
        error = {
            "code": "time_limit",
            "message": f"plugin {plugin!r} overran its time limit in {op}",
        }
    except Cul8erError as exc:
        error = exc.to_dict()
    except Exception as exc:
        log.exception("plugin_crashed")
        error = {"code": "plugin_crashed", "message": f"{type(exc).__name__}: {exc}"}
    log.warning("plugin_call_failed", code=error["code"])
    return {"ok": False, "error": redact(error)}


def _call_here(
    reg: PluginRegistry, served: Served, op: str, kwargs: dict[str, Any], *, lookup: bool = True
) -> Any:
    """Run ``op`` here on the version the call's tenant runs, counting its outcome and time.

    The version is chosen once, when the call starts: a tenant moved meanwhile runs its new
    version from its next call, and this one finishes on the version it started on.
    """
    sig = signature(served.loaded.manifest.type, op)
    args = sig.check(served.name, kwargs)
    tenant_id = tenant_of(args)
    chosen, config = reg.for_tenant(served, tenant_id, lookup=lookup)
    started = time.perf_counter()
    ok = False
    try:
        instance = reg.instance(chosen, resolve=_resolver(reg), config=config)
        value = getattr(instance, op)(**sig.fit(type(instance), args))
        ok = True
        return value
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000
        callstats.record(served.name, chosen.loaded.version, tenant_id, ok=ok, ms=elapsed_ms)


def _resolver(reg: PluginRegistry) -> Callable[[Any], Any]:
    """Resolve a config's ``${secret:…}`` references through the secrets plugins, at call time."""
    from workers.pluginhost.secrets import find_refs, resolve

    def lookup(provider: str, path: str) -> str:
        served = reg.get(provider)
        if served.loaded.manifest.type is not PluginType.SECRETS or not served.trusted:
            raise PluginError(
                f"${{secret:...}} names {provider!r}, which is not a trusted secrets plugin",
                plugin_name=provider,
            )
        secret: SecretValue = reg.instance(served).get(path)
        return secret.value.get_secret_value()

    def apply(raw: Any) -> Any:
        if not find_refs(raw):
            return raw
        return resolve(raw, lookup=lookup, default_provider=reg.settings.secrets_provider)

    return apply


def call_served(plugin: str, op: str, **kwargs: Any) -> Any:
    """Call a trusted plugin served by this process, from its last known state.

    Reads no table (for callers inside a transaction). Raises ``PluginUnavailableError``
    when the plugin is not active here or not trusted.
    """
    reg = registry()
    served = reg.served.get(plugin)
    if served is None or served.state != "active" or not served.trusted:
        raise PluginUnavailableError(f"plugin {plugin!r} is not served here", plugin_name=plugin)
    return _call_here(reg, served, op, kwargs, lookup=False)


def invoke(plugin: str, op: str, **kwargs: Any) -> Any:
    """Call ``op`` of ``plugin``: here when this process serves it, else through its task.

    A trusted plugin runs in-process on a worker that consumes its queue (and in the CLI);
    otherwise the call goes to ``plugins.<name>.<op>`` on the plugin's queue and waits.

    Raises:
        PluginError: the plugin is unavailable, or its process was killed (sandbox limits).
        TransientError: the plugin said so, or no worker answered in time.
        PermanentError: the plugin refused the call.
    """
    reg = registry()
    served = reg.get(plugin)
    queues = _worker["queues"]
    if served.trusted and (queues is None or served.queue in queues):
        return _call_here(reg, served, op, kwargs)
    sig = signature(served.loaded.manifest.type, op)
    # JSON only on the wire: checked here, so a bad argument never becomes a message.
    payload = sig.dump_args(sig.check(plugin, kwargs))
    result = app.send_task(f"plugins.{plugin}.{op}", kwargs=payload, queue=served.queue)
    settings = get_settings()
    try:
        answer = result.get(timeout=settings.plugin_call_timeout, disable_sync_subtasks=False)
    except TimeLimitExceeded as exc:
        raise PluginError(
            f"plugin {plugin!r} was killed in {op}: time limit exceeded ({exc})",
            plugin_name=plugin,
        ) from None
    except WorkerLostError as exc:
        raise PluginError(
            f"plugin {plugin!r} was killed in {op}: its process died ({exc})", plugin_name=plugin
        ) from None
    except CeleryTimeoutError as exc:
        raise TransientError(
            f"no answer from plugins.{plugin}.{op} on queue {served.queue} "
            f"within {settings.plugin_call_timeout:g} s"
        ) from exc
    finally:
        result.forget()
    if not answer.get("ok"):
        error = answer.get("error") or {}
        message = f"plugin {plugin!r} {op}: {error.get('message', 'failed')}"
        if error.get("code") == "transient":
            raise TransientError(message)
        raise PluginError(message, plugin_name=plugin)
    return sig.load_result(answer["result"])


def route_task(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_kw: Any
) -> dict[str, str] | None:
    """Celery router: ``plugins.<name>.<op>`` goes to that plugin's queue."""
    if not name.startswith("plugins."):
        return None
    plugin = name.split(".")[1]
    served = registry().served.get(plugin)
    return {"queue": served.queue if served is not None else f"plugins.{plugin}"}


# -- worker roles and the sandbox -------------------------------------------------------------


def _queue_names(value: Any) -> set[str]:
    if not value:
        return set()
    if isinstance(value, str):
        return {q.strip() for q in value.split(",") if q.strip()}
    return {str(q) for q in value}


#: The worker signals the plugin host hooks, and its handler for each.
WORKER_SIGNALS: Final = (
    ("import_modules", "_boot_plugins"),
    ("celeryd_init", "_worker_init"),
    ("celeryd_after_setup", "_serve_plugin_queues"),
    ("worker_process_init", "_sandbox_limits"),
    ("task_prerun", "_sandbox_cpu"),
    ("worker_process_shutdown", "_flush_call_stats"),
)


def connect_worker_signals() -> None:
    """Hook plugin booting, plugin queues and the sandbox limits to Celery's worker signals.

    Idempotent (each handler is connected under a fixed ``dispatch_uid``).
    """
    for signal_name, handler in WORKER_SIGNALS:
        getattr(signals, signal_name).connect(
            globals()[handler], weak=False, dispatch_uid=f"cul8er.plugins.{handler}"
        )


def _boot_plugins(**_kwargs: Any) -> None:
    # Before the worker imports ``include``: booting adds every plugin's module to it.
    registry()


def _worker_init(conf: Any = None, options: Any = None, **_kwargs: Any) -> None:
    settings = get_settings()
    queues = _queue_names((options or {}).get("queues"))
    _worker["queues"] = queues
    if settings.sandbox_queue in queues:
        _worker["sandbox"] = True
        # Read by the worker when it builds its pool, just after this signal.
        conf.worker_max_memory_per_child = settings.sandbox_max_memory_per_child
        log.info("sandbox_worker", queue=settings.sandbox_queue)


def _serve_plugin_queues(instance: Any = None, **_kwargs: Any) -> None:
    queues = instance.app.amqp.queues
    consumed = set(queues.consume_from or {})
    if not _worker["sandbox"] and consumed & _GENERAL:
        for served in registry().served.values():
            if served.trusted and served.queue == f"plugins.{served.name}":
                queues.select_add(served.queue)
                consumed.add(served.queue)
    _worker["queues"] = consumed


def _sandbox_limits(**_kwargs: Any) -> None:
    if not _worker["sandbox"]:
        return
    settings = get_settings()
    memory = settings.sandbox_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    files = settings.sandbox_open_files
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))


def _flush_call_stats(**_kwargs: Any) -> None:
    # The last second of counts, before the pool process goes (a SIGKILL loses it).
    try:
        callstats.flush()
    except TransientError:
        log.warning("plugin_call_stats_lost_at_shutdown")


def _sandbox_cpu(**_kwargs: Any) -> None:
    if not _worker["sandbox"]:
        return
    # RLIMIT_CPU counts the whole process's life: give each call its own budget on top of
    # what the process used so far. Past it the kernel sends SIGXCPU, which kills the process.
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime) + 1
    budget = spent + get_settings().sandbox_cpu_seconds
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (budget, hard))
    except (ValueError, OSError):
        log.warning("sandbox_cpu_limit_unset", budget=budget)
