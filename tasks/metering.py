"""Metering on beat: ``meter_all`` fans the active tenants out in chunks, each chunk meters once.

``cul8er.metering.meter_all`` runs every ``meter_interval`` seconds. It claims its schedule
slot ``S`` (a second beat, or a re-run of the slot, finds it claimed and does nothing) and
sends one ``cul8er.metering.meter_tenants`` message per ``meter_chunk_size`` active tenants
for the window ``[S - interval, S)``. A chunk delivered twice, even at once, writes each
tenant's window once: the usage rows' unique key decides, in the same transaction as the
counter readings. ``cul8er.metering.meter_tenant`` meters one tenant on demand.

Metering reads the counters through :class:`PluginSources`: the platform and provisioner
plugins, which the economics never call themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from workers.delivery import traffic
from workers.economics import metering
from workers.engine.public import rejection
from workers.pluginhost.handles import get_platform, get_provisioner
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import (
    ConflictError,
    NotFoundError,
    PermanentError,
    TransientError,
    ValidationFailedError,
)
from workers.runtime.models import Tenant
from workers.runtime.queues import Queue
from workers.runtime.schedule import claim_slot, claimed_slot
from workers.runtime.settings import get_settings
from workers.runtime.task import RetryingTask

if TYPE_CHECKING:
    from schemas.platform import InstanceStats
    from workers.pluginhost.contracts import LoadBalancer, Platform
    from workers.runtime.settings import Settings

__all__ = [
    "METER_ALL",
    "METER_TENANT",
    "METER_TENANTS",
    "MeteringTask",
    "PluginSources",
    "meter_all",
    "meter_tenant",
    "meter_tenants",
]

log = structlog.get_logger(__name__)

METER_ALL = "cul8er.metering.meter_all"
METER_TENANTS = "cul8er.metering.meter_tenants"
METER_TENANT = "cul8er.metering.meter_tenant"


class MeteringTask(RetryingTask):
    """Metering: a killed worker's chunk runs again (global acks_late), busy database retried."""

    typing = False  # kwargs are checked here, with the field named in the error


class PluginSources:
    """Metering's :class:`~workers.economics.metering.SourceReader` over the plugins.

    Instances are read through their platform's ``stats`` (each platform looked up once per
    reader), pool shares and datastores through their provisioner's ``meter_usage``, entry
    points through the load balancer's ``stats``.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._platforms: dict[str, Platform] = {}
        self._balancer: LoadBalancer | None = None

    def instance_stats(self, platform: str, instance: str) -> InstanceStats:
        """The counters and gauges of ``instance`` as its ``platform`` reads them now."""
        if platform not in self._platforms:
            self._platforms[platform] = get_platform(platform, self._settings)
        return self._platforms[platform].stats(instance)

    def provisioner_usage(self, provisioner: str, tenant_id: str) -> dict[str, float]:
        """The counters ``provisioner`` keeps for the tenant, now."""
        return get_provisioner(provisioner).meter_usage(tenant_id).metrics

    def entry_requests(self, tenant_id: str) -> float:
        """The requests the tenant's frontend received, as the load balancer counts them."""
        if self._balancer is None:
            self._balancer = traffic.balancer()
        if self._balancer is None:
            raise TransientError("no load balancer is configured")
        return float(self._balancer.stats(tenant_id).frontend_requests)


def _meter(tenant_ids: list[str], window: metering.Window) -> metering.ChunkResult:
    """Meter ``window`` for ``tenant_ids``, reading their sources through the plugins."""
    settings = get_settings()
    return metering.meter_chunk(tenant_ids, window, settings, PluginSources(settings))


def _window(window_start: str | None, window_end: str | None) -> metering.Window:
    if window_start is None and window_end is None:
        return metering.window_for(get_settings().meter_interval)
    if window_start is None or window_end is None:
        missing = "window_start" if window_start is None else "window_end"
        raise ValidationFailedError(
            "window_start and window_end go together",
            errors=[{"field": missing, "message": "required with the other window bound"}],
        )
    try:
        return metering.Window.parse(window_start, window_end)
    except (TypeError, ValueError) as exc:
        raise ValidationFailedError(
            f"invalid window: {exc}", errors=[{"field": "window_start", "message": str(exc)}]
        ) from exc


@app.task(name=METER_ALL, base=MeteringTask, ignore_result=True, bind=True)
def meter_all(self: MeteringTask) -> dict[str, Any]:
    """Claim this schedule slot and send the active tenants to ``meter_tenants`` in chunks.

    A redelivery of the message (its worker died while sending) sends every chunk of
    the window it claimed again, however late it comes: chunks meter idempotently.
    """
    settings = get_settings()
    task_id = self.request.id
    claimed = claimed_slot(METER_ALL, task_id) if task_id else None
    window = metering.window_for(settings.meter_interval, now=claimed)
    # The tenants first: a failure up to the claim retries the whole slot, and after the
    # claim only sending is left.
    with session_scope() as session:
        tenant_ids = metering.active_tenant_ids(session)
    chunks = list(metering.chunked(tenant_ids, settings.meter_chunk_size))
    result = {"tenants": len(tenant_ids)}
    if not claim_slot(METER_ALL, window.end, result=result, task_id=task_id):
        # Another fan-out of this slot went ahead. A chunk message it sent can be lost (a
        # worker killed as Redis hands it over); what is still unmetered is sent again,
        # and a chunk still on its way finds its tenants metered and writes nothing.
        with session_scope() as session:
            done = metering.metered_tenants(session, tenant_ids, window)
        missing = [t for t in tenant_ids if t not in done]
        _send_chunks(list(metering.chunked(missing, settings.meter_chunk_size)), window)
        log.info("metering_slot_taken", window_start=window.start.isoformat(), resent=len(missing))
        return {
            "ok": True,
            "skipped": "slot already claimed",
            "resent": len(missing),
            **window.to_json(),
        }
    _send_chunks(chunks, window)
    log.info(
        "metering_fanned_out",
        window_start=window.start.isoformat(),
        tenants=len(tenant_ids),
        chunks=len(chunks),
    )
    return {"ok": True, "tenants": len(tenant_ids), "chunks": len(chunks), **window.to_json()}


def _send_chunks(chunks: list[list[str]], window: metering.Window) -> None:
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            meter_tenants.apply_async(
                kwargs={"tenant_ids": chunk, **window.to_json()},
                queue=Queue.METERING.value,
                producer=producer,
            )


@app.task(name=METER_TENANTS, base=MeteringTask, ignore_result=True)
def meter_tenants(tenant_ids: list[str], window_start: str, window_end: str) -> dict[str, Any]:
    """Meter one window of a chunk of tenants (idempotent: a repeat writes nothing)."""
    window = metering.Window.parse(window_start, window_end)
    result = _meter(tenant_ids, window)
    log.info("metering_chunk_done", window_start=window_start, **result.to_json())
    return {"ok": True, **window.to_json(), **result.to_json()}


@app.task(name=METER_TENANT, base=MeteringTask, ignore_result=False)
def meter_tenant(
    tenant_id: str | None = None,
    window_start: str | None = None,
    window_end: str | None = None,
    **unknown: Any,
) -> dict[str, Any]:
    """Meter one tenant now, for the last closed window unless one is given; its usage rows."""
    try:
        if unknown:
            raise ValidationFailedError(
                "unexpected arguments",
                errors=[{"field": key, "message": "unknown argument"} for key in sorted(unknown)],
            )
        if not isinstance(tenant_id, str) or not tenant_id:
            raise ValidationFailedError(
                "tenant_id is required",
                errors=[{"field": "tenant_id", "message": "a tenant id is required"}],
            )
        window = _window(window_start, window_end)
        with session_scope() as session:
            tenant = session.get(Tenant, tenant_id)
            if tenant is None:
                raise NotFoundError(f"tenant {tenant_id} does not exist")
            status = tenant.status
        result = _meter([tenant_id], window)
        if result.skipped:
            raise ConflictError(f"tenant {tenant_id} is {status}, not active: nothing to meter")
        with session_scope() as session:
            usage = metering.usage_of(session, tenant_id, window)
    except PermanentError as exc:
        return rejection(exc)
    return {
        "ok": True,
        "tenant_id": tenant_id,
        **window.to_json(),
        "metered": bool(result.metered),
        "usage": usage,
    }
