"""The HTTP API's application: ``/api/v1`` routes, problem answers, request logs.

``create_app()`` builds it; ``cul8er api`` serves it with uvicorn. The OpenAPI document comes
from the same pydantic models as the public tasks' JSON Schemas (``schemas/tasks.py``).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from workers.api import deployments, health, plugins, problems, records, tenants, workflows
from workers.api.auth import AuthError
from workers.api.deps import Limited
from workers.api.middleware import RequestLog
from workers.api.ratelimit import limited

__all__ = ["PREFIX", "create_app"]

#: Every versioned route lives under it.
PREFIX = "/api/v1"


def create_app() -> FastAPI:
    """The API with its routes, error answers and request logging."""
    api = FastAPI(
        title="cul8er",
        version="1",
        summary="The control plane of a multi-tenant SaaS platform.",
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
        # Every error is a problem (RFC 9457); the routes declare their own successes.
        responses=problems.RESPONSES,
    )
    problems.install(api)

    @api.exception_handler(AuthError)
    def _unauthorized(request: Request, exc: AuthError) -> JSONResponse:
        response = problems.problem(401, "unauthorized", str(exc), instance=request.url.path)
        response.headers["WWW-Authenticate"] = 'Bearer realm="cul8er"'
        return response

    @api.exception_handler(Limited)
    def _limited(request: Request, exc: Limited) -> JSONResponse:
        return limited(exc.decision)

    api.add_middleware(RequestLog)
    api.include_router(health.router)
    for router in (
        tenants.router,
        plugins.tenant_router,
        workflows.router,
        deployments.router,
        plugins.router,
        records.router,
    ):
        api.include_router(router, prefix=PREFIX)
    return api
