"""Rate limits per subject and route class, counted with the ``limits`` library.

Each principal (its ``subject``) has two budgets, ``read`` (``api_rate_read``) and ``write``
(``api_rate_write``), both in the ``limits`` notation such as ``"600/minute"``, counted apart.

Where the counts live
    In the broker's Redis when the broker is Redis (the embedded one's unix socket by
    default, or ``CUL8ER_BROKER_URL`` when it is ``redis://``/``rediss://``/a kombu
    ``redis+socket://``), so every API process shares one count, under keys prefixed
    ``cul8er-api``. With any other broker (AMQP) the counts are ``memory://``, per process:
    N API processes then let a subject make up to N times its limit. A Redis that does not
    answer refuses the call with :class:`~workers.runtime.errors.TransientError` (503): the
    API could not send its task to that broker either, and an unreachable store must not
    turn the limits off.

Strategy: moving window
    A call counts for exactly one window length after it was made, so no instant admits more
    than the limit. A fixed window lets a subject spend its whole budget at the end of one
    window and again at the start of the next: twice the limit within a second or two, which
    is what a limit on task sends is there to prevent. The moving window's cost is a Redis
    list of at most ``limit`` timestamps per subject and class (600 by default) and a Lua
    script per call, negligible next to the task a call sends. It also gives an exact
    ``Retry-After``: when the oldest call in the window leaves it, one call is allowed again.

Headers (draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Limit``, ``RateLimit-Remaining``
and ``RateLimit-Reset`` (seconds until the oldest counted call leaves the window, i.e. until
one more call is allowed), plus ``Retry-After`` (integer seconds, at least 1) on a refusal.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import parse_qs, urlsplit

import structlog
from fastapi.responses import JSONResponse
from limits import RateLimitItem, parse
from limits.errors import ConfigurationError, StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.concurrency import run_in_threadpool

from workers.api.problems import problem
from workers.runtime.embedded import EmbeddedRedis
from workers.runtime.errors import ConfigError, TransientError
from workers.runtime.settings import Settings

__all__ = [
    "Decision",
    "KEY_PREFIX",
    "RateLimiter",
    "RouteClass",
    "default_storage_uri",
    "limited",
]

log = structlog.get_logger(__name__)

RouteClass = Literal["read", "write"]

#: Prefix of the counters' keys in Redis.
KEY_PREFIX: Final = "cul8er-api"
#: How long one Redis call of the limiter may take (seconds).
REDIS_TIMEOUT: Final = 2.0


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether one call may go ahead, and the budget it leaves."""

    allowed: bool
    #: Calls allowed per window.
    limit: int
    #: Calls left in the window after this one.
    remaining: int
    #: Seconds until the oldest counted call leaves the window (one more call is allowed).
    reset_after: float

    @property
    def retry_after(self) -> int:
        """Whole seconds to wait before calling again, at least 1."""
        return max(1, math.ceil(self.reset_after))

    def headers(self) -> dict[str, str]:
        """The ``RateLimit-*`` headers, and ``Retry-After`` when the call is refused."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(max(0, math.ceil(self.reset_after))),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


def default_storage_uri(settings: Settings) -> str:
    """Where the counts live: the broker's Redis when it is Redis, else ``memory://``."""
    if settings.broker_url is None:
        return f"redis+unix://{EmbeddedRedis(settings.data_dir).socket_path}"
    url = settings.broker_url
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        return url
    if parts.scheme in ("redis+socket", "socket") and parts.path:
        # kombu names the database ``virtual_host``; redis-py's unix URLs take ``db``.
        db = parse_qs(parts.query).get("virtual_host", [""])[0]
        return f"redis+unix://{parts.path}" + (f"?db={db}" if db.isdigit() else "")
    return "memory://"


def _safe_uri(uri: str) -> str:
    """``uri`` without its password, for logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def _storage(uri: str) -> Storage:
    options: dict[str, float | str | bool] = {}
    if not uri.startswith("memory://"):
        options = {
            "key_prefix": KEY_PREFIX,
            "wrap_exceptions": True,
            "socket_timeout": REDIS_TIMEOUT,
            "socket_connect_timeout": REDIS_TIMEOUT,
        }
    try:
        store = storage_from_string(uri, **options)
    except ConfigurationError as exc:
        raise ConfigError(f"no rate limit store for {_safe_uri(uri)}") from exc
    if not isinstance(store, Storage):  # an async+ scheme
        raise ConfigError(f"the rate limit store {_safe_uri(uri)} must not be async")
    return store


def _item(text: str, setting: str) -> RateLimitItem:
    try:
        return parse(text)
    except ValueError as exc:
        raise ConfigError(f"{setting} {text!r} is not a rate limit like '600/minute'") from exc


class RateLimiter:
    """Counts calls per subject and route class; :meth:`check` counts one and decides.

    Built once per app (it holds the Redis connection pool) and shared by every request.
    """

    def __init__(self, settings: Settings, storage_uri: str | None = None) -> None:
        self.storage_uri = storage_uri or default_storage_uri(settings)
        self._items: dict[RouteClass, RateLimitItem] = {
            "read": _item(settings.api_rate_read, "api_rate_read"),
            "write": _item(settings.api_rate_write, "api_rate_write"),
        }
        self._strategy = MovingWindowRateLimiter(_storage(self.storage_uri))

    def check(self, subject: str, route_class: RouteClass) -> Decision:
        """Count one call of ``subject`` in ``route_class``, unless it is over the limit.

        Blocking (one or two Redis round trips): call it from a sync dependency, which
        FastAPI runs in its thread pool, or use :meth:`acheck`.

        Raises:
            TransientError: the Redis holding the counts does not answer (503).
        """
        item = self._items[route_class]
        try:
            allowed = self._strategy.hit(item, route_class, subject)
            stats = self._strategy.get_window_stats(item, route_class, subject)
        except StorageError as exc:
            log.warning(
                "api_rate_limit_store_failed",
                store=_safe_uri(self.storage_uri),
                error=type(exc.storage_error).__name__,
            )
            raise TransientError("the rate limit store does not answer; try again") from None
        return Decision(
            allowed=allowed,
            limit=item.amount,
            remaining=max(0, stats.remaining),
            reset_after=max(0.0, stats.reset_time - time.time()),
        )

    async def acheck(self, subject: str, route_class: RouteClass) -> Decision:
        """:meth:`check` in the thread pool, for async code."""
        return await run_in_threadpool(self.check, subject, route_class)

    def clear(self, subject: str, route_class: RouteClass) -> None:
        """Forget every counted call of ``subject`` in ``route_class``."""
        self._strategy.clear(self._items[route_class], route_class, subject)


def limited(decision: Decision) -> JSONResponse:
    """The 429 answer to a refused call: a ``rate_limited`` problem with the headers."""
    return problem(
        429,
        "rate_limited",
        f"rate limit of {decision.limit} calls reached; retry in {decision.retry_after} s",
        headers=decision.headers(),
    )
