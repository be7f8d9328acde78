"""Per-request context: a request id, bound into the logs and echoed, and one access line.

:class:`RequestLog` is plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one
runs the app in a task of its own and wraps the body in a stream, which costs time on every
call, hides contextvars the app sets from the code after it, and breaks streaming and
background tasks. Plain ASGI binds contextvars in the very task
that runs the app, and only looks at the ``http.response.start`` message going out.

For each HTTP request it

- takes the request id from a valid incoming ``X-Request-ID`` (:data:`REQUEST_ID`: 8 to 128
  letters, digits, ``.``, ``_``, ``:`` or ``-``) or makes a new one (uuid4 hex), stores it
  as ``request.state.request_id``, binds it into structlog's contextvars for the request (so
  every line logged meanwhile carries it) and sets it on the response's ``X-Request-ID``;
- logs one ``api_request`` line once the app is done: ``method``, ``path`` (the route's
  template such as ``/api/v1/tenants/{tenant_id}`` when a route matched, else the raw path),
  ``status``, ``duration_ms``, ``client``, ``request_id`` and ``subject`` when the app put
  one on ``request.state.subject``. Never a header (``Authorization`` above all) nor the
  query string, so no token, key, secret or password given in either reaches the log. A
  request that raised is logged with status 500 before the exception goes on to the 500
  handler (:mod:`workers.api.problems`).

Proxies: ``X-Forwarded-For``/``X-Forwarded-Proto`` are honoured by the server, not here:
``cul8er api serve`` runs uvicorn with ``proxy_headers=True`` and ``forwarded_allow_ips`` set
to ``api_forwarded_allow_ips``, so uvicorn's ``ProxyHeadersMiddleware`` (addresses or
networks, comma-separated; ``*`` trusts any peer) rewrites the client and scheme before the
app runs, and only for a direct peer in that list. This middleware logs the client as the
server resolved it. A second check inside the app would apply the same headers twice; under
another ASGI server, wrap the app in that same ``ProxyHeadersMiddleware`` with the setting.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Final

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.api.problems import problem

__all__ = ["REQUEST_ID", "REQUEST_ID_HEADER", "RequestLog"]

log = structlog.get_logger(__name__)

#: The header carrying the request id, both ways.
REQUEST_ID_HEADER: Final = "X-Request-ID"
#: What an incoming request id must look like to be kept; anything else is replaced.
REQUEST_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}")


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if REQUEST_ID.fullmatch(text) else None
    return None


def _path(scope: Scope) -> str:
    """The matched route's full template (prefixes included), else the path as it came."""
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        # FastAPI keeps included routers nested; this context has the prefixed template.
        context = fastapi_scope.get("effective_route_context")
        template = getattr(context, "path_format", None)
        if isinstance(template, str) and template:
            return template
    template = getattr(scope.get("route"), "path_format", None)
    if isinstance(template, str) and template:
        return template
    return str(scope.get("path", ""))


def _subject(state: dict[str, Any]) -> str | None:
    subject = state.get("subject")
    if subject is None or isinstance(subject, str):
        return subject
    nested = getattr(subject, "subject", None)  # a principal stored whole
    return nested if isinstance(nested, str) else None


def _has_nul(scope: Scope) -> bool:
    query = scope.get("query_string", b"").lower()
    return "\x00" in scope.get("path", "") or b"%00" in query or b"\x00" in query


class RequestLog:
    """Request id, contextvars and one ``api_request`` log line per HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = time.perf_counter()
        if _has_nul(scope):
            # No text column takes a NUL, and no name, id or filter holds one: refused here.
            inner: ASGIApp = problem(
                400, "validation_error", "the path or query holds a NUL character"
            )
        else:
            inner = self.app

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            with structlog.contextvars.bound_contextvars(request_id=request_id):
                await inner(scope, receive, send_with_id)
        finally:
            client = scope.get("client")
            log.info(
                "api_request",
                method=scope.get("method"),
                path=_path(scope),
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                client=client[0] if client else None,
                subject=_subject(state),
                request_id=request_id,
            )
