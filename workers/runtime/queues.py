"""The queues cul8er's tasks travel on, each with the worker that consumes it."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Queue", "WORKER_QUEUES"]


class Queue(StrEnum):
    """Queue names; a machine's worker serves the ones it is placed for (``-Q``)."""

    #: Tenant workflows and their steps; any general worker.
    LIFECYCLE = "lifecycle"
    #: Metering and billing runs; workers close to the database.
    METERING = "metering"
    #: Health probes and sweeps; cheap, latency-sensitive.
    HEALTH = "health"
    #: Celery's default queue: where a plain client's ``send_task`` by name lands
    #: when it knows nothing of cul8er's routes. Every general worker serves it.
    DEFAULT = "celery"


#: What ``cul8er up`` and a general worker consume (``-Q``).
WORKER_QUEUES = ",".join(q.value for q in Queue)
