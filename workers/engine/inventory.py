"""The database's view of a tenant's instances, written from what platforms report."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from workers.runtime.db import session_scope
from workers.runtime.models import Instance

if TYPE_CHECKING:
    from schemas.platform import InstanceInfo

__all__ = ["KEEP", "record_instance"]

#: ``release=KEEP``: leave the release recorded on the row as it is.
KEEP = "\0keep"


def record_instance(
    tenant_id: str, info: InstanceInfo, *, role: str, ordinal: int, release: str | None = KEEP
) -> None:
    """Upsert the row of an instance from what the platform reported.

    ``release`` is the version it runs (``None``: the plan's image); ``KEEP`` leaves the
    recorded one, for a start or a stop, which change no artifact.
    """
    with session_scope() as session:
        row = session.scalars(
            select(Instance).where(Instance.tenant_id == tenant_id, Instance.name == info.name)
        ).first()
        if row is None:
            row = Instance(tenant_id=tenant_id, name=info.name, role=role, ordinal=ordinal)
            session.add(row)
        row.platform = info.platform
        row.status = info.status
        row.endpoint = info.endpoint
        row.provider_id = info.provider_id
        row.limits = {
            "requested": info.limits_requested.model_dump(mode="json"),
            "applied": info.limits_applied,
        }
        if release != KEEP:
            row.release = release
