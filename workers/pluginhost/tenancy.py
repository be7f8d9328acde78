"""Which version of a plugin each tenant runs, and with which config (docs/architecture.md §5).

A tenant with no ``tenant_plugins`` row runs the version the ``plugins`` row serves. A row
pins a version (a plugin deployment moved the tenant) or carries config overrides, or both.

A call that names a tenant reads that tenant's row when it starts: a tenant moved back by a
rollback runs the old version from the first call that starts after the rollback committed,
on every worker. To keep the read off plugins nobody pinned, each process keeps the set of
plugins that have rows at all, refreshed with the rest of its plugin state
(``CUL8ER_PLUGIN_STATE_TTL``): a plugin's first pinned tenant is seen within that time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from schemas.states import DEPLOYMENT_OPEN
from workers.runtime.db import session_scope
from workers.runtime.models import Deployment, TenantPlugin

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.orm import Session

__all__ = [
    "Choice",
    "choices_of",
    "pinned_plugins",
    "rolling_versions",
    "set_choice",
    "tenant_choice",
    "tenant_of",
    "version_counts",
]

#: (version or ``None`` for the plugin's own, config overrides).
Choice = tuple[str | None, dict[str, Any]]


def pinned_plugins(url: str) -> frozenset[str]:
    """The plugins some tenant has a row for."""
    with session_scope(url) as session:
        return frozenset(session.scalars(select(TenantPlugin.plugin).distinct()))


def rolling_versions(url: str) -> frozenset[tuple[str, str]]:
    """(plugin, version) of every plugin deployment in progress past its first stage (the
    sandbox: no version is imported on a general worker before it passed there): what workers
    load ahead of the switch."""
    with session_scope(url) as session:
        rows = session.execute(
            select(Deployment.plugin, Deployment.release).where(
                Deployment.plugin.is_not(None),
                Deployment.status.in_(DEPLOYMENT_OPEN),
                Deployment.stage_index > 0,
            )
        ).all()
    return frozenset((str(plugin), str(release.get("version"))) for plugin, release in rows)


def tenant_choice(url: str, plugin: str, tenant_id: str) -> Choice | None:
    """``tenant_id``'s row for ``plugin``, if it has one."""
    with session_scope(url) as session:
        row = session.execute(
            select(TenantPlugin.version, TenantPlugin.config).where(
                TenantPlugin.tenant_id == tenant_id, TenantPlugin.plugin == plugin
            )
        ).first()
    if row is None:
        return None
    return row.version, dict(row.config or {})


def tenant_of(args: Mapping[str, Any]) -> str | None:
    """The tenant a call is for: a ``tenant_id`` argument, or one carried by an argument
    (an event, a provision request, a backend), or a metric's ``tenant_id`` label."""
    value = args.get("tenant_id")
    if isinstance(value, str) and value:
        return value
    for arg in args.values():
        found = getattr(arg, "tenant_id", None)
        if isinstance(found, str) and found:
            return found
        labels = getattr(arg, "labels", None)
        if isinstance(labels, dict) and isinstance(labels.get("tenant_id"), str):
            return str(labels["tenant_id"])
    return None


def set_choice(
    session: Session, tenant_id: str, plugin: str, version: str | None, config: dict[str, Any]
) -> dict[str, Any]:
    """Pin ``tenant_id`` to ``version`` of ``plugin`` with ``config`` overrides (both empty:
    back to the plugin's own version and config); the tenant's row as it is now."""
    row = session.get(TenantPlugin, (tenant_id, plugin), with_for_update=True)
    previous = row.version if row is not None else None
    if version is None and not config:
        if row is not None:
            session.delete(row)
        return {
            "tenant_id": tenant_id,
            "plugin": plugin,
            "version": None,
            "config": {},
            "previous_version": previous,
        }
    if row is None:
        row = TenantPlugin(tenant_id=tenant_id, plugin=plugin)
        session.add(row)
    row.version, row.config = version, dict(config)
    row.deployment_id, row.previous_version = None, previous
    return {
        "tenant_id": tenant_id,
        "plugin": plugin,
        "version": version,
        "config": dict(config),
        "previous_version": previous,
    }


def choices_of(session: Session, tenant_id: str) -> dict[str, TenantPlugin]:
    """``tenant_id``'s rows, by plugin."""
    return {
        row.plugin: row
        for row in session.scalars(select(TenantPlugin).where(TenantPlugin.tenant_id == tenant_id))
    }


def version_counts(session: Session, plugin: str) -> dict[str | None, int]:
    """How many tenants are pinned to each version of ``plugin`` (``None``: config only)."""
    rows = session.execute(
        select(TenantPlugin.version, func.count())
        .where(TenantPlugin.plugin == plugin)
        .group_by(TenantPlugin.version)
    ).all()
    return {version: int(count) for version, count in rows}
