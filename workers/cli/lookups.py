"""The rows commands that read the models are about, by id: found, or ``not_found`` and exit 1.

The read commands that print tenants, runs and invoices find them in :mod:`workers.cli.views`,
with the same message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.cli.console import fail
from workers.runtime.models import Tenant

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["find_tenant"]


def find_tenant(session: Session, tenant_id: str) -> Tenant:
    """The tenant ``tenant_id``, or exit saying it does not exist."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise fail("not_found", f"tenant {tenant_id!r} does not exist")
    return tenant
