"""Schedule slots: a beat-triggered run claims its slot once, so a second beat does nothing.

A run's slot is the start of the interval it belongs to (``meter:2026-11-22T02:01:00+00:00``).
Claiming inserts the slot's key into ``operations``: the unique key lets exactly one claim
win, whether the duplicate comes from a second beat, a re-run or a redelivered message.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.exc import IntegrityError

from workers.runtime.db import session_scope
from workers.runtime.models import Operation, utcnow

__all__ = ["claim_slot", "claimed_slot", "slot_start"]


def slot_start(interval: float, *, now: dt.datetime | None = None) -> dt.datetime:
    """The start of the ``interval``-second slot ``now`` falls in (aligned to the epoch)."""
    moment = now or utcnow()
    seconds = int(interval) or 1
    epoch = int(moment.timestamp())
    return dt.datetime.fromtimestamp(epoch - epoch % seconds, tz=dt.UTC)


def claim_slot(
    name: str,
    slot: dt.datetime,
    *,
    result: dict[str, Any] | None = None,
    task_id: str | None = None,
    url: str | None = None,
) -> bool:
    """Whether this call owns ``name``'s run for ``slot`` (``False``: another run has it).

    With ``task_id`` the claim belongs to that message: a redelivery of it (its worker
    died after the claim, before finishing) owns the slot still and carries on, while
    a second beat's message, with another id, stops. :func:`claimed_slot` tells a
    redelivered message which slot it claimed, even once the clock has moved on.
    """
    key = f"{name}:{slot.isoformat()}"
    stored = {**(result or {}), **({"task_id": task_id} if task_id else {})}
    try:
        with session_scope(url) as session:
            existing = session.get(Operation, key)
            if existing is not None:
                return task_id is not None and existing.result.get("task_id") == task_id
            session.add(Operation(key=key, task_name=name, tenant_id=None, result=stored))
            if task_id is not None:
                session.add(
                    Operation(
                        key=_task_key(name, task_id),
                        task_name=name,
                        tenant_id=None,
                        result={"slot": slot.isoformat()},
                    )
                )
    except IntegrityError:
        # A concurrent claim won; it may be another delivery of this very message.
        return task_id is not None and claimed_slot(name, task_id, url=url) == slot
    return True


def claimed_slot(name: str, task_id: str, *, url: str | None = None) -> dt.datetime | None:
    """The slot the message ``task_id`` claimed for ``name`` on an earlier delivery, if any."""
    with session_scope(url) as session:
        claim = session.get(Operation, _task_key(name, task_id))
        return dt.datetime.fromisoformat(claim.result["slot"]) if claim is not None else None


def _task_key(name: str, task_id: str) -> str:
    return f"{name}:task:{task_id}"
