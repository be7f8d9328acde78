"""Schedule slots: a beat-triggered run claims its slot once, so a second beat does nothing.

A run's slot is the start of the interval it belongs to (``meter:2026-11-22T02:01:00+00:00``).
Claiming inserts the slot's key into ``operations``: the unique key lets exactly one claim
win, whether the duplicate comes from a second beat, a re-run or a redelivered message.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.exc import IntegrityError

from workers.db import session_scope
from workers.models import Operation, utcnow

__all__ = ["claim_slot", "slot_start"]


def slot_start(interval: float, *, now: dt.datetime | None = None) -> dt.datetime:
    """The start of the ``interval``-second slot ``now`` falls in (aligned to the epoch)."""
    moment = now or utcnow()
    seconds = int(interval) or 1
    epoch = int(moment.timestamp())
    return dt.datetime.fromtimestamp(epoch - epoch % seconds, tz=dt.UTC)


def claim_slot(
    name: str, slot: dt.datetime, *, result: dict[str, Any] | None = None, url: str | None = None
) -> bool:
    """Whether this call won ``name``'s run for ``slot`` (``False``: it ran already)."""
    key = f"{name}:{slot.isoformat()}"
    try:
        with session_scope(url) as session:
            if session.get(Operation, key) is not None:
                return False
            session.add(Operation(key=key, task_name=name, tenant_id=None, result=result or {}))
    except IntegrityError:
        return False
    return True
