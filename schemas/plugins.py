"""The models plugin operations take and answer, one per contract operation.

See docs/architecture.md §5.

Every model is JSON in and out: a plugin task ``plugins.<name>.<operation>`` validates its
keyword arguments with them and answers ``model_dump(mode="json")``. Secret values are
``SecretStr``, which serialise as ``**********``, so a result never carries one.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr

from schemas.plans import Plan
from schemas.platform import InstanceInfo

__all__ = [
    "Ack",
    "AnalysisInput",
    "Backend",
    "DeploymentSpec",
    "HeaderRoute",
    "HealthReport",
    "HealthStatus",
    "MetricSample",
    "ProvisionRequest",
    "ProvisionResult",
    "SecretValue",
    "Stage",
    "StagePlan",
    "TenantResources",
    "UsageSample",
    "Verdict",
    "Weights",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ack(_Model):
    """A plain acknowledgement; ``detail`` says what was done, if anything."""

    ok: bool = True
    detail: str = ""


# -- tenant provisioners ----------------------------------------------------------------------


class ProvisionRequest(_Model):
    """Give ``tenant_id`` what ``plan`` entitles it to, on ``platform``."""

    tenant_id: str
    plan: Plan
    platform: str = "local"
    instances: int | None = Field(default=None, ge=0)


class ProvisionResult(_Model):
    """What a provisioner made (or found already made) for a tenant."""

    tenant_id: str
    provisioner: str
    #: The tenant's own instances as the platform reported them (recorded by the workflow).
    instances: list[InstanceInfo] = Field(default_factory=list)
    datastore: dict[str, str] = Field(default_factory=dict)
    detail: dict[str, Any] = Field(default_factory=dict)


class UsageSample(_Model):
    """A tenant's counters at one moment, as a provisioner reads them."""

    tenant_id: str
    taken_at: AwareDatetime
    metrics: dict[str, float] = Field(default_factory=dict)


class HealthReport(_Model):
    """Whether a tenant's resources answer, per resource."""

    tenant_id: str
    healthy: bool
    checks: dict[str, str] = Field(default_factory=dict)


class TenantResources(_Model):
    """Everything a provisioner holds for a tenant."""

    tenant_id: str
    provisioner: str
    instances: list[dict[str, Any]] = Field(default_factory=list)
    datastore: dict[str, str] = Field(default_factory=dict)
    detail: dict[str, Any] = Field(default_factory=dict)


# -- deployment strategies --------------------------------------------------------------------


class DeploymentSpec(_Model):
    """A release rolled over a tenant's instances."""

    deployment_id: str
    tenant_id: str
    version: str
    artifact: str
    instances: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    environment: str = "staging"


class Stage(_Model):
    """One stage of a deployment: an action, and how long to pause after it."""

    name: str
    action: Literal[
        "create_green", "shift_weight", "pause", "analyze", "promote", "replace", "cleanup"
    ]
    weight: int | None = Field(default=None, ge=0, le=100)
    pause_seconds: float = Field(default=0, ge=0)
    needs_approval: bool = False
    params: dict[str, Any] = Field(default_factory=dict)


class StagePlan(_Model):
    """The ordered stages of a deployment or of its rollback."""

    stages: list[Stage]


class AnalysisInput(_Model):
    """What a health gate knows when a stage is analysed."""

    deployment: DeploymentSpec
    stage: Stage
    metrics: dict[str, float] = Field(default_factory=dict)


class Verdict(_Model):
    """A gate's decision: go on, wait and look again, or roll back."""

    decision: Literal["pass", "inconclusive", "fail"]
    reason: str = ""


# -- load balancers ---------------------------------------------------------------------------


class Backend(_Model):
    """One server behind a tenant's frontend."""

    tenant_id: str
    name: str
    address: str
    weight: int = Field(default=100, ge=0, le=256)
    group: str = "stable"


class Weights(_Model):
    """Traffic split of a tenant's backend groups, in percent."""

    tenant_id: str
    weights: dict[str, int]


class HeaderRoute(_Model):
    """Send requests carrying ``header: value`` to ``group`` (A/B tests)."""

    tenant_id: str
    header: str
    value: str
    group: str


# -- observers --------------------------------------------------------------------------------


class MetricSample(_Model):
    """One measurement reported to observers."""

    name: str
    value: float
    kind: Literal["counter", "gauge", "histogram"] = "gauge"
    labels: dict[str, str] = Field(default_factory=dict)
    at: AwareDatetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))


class HealthStatus(_Model):
    """Whether a plugin can do its work right now."""

    healthy: bool
    detail: str = ""


# -- secrets ----------------------------------------------------------------------------------


class SecretValue(_Model):
    """A secret as a provider answers it; the value never serialises in clear."""

    path: str
    value: SecretStr
    version: str | None = None
