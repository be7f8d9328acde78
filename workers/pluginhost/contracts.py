"""Typed contracts that plugins implement, checked when a plugin is loaded.

See docs/architecture.md §5.

One ``Protocol`` per plugin type. Every operation takes pydantic models (or JSON
primitives) and answers one, so the registry can turn each operation into a Celery
task ``plugins.<name>.<operation>`` that validates its keyword arguments and answers JSON.

Raise ``TransientError`` for what may pass (engine down, timeout) and
``PermanentError`` for what will not (bad image, invalid limit).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, ClassVar, Final, Protocol, runtime_checkable

# The models are imported at run time (not under TYPE_CHECKING): the registry reads each
# operation's annotations to validate task arguments and serialise results.
from schemas.events import Event
from schemas.manifest import PluginType
from schemas.platform import ExecResult, InstanceInfo, InstanceSpec, InstanceStats, Limits
from schemas.plugins import (
    Ack,
    AnalysisInput,
    Backend,
    DeploymentSpec,
    Entry,
    Frontend,
    HeaderRoute,
    HealthReport,
    HealthStatus,
    MetricSample,
    ProvisionRequest,
    ProvisionResult,
    SecretValue,
    StagePlan,
    TenantResources,
    TrafficStats,
    UsageSample,
    Verdict,
    Weights,
)
from workers.runtime.errors import PluginError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "CONTRACTS",
    "LoadBalancer",
    "Observer",
    "PLATFORM_OPERATIONS",
    "Platform",
    "Secrets",
    "Strategy",
    "TenantProvisioner",
    "check_contract",
    "operations",
]


@runtime_checkable
class Platform(Protocol):
    """Where a tenant's instances run. Every operation is idempotent."""

    name: ClassVar[str]

    def create_instance(self, spec: InstanceSpec) -> InstanceInfo:
        """Create and start ``spec.name``; an existing instance of that name is returned."""
        ...

    def destroy_instance(self, name: str) -> None:
        """Remove the instance and its data; a missing instance is success."""
        ...

    def start_instance(self, name: str) -> InstanceInfo:
        """Start a stopped instance; a running one is returned as it is."""
        ...

    def stop_instance(self, name: str) -> None:
        """Stop the instance, keeping its data; a stopped or missing one is success."""
        ...

    def exec(self, name: str, command: list[str], *, timeout: float = 30.0) -> ExecResult:
        """Run ``command`` inside the instance."""
        ...

    def stats(self, name: str) -> InstanceStats:
        """Read the instance's counters (CPU seconds, memory, disk, network)."""
        ...

    def set_limits(self, name: str, limits: Limits) -> InstanceInfo:
        """Apply new limits to the running instance, without a restart."""
        ...

    def list_instances(self, tenant_id: str | None = None) -> list[InstanceInfo]:
        """Every instance this platform runs for cul8er, or for one tenant."""
        ...


@runtime_checkable
class TenantProvisioner(Protocol):
    """How a tenant's resources are laid out: its own containers, its own database, a share.

    ``platform`` names the platform the tenant lives on (``None``: the default platform),
    as recorded by cul8er: a provisioner never reads cul8er's tables to find it.
    """

    def provision(self, request: ProvisionRequest) -> ProvisionResult:
        """Make (or find) what the tenant's plan entitles it to; idempotent."""
        ...

    def deprovision(self, tenant_id: str, platform: str | None = None) -> Ack:
        """Remove everything the provisioner holds for the tenant; nothing held is success."""
        ...

    def scale(self, request: ProvisionRequest) -> ProvisionResult:
        """Bring the tenant's resources to ``request.plan`` (limits, instance count)."""
        ...

    def meter_usage(self, tenant_id: str, platform: str | None = None) -> UsageSample:
        """Read the tenant's usage counters now."""
        ...

    def health_check(self, tenant_id: str, platform: str | None = None) -> HealthReport:
        """Whether every resource of the tenant answers."""
        ...

    def get_resources(self, tenant_id: str, platform: str | None = None) -> TenantResources:
        """What the provisioner holds for the tenant."""
        ...


@runtime_checkable
class Strategy(Protocol):
    """How a release rolls out: its stages, and how a measurement of a gate is judged.

    The way back is not a strategy's to plan: every rollback is the same (traffic to the
    stable group in one call, then the new release's instances go), so no strategy can
    leave instances behind (docs/architecture.md §10).
    """

    def plan(self, deployment: DeploymentSpec) -> StagePlan:
        """The stages that roll ``deployment`` out; ``PermanentError`` for a bad config."""
        ...

    def analyze(self, analysis: AnalysisInput) -> Verdict:
        """Judge one measurement of an ``analysis`` stage."""
        ...


@runtime_checkable
class LoadBalancer(Protocol):
    """Where a tenant's traffic enters, and how it is split between its backend groups.

    A tenant's frontend has two groups: ``stable`` (the instances of the running release)
    and ``canary`` (instances of a release being rolled out). Every operation is idempotent
    and, except ``ensure_frontend`` for a new tenant and header routes, needs no reload.
    """

    def ensure_frontend(self, frontend: Frontend) -> Entry:
        """Serve the tenant on a stable 127.0.0.1 port (the same port on every call)."""
        ...

    def remove_frontend(self, tenant_id: str) -> Ack:
        """Stop serving the tenant; a missing frontend is success."""
        ...

    def add_backend(self, backend: Backend) -> Ack:
        """Add a backend to its group, or update its address and state; idempotent."""
        ...

    def remove_backend(self, backend: Backend) -> Ack:
        """Remove a backend; a missing one is success."""
        ...

    def set_weights(self, weights: Weights) -> Ack:
        """Split the tenant's traffic between its groups, without a reload."""
        ...

    def route_by_header(self, route: HeaderRoute) -> Ack:
        """Send requests with a header or cookie value to one group (``group=None`` clears)."""
        ...

    def stats(self, tenant_id: str) -> TrafficStats:
        """Per-server counters, and the split and routes as the balancer has them now."""
        ...

    def health(self, tenant_id: str) -> HealthStatus:
        """Whether the balancer answers and the tenant's frontend has a server up."""
        ...


@runtime_checkable
class Observer(Protocol):
    """Receives the app's events and metrics; a failing observer never stops the others."""

    def observe_event(self, event: Event) -> Ack:
        """Handle one event (deliveries may repeat: use ``event.event_id``)."""
        ...

    def report_metric(self, metric: MetricSample) -> Ack:
        """Record one measurement."""
        ...

    def health_status(self) -> HealthStatus:
        """Whether the observer can deliver right now."""
        ...

    def flush(self) -> Ack:
        """Deliver whatever is buffered."""
        ...


@runtime_checkable
class Secrets(Protocol):
    """Where ``${secret:path}`` values come from. Values never travel in task messages."""

    def get(self, path: str) -> SecretValue:
        """The secret at ``path``; ``NotFoundError`` when there is none."""
        ...

    def put(self, path: str, value: str) -> Ack:
        """Store ``value`` at ``path`` (in-process only: a value is never a task argument)."""
        ...

    def rotate(self, path: str) -> SecretValue:
        """Replace the secret at ``path`` by a fresh random value."""
        ...


#: The contract of each plugin type.
CONTRACTS: Final[Mapping[PluginType, type]] = {
    PluginType.PLATFORM: Platform,
    PluginType.TENANT_PROVISIONER: TenantProvisioner,
    PluginType.STRATEGY: Strategy,
    PluginType.LOAD_BALANCER: LoadBalancer,
    PluginType.OBSERVER: Observer,
    PluginType.SECRETS: Secrets,
}


def operations(plugin_type: PluginType) -> tuple[str, ...]:
    """The operations of ``plugin_type``'s contract, in declaration order."""
    contract = CONTRACTS[plugin_type]
    return tuple(
        name
        for name, member in vars(contract).items()
        if not name.startswith("_") and inspect.isfunction(member)
    )


#: The operations every platform must provide, in the order the docs list them.
PLATFORM_OPERATIONS: Final[tuple[str, ...]] = operations(PluginType.PLATFORM)


def check_contract(name: str, plugin_type: PluginType, cls: type) -> None:
    """Refuse ``cls`` when it lacks an operation of its type or takes the wrong arguments.

    Raises:
        PluginError: naming every missing operation, or every wrong signature.
    """
    contract = CONTRACTS[plugin_type]
    ops = operations(plugin_type)
    missing = [op for op in ops if not callable(getattr(cls, op, None))]
    if missing:
        raise PluginError(
            f"{plugin_type.value} plugin {name!r} is missing operations: {', '.join(missing)}",
            plugin_name=name,
        )
    wrong = []
    for op in ops:
        params = inspect.signature(getattr(contract, op)).parameters.values()
        expected = [p.name for p in params]
        # Optional parameters added to a contract later: a plugin written before may omit them
        # (cul8er then does not pass them; see ``Signature.fit``).
        required = [p.name for p in params if p.default is inspect.Parameter.empty]
        try:
            actual = list(inspect.signature(getattr(cls, op)).parameters)
        except (TypeError, ValueError):
            actual = []
        if actual[: len(required)] != required or not set(actual) >= set(required):
            wrong.append(f"{op}({', '.join(actual[1:])}) should be {op}({', '.join(expected[1:])})")
    if wrong:
        raise PluginError(
            f"{plugin_type.value} plugin {name!r} has wrong signatures: {'; '.join(wrong)}",
            plugin_name=name,
        )
