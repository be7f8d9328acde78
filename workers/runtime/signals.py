"""Celery signal handlers: logging set-up, per-task log context, fork safety and sharing."""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import structlog
from celery import signals

from workers.runtime import liveness
from workers.runtime.db import dispose_engines
from workers.runtime.logging import configure_logging
from workers.runtime.settings import get_settings

__all__: list[str] = []


@signals.setup_logging.connect
def _setup_logging(**_kwargs: Any) -> None:
    # Connecting here stops Celery from configuring logging its own way.
    settings = get_settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)


@signals.worker_init.connect
def _metrics(**_kwargs: Any) -> None:
    # Before the pool forks: every child writes its metrics to the shared multi-process folder,
    # and the main process alone serves /metrics (children would fight over the port).
    from workers.runtime import metrics

    settings = get_settings()
    directory = metrics.metrics_directory(settings)
    metrics.configure(directory)
    if settings.prometheus_port:
        metrics.serve(settings.prometheus_port, directory)


@signals.celeryd_init.connect
def _remember_node(sender: str | None = None, **_kwargs: Any) -> None:
    # Before the pool forks: each child's heartbeat names the node it belongs to.
    if sender:
        liveness.set_node(sender)


@signals.worker_process_shutdown.connect
def _child_gone(pid: int | None = None, **_kwargs: Any) -> None:
    from workers.runtime import metrics

    liveness.stop_current()
    metrics.mark_process_dead(pid or os.getpid(), metrics.metrics_directory(get_settings()))


#: Whether this process has frozen its objects before forking its first pool child.
_frozen = False


@signals.worker_before_create_process.connect
def _before_fork(**_kwargs: Any) -> None:
    # The prefork pool forks its children from this process, each after a full gc.collect().
    # Freezing (once) what the boot built, modules, tasks and plugins, keeps the collector off
    # those objects for good: in this process, whose collections would write to every object's
    # header and so copy the pages its children share, and in the children. It also makes
    # those collections before each fork short.
    global _frozen
    if _frozen:
        return
    _frozen = True
    _warm_prctl()
    gc.freeze()


def _warm_prctl() -> None:
    # Every pool child sets its parent-death signal through billiard, with cffi when cffi is
    # imported: cffi parses that C declaration with pycparser, whose parser it builds once per
    # process (some 0.1 s of CPU and 3 MB). Built here, every child inherits it.
    cffi = sys.modules.get("cffi")
    if cffi is not None:
        cffi.FFI().cdef("int prctl (int __option, ...);")


@signals.worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    # A prefork child must not share the parent's pooled database connections.
    dispose_engines()
    # Each pool child proves it is alive from its first moment (`cul8er workers` lists it).
    settings = get_settings()
    liveness.current(database_url=settings.sqlalchemy_url, interval=settings.heartbeat_interval)


@signals.worker_ready.connect
def _beat_in_main(sender: Any = None, **_kwargs: Any) -> None:
    # Solo and thread pools run steps in the main process: it beats from the start.
    pool = getattr(sender, "pool", None)
    if type(pool).__module__ in ("celery.concurrency.solo", "celery.concurrency.thread"):
        settings = get_settings()
        liveness.current(database_url=settings.sqlalchemy_url, interval=settings.heartbeat_interval)


@signals.worker_shutdown.connect
def _worker_gone(**_kwargs: Any) -> None:
    # Solo and thread pools run steps in the main process: its heartbeat ends here.
    liveness.stop_current()


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_kwargs: Any) -> None:
    # Prefork children reuse processes: start every task from a clean context.
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task_name=getattr(task, "name", None))


@signals.task_postrun.connect
def _unbind_task(**_kwargs: Any) -> None:
    structlog.contextvars.clear_contextvars()
