"""Instances of a release: started as the canary group, replaced in place, removed.

See docs/architecture.md §10. Names are deterministic (``t-{tenant}-canary-{n}`` for the
canary group, the tenant's own ``t-{tenant}-app-{n}`` for the stable group), and each
instance row records the release it runs, so every operation here can be repeated after
a crash and finds the work already done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import delete, select

from schemas.delivery import Release
from schemas.plugins import Backend
from workers.delivery import traffic
from workers.economics.plans import get_plan
from workers.engine.instances import instance_spec, wait_healthy
from workers.engine.inventory import record_instance
from workers.pluginhost.handles import get_platform
from workers.runtime.db import session_scope
from workers.runtime.errors import NotFoundError, TransientError
from workers.runtime.models import Instance, Tenant
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from schemas.plans import Plan
    from schemas.platform import InstanceInfo
    from workers.pluginhost.contracts import LoadBalancer, Platform

__all__ = ["Group", "Target", "load_target"]

log = structlog.get_logger(__name__)

#: How long a drained server keeps finishing its open requests before it is stopped (s).
DRAIN_GRACE = 0.3


@dataclass(frozen=True)
class Group:
    """A tenant's instances of one role, as recorded: name → (ordinal, release, endpoint)."""

    role: str
    rows: tuple[tuple[str, int, str | None, str | None, str], ...]

    @property
    def names(self) -> list[str]:
        """The instance names, in ordinal order."""
        return [name for name, *_ in self.rows]

    def release_of(self, name: str) -> str | None:
        """The version the instance runs, as recorded (``None`` also for a name not here)."""
        return next((release for n, _, release, _, _ in self.rows if n == name), None)


@dataclass(frozen=True)
class Target:
    """One tenant as a deployment sees it: where it runs, on what plan, behind what."""

    tenant_id: str
    platform_name: str
    plan: Plan
    lb: LoadBalancer | None

    @property
    def platform(self) -> Platform:
        """The tenant's platform plugin."""
        return get_platform(self.platform_name, get_settings())

    def group(self, role: str) -> Group:
        """The tenant's instances of ``role`` (``app``: stable; ``canary``), read now."""
        with session_scope() as session:
            rows = session.execute(
                select(
                    Instance.name,
                    Instance.ordinal,
                    Instance.release,
                    Instance.endpoint,
                    Instance.status,
                )
                .where(Instance.tenant_id == self.tenant_id, Instance.role == role)
                .order_by(Instance.ordinal)
            ).all()
        return Group(role, tuple((n, o, r, e, s) for n, o, r, e, s in rows))

    # -- the canary group ---------------------------------------------------------------------

    def start_canaries(self, release: Release, count: int) -> list[str]:
        """Instances ``0..count-1`` of the canary group run ``release``, healthy, at weight 0.

        An instance found from an earlier attempt is kept if it runs ``release``.
        """
        names = []
        for ordinal in range(count):
            spec = instance_spec(
                self.tenant_id,
                self.plan,
                self.platform_name,
                ordinal,
                role="canary",
                release=release,
            )
            info = self.platform.create_instance(spec)
            record_instance(
                self.tenant_id, info, role="canary", ordinal=ordinal, release=release.version
            )
            self._wait_healthy(info)
            self._serve(info, group="canary")
            names.append(info.name)
        for name in self.group("canary").names:
            if name not in names:
                self._remove(name, group="canary")
        return names

    def remove_canaries(self) -> list[str]:
        """Every canary instance out of the load balancer, destroyed, its row gone."""
        removed = self.group("canary").names
        for name in removed:
            self._remove(name, group="canary")
        return removed

    # -- the stable group ---------------------------------------------------------------------

    def replace(self, names: list[str], release: Release | None) -> list[str]:
        """Give the stable instances ``names`` ``release`` in place, one after another.

        Each is drained first (open requests finish), destroyed, created again from the
        release, health-checked and only then given traffic again. An instance that runs
        ``release`` already is left alone. Returns the names replaced now.
        """
        version = release.version if release is not None else None
        stable = self.group("app")
        replaced = []
        for name, ordinal, current, endpoint, status in stable.rows:
            if name not in names or (current == version and status == "running"):
                continue
            if self.lb is not None and endpoint:
                old = Backend(tenant_id=self.tenant_id, name=name, address=endpoint)
                self.lb.add_backend(old.model_copy(update={"state": "drain"}))
                time.sleep(DRAIN_GRACE)
                self.lb.add_backend(old.model_copy(update={"state": "maint"}))
            self.platform.destroy_instance(name)
            spec = instance_spec(
                self.tenant_id, self.plan, self.platform_name, ordinal, release=release
            )
            info = self.platform.create_instance(spec)
            record_instance(self.tenant_id, info, role="app", ordinal=ordinal, release=version)
            self._wait_healthy(info)
            self._serve(info, group="stable")
            replaced.append(name)
            log.info("instance_replaced", instance=name, release=version)
        return replaced

    # -- helpers ------------------------------------------------------------------------------

    def _serve(self, info: InstanceInfo, *, group: str) -> None:
        if self.lb is None or not info.endpoint:
            return
        self.lb.add_backend(
            Backend(
                tenant_id=self.tenant_id,
                name=info.name,
                address=info.endpoint,
                group="canary" if group == "canary" else "stable",
            )
        )

    def _remove(self, name: str, *, group: str) -> None:
        if self.lb is not None:
            self.lb.remove_backend(
                Backend(
                    tenant_id=self.tenant_id,
                    name=name,
                    address="127.0.0.1:1",
                    group="canary" if group == "canary" else "stable",
                )
            )
        self.platform.destroy_instance(name)
        with session_scope() as session:
            session.execute(
                delete(Instance).where(Instance.tenant_id == self.tenant_id, Instance.name == name)
            )

    def _wait_healthy(self, info: InstanceInfo) -> None:
        """One healthy answer from the instance within the health window."""
        if not info.endpoint:
            raise TransientError(f"instance {info.name} has no endpoint ({info.status})")
        settings = get_settings()
        wait_healthy(
            info.name,
            info.endpoint,
            timeout=settings.health_window,
            probe_timeout=settings.health_timeout,
            interval=0.1,
        )


def load_target(tenant_id: str, *, lb: LoadBalancer | None = None) -> Target:
    """The tenant as a deployment sees it (``lb``: the balancer in use, if any)."""
    settings = get_settings()
    with session_scope() as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFoundError(f"tenant {tenant_id!r} does not exist")
        platform, plan_name = tenant.platform, tenant.plan
    if lb is None and settings.load_balancer:
        lb, _ = traffic.availability()
    return Target(tenant_id, platform, get_plan(plan_name, settings.plans_file), lb)
