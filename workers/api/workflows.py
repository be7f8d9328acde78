"""``/api/v1/workflows``: a workflow run and its steps (what a write's ``Location`` points at)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select

from workers.api.deps import Caller
from workers.api.roles import Action, authorize, visible_tenants
from workers.engine.views import describe_run
from workers.runtime.db import session_scope
from workers.runtime.errors import NotFoundError
from workers.runtime.models import WorkflowRun

__all__ = ["router"]

router = APIRouter(prefix="/workflows", tags=["workflows"])


@router.get("/{workflow_id}", summary="A workflow: status, phase, steps, error")
def get_workflow(workflow_id: str, caller: Caller) -> Response:
    """One run as ``cul8er.workflows.status`` answers it (a tenant owner sees its own only)."""
    authorize(caller, Action.WORKFLOW_READ)
    seen = visible_tenants(caller)
    with session_scope() as session:
        run = session.get(WorkflowRun, workflow_id)
        if run is None or (seen is not None and run.tenant_id not in seen):
            raise NotFoundError(f"workflow {workflow_id} does not exist")
        # What cul8er.workflows.status answers, read here without a round trip to a worker.
        return JSONResponse({"ok": True, **describe_run(session, run)})


@router.get("", summary="Workflow runs, newest first")
def list_workflows(
    caller: Caller,
    tenant_id: Annotated[str | None, Query(max_length=40)] = None,
    kind: Annotated[str | None, Query(max_length=40)] = None,
    status: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """Runs the caller may see, filtered by tenant, kind and status."""
    authorize(caller, Action.WORKFLOW_READ, tenant_id=tenant_id)
    query = select(WorkflowRun).order_by(WorkflowRun.created_at.desc()).limit(limit)
    seen = visible_tenants(caller)
    if seen is not None:
        query = query.where(WorkflowRun.tenant_id.in_(seen))
    for column, value in (
        (WorkflowRun.tenant_id, tenant_id),
        (WorkflowRun.kind, kind),
        (WorkflowRun.status, status),
    ):
        if value is not None:
            query = query.where(column == value)
    with session_scope() as session:
        runs = list(session.scalars(query))
    return {
        "items": [
            {
                "workflow_id": run.id,
                "kind": run.kind,
                "tenant_id": run.tenant_id,
                "status": run.status,
                "phase": run.phase,
                "current_step": run.current_step,
                "created_at": run.created_at.isoformat(),
            }
            for run in runs
        ]
    }
