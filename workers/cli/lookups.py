"""The rows commands are about, by id: found, or ``not_found`` on stderr and exit code 1."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.cli.console import fail
from workers.runtime.models import Invoice, Tenant, WorkflowRun

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["find_invoice", "find_run", "find_tenant"]


def find_tenant(session: Session, tenant_id: str) -> Tenant:
    """The tenant ``tenant_id``, or exit saying it does not exist."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise fail("not_found", f"tenant {tenant_id!r} does not exist")
    return tenant


def find_run(session: Session, workflow_id: str) -> WorkflowRun:
    """The workflow run ``workflow_id``, or exit saying it does not exist."""
    run = session.get(WorkflowRun, workflow_id)
    if run is None:
        raise fail("not_found", f"workflow {workflow_id} does not exist")
    return run


def find_invoice(session: Session, invoice_id: str) -> Invoice:
    """The invoice ``invoice_id``, or exit saying it does not exist."""
    invoice = session.get(Invoice, invoice_id)
    if invoice is None:
        raise fail("not_found", f"invoice {invoice_id!r} does not exist")
    return invoice
