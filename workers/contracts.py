"""Typed contracts that plugins implement (DESIGN §5); the registry checks them at load."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from schemas.platform import ExecResult, InstanceInfo, InstanceSpec, InstanceStats, Limits

__all__ = ["PLATFORM_OPERATIONS", "Platform"]


@runtime_checkable
class Platform(Protocol):
    """Where a tenant's instances run. Every operation is idempotent.

    Raise ``TransientError`` for what may pass (engine down, timeout) and
    ``PermanentError`` for what will not (bad image, invalid limit).
    """

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


#: The operations every platform must provide, in the order the docs list them.
PLATFORM_OPERATIONS: tuple[str, ...] = (
    "create_instance",
    "destroy_instance",
    "start_instance",
    "stop_instance",
    "exec",
    "stats",
    "set_limits",
    "list_instances",
)
