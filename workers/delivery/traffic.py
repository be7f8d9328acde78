"""A tenant's entry point on the load balancer, kept in step with its instances.

See docs/architecture.md §10. Each tenant gets a frontend on a stable 127.0.0.1 port whose
``stable`` group holds its instances (role ``app``) and whose ``canary`` group holds a
deployment's new instances. Without a load balancer (none configured, or not running)
tenants are reached at their instances' own addresses, and deployments that shift traffic
are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select

from schemas.plugins import Backend, Frontend, HeaderRoute, Weights
from workers.pluginhost.handles import get_load_balancer
from workers.runtime.db import session_scope
from workers.runtime.errors import Cul8erError, UnavailableError
from workers.runtime.models import Instance, Tenant
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from schemas.plugins import TrafficStats
    from workers.pluginhost.contracts import LoadBalancer

__all__ = [
    "availability",
    "backend_of",
    "balancer",
    "forget",
    "require",
    "restore_stable",
    "set_canary_weight",
    "sync",
]

log = structlog.get_logger(__name__)


def balancer() -> LoadBalancer | None:
    """The configured load balancer's handle, or ``None`` when none is configured."""
    name = get_settings().load_balancer
    return get_load_balancer(name) if name else None


def availability() -> tuple[LoadBalancer | None, str]:
    """The load balancer if it can serve traffic now; else ``None`` and the reason."""
    name = get_settings().load_balancer
    if not name:
        return None, "no load balancer is configured (CUL8ER_LOAD_BALANCER is empty)"
    try:
        lb = get_load_balancer(name)
        status = lb.health("")
    except Cul8erError as exc:
        return None, f"load balancer {name!r} is unavailable: {exc}"
    if not status.healthy:
        return None, f"load balancer {name!r} is not serving: {status.detail}"
    return lb, ""


def require(what: str) -> LoadBalancer:
    """The load balancer, or ``UnavailableError`` saying that ``what`` needs one."""
    lb, reason = availability()
    if lb is None:
        raise UnavailableError(
            f"{what} needs a load balancer to shift traffic: {reason}. Install HAProxy "
            "(scripts/setup.sh services) and start it with `cul8er up`."
        )
    return lb


def backend_of(row: Instance) -> Backend | None:
    """The backend an instance row stands for, or ``None`` when it has no address."""
    if not row.endpoint or row.status != "running":
        return None
    return Backend(
        tenant_id=row.tenant_id,
        name=row.name,
        address=row.endpoint,
        group="stable" if row.role == "app" else "canary",
    )


def sync(tenant_id: str) -> dict[str, Any]:
    """Make the tenant's frontend serve exactly its running instances; record its entry.

    Idempotent: a frontend that exists keeps its port; each backend is upserted and
    servers no longer recorded are removed. Without a load balancer this notes why and
    changes nothing: the tenant is reached at its instances' addresses.
    """
    lb, reason = availability()
    if lb is None:
        log.info("entry_skipped", reason=reason)
        return {"entry": None, "reason": reason}
    with session_scope() as session:
        rows = session.scalars(
            select(Instance).where(Instance.tenant_id == tenant_id).order_by(Instance.name)
        ).all()
        wanted = [b for b in (backend_of(row) for row in rows) if b is not None]
    entry = lb.ensure_frontend(Frontend(tenant_id=tenant_id))
    names = {b.name for b in wanted}
    for backend in wanted:
        lb.add_backend(backend)
    for server in lb.stats(tenant_id).servers:
        if server.name not in names:
            lb.remove_backend(
                Backend(
                    tenant_id=tenant_id,
                    name=server.name,
                    address=server.address,
                    group=server.group,
                )
            )
    with session_scope() as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is not None and tenant.resources.get("entry") != entry.address:
            tenant.resources = {**tenant.resources, "entry": entry.address}
    return {"entry": entry.address, "backends": sorted(names)}


def forget(tenant_id: str) -> dict[str, Any]:
    """Stop serving the tenant on the load balancer (deprovision); nothing there is fine."""
    lb, reason = availability()
    if lb is not None:
        lb.remove_frontend(tenant_id)
    with session_scope() as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is not None and "entry" in tenant.resources:
            tenant.resources = {k: v for k, v in tenant.resources.items() if k != "entry"}
    return {"removed": lb is not None, "reason": reason or None}


def set_canary_weight(lb: LoadBalancer, tenant_id: str, percent: int) -> TrafficStats:
    """Send ``percent`` of the tenant's traffic to the canary group; the split read back."""
    lb.set_weights(
        Weights(tenant_id=tenant_id, weights={"stable": 100 - percent, "canary": percent})
    )
    return lb.stats(tenant_id)


def restore_stable(lb: LoadBalancer, tenant_id: str) -> TrafficStats:
    """All traffic to the stable group, header routes cleared: one runtime call, then one
    config change only if a route was set."""
    lb.set_weights(Weights(tenant_id=tenant_id, weights={"stable": 100, "canary": 0}))
    stats = lb.stats(tenant_id)
    if stats.routes:
        lb.route_by_header(HeaderRoute(tenant_id=tenant_id, group=None))
    return stats
