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

from schemas.delivery import Release
from schemas.plans import Plan
from schemas.platform import InstanceInfo

__all__ = [
    "Ack",
    "AnalysisInput",
    "Backend",
    "DeploymentSpec",
    "Entry",
    "Frontend",
    "HeaderRoute",
    "HealthReport",
    "HealthStatus",
    "MetricSample",
    "ProvisionRequest",
    "ProvisionResult",
    "SecretValue",
    "ServerStats",
    "Stage",
    "StageAction",
    "StagePlan",
    "TenantResources",
    "TrafficStats",
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
    #: The release the tenant's instances run (``None``: the plan's image).
    release: Release | None = None


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
    """A release rolled over a tenant's instances, as a strategy plans it."""

    deployment_id: str
    #: The tenant whose instances take the release (``""`` for a plugin deployment).
    tenant_id: str
    version: str
    #: A plugin deployment's plugin: ``instances`` then lists the tenants it moves, in order.
    plugin: str | None = None
    #: The version the tenant runs now (``None``: its first release).
    previous_version: str | None = None
    #: The platform's artifact of the new release (``None``: the platform's default).
    artifact: str | None = None
    #: The tenant's instances (the stable group), in order.
    instances: list[str] = Field(default_factory=list)
    #: The deployment's ``strategy_config``, as the caller gave it.
    config: dict[str, Any] = Field(default_factory=dict)
    environment: str = "development"


#: What a stage does; the engine carries each out idempotently (docs/architecture.md §10).
StageAction = Literal[
    "create_group",
    "set_weight",
    "route",
    "pause",
    "analysis",
    "replace",
    "promote",
    "sandbox",
    "approval",
]


class Stage(_Model):
    """One stage of a deployment.

    - ``create_group``: start ``params.count`` instances of the new release (the canary
      group, ``None``: as many as the stable group), health-checked, at weight 0;
    - ``set_weight``: send ``weight`` percent of traffic to the canary group;
    - ``route``: send requests whose ``params.header`` (or ``params.cookie``) equals
      ``params.value`` to the canary group (A/B tests, blue-green previews);
    - ``pause``: wait ``pause_seconds``, or until promoted when it is ``None``;
    - ``analysis``: run the gate ``params`` (an ``AnalysisConfig``) against the canary group;
    - ``replace``: give the stable instances ``params.instances`` the new release in place,
      each drained first and health-checked before it takes traffic again, with
      ``params.surge`` extra instances of the new release carrying traffic meanwhile;
    - ``promote``: the new release becomes stable: every stable instance runs it, traffic
      goes back to the stable group, the canary group and routes go.

    A plugin deployment gives each action its plugin meaning (tenants move, not traffic; see
    ``workers/delivery/plugin_stages.py``), and cul8er puts two stages of its own before the
    strategy's: ``sandbox`` (the version's checks on the sandbox queue) and, in production,
    ``approval``.
    """

    name: str
    action: StageAction
    weight: int | None = Field(default=None, ge=0, le=100)
    #: For ``pause``: seconds, or ``None`` for "until promoted".
    pause_seconds: float | None = Field(default=0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class StagePlan(_Model):
    """The ordered stages of a deployment."""

    stages: list[Stage]


class AnalysisInput(_Model):
    """One measurement of an analysis stage, for the strategy to judge."""

    deployment: DeploymentSpec
    stage: Stage
    metrics: dict[str, float] = Field(default_factory=dict)


class Verdict(_Model):
    """A strategy's judgement of one measurement."""

    decision: Literal["pass", "inconclusive", "fail"]
    reason: str = ""


# -- load balancers ---------------------------------------------------------------------------


class Frontend(_Model):
    """A tenant's entry point: where its traffic comes in (``port`` 0: the balancer picks)."""

    tenant_id: str
    port: int = Field(default=0, ge=0, le=65535)


class Entry(_Model):
    """A tenant's entry point as the load balancer serves it."""

    tenant_id: str
    #: ``127.0.0.1:PORT``: the tenant's stable address.
    address: str
    #: Whether the balancer had to reload its configuration to serve it.
    reloaded: bool = False


class Backend(_Model):
    """One server behind a tenant's frontend, in a group (``stable`` or ``canary``)."""

    tenant_id: str
    name: str
    address: str
    group: Literal["stable", "canary"] = "stable"
    #: ``ready`` takes traffic, ``drain`` finishes open requests only, ``maint`` takes none.
    state: Literal["ready", "drain", "maint"] = "ready"


class Weights(_Model):
    """Traffic split of a tenant's backend groups, in percent (they add up to 100)."""

    tenant_id: str
    weights: dict[Literal["stable", "canary"], int]


class HeaderRoute(_Model):
    """Send requests whose header (or cookie) equals ``value`` to ``group``; ``None`` clears."""

    tenant_id: str
    header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    cookie: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    value: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,128}$")
    group: Literal["canary"] | None = "canary"


class ServerStats(_Model):
    """One backend server's counters, as the load balancer reports them."""

    name: str
    group: Literal["stable", "canary"]
    address: str
    state: str
    weight: int
    requests: int = 0
    responses_2xx: int = 0
    responses_5xx: int = 0
    #: Average response time of the last requests, in milliseconds.
    response_ms: float = 0.0


class TrafficStats(_Model):
    """A tenant's servers with their counters, and the split read back in percent."""

    tenant_id: str
    servers: list[ServerStats] = Field(default_factory=list)
    weights: dict[str, int] = Field(default_factory=dict)
    routes: list[HeaderRoute] = Field(default_factory=list)
    #: HTTP requests the tenant's frontend received since the balancer last (re)started its
    #: counters: what metering bills as requests.
    frontend_requests: int = 0


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
