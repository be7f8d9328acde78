"""``Idempotency-Key``: the tasks' idempotency keys, scoped per caller and bound to a body.

As Stripe's API does: a replay with the same key and the same request answers what the first
answered (the public task stores that answer under the key); the same key with a different
request is refused with ``422`` instead of silently answering the first request's result.
The key the task sees is ``api:<caller>:<key>:<digest of the request>``, so keys of two
callers never meet, and a different request under the same key is found by its prefix.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from sqlalchemy import select

from workers.runtime.db import session_scope
from workers.runtime.errors import ValidationFailedError
from workers.runtime.models import Operation

__all__ = ["MAX_KEY", "task_key"]

#: Longest ``Idempotency-Key`` accepted (the task's key adds the caller and the digest).
MAX_KEY: Final = 100


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_key(task: str, subject: str, key: str, request: dict[str, Any]) -> str:
    """The idempotency key to send ``task`` with for ``subject``'s ``key`` and ``request``.

    Raises:
        ValidationFailedError: ``key`` is too long, or was used with a different request.
    """
    if len(key) > MAX_KEY or not key.isprintable():
        raise _refused(f"at most {MAX_KEY} printable characters")
    base = f"api:{_short(subject)}:{key}"
    mine = f"{base}:{_short(json.dumps(request, sort_keys=True, default=str))}"
    prefix = f"{task}:{base}:"
    with session_scope() as session:
        other = session.scalars(
            select(Operation.key)
            .where(Operation.key.startswith(prefix, autoescape=True))
            .where(Operation.key != f"{task}:{mine}")
            .limit(1)
        ).first()
    if other is not None:
        raise _refused("this key was used with a different request; use a new key")
    return mine


def _refused(message: str) -> ValidationFailedError:
    return ValidationFailedError(
        f"Idempotency-Key: {message}", errors=[{"field": "Idempotency-Key", "message": message}]
    )
