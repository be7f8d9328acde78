"""``cul8er usage|invoice|autoscale|beat …``: read usage, invoices, autoscale decisions, beat.

Every command reads the database directly (no worker needed) and has ``--json``.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer
from rich.table import Table
from rich.text import Text

from workers.cli.console import JsonOpt, add_row, complain, console, emit, fail, line
from workers.cli.reads import reader

# The invoice commands read through workers.cli.reads; the others import the models, the
# economics views and the full settings when they run.
if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from schemas.autoscale import AutoscaleRule
    from workers.runtime.models import Tenant
    from workers.runtime.settings import Settings

__all__ = ["autoscale_cli", "beat_cli", "economics_cli", "invoice_cli", "main", "usage_cli"]

usage_cli = typer.Typer(help="Metered usage per tenant.", no_args_is_help=True)
invoice_cli = typer.Typer(help="Invoices of closed billing periods.", no_args_is_help=True)
autoscale_cli = typer.Typer(help="Autoscale decisions and why.", no_args_is_help=True)
beat_cli = typer.Typer(help="The beat schedule and its last runs.", no_args_is_help=True)


@usage_cli.callback()
def _usage() -> None:
    """Metered usage per tenant."""


@invoice_cli.callback()
def _invoice() -> None:
    """Invoices of closed billing periods."""


@autoscale_cli.callback()
def _autoscale() -> None:
    """Autoscale decisions and why."""


@beat_cli.callback()
def _beat() -> None:
    """The beat schedule and its last runs."""


#: All four under one app, for ``python -m workers.cli.economics`` (``cul8er`` adds each).
economics_cli = typer.Typer(help="cul8er economics: usage, invoices, autoscale, beat.")
economics_cli.add_typer(usage_cli, name="usage")
economics_cli.add_typer(invoice_cli, name="invoice")
economics_cli.add_typer(autoscale_cli, name="autoscale")
economics_cli.add_typer(beat_cli, name="beat")

#: How long past its expected run a crontab entry may be before it counts as overdue (s).
CRONTAB_GRACE: Final = 600.0


def _moment(text: str | None, option: str) -> dt.datetime | None:
    """An ISO date or datetime from the command line; naive ones are UTC."""
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        message = f"{option}: not an ISO date or datetime: {text!r}"
        raise fail("validation_error", message, exit_code=2) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


# -- usage ------------------------------------------------------------------------------------


def _print_usage(view: dict[str, Any], limit: int) -> None:
    """The totals per metric, then each metric's last ``limit`` windows."""
    console.print(line((view["tenant_id"], "bold"), f" usage from {view['from']} to {view['to']}"))
    metrics = view["metrics"]
    if not metrics:
        console.print("no usage recorded")
        return
    summary = Table("metric", "aggregation", "windows", "total")
    for m in metrics:
        add_row(summary, m["metric"], m["aggregation"], str(m["windows"]), f"{m['total']:.6g}")
    console.print(summary)
    for m in metrics:
        table = Table("window start", "window end", "value", title=Text(m["metric"]))
        shown = m["rows"][-limit:] if limit > 0 else []
        for r in shown:
            add_row(table, r["window_start"][:19], r["window_end"][:19], f"{r['value']:.6g}")
        total = Text("total", style="bold")
        add_row(table, total, f"{len(m['rows'])} windows", f"{m['total']:.6g}")
        console.print(table)


@usage_cli.command("show")
def usage_show(
    tenant_id: str,
    start: Annotated[
        str | None, typer.Option("--from", help="ISO start (default: the period's start).")
    ] = None,
    end: Annotated[str | None, typer.Option("--to", help="ISO end (default: now).")] = None,
    metric: Annotated[str | None, typer.Option(help="Only this metric.")] = None,
    limit: Annotated[int, typer.Option(help="Rows shown per metric in the table.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """A tenant's usage rows grouped per metric, with each metric's total."""
    # The billing periods themselves (periods.py), not quotas.period_start over them: quotas
    # imports every public task's payload model. Both give the same start (a test says so).
    from workers.cli.views import metric_views, tenant_anchor, usage_rows
    from workers.economics.periods import period_bounds
    from workers.runtime.settings import get_settings

    now = dt.datetime.now(dt.UTC)
    with reader() as read:
        anchor = tenant_anchor(read, tenant_id)
        since = (
            _moment(start, "--from") or period_bounds(anchor, get_settings().billing_period, now)[0]
        )
        until = _moment(end, "--to") or now
        rows = usage_rows(read, tenant_id, since, until, metric)
    view = {
        "tenant_id": tenant_id,
        "from": since.isoformat(),
        "to": until.isoformat(),
        "metrics": metric_views(rows),
    }
    if as_json:
        emit(view)
    else:
        _print_usage(view, limit)


# -- invoices ---------------------------------------------------------------------------------


@invoice_cli.command("list")
def invoice_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's invoices.")] = None,
    limit: int = 50,
    as_json: JsonOpt = False,
) -> None:
    """Invoices, newest period first."""
    from workers.cli.views import list_invoices

    with reader() as read:
        views = list_invoices(read, tenant=tenant, limit=limit)
    if as_json:
        emit(views)
        return
    table = Table("invoice", "tenant", "period start", "period end", "total", "status", "lines")
    for v in views:
        add_row(
            table,
            v["invoice_id"],
            v["tenant_id"],
            v["period_start"][:19],
            v["period_end"][:19],
            f"{v['total']} {v['currency']}",
            v["status"],
            str(v["lines_count"]),
        )
    console.print(table if views else "no invoices")


@invoice_cli.command("show")
def invoice_show(invoice_id: str, as_json: JsonOpt = False) -> None:
    """One invoice with its lines."""
    from workers.cli.views import find_invoice, invoice_view, money

    with reader() as read:
        view = invoice_view(read, find_invoice(read, invoice_id), lines=True)
    if as_json:
        emit(view)
        return
    console.print(
        line(
            (view["invoice_id"], "bold"),
            f" tenant={view['tenant_id']} {view['period_start'][:19]} → "
            f"{view['period_end'][:19]} status={view['status']} "
            f"total={view['total']} {view['currency']}",
        )
    )
    table = Table(
        "kind", "plan", "metric", "from", "to", "quantity", "included", "unit price", "amount"
    )
    for item in view["lines"]:
        add_row(
            table,
            str(item.get("kind", "")),
            str(item.get("plan") or "-"),
            str(item.get("metric") or "-"),
            str(item.get("from") or "-")[:19],
            str(item.get("to") or "-")[:19],
            str(item.get("quantity", "-")),
            str(item.get("included", "-")),
            str(item.get("unit_price", "-")),
            money(item.get("amount")) + (" (late)" if item.get("late") else ""),
        )
    total = Text("total", style="bold")
    add_row(table, total, "", "", "", "", "", "", "", f"{view['total']} {view['currency']}")
    console.print(table)


# -- autoscale --------------------------------------------------------------------------------


def _inputs_text(inputs: dict[str, Any]) -> str:
    keys = ("value", "threshold", "window", "samples", "instances", "held_seconds")
    return " ".join(f"{k}={inputs[k]}" for k in keys if k in inputs)


def _rules(settings: Settings, tenant: Tenant) -> tuple[list[AutoscaleRule], list[str]]:
    """The tenant's effective autoscale rules (its plan's, with its overrides), and problems."""
    from workers.economics.autoscale import resolve_rules
    from workers.economics.plans import load_catalog

    plan = load_catalog(settings.plans_file).plans.get(tenant.plan)
    return resolve_rules(plan, tenant.meta or {}) if plan else ([], [])


def _print_autoscale(view: dict[str, Any], rules: list[AutoscaleRule]) -> None:
    """The rules in words, their problems on stderr, then the decisions' table."""
    console.print(line((view["tenant_id"], "bold"), f" on {view['plan']} ({view['status']})"))
    for rule in rules:
        extra = f" → {rule.target_plan}" if rule.target_plan else ""
        console.print(
            line(
                "rule ",
                (rule.name, "bold"),
                f": {rule.metric} {rule.comparison} {rule.threshold:g} "
                f"over {rule.window:g} s: {rule.action}{extra}",
            )
        )
    for problem in view["rule_problems"]:
        complain(("rule problem", "yellow"), f": {problem}")
    decisions = view["decisions"]
    table = Table("decided", "rule", "action", "reason", "inputs", "workflow")
    for d in decisions:
        add_row(
            table,
            d["decided_at"][:19],
            d["rule"],
            d["action"],
            d["reason"],
            _inputs_text(d["inputs"]),
            d["workflow_id"] or "-",
        )
    console.print(table if decisions else "no decisions yet")


@autoscale_cli.command("explain")
def autoscale_explain(
    tenant_id: str,
    last: Annotated[int, typer.Option("--last", help="How many decisions, newest first.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """A tenant's autoscale rules and its last decisions, with their inputs and reasons."""
    from workers.cli.lookups import find_tenant
    from workers.economics.views import autoscale_decisions
    from workers.runtime.db import session_scope
    from workers.runtime.settings import get_settings

    settings = get_settings()
    with session_scope() as session:
        tenant = find_tenant(session, tenant_id)
        rules, problems = _rules(settings, tenant)
        view = {
            "tenant_id": tenant_id,
            "plan": tenant.plan,
            "status": tenant.status,
            "rules": [r.model_dump(mode="json") for r in rules],
            "rule_problems": problems,
            "defaults": {
                "cooldown": settings.autoscale_cooldown,
                "stabilization": settings.autoscale_stabilization,
            },
            "decisions": autoscale_decisions(session, tenant_id, last),
        }
    if as_json:
        emit(view)
    else:
        _print_autoscale(view, rules)


# -- beat -------------------------------------------------------------------------------------


def _last_slot(session: Session, task: str) -> dt.datetime | None:
    """The newest slot ``task`` claimed (keys ``<task>:<slot>`` in ``operations``)."""
    from sqlalchemy import select

    from workers.runtime.models import Operation

    keys = session.scalars(
        select(Operation.key)
        .where(Operation.key.like(f"{task}:%"))
        .order_by(Operation.created_at.desc())
        .limit(20)
    )
    slots = []
    for key in keys:
        try:
            slot = dt.datetime.fromisoformat(key[len(task) + 1 :])
        except ValueError:
            continue  # an idempotency key of the same task name, not a slot
        slots.append(slot if slot.tzinfo else slot.replace(tzinfo=dt.UTC))
    return max(slots, default=None)


def _entry_status(
    name: str, entry: dict[str, Any], last: dt.datetime | None, now: dt.datetime
) -> dict[str, Any]:
    schedule = entry["schedule"]
    view: dict[str, Any] = {
        "entry": name,
        "task": entry["task"],
        "queue": entry.get("options", {}).get("queue"),
        "last_slot": last.isoformat() if last else None,
        "next_due": None,
        "overdue": None,
    }
    if isinstance(schedule, int | float):
        view["schedule"] = f"every {float(schedule):g} s"
        if last is not None:
            due = last + dt.timedelta(seconds=float(schedule))
            # One interval of slack: beat's own drift and the run's queueing.
            view["next_due"] = due.isoformat()
            view["overdue"] = now > due + dt.timedelta(seconds=float(schedule))
    else:
        view["schedule"] = str(schedule).strip("<>")
        if last is not None:
            due = now + schedule.remaining_estimate(last)
            view["next_due"] = due.isoformat()
            view["overdue"] = now > due + dt.timedelta(seconds=CRONTAB_GRACE)
    return view


@beat_cli.command("status")
def beat_status(as_json: JsonOpt = False) -> None:
    """Each beat entry: task, schedule, the last slot it claimed, and whether it is overdue."""
    from beat_schedule import build_beat_schedule
    from workers.runtime.db import session_scope
    from workers.runtime.models import utcnow
    from workers.runtime.settings import get_settings

    settings = get_settings()
    now = utcnow()
    entries = build_beat_schedule(settings)
    with session_scope() as session:
        views = [
            _entry_status(name, entry, _last_slot(session, entry["task"]), now)
            for name, entry in entries.items()
        ]
    if as_json:
        emit(views)
        return
    table = Table("entry", "task", "schedule", "last slot", "next due", "overdue")
    for v in views:
        overdue = {None: Text("-"), True: Text("yes", style="red"), False: Text("no")}
        add_row(
            table,
            v["entry"],
            v["task"],
            v["schedule"],
            (v["last_slot"] or "never claimed")[:19],
            (v["next_due"] or "-")[:19],
            overdue[v["overdue"]],
        )
    console.print(table)
    console.print("overdue '-': the task claims no schedule slot, or none yet")


def main() -> None:
    """Run the four groups on their own: ``python -m workers.cli.economics autoscale …``."""
    from workers.runtime.logging import configure_logging
    from workers.runtime.settings import get_settings

    settings = get_settings()
    # Logs go to stderr, so --json output on stdout stays parseable.
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    economics_cli()


if __name__ == "__main__":
    main()
