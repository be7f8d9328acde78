"""``/healthz`` (the process answers) and ``/readyz`` (its database and broker answer too)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from workers.runtime.app import app as celery_app
from workers.runtime.db import session_scope

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The API process answers")
def healthz() -> dict[str, str]:
    """Always ``ok`` while the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", summary="The database and the broker answer")
def readyz() -> JSONResponse:
    """``200`` when both answer, ``503`` naming the one that does not."""
    checks: dict[str, str] = {}
    try:
        with session_scope() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; the reason is reported
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:  # idem
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)
