"""The platform contract's models: what a platform is given and what it answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ExecResult", "InstanceInfo", "InstanceSpec", "InstanceStats", "Limits"]


class Limits(BaseModel):
    """Resource limits of one instance; ``None`` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_cores: float | None = Field(default=None, gt=0)
    memory_mb: int | None = Field(default=None, gt=0)
    storage_gb: float | None = Field(default=None, gt=0)


class InstanceSpec(BaseModel):
    """Everything a platform needs to create one instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Deterministic: ``t-{tenant}-{role}-{n}``; creating an existing name returns it.
    name: str
    tenant_id: str
    role: str = "app"
    ordinal: int = 0
    #: Platform-specific: a container image, or for ``local`` a command line.
    image: str | None = None
    limits: Limits = Limits()
    labels: dict[str, str] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    #: The port the instance's service listens on inside the instance.
    port: int = 8080


class InstanceInfo(BaseModel):
    """What a platform knows of one instance."""

    model_config = ConfigDict(extra="forbid")

    name: str
    tenant_id: str
    platform: str
    status: Literal["running", "stopped", "missing"]
    #: ``127.0.0.1:PORT`` where the host reaches the instance's service.
    endpoint: str | None = None
    provider_id: str | None = None
    limits_requested: Limits = Limits()
    #: What the platform really applied (for example a CPU quota capped at the host's cores).
    limits_applied: dict[str, float | int | str | None] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)


class InstanceStats(BaseModel):
    """Counters and gauges of one instance, read from the platform."""

    model_config = ConfigDict(extra="forbid")

    cpu_seconds: float
    memory_bytes: int
    disk_bytes: int
    rx_bytes: int = 0
    tx_bytes: int = 0


class ExecResult(BaseModel):
    """The outcome of a command run in an instance."""

    model_config = ConfigDict(extra="forbid")

    exit_code: int
    stdout: str
    stderr: str
