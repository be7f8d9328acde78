"""Keyword arguments of the public tasks: one model per task, strict, no extras.

See docs/architecture.md §4.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.delivery import Release
from schemas.manifest import SEMVER
from schemas.states import Environment

__all__ = [
    "ChangePlan",
    "CreateDeployment",
    "CreateTenant",
    "DeploymentAction",
    "DeploymentId",
    "DeprovisionTenant",
    "GetDeployment",
    "GetTenant",
    "InstallPlugin",
    "InvoiceId",
    "ListDeployments",
    "PUBLIC_TASKS",
    "PaymentFailed",
    "PaymentSucceeded",
    "PluginByName",
    "PromoteDeployment",
    "ReloadPlugin",
    "ResumeTenant",
    "SetEnvironment",
    "SetTenantPlugin",
    "SuspendTenant",
    "WorkflowStatus",
]

#: An environment by name (strict mode takes enum members only from Python, not from JSON).
EnvironmentName = Annotated[Environment, Field(strict=False)]

#: A tenant id: a DNS-label-like slug, so it fits instance names and schema names.
TenantId = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{1,38}[a-z0-9]$")]
PlanName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
PluginName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Reason = Annotated[str, StringConstraints(max_length=500)]
#: Who asks (a person, a service, an API token's subject), recorded in the audit trail.
Actor = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetaValue = Annotated[str, StringConstraints(max_length=1000)] | int | float | bool | None


class _Payload(BaseModel):
    # strict: "3" is not a number and 3 is not a name; extra="forbid": a typo is an error.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Idempotent(_Payload):
    #: A repeated call with the same key returns the first call's result.
    idempotency_key: IdempotencyKey | None = None


class CreateTenant(_Idempotent):
    """``cul8er.tenants.create``: sign a tenant up on a plan and provision it."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    plan: PlanName
    tenant_id: TenantId | None = None
    platform: PluginName | None = None
    provisioner: PluginName | None = None
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=50)
    #: ``development``, ``qa`` or ``production`` (production deployments need approvals).
    environment: EnvironmentName = Environment.DEVELOPMENT
    #: Who asks (recorded in the audit trail).
    actor: Actor | None = None


class ChangePlan(_Idempotent):
    """``cul8er.tenants.change_plan``: move a tenant to another plan; resources follow."""

    tenant_id: TenantId
    plan: PlanName
    #: Who asks (recorded in the audit trail).
    actor: Actor | None = None


class SuspendTenant(_Idempotent):
    """``cul8er.tenants.suspend``: stop a tenant's instances, keeping its data."""

    tenant_id: TenantId
    reason: Reason = ""
    #: Who asks (recorded in the audit trail).
    actor: Actor | None = None


class ResumeTenant(_Idempotent):
    """``cul8er.tenants.resume``: start a suspended tenant again."""

    tenant_id: TenantId
    reason: Reason = ""
    #: Who asks (recorded in the audit trail).
    actor: Actor | None = None


class DeprovisionTenant(_Idempotent):
    """``cul8er.tenants.deprovision``: remove everything of a tenant and free its subnet."""

    tenant_id: TenantId
    #: Who asks (recorded in the audit trail).
    actor: Actor | None = None


class GetTenant(_Payload):
    """``cul8er.tenants.get``: a tenant's status, plan, instances and subnet."""

    tenant_id: TenantId


class WorkflowStatus(_Payload):
    """``cul8er.workflows.status``: a workflow's status, steps and error."""

    workflow_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


#: An invoice id, as the billing side knows it.
InvoiceId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class PaymentFailed(_Idempotent):
    """``cul8er.billing.payment_failed``: a charge failed; suspend after the grace period."""

    tenant_id: TenantId
    invoice_id: InvoiceId | None = None


class PaymentSucceeded(_Idempotent):
    """``cul8er.billing.payment_succeeded``: a charge went through; the pending suspension goes."""

    tenant_id: TenantId
    invoice_id: InvoiceId | None = None


class PluginByName(_Payload):
    """``cul8er.plugins.enable`` / ``.disable``: serve a plugin again, or stop serving it."""

    name: PluginName
    #: Who asks (recorded in the audit trail).
    actor: Actor | None = None


class ReloadPlugin(_Payload):
    """``cul8er.plugins.reload``: move a plugin to its newest version found (or ``version``)."""

    name: PluginName
    version: Annotated[str, StringConstraints(max_length=64)] | None = None
    #: Who asks (recorded in the audit trail).
    actor: Actor | None = None


class InstallPlugin(_Payload):
    """``cul8er.plugins.install``: a folder, .zip or .tar.gz on the worker, or a pip requirement."""

    source: Annotated[str, StringConstraints(min_length=1, max_length=1000)]
    #: Who asks (recorded in the audit trail).
    actor: Actor | None = None


class SetEnvironment(_Idempotent):
    """``cul8er.tenants.set_environment``: move a tenant to development, qa or production."""

    tenant_id: TenantId
    environment: EnvironmentName


#: A deployment id (32 hex characters).
DeploymentId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
#: Who asks: a person or a service, recorded in the audit trail.


class CreateDeployment(_Idempotent):
    """``cul8er.deployments.create``: roll a release over a tenant's instances (``tenant_id``
    and ``release``), or a plugin version over tenants (``plugin`` and ``version``, the tenants
    picked by ``tenants``, ``plan`` and ``environment``; none of them: every tenant)."""

    tenant_id: TenantId | None = None
    release: Release | None = None
    plugin: PluginName | None = None
    version: Annotated[str, StringConstraints(pattern=SEMVER.pattern)] | None = None
    tenants: list[TenantId] | None = Field(default=None, min_length=1, max_length=100_000)
    plan: PlanName | None = None
    environment: EnvironmentName | None = None
    #: A strategy plugin: direct, rolling, blue_green, canary, ab_test (default: a setting).
    strategy: PluginName | None = None
    #: The strategy's own settings (each strategy documents them).
    strategy_config: dict[str, Any] = Field(default_factory=dict)
    actor: Actor = "api"


class SetTenantPlugin(_Idempotent):
    """``cul8er.tenants.set_plugin``: the version of a plugin a tenant runs, and its own config
    overrides (``${secret:…}`` references stay references). Neither: back to the plugin's."""

    tenant_id: TenantId
    plugin: PluginName
    version: Annotated[str, StringConstraints(pattern=SEMVER.pattern)] | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    actor: Actor = "api"


class DeploymentAction(_Idempotent):
    """``cul8er.deployments.approve`` / ``reject`` / ``pause`` / ``resume`` / ``abort`` /
    ``retry`` / ``rollback``: a person's (or a service's) say on one deployment."""

    deployment_id: DeploymentId
    actor: Actor
    reason: Reason = ""


class PromoteDeployment(_Idempotent):
    """``cul8er.deployments.promote``: end the current pause or gate (``full``: all stages)."""

    deployment_id: DeploymentId
    actor: Actor
    full: bool = False


class GetDeployment(_Payload):
    """``cul8er.deployments.get``: a deployment's status, stages, timeline and measurements."""

    deployment_id: DeploymentId


class ListDeployments(_Payload):
    """``cul8er.deployments.list``: deployments, newest first."""

    tenant_id: TenantId | None = None
    plugin: PluginName | None = None
    status: Annotated[str, StringConstraints(max_length=32)] | None = None
    limit: int = Field(default=50, ge=1, le=500)


#: Public task name → its payload model (``cul8er schema export`` writes one schema each).
PUBLIC_TASKS: dict[str, type[BaseModel]] = {
    "cul8er.tenants.create": CreateTenant,
    "cul8er.tenants.change_plan": ChangePlan,
    "cul8er.tenants.suspend": SuspendTenant,
    "cul8er.tenants.resume": ResumeTenant,
    "cul8er.tenants.deprovision": DeprovisionTenant,
    "cul8er.tenants.get": GetTenant,
    "cul8er.workflows.status": WorkflowStatus,
    "cul8er.billing.payment_failed": PaymentFailed,
    "cul8er.billing.payment_succeeded": PaymentSucceeded,
    "cul8er.plugins.install": InstallPlugin,
    "cul8er.plugins.enable": PluginByName,
    "cul8er.plugins.disable": PluginByName,
    "cul8er.plugins.reload": ReloadPlugin,
    "cul8er.tenants.set_environment": SetEnvironment,
    "cul8er.tenants.set_plugin": SetTenantPlugin,
    "cul8er.deployments.create": CreateDeployment,
    "cul8er.deployments.get": GetDeployment,
    "cul8er.deployments.list": ListDeployments,
    "cul8er.deployments.approve": DeploymentAction,
    "cul8er.deployments.reject": DeploymentAction,
    "cul8er.deployments.promote": PromoteDeployment,
    "cul8er.deployments.pause": DeploymentAction,
    "cul8er.deployments.resume": DeploymentAction,
    "cul8er.deployments.abort": DeploymentAction,
    "cul8er.deployments.retry": DeploymentAction,
    "cul8er.deployments.rollback": DeploymentAction,
}
