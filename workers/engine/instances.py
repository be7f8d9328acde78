"""Helpers the provisioners and the tenant workflow share: instance names, specs, probes."""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import TYPE_CHECKING, Any, Final

from schemas.platform import InstanceSpec
from schemas.plugins import HealthReport
from workers.runtime.errors import PermanentError, TransientError
from workers.runtime.settings import get_settings
from workers.runtime.waiting import wait_until

if TYPE_CHECKING:
    from collections.abc import Iterable

    from schemas.delivery import Release
    from schemas.plans import Plan
    from schemas.platform import InstanceInfo

__all__ = [
    "SHARED_TENANT_ID",
    "TENANT_ID_PATTERN",
    "check_tenant_id",
    "health_report",
    "instance_name",
    "instance_spec",
    "probe",
]

#: The owner recorded on instances no tenant owns (a shared pool): an underscore keeps it
#: out of tenant slugs, so no tenant's listing includes them.
SHARED_TENANT_ID: Final = "_shared"
#: A tenant id as ``schemas.tasks.TenantId`` accepts it: it fits instance and SQL names.
TENANT_ID_PATTERN: Final = re.compile(r"^[a-z][a-z0-9-]{1,38}[a-z0-9]$")


@functools.cache
def _direct() -> Any:
    """An opener that never sends loopback probes through an HTTP proxy from the environment.

    Built on the first probe: ``urllib.request`` (with ``http.client`` and ``email``) costs
    every plugin that imports this module tens of milliseconds at load.
    """
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_tenant_id(tenant_id: str) -> str:
    """``tenant_id`` if it is a valid tenant slug; anything else is refused for good."""
    # Names of instances, schemas and databases derive from it, so it must never be raw text.
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise PermanentError(
            f"invalid tenant id {tenant_id[:64]!r}: must match {TENANT_ID_PATTERN.pattern}"
        )
    return tenant_id


def instance_name(tenant_id: str, role: str, ordinal: int) -> str:
    """The deterministic instance name ``t-{tenant}-{role}-{n}``."""
    return f"t-{tenant_id}-{role}-{ordinal}"


def instance_spec(
    tenant_id: str,
    plan: Plan,
    platform: str,
    ordinal: int,
    *,
    port: int | None = None,
    role: str = "app",
    release: Release | None = None,
) -> InstanceSpec:
    """What instance ``ordinal`` of a tenant on ``plan`` looks like on ``platform``.

    ``port`` is the service's port inside the instance; ``None`` reads ``instance_port``
    from the process-wide settings. ``release`` (``None``: the plan's image) picks the
    artifact for ``platform`` and the release's settings, as environment variables.
    """
    labels = {"cul8er.tenant": tenant_id, "cul8er.plan": plan.name}
    image, env = plan.images.get(platform), {}
    if release is not None:
        image = release.artifact(platform) or image
        env = release.settings.env(release.version)
        labels["cul8er.release"] = release.version
    return InstanceSpec(
        name=instance_name(tenant_id, role, ordinal),
        tenant_id=tenant_id,
        role=role,
        ordinal=ordinal,
        image=image,
        limits=plan.instance_limits(),
        labels=labels,
        env=env,
        port=get_settings().instance_port if port is None else port,
    )


def probe(endpoint: str, *, timeout: float) -> tuple[bool, str]:
    """GET ``/health`` on a loopback endpoint; returns (healthy, detail)."""
    host = endpoint.rsplit(":", 1)[0]
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        # Health traffic stays on this machine: instances publish their port on loopback.
        return False, f"endpoint {endpoint} is not on loopback"
    from urllib.error import HTTPError

    try:
        with _direct().open(f"http://{endpoint}/health", timeout=timeout) as response:
            body = response.read(1024)
            return response.status == 200, body.decode(errors="replace")
    except HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, str(exc)


def wait_healthy(
    name: str, endpoint: str, *, timeout: float, probe_timeout: float, interval: float = 0.2
) -> None:
    """Probe ``endpoint`` until it answers healthy; ``TransientError`` with the last answer."""
    last = {"detail": ""}

    def healthy() -> bool:
        ok, last["detail"] = probe(endpoint, timeout=probe_timeout)
        return ok

    wait_until(
        healthy,
        timeout=timeout,
        interval=interval,
        message=lambda: f"instance {name} is not healthy: {last['detail'][:200]}",
        error=TransientError,
    )


def health_report(
    tenant_id: str, instances: Iterable[InstanceInfo], *, timeout: float, empty: tuple[str, str]
) -> HealthReport:
    """Probe each instance's ``/health`` once; no instance at all is ``empty`` and unhealthy."""
    checks: dict[str, str] = {}
    healthy = True
    for info in instances:
        if info.endpoint is None:
            ok, detail = False, f"{info.status}, no endpoint"
        else:
            ok, detail = probe(info.endpoint, timeout=timeout)
        checks[info.name] = "healthy" if ok else f"unhealthy: {detail[:200]}"
        healthy = healthy and ok
    if not checks:
        return HealthReport(tenant_id=tenant_id, healthy=False, checks=dict([empty]))
    return HealthReport(tenant_id=tenant_id, healthy=healthy, checks=checks)
