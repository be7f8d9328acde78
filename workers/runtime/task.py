"""The one task base: cul8er's defaults for every task, set as the app's ``task_cls``.

What every task shares is configured once, globally, in :mod:`workers.runtime.config`:
``task_acks_late`` and ``task_reject_on_worker_lost`` (a task is acknowledged after it ran
and re-queued when its worker dies, which is safe because every cul8er task is
idempotent), JSON only, time limits. This class adds the retry policy that the tasks which
retry Celery's way share; each subclass says why it differs:

- :class:`RetryingTask`: a transient error retries the whole body (the billing close);
- :class:`workers.engine.public.PublicTask`: a retrying task that keeps its result for the
  caller and validates its own arguments;
- ``tasks.metering.MeteringTask``: a retrying task that checks its own arguments;
- :class:`workers.engine.steps.StepTask`: retries from the ledger's attempt count instead;
- :class:`workers.pluginhost.calls.PluginTask`: an untrusted plugin is never redelivered.

Beat and maintenance tasks use this base as it is.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from workers.runtime.errors import PermanentError, TransientError

__all__ = ["Cul8erTask", "RetryingTask"]


class Cul8erTask(Task[Any, Any]):
    """Retry policy for subclasses that set ``autoretry_for``; never retries bad input."""

    #: Exponential backoff with jitter, at most five retries.
    retry_backoff = True
    retry_jitter = True
    max_retries = 5
    #: A permanent error (bad input, refused) is never retried, whatever ``autoretry_for`` says.
    dont_autoretry_for = (PermanentError,)


class RetryingTask(Cul8erTask):
    """A task whose whole body may simply run again: a transient error retries it.

    For tasks that commit as they go or not at all (the public tasks, metering, the
    billing close), so a busy database or broker is waited out with backoff.
    """

    autoretry_for = (TransientError,)
