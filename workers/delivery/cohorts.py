"""The tenants a plugin deployment moves, in cohorts, and what their calls measured.

See docs/architecture.md §10. A plugin deployment moves tenants, not instances, from the
version they run to the new one: each move is a ``tenant_plugins`` row (with the version the
tenant came from, for the way back), so the next call that names the tenant runs the new
version on every worker (``workers/pluginhost/tenancy.py``). Tenants move in a fixed order, a
stable hash of plugin and tenant, so the same 10 % go first on every retry and a cohort only
ever grows.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from workers.delivery import statistics
from workers.pluginhost import callstats
from workers.pluginhost.callstats import Tally
from workers.runtime.db import session_scope
from workers.runtime.models import AuditEvent, PluginCallStat, TenantPlugin

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterable

    from sqlalchemy.orm import Session

__all__ = ["Cohort", "hash_order"]


def hash_order(plugin: str, tenants: list[str]) -> list[str]:
    """``tenants`` in the order a deployment of ``plugin`` moves them (a stable hash)."""
    return sorted(
        set(tenants), key=lambda t: hashlib.sha256(f"{plugin}\x00{t}".encode()).hexdigest()
    )


@dataclass(frozen=True)
class Cohort:
    """The tenants of one plugin deployment and the version they move to."""

    deployment_id: str
    plugin: str
    version: str
    #: Every targeted tenant, in the order they move.
    targets: list[str]

    def count_for(self, weight: int) -> int:
        """How many tenants ``weight`` percent is (at least one for any weight above 0)."""
        return min(len(self.targets), math.ceil(len(self.targets) * weight / 100))

    def moved(self, session: Session | None = None) -> list[str]:
        """The targets on the new version by this deployment, in move order."""
        if session is None:
            with session_scope() as own:
                return self.moved(own)
        rows = set(
            session.scalars(
                select(TenantPlugin.tenant_id).where(
                    TenantPlugin.plugin == self.plugin,
                    TenantPlugin.deployment_id == self.deployment_id,
                    TenantPlugin.version == self.version,
                )
            )
        )
        return [t for t in self.targets if t in rows]

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The targets' own config overrides (``${secret:}`` references, never values)."""
        with session_scope() as session:
            rows = session.execute(
                select(TenantPlugin.tenant_id, TenantPlugin.config).where(
                    TenantPlugin.plugin == self.plugin, TenantPlugin.tenant_id.in_(self.targets)
                )
            ).all()
        return {tenant_id: dict(config) for tenant_id, config in rows if config}

    def move(self, tenants: list[str], *, actor: str = "cul8er") -> list[str]:
        """Put ``tenants`` on the new version; the ones moved now (again: none)."""
        moved: list[str] = []
        with session_scope() as session:
            current = {
                row.tenant_id: row
                for row in session.scalars(
                    select(TenantPlugin)
                    .where(TenantPlugin.plugin == self.plugin, TenantPlugin.tenant_id.in_(tenants))
                    .with_for_update()
                )
            }
            for tenant_id in tenants:
                row = current.get(tenant_id)
                if row is None:
                    row = TenantPlugin(tenant_id=tenant_id, plugin=self.plugin, config={})
                    session.add(row)
                elif row.deployment_id == self.deployment_id and row.version == self.version:
                    continue
                row.previous_version = row.version
                row.version = self.version
                row.deployment_id = self.deployment_id
                moved.append(tenant_id)
            if moved:
                self._audit(session, "plugin.tenants_moved", moved, actor)
        return moved

    def move_first(self, count: int) -> list[str]:
        """The first ``count`` targets on the new version; the ones moved now."""
        return self.move(self.targets[:count])

    def restore(self, *, actor: str = "cul8er") -> list[str]:
        """Every tenant this deployment moved back on the version it came from."""
        restored: list[str] = []
        with session_scope() as session:
            for row in session.scalars(
                select(TenantPlugin)
                .where(
                    TenantPlugin.plugin == self.plugin,
                    TenantPlugin.deployment_id == self.deployment_id,
                )
                .with_for_update()
            ):
                restored.append(row.tenant_id)
                if row.previous_version is None and not row.config:
                    session.delete(row)
                    continue
                row.version, row.previous_version = row.previous_version, None
                row.deployment_id = None
            if restored:
                self._audit(session, "plugin.tenants_restored", restored, actor)
        return sorted(restored, key=self.targets.index)

    def _audit(self, session: Session, kind: str, tenants: list[str], actor: str) -> None:
        session.add(
            AuditEvent(
                tenant_id=None,
                kind=kind,
                data={
                    "plugin": self.plugin,
                    "version": self.version,
                    "deployment_id": self.deployment_id,
                    "tenants": tenants,
                    "actor": actor,
                },
            )
        )

    # -- what the calls measured --------------------------------------------------------------

    def measure(self, since: dt.datetime, *, compare: bool = False) -> dict[str, Any]:
        """The new version's calls by the moved tenants since ``since``, as gate metrics.

        ``compare``: also the calls of every other version by the targets not moved, and a
        statistical comparison of the two (``statistics.compare``), under ``"comparison"``.
        """
        with session_scope() as session:
            moved = self.moved(session)
            new = callstats.read(session, self.plugin, self.version, moved, since)
            old: dict[str, Tally] = {}
            if compare:
                stay = [t for t in self.targets if t not in set(moved)]
                old = _other_versions(session, self.plugin, self.version, stay, since)
        total = _sum(new.values())
        metrics: dict[str, Any] = {
            "requests": float(total.calls),
            "errors": float(total.errors),
            "error_rate": total.error_rate,
            "success_rate": 1.0 - total.error_rate if total.calls else 0.0,
            "latency_ms_avg": round(total.latency_ms_avg, 3),
        }
        if compare:
            metrics["comparison"] = statistics.compare(list(new.values()), list(old.values()))
        return metrics


def _sum(tallies: Iterable[Tally]) -> Tally:
    total = Tally()
    for tally in tallies:
        total.merge(tally)
    return total


def _other_versions(
    session: Session, plugin: str, version: str, tenants: list[str], since: dt.datetime
) -> dict[str, Tally]:
    """Per tenant: the calls of every version but ``version`` since ``since``."""
    versions = set(
        session.scalars(
            select(PluginCallStat.version)
            .where(PluginCallStat.plugin == plugin, PluginCallStat.version != version)
            .distinct()
        )
    )
    found: dict[str, Tally] = {}
    for other in versions:
        for tenant_id, tally in callstats.read(session, plugin, other, tenants, since).items():
            found.setdefault(tenant_id, Tally()).merge(tally)
    return found
