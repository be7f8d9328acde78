"""The database tables: tenants, their networks and instances, and the workflow ledger."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from schemas.states import Phase

__all__ = [
    "Approval",
    "AuditEvent",
    "AutoscaleDecision",
    "Base",
    "Deployment",
    "Instance",
    "Invoice",
    "MeterReading",
    "NetworkAllocation",
    "Operation",
    "PlanPeriod",
    "Plugin",
    "PluginCallStat",
    "StepRun",
    "Tenant",
    "TenantPlugin",
    "UsageRecord",
    "WorkerProcess",
    "WorkflowRun",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Now, timezone-aware in UTC."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        result: dt.datetime = value.replace(tzinfo=dt.UTC)
        return result


class Base(DeclarativeBase):
    """Declarative base with a naming convention and JSON for dicts."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        dt.datetime: UTCDateTime,
    }


class Tenant(Base):
    """A customer of the SaaS platform and everything it is entitled to."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    plan: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32), index=True)
    platform: Mapped[str] = mapped_column(String(64))
    placement: Mapped[str | None] = mapped_column(String(200))
    resources: Mapped[dict[str, Any]] = mapped_column(default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    billing_anchor: Mapped[dt.date] = mapped_column()
    #: Bumped by each accepted change, so readers can tell stale views apart.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    #: The workflow that currently owns the tenant; a second change waits its turn.
    active_workflow_id: Mapped[str | None] = mapped_column(String(32))
    status_reason: Mapped[str | None] = mapped_column(Text)
    #: ``development``, ``qa`` or ``production`` (production deployments need approvals).
    environment: Mapped[str] = mapped_column(String(32), default="development")
    #: The release its stable instances run (``schemas.delivery.Release`` as JSON; empty:
    #: the platform's default artifact).
    release: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class NetworkAllocation(Base):
    """A /24 of the pool held by one tenant; the primary key keeps it unshared."""

    __tablename__ = "network_allocations"

    cidr: Mapped[str] = mapped_column(String(43), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), unique=True)
    allocated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Instance(Base):
    """One running unit of a tenant on a platform, named ``t-{tenant}-{role}-{n}``."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    platform: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    ordinal: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    endpoint: Mapped[str | None] = mapped_column(String(200))
    provider_id: Mapped[str | None] = mapped_column(String(200))
    #: ``{"requested": {...}, "applied": {...}}`` as the platform reported them.
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: The release version it runs (``None``: the platform's default artifact).
    release: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WorkflowRun(Base):
    """One run of a declared workflow: the ledger's header row."""

    __tablename__ = "workflow_runs"
    __table_args__ = (Index("ix_workflow_runs_status_deadline", "status", "deadline_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    tenant_id: Mapped[str | None] = mapped_column(String(40), index=True)
    #: running → succeeded | compensating → failed
    status: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(16), default=Phase.FORWARD)
    current_step: Mapped[str | None] = mapped_column(String(100))
    input: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Past this with no progress, reconcile re-dispatches the run.
    deadline_at: Mapped[dt.datetime | None] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()


class StepRun(Base):
    """One step of one run, forward or compensating, with its stored output."""

    __tablename__ = "step_runs"
    __table_args__ = (UniqueConstraint("run_id", "phase", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.id"), index=True)
    phase: Mapped[str] = mapped_column(String(16))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    #: pending → running → done | failed; retrying / waiting in between
    status: Mapped[str] = mapped_column(String(16), index=True)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    due_at: Mapped[dt.datetime | None] = mapped_column()
    lease_until: Mapped[dt.datetime | None] = mapped_column()
    #: The message that runs (or, while pending, should run) the step.
    task_id: Mapped[str | None] = mapped_column(String(64))
    #: The process that holds the step while it runs: a :class:`WorkerProcess` boot id.
    owner_id: Mapped[str | None] = mapped_column(String(32), index=True)
    #: The owner's last proof that it is still running this step (renewed by its heartbeat).
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column()
    #: Takeovers and refused late completions, oldest first.
    history: Mapped[list[Any] | None] = mapped_column(default=list)
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()


class WorkerProcess(Base):
    """One process that runs steps (a pool child), proving it is alive with heartbeats.

    A process gets a fresh ``boot_id`` each time it starts, so a restarted pid is
    never mistaken for the process that held a step before it.
    """

    __tablename__ = "workers"

    boot_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: The Celery node name (``w1@host``); the CLI groups processes by it.
    node: Mapped[str] = mapped_column(String(200), index=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    #: Host, kernel boot and pid namespace: where ``pid`` names this very process.
    namespace: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    beat_at: Mapped[dt.datetime] = mapped_column(index=True)
    #: Set on a clean exit: the process holds nothing any more.
    stopped_at: Mapped[dt.datetime | None] = mapped_column()
    #: Set when reconcile noticed the heartbeats had stopped; cleared if it beats again.
    lost_at: Mapped[dt.datetime | None] = mapped_column()


class Operation(Base):
    """An idempotency key and the result its first call returned."""

    __tablename__ = "operations"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100))
    tenant_id: Mapped[str | None] = mapped_column(String(40), index=True)
    result: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Append-only record of what happened to a tenant."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Plugin(Base):
    """One plugin's lifecycle: discovered → validated → loaded → active ⇄ disabled, or failed."""

    __tablename__ = "plugins"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The version workers serve; a reload that fails keeps this one.
    version: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    #: The operator's wish; ``state`` says what happened to it.
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    #: sha256 of the manifest's bytes, which carry every file's sha256.
    checksum: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    #: The folder the served version is loaded from (``None`` for built-ins).
    root: Mapped[str | None] = mapped_column(Text)
    queue: Mapped[str] = mapped_column(String(200))
    #: The config as given, ``${secret:…}`` references unresolved: never a secret value.
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: Why the last validation, load or reload failed.
    error: Mapped[str | None] = mapped_column(Text)
    #: Bumped on every change, so workers can tell their view is stale.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PlanPeriod(Base):
    """The plan a tenant was on from ``start_at`` until ``end_at`` (open: still on it).

    Billing prices each part of a period on the plan of that part, so a mid-period
    upgrade is never priced wholly on one plan.
    """

    __tablename__ = "plan_periods"
    __table_args__ = (UniqueConstraint("tenant_id", "start_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    plan: Mapped[str] = mapped_column(String(64))
    start_at: Mapped[dt.datetime] = mapped_column()
    end_at: Mapped[dt.datetime | None] = mapped_column()


class MeterReading(Base):
    """The last value a counter showed, per tenant, source and metric: deltas start here."""

    __tablename__ = "meter_readings"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    #: The instance (or ``datastore``) the counter belongs to.
    source: Mapped[str] = mapped_column(String(100), primary_key=True)
    metric: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float] = mapped_column()
    taken_at: Mapped[dt.datetime] = mapped_column()


class UsageRecord(Base):
    """One metric of one tenant over one window: the unique key makes metering idempotent."""

    __tablename__ = "usage_records"
    __table_args__ = (
        UniqueConstraint("tenant_id", "metric", "window_start"),
        Index("ix_usage_records_window_start", "window_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    metric: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[dt.datetime] = mapped_column()
    window_end: Mapped[dt.datetime] = mapped_column()
    #: The window's amount: a delta (sum metrics), a peak (max) or a time-weighted mean (avg).
    value: Mapped[float] = mapped_column()
    aggregation: Mapped[str] = mapped_column(String(8))
    recorded_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Invoice(Base):
    """One tenant's bill for one period; unique per (tenant, period start)."""

    __tablename__ = "invoices"
    __table_args__ = (UniqueConstraint("tenant_id", "period_start"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    period_start: Mapped[dt.datetime] = mapped_column()
    period_end: Mapped[dt.datetime] = mapped_column()
    currency: Mapped[str] = mapped_column(String(8))
    total: Mapped[Any] = mapped_column(Numeric(14, 4))
    #: ``[{"kind", "plan", "metric", "from", "to", "quantity", "included", "unit_price",
    #: "amount", "late"}]``
    lines: Mapped[list[Any]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(16), default="finalized")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: When its ``invoice.finalized`` event was handed to the observers; ``None`` until
    #: then (an outbox: a close killed before publishing leaves it to the next close).
    published_at: Mapped[dt.datetime | None] = mapped_column(index=True)


class AutoscaleDecision(Base):
    """One evaluation of one rule for one tenant, with its inputs and the reason."""

    __tablename__ = "autoscale_decisions"
    __table_args__ = (UniqueConstraint("tenant_id", "rule", "window_start"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[dt.datetime] = mapped_column()
    #: ``add_instance``, ``remove_instance``, ``upgrade_plan``, ``downgrade_plan`` or ``none``.
    action: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    inputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    workflow_id: Mapped[str | None] = mapped_column(String(32))
    decided_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    """A release rolled over one tenant's instances by a strategy (docs/architecture.md §10)."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: The tenant whose instances take the release (``None`` for a plugin deployment).
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    #: A plugin deployment's plugin: tenants, not instances, move to ``release["version"]``.
    plugin: Mapped[str | None] = mapped_column(String(64), index=True)
    #: A plugin deployment's tenants, in the order they move (a stable hash of each).
    targets: Mapped[list[Any]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(32), index=True)
    strategy: Mapped[str] = mapped_column(String(64))
    strategy_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    environment: Mapped[str] = mapped_column(String(32))
    #: The release rolled out, and the one it replaces (``schemas.delivery.Release``).
    release: Mapped[dict[str, Any]] = mapped_column(default=dict)
    previous_release: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: The strategy's plan: ``[Stage, ...]`` as JSON.
    stages: Mapped[list[Any]] = mapped_column(default=list)
    #: The stage under way (``len(stages)``: all done).
    stage_index: Mapped[int] = mapped_column(Integer, default=0)
    #: Progress inside the current stage (a pause's due time, an analysis's counts).
    stage_state: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: Every gate measurement: ``{"stage", "at", "metrics", "judgement", "reason"}``.
    measurements: Mapped[list[Any]] = mapped_column(default=list)
    #: What happened when: ``{"at", "event", "stage", ...}`` (weights read back, approvals).
    timeline: Mapped[list[Any]] = mapped_column(default=list)
    approvals_required: Mapped[int] = mapped_column(Integer, default=0)
    #: A deployment not approved by then is refused.
    approval_expires_at: Mapped[dt.datetime | None] = mapped_column()
    #: The ledger run carrying it now; each retry starts another.
    workflow_id: Mapped[str | None] = mapped_column(String(32))
    #: Requests from people, read by the running stage: ``pause``, ``promote``,
    #: ``promote_full``, ``abort`` (each with its actor).
    requests: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: Why it ended as it did, or why it is paused: ``{"code", "message", "measurement"}``.
    reason: Mapped[dict[str, Any] | None] = mapped_column()
    #: Whose call started it, and whether it is the fast way back to an earlier release.
    actor: Mapped[str] = mapped_column(String(200), default="")
    rollback_of: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()


class TenantPlugin(Base):
    """The version of one plugin a tenant runs, and its own config, where not the plugin's.

    No row: the tenant runs the version the ``plugins`` row serves, with its config.
    """

    __tablename__ = "tenant_plugins"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    plugin: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    #: ``None``: whatever version the plugin serves fleet-wide.
    version: Mapped[str | None] = mapped_column(String(64))
    #: Overrides merged over the plugin's config, ``${secret:…}`` references unresolved.
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: The version before the deployment that moved it (``None``: the fleet's), for rollback.
    previous_version: Mapped[str | None] = mapped_column(String(64))
    deployment_id: Mapped[str | None] = mapped_column(String(32), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PluginCallStat(Base):
    """Calls of one plugin version for one tenant in one time window: what gates read."""

    __tablename__ = "plugin_call_stats"

    plugin: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: ``""``: calls that named no tenant.
    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    #: The window's start (UTC, a multiple of ``plugin_stats_window`` seconds).
    window_start: Mapped[dt.datetime] = mapped_column(primary_key=True, index=True)
    calls: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms_sum: Mapped[float] = mapped_column(default=0.0)
    #: Sum of squared latencies: with the sum and count, the variance a t-test needs.
    latency_ms_sq: Mapped[float] = mapped_column(default=0.0)
    latency_ms_max: Mapped[float] = mapped_column(default=0.0)


class Approval(Base):
    """One person's approval (or rejection) of a production deployment; unique per actor."""

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("deployment_id", "actor"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column()
