"""What every route depends on: who calls (a verified bearer token) and whether they may now.

``read`` and ``write`` are FastAPI dependencies: each verifies the token, checks the subject's
rate limit for its route class, and hands the route the ``Principal``; a route then asks
``roles.authorize`` for its action on its tenant or environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import Depends, Header, Request, Response

from workers.api.auth import TokenVerifier, bearer
from workers.api.ratelimit import Decision, RateLimiter
from workers.api.roles import Principal
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from workers.runtime.settings import Settings

__all__ = ["Caller", "IdempotencyKey", "Limited", "Writer", "read", "write"]


@dataclass
class Gate:
    """One process's verifier and rate limiter (built once, on first use)."""

    settings: Settings
    verifier: TokenVerifier
    limiter: RateLimiter


_gate: Gate | None = None


def gate() -> Gate:
    """This process's verifier and limiter."""
    global _gate
    if _gate is None:
        settings = get_settings()
        _gate = Gate(settings, TokenVerifier(settings), RateLimiter(settings))
    return _gate


class Limited(Exception):
    """The subject called too often; carries the limiter's decision (answered 429)."""

    def __init__(self, decision: Decision) -> None:
        super().__init__("rate limited")
        self.decision = decision


def _caller(
    request: Request, response: Response, route_class: Literal["read", "write"]
) -> Principal:
    token = bearer(request.headers.get("authorization"))
    principal = gate().verifier.verify(token)
    request.state.subject = principal.subject
    decision = gate().limiter.check(principal.subject, route_class)
    if not decision.allowed:
        raise Limited(decision)
    for name, value in decision.headers().items():
        response.headers[name] = value
    return principal


def read(request: Request, response: Response) -> Principal:
    """The caller of a read route."""
    return _caller(request, response, "read")


def write(request: Request, response: Response) -> Principal:
    """The caller of a write route."""
    return _caller(request, response, "write")


#: The caller of a read route, and of a write route (each counted in its own rate limit).
Caller = Annotated[Principal, Depends(read)]
Writer = Annotated[Principal, Depends(write)]
#: ``Idempotency-Key``: the task's idempotency key (a replay answers the first response).
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=100)
]
