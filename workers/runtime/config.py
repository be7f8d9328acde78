"""Celery's configuration, built in one place from cul8er's settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kombu import Queue as KombuQueue

from beat_schedule import build_beat_schedule
from workers.runtime.embedded import EmbeddedRedis
from workers.runtime.queues import Queue

if TYPE_CHECKING:
    from workers.runtime.settings import Settings

__all__ = ["TASK_MODULES", "celery_config"]

#: Modules every worker imports: the public tasks and the workflow steps.
TASK_MODULES: tuple[str, ...] = (
    "tasks.tenants",
    "tasks.steps",
    "tasks.maintenance",
    "tasks.drift",
    "tasks.events",
    "tasks.plugins",
    "tasks.metering",
    "tasks.billing",
    "tasks.autoscale",
    "tasks.quotas",
    "tasks.health",
    "tasks.deployments",
)


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded Redis under the data dir."""
    return settings.broker_url or EmbeddedRedis(settings.data_dir).url


def result_backend(settings: Settings) -> str:
    """Where task results go: the set backend, the Redis broker, or ``rpc://`` for AMQP."""
    if settings.result_backend:
        return settings.result_backend
    url = broker_url(settings)
    return "rpc://" if url.startswith(("amqp", "pyamqp")) else url


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options: how fast a dead worker's unacknowledged messages return.

    kombu keeps a delivered message in an ``unacked`` set until it is acknowledged;
    a message older than ``visibility_timeout`` goes back to its queue when some
    consumer next sweeps the set. kombu's defaults (3600 s, a sweep every ~100 s)
    mean an hour before a SIGKILLed worker's messages run again; a dead pool child
    is covered sooner by ``task_reject_on_worker_lost``. With a short timeout,
    a step running longer than it is delivered a second time: the ledger sees its
    owner alive and the duplicate steps aside. AMQP needs none of this (the broker
    requeues a dead connection's messages at once).
    """
    url = broker_url(settings)
    if not url.startswith(("redis", "rediss", "unix")):
        return {}
    timeout = settings.broker_visibility_timeout
    return {
        "visibility_timeout": timeout,
        # Sweep about ten times per timeout, scanning Redis on every sweep.
        "unacked_restore_interval": max(1.0, timeout / 10),
        "unacked_restore_throttle": 1,
        # A sweeper killed while holding the sweep lock must not stop sweeps for kombu's
        # default 5 minutes; a sweep takes milliseconds.
        "unacked_mutex_expire": 5,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The whole Celery configuration for ``settings``."""
    return {
        "broker_url": broker_url(settings),
        "result_backend": result_backend(settings),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": broker_transport_options(settings),
        # JSON only: a message can never make a worker unpickle attacker-chosen bytes.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A task is acknowledged after it ran, and re-queued when its worker dies: a crash
        # means the task runs again. Safe only because every cul8er task is idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # With acks_late a prefetched message is held hostage by a busy process; take one.
        "worker_prefetch_multiplier": 1,
        # Events on, so Flower and `celery events` see every task from publish to finish.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "task_time_limit": settings.step_time_limit + 5,
        "task_soft_time_limit": settings.step_time_limit,
        "result_expires": 24 * 3600,
        "result_extended": True,
        "task_queues": [KombuQueue(q.value, routing_key=q.value) for q in Queue],
        "task_default_queue": Queue.LIFECYCLE.value,
        # Plugin tasks first: each goes to its plugin's queue (or the sandbox).
        "task_routes": (
            "workers.pluginhost.calls.route_task",
            {
                "cul8er.metering.*": {"queue": Queue.METERING.value},
                "cul8er.billing.*": {"queue": Queue.METERING.value},
                "cul8er.quotas.*": {"queue": Queue.METERING.value},
                "cul8er.autoscale.*": {"queue": Queue.METERING.value},
                "cul8er.health.*": {"queue": Queue.HEALTH.value},
                "cul8er.*": {"queue": Queue.LIFECYCLE.value},
            },
        ),
        "include": [*TASK_MODULES, *settings.imports],
        "beat_schedule": build_beat_schedule(settings),
        "beat_schedule_filename": str(settings.data_dir / "celerybeat-schedule"),
        # We configure logging ourselves (structlog); keep Celery's hands off the root logger.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }
