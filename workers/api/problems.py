"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error the API answers has one shape::

    {"type": "https://cul8er.dev/problems/<code>", "title": "<HTTP reason phrase>",
     "status": 409, "detail": "...", "code": "conflict",
     "errors": [{"field": "plan", "message": "..."}], "instance": "/api/v1/..."}

``code`` and ``errors`` are exactly what a public task answers in ``{"ok": false, "error":
{"code", "message", "errors"}}`` (docs/architecture.md §4), so a client handles the API and the
task contract alike; ``detail`` is the task's ``message``. :data:`STATUS` maps each code to its
HTTP status; :func:`install` turns what a route raises into a problem:

- a :class:`~workers.runtime.errors.Cul8erError`: its code and status (an error with a
  ``headers`` mapping, such as ``WWW-Authenticate``, sends them). A 5xx one whose message may
  name server internals (``config_error``, an unknown code) is logged and answered without it;
- FastAPI's :class:`~fastapi.exceptions.RequestValidationError`: 422 ``validation_error`` with
  dotted field paths as the tasks give them (``instances.0.cpu``; body fields without the
  leading ``body``, query, path and header parameters as ``query.limit``), at most 20;
- Starlette's :class:`~starlette.exceptions.HTTPException` (FastAPI's too): its status, headers
  and detail, with the code of that status (404 ``not_found``, 405 ``method_not_allowed``, ...);
- anything else: 500 ``internal`` with a detail that reveals nothing but the request id, and
  the exception logged (``api_unhandled_error``, its traceback without local variables,
  which would hold the request's headers) with that id. That handler runs outside every
  middleware (Starlette's ``ServerErrorMiddleware``), so it sets ``X-Request-ID`` itself from
  ``request.state.request_id`` (stored by :mod:`workers.api.middleware`).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from workers.engine.public import field_path
from workers.runtime.errors import Cul8erError

__all__ = [
    "FieldProblem",
    "MAX_ERRORS",
    "MAX_MESSAGE",
    "MEDIA_TYPE",
    "Problem",
    "RESPONSES",
    "STATUS",
    "TYPE_BASE",
    "code_for_status",
    "from_task_answer",
    "install",
    "problem",
]

log = structlog.get_logger(__name__)

#: The media type of every error answer.
MEDIA_TYPE: Final = "application/problem+json"
#: A problem's ``type`` is this followed by its code.
TYPE_BASE: Final = "https://cul8er.dev/problems/"
#: Longest message echoed back, and most field errors listed (as the public tasks do).
MAX_MESSAGE: Final = 300
MAX_ERRORS: Final = 20

#: Error code → HTTP status; a code not listed is answered 500.
STATUS: Final[Mapping[str, int]] = {
    # workers/runtime/errors.py
    "error": 500,  # Cul8erError itself: a bug, not a caller's mistake
    "transient": 503,  # TransientError: try again later
    "permanent": 400,  # PermanentError itself: this request will never succeed
    "validation_error": 422,
    "conflict": 409,
    "not_found": 404,
    "pool_exhausted": 503,  # no subnet is free: the server's capacity, not the request
    "plugin_refused": 409,  # an operator's plugin action broke a rule of the current state
    "unavailable": 503,  # what the request needs (a load balancer, an engine) is not there
    "config_error": 500,  # the server's settings are wrong
    "plugin_error": 422,  # the plugin named does not fulfil its contract
    # workers/pluginhost/registry.py: the plugin exists but is disabled, failed or missing
    "plugin_unavailable": 409,
    # workers/delivery: why a deployment stopped, should an answer carry one
    "sandbox_failed": 409,
    "gate_failed": 409,
    "aborted": 409,
    # the API's own
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "rate_limited": 429,
    "internal": 500,
}

#: The code of an HTTP status, where one of :data:`STATUS` is the obvious one.
_STATUS_CODE: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    422: "validation_error",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
}


def code_for_status(status: int) -> str:
    """The code of an HTTP status: ``not_found`` for 404, ``method_not_allowed`` for 405."""
    if status in _STATUS_CODE:
        return _STATUS_CODE[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "internal" if status >= 500 else "bad_request"


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class FieldProblem(BaseModel):
    """One field a request got wrong, as the public tasks name it."""

    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem: what every error answer of the API is."""

    type: str
    title: str
    status: int
    detail: str
    #: The same code a public task answers with (``validation_error``, ``not_found``, …).
    code: str
    errors: list[FieldProblem] | None = None
    instance: str | None = None


def _documented(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {MEDIA_TYPE: {"schema": Problem.model_json_schema()}},
    }


#: The problems every route may answer, for the OpenAPI document.
RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: _documented("Bad request (a NUL character, a body that is not JSON)"),
    401: _documented("No valid bearer token"),
    403: _documented("The token's role may not do this"),
    404: _documented("No such resource, or not one the token may see"),
    409: _documented("The resource is in a state that refuses this"),
    422: _documented("A field is wrong; ``errors`` names each"),
    429: _documented("Too many calls; see Retry-After"),
    503: _documented("No worker or store answered in time; try again"),
}


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A problem-details answer; ``errors`` are ``{"field", "message"}`` as the tasks give them."""
    body: dict[str, Any] = {
        "type": TYPE_BASE + code,
        "title": _title(status),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    if instance is not None:
        body["instance"] = instance
    return JSONResponse(
        body, status_code=status, media_type=MEDIA_TYPE, headers=dict(headers or {})
    )


def from_task_answer(answer: Mapping[str, Any]) -> JSONResponse:
    """A public task's ``{"ok": false, "error": {...}}`` as a problem.

    Raises:
        ValueError: ``answer`` is a success (``"ok": true``); only a rejection is a problem.
    """
    if answer.get("ok") is True:
        raise ValueError("a successful task answer is not a problem")
    error = answer.get("error")
    if not isinstance(error, Mapping) or not isinstance(error.get("code"), str):
        log.error("api_bad_task_answer", answer_keys=sorted(answer))
        return problem(500, "internal", "the task gave an answer the API cannot read")
    code = error["code"]
    errors = error.get("errors")
    return problem(
        STATUS.get(code, 500),
        code,
        str(error.get("message", ""))[:MAX_MESSAGE],
        errors=list(errors) if isinstance(errors, list) else None,
    )


def _traceback(exc: BaseException) -> str:
    """The traceback as text, without local variables.

    Not ``exc_info``: a console renderer with rich shows each frame's locals, and a
    request's locals hold its headers, the ``Authorization`` token among them.
    """
    return "".join(traceback.format_exception(exc)).rstrip()


def _request_id(request: Request) -> str | None:
    value = getattr(request.state, "request_id", None)
    return value if isinstance(value, str) else None


async def _cul8er_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Cul8erError)
    data = exc.to_dict()
    status = STATUS.get(exc.code, 500)
    detail = str(data.get("message", ""))[:MAX_MESSAGE]
    if status == 500:
        # config_error and unknown codes: the message may name files, hosts or settings.
        log.error(
            "api_server_error",
            code=exc.code,
            request_id=_request_id(request),
            exception=_traceback(exc),
        )
        detail = "the server cannot answer this request; its operator has the details"
    errors = data.get("errors")
    headers = getattr(exc, "headers", None)
    return problem(
        status,
        exc.code,
        detail,
        errors=errors if isinstance(errors, list) else None,
        instance=request.url.path,
        headers=headers if isinstance(headers, Mapping) else None,
    )


def _request_field(body: Any, loc: tuple[int | str, ...] | list[int | str]) -> str:
    if not loc:
        return "request"
    where, rest = loc[0], tuple(loc[1:])
    if where == "body":
        return field_path(body, rest) or "body"
    return ".".join(str(part) for part in loc[:2])  # query.limit, path.tenant_id, header.x


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: dict[str, str] = {}
    for err in exc.errors():
        field = _request_field(exc.body, err.get("loc", ()))
        errors.setdefault(field, str(err.get("msg", "invalid"))[:MAX_MESSAGE])
    listed = [{"field": f, "message": m} for f, m in list(errors.items())[:MAX_ERRORS]]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in listed)
    return problem(
        422,
        "validation_error",
        f"invalid request: {summary}"[:MAX_MESSAGE],
        errors=listed,
        instance=request.url.path,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail else _title(status)
    return problem(
        status,
        code_for_status(status),
        detail[:MAX_MESSAGE],
        instance=request.url.path,
        headers=exc.headers,
    )


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    request_id = _request_id(request)
    log.error(
        "api_unhandled_error",
        request_id=request_id,
        method=request.method,
        error_type=type(exc).__name__,
        exception=_traceback(exc),
    )
    detail = "the server failed to answer this request"
    if request_id:
        detail += f"; quote request id {request_id} to its operator"
    return problem(
        500,
        "internal",
        detail,
        instance=request.url.path,
        headers={"X-Request-ID": request_id} if request_id else None,
    )


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` as a problem (see the module docstring)."""
    app.add_exception_handler(Cul8erError, _cul8er_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
