"""The ``shared_cluster`` provisioner: tenants share one pool of instances per platform.

The pool of platform ``p`` is ``t-shared-{p}-app-0..size-1``, owned by the pseudo tenant
:data:`SHARED_TENANT_ID` (not a valid tenant slug, so no tenant's listing ever includes
it), and runs under the largest limits any member's plan asks for. Memberships live in
``<plugin data_dir>/members.json``; every operation rereads it under an exclusive
``flock`` held for the whole operation, so two processes never both create or destroy a
pool, and replaces it atomically, so a crash never leaves half of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar, Final

import structlog
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from schemas.plans import Plan
from schemas.platform import InstanceInfo, InstanceSpec, Limits
from schemas.plugins import Ack, HealthReport, ProvisionResult, TenantResources, UsageSample
from workers.plugin_api import (
    SHARED_TENANT_ID,
    NotFoundError,
    PermanentError,
    TransientError,
    check_tenant_id,
    get_platform,
    health_report,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from schemas.plugins import ProvisionRequest
    from workers.plugin_api import Platform, PluginContext

__all__ = ["SharedCluster", "SharedClusterConfig", "pool_instance_name"]

log = structlog.get_logger(__name__)

#: The label marking pool instances (drift checks can tell them from orphans by it).
POOL_LABEL: Final = "cul8er.pool"
#: Counters of the pool that ``meter_usage`` shares out between members.
STAT_FIELDS: Final = ("cpu_seconds", "memory_bytes", "disk_bytes", "rx_bytes", "tx_bytes")
#: How often a waiter retries the membership lock (seconds).
POLL_SECONDS: Final = 0.05
#: Platform names allowed in pool names (they end up in instance names).
PLATFORM_PATTERN: Final = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


class SharedClusterConfig(BaseModel):
    """Config of the ``shared_cluster`` provisioner."""

    model_config = ConfigDict(extra="forbid")

    #: Instances in each platform's pool.
    size: int = Field(default=1, ge=1, le=20)


class _Member(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: Plan
    joined_at: str


class _Pool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    members: dict[str, _Member] = Field(default_factory=dict)


_STATE: Final = TypeAdapter(dict[str, _Pool])


def pool_instance_name(platform: str, ordinal: int) -> str:
    """The name of instance ``ordinal`` of ``platform``'s shared pool."""
    return f"t-shared-{platform}-app-{ordinal}"


def _check_platform(platform: str) -> str:
    if not PLATFORM_PATTERN.fullmatch(platform):
        raise PermanentError(f"invalid platform name {platform[:64]!r} for a shared pool")
    return platform


def _largest(current: Limits | None, plans: list[Plan]) -> Limits:
    """Per field, the largest of ``current`` and what each plan asks; ``None`` is unlimited."""
    wanted = [plan.instance_limits() for plan in plans]
    if current is not None:
        wanted.append(current)
    fields: dict[str, Any] = {}
    for field in ("cpu_cores", "memory_mb", "storage_gb"):
        values = [getattr(limits, field) for limits in wanted]
        fields[field] = None if not values or None in values else max(values)
    return Limits(**fields)


class SharedCluster:
    """Tenants placed on one shared pool of instances per platform."""

    name: ClassVar[str] = "shared_cluster"

    def __init__(self, config: SharedClusterConfig | None, context: PluginContext) -> None:
        self.config = config or SharedClusterConfig()
        self.context = context
        self.settings = context.settings
        self.state_path: Path = context.data_dir / "members.json"
        self.lock_path: Path = context.data_dir / "members.json.lock"

    # -- the TenantProvisioner contract -----------------------------------------------------

    def provision(self, request: ProvisionRequest) -> ProvisionResult:
        """Join the platform's pool (creating it if needed); the tenant owns no instance."""
        return self._join(request, "tenant_joined_pool")

    def deprovision(self, tenant_id: str) -> Ack:
        """Leave every pool; the last member out destroys the pool. Not a member is success."""
        check_tenant_id(tenant_id)
        with self._locked():
            state = self._read()
            left = []
            for platform_name in sorted(state):
                pool = state[platform_name]
                if tenant_id not in pool.members:
                    continue
                del pool.members[tenant_id]
                if not pool.members:
                    # Destroyed before the file is written: should this fail, the tenant
                    # is still a member on disk and a retry destroys what is left.
                    self._destroy_pool(platform_name)
                    del state[platform_name]
                self._write(state)
                left.append(platform_name)
        log.info("tenant_left_pool", tenant_id=tenant_id, platforms=left)
        return Ack(detail=f"left pool(s) {', '.join(left)}" if left else "not a member")

    def scale(self, request: ProvisionRequest) -> ProvisionResult:
        """Record the tenant's new plan and raise the pool's limits if it needs more."""
        return self._join(request, "tenant_pool_plan_changed")

    def meter_usage(self, tenant_id: str) -> UsageSample:
        """The pool's counters divided by its member count: the tenant's share."""
        check_tenant_id(tenant_id)
        platform_name, members = self._membership(tenant_id)
        platform = self._platform(platform_name)
        totals = dict.fromkeys(STAT_FIELDS, 0.0)
        for info in self._pool(platform, platform_name):
            try:
                stats = platform.stats(info.name)
            except NotFoundError:
                continue  # destroyed between the listing and the read
            for field in STAT_FIELDS:
                totals[field] += float(getattr(stats, field))
        share = 1.0 / members
        return UsageSample(
            tenant_id=tenant_id,
            taken_at=dt.datetime.now(dt.UTC),
            metrics={**{k: v * share for k, v in totals.items()}, "share": share},
        )

    def health_check(self, tenant_id: str) -> HealthReport:
        """Probe ``/health`` of every instance of the tenant's pool once."""
        check_tenant_id(tenant_id)
        try:
            platform_name, _members = self._membership(tenant_id)
        except NotFoundError as exc:
            return HealthReport(tenant_id=tenant_id, healthy=False, checks={"pool": str(exc)})
        return health_report(
            tenant_id,
            self._pool(self._platform(platform_name), platform_name),
            timeout=self.settings.health_timeout,
            empty=("pool", "no instance"),
        )

    def get_resources(self, tenant_id: str) -> TenantResources:
        """The pool the tenant is placed on (it owns no instance)."""
        check_tenant_id(tenant_id)
        state = self._read()
        for platform_name, pool in sorted(state.items()):
            member = pool.members.get(tenant_id)
            if member is not None:
                infos = self._pool(self._platform(platform_name), platform_name)
                return TenantResources(
                    tenant_id=tenant_id,
                    provisioner=self.name,
                    detail={
                        "platform": platform_name,
                        "plan": member.plan.name,
                        "cluster": [info.name for info in infos],
                        "endpoints": [info.endpoint for info in infos if info.endpoint],
                    },
                )
        return TenantResources(tenant_id=tenant_id, provisioner=self.name)

    # -- the pool ---------------------------------------------------------------------------

    def _join(self, request: ProvisionRequest, event: str) -> ProvisionResult:
        """Record the tenant's plan in the pool of ``request.platform`` and converge the pool."""
        tenant_id = check_tenant_id(request.tenant_id)
        platform_name = _check_platform(request.platform)
        with self._locked():
            state = self._read()
            for other_name in sorted(state):
                other = state[other_name]
                if other_name == platform_name or tenant_id not in other.members:
                    continue
                # A tenant sits in one pool: moving platforms leaves the old one first.
                del other.members[tenant_id]
                if not other.members:
                    self._destroy_pool(other_name)
                    del state[other_name]
                self._write(state)
            pool = state.setdefault(platform_name, _Pool())
            previous = pool.members.get(tenant_id)
            pool.members[tenant_id] = _Member(
                plan=request.plan,
                joined_at=previous.joined_at if previous else dt.datetime.now(dt.UTC).isoformat(),
            )
            # Written before the pool is touched: a crash part-way still leaves a member
            # whose deprovision destroys what was made.
            self._write(state)
            plans = [member.plan for member in pool.members.values()]
            infos = self._ensure_pool(platform_name, plans)
            members = len(pool.members)
        log.info(event, tenant_id=tenant_id, platform=platform_name, pool=len(infos))
        return ProvisionResult(
            tenant_id=tenant_id,
            provisioner=self.name,
            instances=[],
            detail={
                "platform": platform_name,
                "plan": request.plan.name,
                "cluster": [info.name for info in infos],
                "endpoints": [info.endpoint for info in infos if info.endpoint],
                "share": 1.0 / members,
            },
        )

    def _ensure_pool(self, platform_name: str, plans: list[Plan]) -> list[InstanceInfo]:
        """Instances ``0..size-1`` run under limits no smaller than any member's plan."""
        platform = self._platform(platform_name)
        size = self.config.size
        current = {info.name: info for info in self._pool(platform, platform_name)}
        for name, info in sorted(current.items(), reverse=True):
            # The size was lowered in the config: the pool shrinks with the next join.
            if self._ordinal(platform_name, name) >= size:
                platform.destroy_instance(info.name)
        infos = []
        for ordinal in range(size):
            name = pool_instance_name(platform_name, ordinal)
            found = current.get(name)
            # Limits only rise: lowering them under live tenants could starve the others.
            limits = _largest(found.limits_requested if found else None, plans)
            info = platform.create_instance(
                InstanceSpec(
                    name=name,
                    tenant_id=SHARED_TENANT_ID,
                    role="app",
                    ordinal=ordinal,
                    limits=limits,
                    labels={POOL_LABEL: "shared", "cul8er.platform": platform_name},
                    port=self.settings.instance_port,
                )
            )
            if info.tenant_id != SHARED_TENANT_ID:
                raise PermanentError(f"instance {name} belongs to tenant {info.tenant_id!r}")
            if info.limits_requested != limits:
                info = platform.set_limits(name, limits)
                log.info("shared_pool_limits_raised", instance=name, **limits.model_dump())
            infos.append(info)
        return infos

    def _destroy_pool(self, platform_name: str) -> None:
        platform = self._platform(platform_name)
        names = [info.name for info in self._pool(platform, platform_name)]
        for name in names:
            platform.destroy_instance(name)
        log.info("shared_pool_destroyed", platform=platform_name, instances=names)

    @staticmethod
    def _ordinal(platform_name: str, name: str) -> int:
        return int(name.removeprefix(f"t-shared-{platform_name}-app-"))

    @staticmethod
    def _pool(platform: Platform, platform_name: str) -> list[InstanceInfo]:
        """The pool's instances as the platform lists them, in ordinal order."""
        pattern = re.compile(rf"t-shared-{re.escape(platform_name)}-app-\d+")
        infos = [
            info
            for info in platform.list_instances(SHARED_TENANT_ID)
            if pattern.fullmatch(info.name)
        ]
        return sorted(infos, key=lambda info: SharedCluster._ordinal(platform_name, info.name))

    def _platform(self, name: str) -> Platform:
        return get_platform(name, self.settings)

    # -- memberships ------------------------------------------------------------------------

    def _membership(self, tenant_id: str) -> tuple[str, int]:
        """The tenant's platform and its pool's member count; not a member: not found."""
        for platform_name, pool in sorted(self._read().items()):
            if tenant_id in pool.members:
                return platform_name, len(pool.members)
        raise NotFoundError(f"tenant {tenant_id!r} is in no shared pool")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the memberships' exclusive lock; the kernel drops it if the process dies."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        # Joins create a pool's instances while holding the lock, so allow for that.
        timeout = self.settings.instance_start_timeout * (self.config.size + 1) + 30
        # flock (not lockf) locks the open file, so two threads of one process exclude too.
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)

        def take() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        try:
            wait_until(
                take,
                timeout=timeout,
                interval=POLL_SECONDS,
                message="shared pool memberships are busy (locked)",
                error=TransientError,
            )
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, _Pool]:
        try:
            return _STATE.validate_json(self.state_path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValidationError as exc:
            raise PermanentError(f"corrupt {self.state_path}: {exc}") from exc

    def _write(self, state: dict[str, _Pool]) -> None:
        """Replace the file through a temporary one, so readers never see half of it."""
        payload = json.dumps(_STATE.dump_python(state, mode="json"), indent=2, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=".members.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(payload + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
