"""Tenants, runs, usage and invoices as JSON for the read commands, from driver rows.

``describe_tenant``, ``describe_run``, ``usage_rows``, ``metric_views``, ``invoice_view`` and
``money`` answer what their namesakes in ``workers/engine/views.py`` and
``workers/economics/views.py`` answer (the tasks and the HTTP API use those), from
:mod:`workers.cli.reads` rows instead of the models; ``tests/unit/cli/test_reads.py``
holds each pair to the same output. A row that does not exist is ``not_found`` on stderr
and exit code 1, as :mod:`workers.cli.lookups` says it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from workers.cli.console import fail

if TYPE_CHECKING:
    import datetime as dt

    from workers.cli.reads import Reader, Row

__all__ = [
    "describe_run",
    "describe_tenant",
    "find_invoice",
    "invoice_view",
    "list_invoices",
    "list_runs",
    "list_tenants",
    "metric_views",
    "money",
    "tenant_anchor",
    "usage_rows",
    "usage_total",
]

_TENANT: Final = (
    "SELECT id, name, plan, status, status_reason, platform, placement, environment, release,"
    " resources, generation, active_workflow_id, metadata, billing_anchor, created_at,"
    " updated_at FROM tenants"
)
_RUN: Final = (
    "SELECT id, kind, tenant_id, status, phase, current_step, error, created_at, updated_at,"
    " finished_at FROM workflow_runs"
)
_INVOICE: Final = (
    "SELECT id, tenant_id, period_start, period_end, currency, total, status, lines,"
    " created_at FROM invoices"
)
#: ``Invoice.total`` is ``Numeric(14, 4)``.
_TOTAL_SCALE: Final = 4


def list_tenants(read: Reader, status: str | None) -> list[dict[str, Any]]:
    """Every tenant (or those in ``status``), newest first, as ``cul8er tenant list`` shows."""
    where = " WHERE status = :status" if status else ""
    sql = (
        "SELECT id, name, plan, status, platform, resources, created_at FROM tenants"
        f"{where} ORDER BY created_at DESC"
    )
    return [
        {
            "tenant_id": t["id"],
            "name": t["name"],
            "plan": t["plan"],
            "status": t["status"],
            "platform": t["platform"],
            "subnet": read.json(t["resources"]).get("subnet"),
            "created_at": _iso(read, t["created_at"]),
        }
        for t in read.rows(sql, status=status)
    ]


def describe_tenant(read: Reader, tenant_id: str) -> dict[str, Any]:
    """``workers.engine.views.describe_tenant`` of the tenant ``tenant_id`` (exit if none)."""
    found = read.rows(f"{_TENANT} WHERE id = :id", id=tenant_id)
    if not found:
        raise fail("not_found", f"tenant {tenant_id!r} does not exist")
    t = found[0]
    subnets = read.rows("SELECT cidr FROM network_allocations WHERE tenant_id = :id", id=t["id"])
    instances = read.rows(
        "SELECT name, role, status, endpoint, platform, release, limits FROM instances"
        " WHERE tenant_id = :id ORDER BY name",
        id=t["id"],
    )
    resources = read.json(t["resources"])
    return {
        "tenant_id": t["id"],
        "name": t["name"],
        "plan": t["plan"],
        "status": t["status"],
        "status_reason": t["status_reason"],
        "platform": t["platform"],
        "placement": t["placement"],
        "environment": t["environment"],
        "release": read.json(t["release"]) or None,
        "entry": resources.get("entry"),
        "subnet": subnets[0]["cidr"] if subnets else None,
        "generation": t["generation"],
        "active_workflow_id": t["active_workflow_id"],
        "metadata": read.json(t["metadata"]),
        "resources": resources,
        "billing_anchor": read.date(t["billing_anchor"]).isoformat(),
        "created_at": _iso(read, t["created_at"]),
        "updated_at": _iso(read, t["updated_at"]),
        "instances": [
            {
                "name": i["name"],
                "role": i["role"],
                "status": i["status"],
                "endpoint": i["endpoint"],
                "platform": i["platform"],
                "release": i["release"],
                "limits": read.json(i["limits"]),
            }
            for i in instances
        ],
    }


def tenant_anchor(read: Reader, tenant_id: str) -> dt.date:
    """The billing anchor of the tenant ``tenant_id`` (exit if there is no such tenant)."""
    found = read.rows("SELECT billing_anchor FROM tenants WHERE id = :id", id=tenant_id)
    if not found:
        raise fail("not_found", f"tenant {tenant_id!r} does not exist")
    return read.date(found[0]["billing_anchor"])


def list_runs(
    read: Reader, *, tenant: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    """Workflow runs, newest first, as ``cul8er workflow list`` shows them."""
    where = [
        clause
        for clause, wanted in (("tenant_id = :tenant", tenant), ("status = :status", status))
        if wanted
    ]
    sql = (
        "SELECT id, kind, tenant_id, status, current_step, created_at, error FROM workflow_runs"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + " ORDER BY created_at DESC LIMIT :limit"
    )
    return [
        {
            "workflow_id": r["id"],
            "kind": r["kind"],
            "tenant_id": r["tenant_id"],
            "status": r["status"],
            "current_step": r["current_step"],
            "created_at": _iso(read, r["created_at"]),
            "error": (read.json(r["error"]) or {}).get("message"),
        }
        for r in read.rows(sql, tenant=tenant, status=status, limit=limit)
    ]


def describe_run(read: Reader, workflow_id: str) -> dict[str, Any]:
    """``workers.engine.views.describe_run`` of the run ``workflow_id`` (exit if none)."""
    found = read.rows(f"{_RUN} WHERE id = :id", id=workflow_id)
    if not found:
        raise fail("not_found", f"workflow {workflow_id} does not exist")
    run = found[0]
    steps = read.rows(
        "SELECT name, phase, status, attempts, owner_id, heartbeat_at, history, output, error,"
        " started_at, finished_at FROM step_runs WHERE run_id = :id ORDER BY id",
        id=run["id"],
    )
    owners = _owners(read, sorted({s["owner_id"] for s in steps if s["owner_id"]}))
    return {
        "workflow_id": run["id"],
        "kind": run["kind"],
        "tenant_id": run["tenant_id"],
        "status": run["status"],
        "phase": run["phase"],
        "current_step": run["current_step"],
        "error": read.json(run["error"]),
        "created_at": _iso(read, run["created_at"]),
        "updated_at": _iso(read, run["updated_at"]),
        "finished_at": _iso(read, run["finished_at"]),
        "steps": [_step(read, s, owners) for s in steps],
    }


def _step(read: Reader, s: Row, owners: dict[str, Row]) -> dict[str, Any]:
    history = read.json(s["history"]) or []
    return {
        "name": s["name"],
        "phase": s["phase"],
        "status": s["status"],
        "attempts": s["attempts"],
        "owner": _owner(s["owner_id"], owners.get(s["owner_id"] or "")),
        "heartbeat_at": _iso(read, s["heartbeat_at"]),
        "takeovers": [h for h in history if h.get("event") == "takeover"],
        "history": history,
        "output": read.json(s["output"]),
        "error": read.json(s["error"]),
        "started_at": _iso(read, s["started_at"]),
        "finished_at": _iso(read, s["finished_at"]),
    }


def _owners(read: Reader, boot_ids: list[str]) -> dict[str, Row]:
    """The worker process rows of ``boot_ids``, by boot id."""
    if not boot_ids:
        return {}
    names = {f"b{i}": boot_id for i, boot_id in enumerate(boot_ids)}
    marks = ", ".join(f":{name}" for name in names)
    sql = f"SELECT boot_id, node, pid FROM workers WHERE boot_id IN ({marks})"
    return {w["boot_id"]: w for w in read.rows(sql, **names)}


def _owner(boot_id: str | None, worker: Row | None) -> dict[str, Any] | None:
    if boot_id is None:
        return None
    if worker is None:
        return {"boot_id": boot_id, "node": None, "pid": None}
    return {"boot_id": boot_id, "node": worker["node"], "pid": worker["pid"]}


def usage_rows(
    read: Reader, tenant_id: str, since: dt.datetime, until: dt.datetime, metric: str | None
) -> list[Row]:
    """The tenant's usage rows whose window starts in [since, until), by metric and time."""
    sql = (
        "SELECT metric, aggregation, value, window_start, window_end FROM usage_records"
        " WHERE tenant_id = :tenant AND window_start >= :since AND window_start < :until"
        + (" AND metric = :metric" if metric else "")
        + " ORDER BY metric, window_start"
    )
    rows = read.rows(
        sql, tenant=tenant_id, since=read.moment(since), until=read.moment(until), metric=metric
    )
    for row in rows:
        row["window_start"] = read.utc(row["window_start"])
        row["window_end"] = read.utc(row["window_end"])
    return rows


def usage_total(aggregation: str, rows: list[Row]) -> float:
    """The rows' total as their aggregation reads: a sum, a peak or a time-weighted mean."""
    values: list[float] = [r["value"] for r in rows]
    if aggregation == "max":
        return max(values)
    if aggregation == "avg":
        seconds: list[float] = [(r["window_end"] - r["window_start"]).total_seconds() for r in rows]
        covered = sum(seconds)
        if covered <= 0:
            return sum(values) / len(values)
        return sum(v * s for v, s in zip(values, seconds, strict=True)) / covered
    return sum(values)


def metric_views(rows: list[Row]) -> list[dict[str, Any]]:
    """One entry per metric of :func:`usage_rows`: its aggregation, total, windows and rows."""
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        grouped.setdefault(row["metric"], []).append(row)
    return [
        {
            "metric": name,
            "aggregation": group[0]["aggregation"],
            "total": usage_total(group[0]["aggregation"], group),
            "windows": len(group),
            "rows": [
                {
                    "window_start": r["window_start"].isoformat(),
                    "window_end": r["window_end"].isoformat(),
                    "value": r["value"],
                }
                for r in group
            ],
        }
        for name, group in grouped.items()
    ]


def list_invoices(read: Reader, *, tenant: str | None, limit: int) -> list[dict[str, Any]]:
    """Invoices (``tenant``'s only, if given), newest period first, without their lines."""
    where = " WHERE tenant_id = :tenant" if tenant else ""
    sql = f"{_INVOICE}{where} ORDER BY period_start DESC, id LIMIT :limit"
    return [invoice_view(read, i, lines=False) for i in read.rows(sql, tenant=tenant, limit=limit)]


def find_invoice(read: Reader, invoice_id: str) -> Row:
    """The invoice row ``invoice_id`` (exit if none)."""
    found = read.rows(f"{_INVOICE} WHERE id = :id", id=invoice_id)
    if not found:
        raise fail("not_found", f"invoice {invoice_id!r} does not exist")
    return found[0]


def invoice_view(read: Reader, invoice: Row, *, lines: bool) -> dict[str, Any]:
    """``workers.economics.views.invoice_view`` of an invoice row."""
    items = read.json(invoice["lines"])
    view: dict[str, Any] = {
        "invoice_id": invoice["id"],
        "tenant_id": invoice["tenant_id"],
        "period_start": _iso(read, invoice["period_start"]),
        "period_end": _iso(read, invoice["period_end"]),
        "currency": invoice["currency"],
        "total": money(read.decimal(invoice["total"], _TOTAL_SCALE)),
        "status": invoice["status"],
        "lines_count": len(items or []),
        "created_at": _iso(read, invoice["created_at"]),
    }
    if lines:
        view["lines"] = list(items or [])
    return view


def money(value: Any) -> str:
    """An amount to 4 places, ``-`` for none (as the economics views print it)."""
    return str(Decimal(str(value)).quantize(Decimal("0.0001"))) if value is not None else "-"


def _iso(read: Reader, value: Any) -> str | None:
    """A ``UTCDateTime`` column as ISO text (``None`` stays ``None``)."""
    moment = read.utc(value)
    return moment.isoformat() if moment is not None else None
