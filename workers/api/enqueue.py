"""Public tasks by name, from the API: enqueue, wait for the answer, poll a workflow.

The API is a door onto the public task contract (docs/architecture.md §4): it sends the same
task with the same kwargs another service would, so the schemas, idempotency keys and error
answers are the tasks' own. Endpoints are plain ``def`` functions (FastAPI runs them in its
thread pool), so waiting on a Celery result never blocks the event loop.
"""

from __future__ import annotations

import time
from typing import Any, Final

from celery.exceptions import TimeoutError as NoAnswerError

from workers.api.idempotency import task_key
from workers.engine.views import describe_run
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import TransientError
from workers.runtime.models import WorkflowRun

__all__ = ["ANSWER_TIMEOUT", "FINISHED", "call", "wait_for_workflow"]

#: Seconds a public task's answer may take (it records and enqueues; it does not provision).
ANSWER_TIMEOUT: Final = 30.0
#: Workflow statuses that end a ``?wait=``.
FINISHED: Final = frozenset({"succeeded", "failed"})


def call(
    task: str,
    kwargs: dict[str, Any],
    *,
    timeout: float = ANSWER_TIMEOUT,
    key: str | None = None,
    subject: str = "",
) -> dict[str, Any]:
    """Send the public task ``task`` by name and return its JSON answer.

    ``key``: the caller's ``Idempotency-Key``, sent as the task's idempotency key bound to
    ``subject`` and to these ``kwargs`` (``idempotency.task_key``).

    Raises:
        TransientError: no worker answered in ``timeout`` seconds (the API answers 503).
        ValidationFailedError: ``key`` was used with a different request.
    """
    if key:
        kwargs = {**kwargs, "idempotency_key": task_key(task, subject, key, kwargs)}
    result = app.send_task(task, kwargs=kwargs)
    try:
        answer: dict[str, Any] = result.get(timeout=timeout)
    except (TimeoutError, NoAnswerError):
        raise TransientError(
            f"no worker answered {task} within {timeout:g} s: is a worker running?"
        ) from None
    finally:
        result.forget()
    return answer


def wait_for_workflow(workflow_id: str, seconds: float) -> dict[str, Any]:
    """The workflow's status once it finished, or after ``seconds`` (whichever comes first)."""
    deadline = time.monotonic() + seconds
    while True:
        with session_scope() as session:
            run = session.get(WorkflowRun, workflow_id)
            answer = {"ok": True, **describe_run(session, run)} if run is not None else {}
        if answer.get("status") in FINISHED or time.monotonic() >= deadline:
            return answer
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
