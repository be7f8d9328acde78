"""The queues cul8er's tasks travel on, each with the worker that consumes it."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Queue"]


class Queue(StrEnum):
    """Queue names; a machine's worker serves the ones it is placed for (``-Q``)."""

    #: Tenant workflows and their steps; any general worker.
    LIFECYCLE = "lifecycle"
    #: Metering and billing runs; workers close to the database.
    METERING = "metering"
    #: Health probes and sweeps; cheap, latency-sensitive.
    HEALTH = "health"
