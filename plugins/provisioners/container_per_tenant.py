"""The ``container_per_tenant`` provisioner: dedicated instances per tenant on its platform.

Instance ``n`` of a tenant is always ``t-{tenant}-app-{n}``, and platforms return the
existing instance when asked to create a name twice, so provisioning (or scaling) the
same tenant from two processes at once converges on one set of instances.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, ClassVar, Final

import structlog

from schemas.plugins import Ack, HealthReport, ProvisionResult, TenantResources, UsageSample
from workers.plugin_api import (
    ConflictError,
    NotFoundError,
    PermanentError,
    check_tenant_id,
    get_platform,
    health_report,
    instance_spec,
)

if TYPE_CHECKING:
    from schemas.platform import InstanceInfo
    from schemas.plugins import ProvisionRequest
    from workers.plugin_api import Platform, PluginContext

__all__ = ["ContainerPerTenant"]

log = structlog.get_logger(__name__)

#: The counters ``meter_usage`` sums over a tenant's instances.
STAT_FIELDS: Final = ("cpu_seconds", "memory_bytes", "disk_bytes", "rx_bytes", "tx_bytes")


def _ordinal(tenant_id: str, name: str) -> int | None:
    """``n`` of ``t-{tenant}-app-{n}``; ``None`` for any other name."""
    match = re.fullmatch(rf"t-{re.escape(tenant_id)}-app-(\d+)", name)
    return int(match.group(1)) if match else None


def _wanted(request: ProvisionRequest) -> int:
    """How many instances the request asks for, within the plan's quota."""
    plan = request.plan
    count = plan.instances if request.instances is None else request.instances
    if plan.max_instances is not None and count > plan.max_instances:
        raise PermanentError(
            f"{count} instances exceed plan {plan.name!r}'s max_instances ({plan.max_instances})"
        )
    return count


def _settled(info: InstanceInfo, tenant_id: str) -> bool:
    """Whether a listed instance needs no create: the tenant's, running, listening, limited.

    Anything less (stopped, still booting, limits never recorded after a killed create)
    goes through ``create_instance``, which starts, waits for or finishes it.
    """
    return (
        info.tenant_id == tenant_id
        and info.status == "running"
        and info.endpoint is not None
        and bool(info.limits_applied)
    )


class ContainerPerTenant:
    """Each tenant gets ``instances`` dedicated instances under its plan's limits."""

    name: ClassVar[str] = "container_per_tenant"

    def __init__(self, config: None, context: PluginContext) -> None:
        self.context = context
        self.settings = context.settings

    # -- the TenantProvisioner contract -----------------------------------------------------

    def provision(self, request: ProvisionRequest) -> ProvisionResult:
        """Create (or find) instances ``0..count-1`` of the tenant, under the plan's limits."""
        return self._converge(request, shrink=False)

    def deprovision(self, tenant_id: str, platform: str | None = None) -> Ack:
        """Destroy every instance of the tenant found on its platform; none found is success."""
        check_tenant_id(tenant_id)
        engine = self._platform(platform)
        names = [info.name for info in engine.list_instances(tenant_id)]
        for name in sorted(names, reverse=True):
            engine.destroy_instance(name)
        log.info("tenant_instances_deprovisioned", tenant_id=tenant_id, destroyed=names)
        return Ack(detail=f"destroyed {len(names)} instance(s)" if names else "nothing to destroy")

    def scale(self, request: ProvisionRequest) -> ProvisionResult:
        """Apply the plan's limits live and create or destroy instances to match the count."""
        return self._converge(request, shrink=True)

    def meter_usage(self, tenant_id: str, platform: str | None = None) -> UsageSample:
        """The platform's counters summed over the tenant's instances."""
        check_tenant_id(tenant_id)
        engine = self._platform(platform)
        totals = dict.fromkeys(STAT_FIELDS, 0.0)
        counted = 0
        for info in engine.list_instances(tenant_id):
            try:
                stats = engine.stats(info.name)
            except NotFoundError:
                continue  # destroyed between the listing and the read
            counted += 1
            for field in STAT_FIELDS:
                totals[field] += float(getattr(stats, field))
        return UsageSample(
            tenant_id=tenant_id,
            taken_at=dt.datetime.now(dt.UTC),
            metrics={**totals, "instances": float(counted)},
        )

    def health_check(self, tenant_id: str, platform: str | None = None) -> HealthReport:
        """Probe ``/health`` of every instance once; no instance at all is unhealthy."""
        check_tenant_id(tenant_id)
        engine = self._platform(platform)
        return health_report(
            tenant_id,
            engine.list_instances(tenant_id),
            timeout=self.settings.health_timeout,
            empty=("instances", "none"),
        )

    def get_resources(self, tenant_id: str, platform: str | None = None) -> TenantResources:
        """The tenant's instances as its platform reports them."""
        check_tenant_id(tenant_id)
        platform_name = platform or self.settings.default_platform
        infos = self._platform(platform_name).list_instances(tenant_id)
        return TenantResources(
            tenant_id=tenant_id,
            provisioner=self.name,
            instances=[info.model_dump(mode="json") for info in infos],
            detail={"platform": platform_name},
        )

    # -- helpers ----------------------------------------------------------------------------

    def _platform(self, name: str | None) -> Platform:
        """The tenant's platform as cul8er recorded it, else the default one."""
        return get_platform(name or self.settings.default_platform, self.settings)

    def _converge(self, request: ProvisionRequest, *, shrink: bool) -> ProvisionResult:
        """Instances ``0..count-1`` run under the plan's limits; with ``shrink``, no others."""
        tenant_id = check_tenant_id(request.tenant_id)
        platform = self._platform(request.platform)
        count = _wanted(request)
        listed = {info.name: info for info in platform.list_instances(tenant_id)}
        before = set(listed)
        destroyed = []
        if shrink:
            extra = [
                (ordinal, name)
                for name in before
                if (ordinal := _ordinal(tenant_id, name)) is not None and ordinal >= count
            ]
            # Highest ordinals first, so a scale interrupted halfway still leaves a prefix.
            for _n, name in sorted(extra, reverse=True):
                platform.destroy_instance(name)
                destroyed.append(name)
        infos = self._ensure(platform, request, count, listed)
        created = [info.name for info in infos if info.name not in before]
        log.info(
            "tenant_instances_converged",
            tenant_id=tenant_id,
            plan=request.plan.name,
            platform=request.platform,
            instances=count,
            created=created,
            destroyed=destroyed,
        )
        return ProvisionResult(
            tenant_id=tenant_id,
            provisioner=self.name,
            instances=infos,
            detail={
                "platform": request.platform,
                "plan": request.plan.name,
                "limits": request.plan.instance_limits().model_dump(mode="json"),
                "created": created,
                "destroyed": destroyed,
            },
        )

    def _ensure(
        self,
        platform: Platform,
        request: ProvisionRequest,
        count: int,
        listed: dict[str, InstanceInfo],
    ) -> list[InstanceInfo]:
        """Instances ``0..count-1`` exist and run under the plan's limits.

        ``listed`` is what the platform listed for the tenant just before: an instance
        running there, booted and limited, is not asked for again (a create of an existing
        instance costs a platform a lookup of its own, and a scale right after a provision
        would pay it for every instance).
        """
        limits = request.plan.instance_limits()
        infos = []
        for ordinal in range(count):
            spec = instance_spec(
                request.tenant_id,
                request.plan,
                request.platform,
                ordinal,
                port=self.settings.instance_port,
                release=request.release,
            )
            info = listed.get(spec.name)
            if info is None or not _settled(info, request.tenant_id):
                info = platform.create_instance(spec)
            if info.tenant_id != request.tenant_id:
                # Another owner holds the name (a shared pool, say): never adopt it.
                raise ConflictError(f"instance {spec.name} belongs to {info.tenant_id!r}")
            if info.limits_requested != limits:
                # Found from an earlier plan: bring it to this one without a restart.
                info = platform.set_limits(spec.name, limits)
            infos.append(info)
        return infos
