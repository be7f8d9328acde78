"""Plans are data: quotas and prices, validated from the YAML catalog."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.autoscale import AutoscaleRule
from schemas.platform import Limits

__all__ = ["Plan", "PlanCatalog"]

#: 1 GB in MB, as engines count memory limits.
MB_PER_GB = 1024


class Plan(BaseModel):
    """One plan: quotas (``None`` is unlimited), prices and the instances it starts with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    description: str = ""
    cpu_cores: float | None = Field(default=None, gt=0)
    memory_gb: float | None = Field(default=None, gt=0)
    storage_gb: float | None = Field(default=None, gt=0)
    max_instances: int | None = Field(default=None, ge=1)
    max_requests_per_month: int | None = Field(default=None, ge=0)
    #: Instances a new tenant starts with.
    instances: int = Field(default=1, ge=1)
    monthly_price: Decimal = Field(default=Decimal("0"), ge=0)
    currency: str = "USD"
    #: Price per unit above the included quota, by metric (e.g. ``requests: 0.0001``).
    overage: dict[str, Decimal] = Field(default_factory=dict)
    #: What happens over quota: suspend, throttle or bill the overage.
    quota_policy: Literal["suspend", "throttle", "bill_overage"] = "bill_overage"
    #: Image per platform, overriding the platform's default: a container image for
    #: ``docker``, an image alias for ``incus``, a command line for ``local``.
    images: dict[str, str] = Field(default_factory=dict)
    #: Autoscale rules of every tenant on the plan; a tenant's own rules override by name.
    autoscale: list[AutoscaleRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _instances_within_quota(self) -> Plan:
        if self.max_instances is not None and self.instances > self.max_instances:
            raise ValueError(f"instances ({self.instances}) exceeds max_instances")
        return self

    def instance_limits(self) -> Limits:
        """The limits each instance of this plan runs under."""
        return Limits(
            cpu_cores=self.cpu_cores,
            memory_mb=int(self.memory_gb * MB_PER_GB) if self.memory_gb else None,
            storage_gb=self.storage_gb,
        )


class PlanCatalog(BaseModel):
    """Every plan, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plans: dict[str, Plan]

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("plans"), dict):
            data = {
                **data,
                "plans": {
                    key: {"name": key, **(value or {})} for key, value in data["plans"].items()
                },
            }
        return data
