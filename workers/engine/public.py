"""Public tasks: validated JSON kwargs in, a JSON result out, idempotent by key.

Other services call these by name without importing cul8er. Bad input is
answered with ``{"ok": false, "error": {...}}`` naming each field, and is
never retried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from workers.engine import ledger
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import (
    ConflictError,
    PermanentError,
    TransientError,
    ValidationFailedError,
)
from workers.runtime.models import Operation
from workers.runtime.task import RetryingTask

__all__ = ["Outcome", "PublicTask", "field_path", "public_task", "rejection"]

log = structlog.get_logger(__name__)

P = TypeVar("P", bound=BaseModel)

#: Longest error message echoed back, so a huge input never comes back whole.
MAX_MESSAGE = 300


@dataclass
class Outcome:
    """A service function's answer: the result data and the runs to dispatch after commit."""

    data: dict[str, Any]
    tenant_id: str | None = None
    #: ``(run_id, phase, tasks)`` to send once the transaction is committed.
    dispatch: list[tuple[str, str, list[str]]] = field(default_factory=list)


class PublicTask(RetryingTask):
    """Public tasks keep their results for the caller; a busy database is retried."""

    ignore_result = False
    typing = False  # we validate kwargs ourselves, with field names in the error


def rejection(exc: PermanentError) -> dict[str, Any]:
    """The error result for ``exc``."""
    error = exc.to_dict()
    error["message"] = error["message"][:MAX_MESSAGE]
    return {"ok": False, "error": error}


def field_path(data: Any, loc: tuple[int | str, ...] | list[int | str]) -> str:
    """The path of the offending input, without pydantic's union-member tags (``""``: none).

    Shared with the HTTP API, so a field is named alike over Celery and over HTTP.
    """
    parts: list[str] = []
    current = data
    for part in loc:
        if isinstance(current, dict):
            parts.append(str(part))
            if part not in current:
                break  # a missing field: the path ends at its name
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            parts.append(str(part))
            current = current[part]
        else:
            break  # what follows names a type tried, not a place in the input
    return ".".join(parts)


def _validation_error(task_name: str, data: Any, exc: ValidationError) -> ValidationFailedError:
    errors: dict[str, str] = {}
    for err in exc.errors(include_input=False, include_url=False):
        errors.setdefault(field_path(data, err["loc"]) or "kwargs", err["msg"][:MAX_MESSAGE])
    listed = [{"field": f, "message": m} for f, m in list(errors.items())[:20]]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in listed)
    return ValidationFailedError(f"invalid arguments for {task_name}: {summary}", errors=listed)


def public_task(
    name: str,
    model: type[P],
    *,
    idempotent: bool = True,
    prepare: Callable[[P], Any] | None = None,
) -> Callable[[Callable[[Session, Any], Outcome]], PublicTask]:
    """Register a service function as the public task ``name``.

    ``idempotent``: the result is stored under the idempotency key (or, without
    one, the message's task id, so a redelivered message does nothing new).
    ``prepare``: work done before the transaction (calls to plugins, reads of other
    rows), whose answer the service gets instead of the payload. On SQLite the service's
    transaction holds the write lock from its start, so nothing inside it may open a
    second connection (a plugin registry refresh would wait for it, and it for that).
    """

    def register(service: Callable[[Session, Any], Outcome]) -> PublicTask:
        def body(self: PublicTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
            try:
                if args:
                    raise ValidationFailedError(
                        f"{name} takes keyword arguments only",
                        errors=[{"field": "args", "message": "positional arguments given"}],
                    )
                try:
                    payload = model.model_validate(kwargs)
                except ValidationError as exc:
                    raise _validation_error(name, kwargs, exc) from None
                tenant_id = getattr(payload, "tenant_id", None)
                if tenant_id:
                    structlog.contextvars.bind_contextvars(tenant_id=tenant_id)
                given: Any = payload if prepare is None else prepare(payload)
                if not idempotent:
                    with session_scope() as session:
                        return {"ok": True, **service(session, given).data}
                return _run_once(self, name, service, payload, given)
            except PermanentError as exc:
                fields = [e["field"] for e in getattr(exc, "errors", [])]
                log.warning("task_rejected", task=name, code=exc.code, fields=fields)
                return rejection(exc)

        body.__doc__ = model.__doc__
        body.__name__ = name.rsplit(".", 1)[-1]
        task: PublicTask = app.task(name=name, base=PublicTask, bind=True)(body)
        return task

    return register


def _run_once(
    task: PublicTask,
    name: str,
    service: Callable[[Session, Any], Outcome],
    payload: BaseModel,
    given: Any,
) -> dict[str, Any]:
    """Run ``service`` on ``given`` unless the payload's idempotency key has a stored result."""
    client_key = getattr(payload, "idempotency_key", None)
    key = f"{name}:{client_key}" if client_key else f"{name}:task:{task.request.id}"
    try:
        with session_scope() as session:
            stored = session.get(Operation, key)
            if stored is not None:
                # A redelivery: the first call may have died between its commit and its send.
                result = stored.result
                send = ledger.unstarted(session, result.get("workflow_id"))
            else:
                outcome = service(session, given)
                result = {"ok": True, **outcome.data}
                session.add(
                    Operation(key=key, task_name=name, tenant_id=outcome.tenant_id, result=result)
                )
                send = outcome.dispatch
    except IntegrityError as exc:
        # A concurrent call with the same key won the insert: answer as it did.
        stored_result = _stored(key)
        if stored_result is not None:
            return stored_result
        raise TransientError(f"conflicting write, will retry: {exc.orig}") from exc
    except ConflictError:
        # The same key's first call may have committed after our read of the key, and its
        # work is what this service now refuses ("exists already"): answer as it did.
        stored_result = _stored(key)
        if stored_result is not None:
            return stored_result
        raise
    for run_id, phase, tasks in send:
        # After commit: if this send is lost, reconcile finds the run past its deadline.
        ledger.dispatch(task.app, run_id, phase, tasks)
    return result


def _stored(key: str) -> dict[str, Any] | None:
    """The stored result of the idempotency key ``key``, read in a transaction of its own."""
    with session_scope() as session:
        stored = session.get(Operation, key)
        return dict(stored.result) if stored is not None else None
