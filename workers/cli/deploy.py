"""``cul8er deploy …``: roll releases over tenants, approve, promote, abort, roll back.

Every change goes through the public task ``cul8er.deployments.<command>`` by name, as
another service would send it; ``show`` and ``list`` read the database. ``--wait`` follows
a deployment until it ends or waits for a person, printing each stage as it passes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from schemas.states import DEPLOYMENT_FINAL, DeploymentStatus
from workers.cli import deployment_views
from workers.cli.client import call
from workers.cli.console import JsonOpt, add_row, console, emit, fail, line
from workers.cli.reads import reader

__all__ = ["deploy_cli"]

deploy_cli = typer.Typer(help="Roll releases over tenants' instances.", no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(help="Deployment id (or a unique prefix).")]
ActorOpt = Annotated[
    str, typer.Option(help="Who asks (recorded in the audit trail); default: $USER.")
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="Follow it until it ends or waits for a person.")
]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds --wait follows it.")]

#: Where ``--wait`` stops: the end, or a person's turn.
_STOPS = (*DEPLOYMENT_FINAL, DeploymentStatus.AWAITING_APPROVAL, DeploymentStatus.PAUSED)


def _actor(actor: str | None) -> str:
    return actor or os.environ.get("USER") or "cli"


def _resolve(prefix: str) -> str:
    with reader() as read:
        return deployment_views.find_id(read, prefix)


def _answer(result: dict[str, Any], as_json: bool) -> dict[str, Any]:
    if not result.get("ok"):
        if as_json:
            emit(result)
            raise typer.Exit(1)
        error = result.get("error", {})
        raise fail(str(error.get("code")), str(error.get("message")))
    return result


def _describe(deployment_id: str) -> dict[str, Any]:
    with reader() as read:
        return deployment_views.describe(read, deployment_views.find_id(read, deployment_id))


def _print(view: dict[str, Any]) -> None:
    subject = view["tenant_id"] or f"plugin {view['plugin']} over {view['targets']} tenants"
    console.print(
        line(
            (view["deployment_id"], "bold"),
            f"  {subject}  {view['previous_version'] or '-'} → {view['version']}  "
            f"{view['strategy']}  {view['environment']}  ",
            (view["status"], "bold"),
        )
    )
    if view.get("moved") is not None:
        console.print(line(f"tenants on {view['version']}: {len(view['moved'])}/{view['targets']}"))
    if view["reason"]:
        console.print(line("reason: ", str(view["reason"].get("message", view["reason"]))))
    stages = Table("#", "stage", "action", "detail")
    for i, stage in enumerate(view["stages"]):
        mark = "→" if i == view["stage_index"] and view["status"] not in DEPLOYMENT_FINAL else ""
        detail = stage.get("weight")
        if stage["action"] == "pause":
            seconds = stage.get("pause_seconds")
            detail = "until promoted" if seconds is None else f"{seconds:g} s"
        add_row(
            stages,
            f"{mark}{i}",
            stage["name"],
            stage["action"],
            "" if detail is None else str(detail),
        )
    console.print(stages)
    timeline = Table("at", "event", "detail")
    for entry in view["timeline"]:
        detail = {k: v for k, v in entry.items() if k not in ("at", "event")}
        add_row(timeline, entry["at"][11:23], entry["event"], json.dumps(detail)[:120])
    console.print(timeline)
    if view["measurements"]:
        measured = Table("stage", "n", "judgement", "error rate", "requests", "p95 ms", "reason")
        for m in view["measurements"]:
            metrics = m.get("metrics", {})
            add_row(
                measured,
                m["stage"],
                str(m.get("n", "")),
                m.get("judgement", "error"),
                str(metrics.get("error_rate", "-")),
                str(metrics.get("requests", "-")),
                str(metrics.get("probe_latency_ms_p95", "-")),
                (m.get("reason") or m.get("error") or "")[:60],
            )
        console.print(measured)
        for m in view["measurements"]:
            if "comparison" in m:
                _print_comparison(m["stage"], m["comparison"])
    if view["approvals"] or view["approvals_required"]:
        valid = sum(a["decision"] == "approve" and not a["expired"] for a in view["approvals"])
        console.print(
            line(
                f"approvals: {valid}/{view['approvals_required']}",
                "; ".join(f" {a['actor']} {a['decision']}d" for a in view["approvals"]),
            )
        )


def _print_comparison(stage: str, comparison: dict[str, Any]) -> None:
    """An A/B verdict: each version's figures, each test with its p-value, the verdict."""
    new, old = comparison["new"], comparison["old"]
    console.print(
        line(
            f"{stage}: new {new['calls']} calls / {new['tenants']} tenants, error rate "
            f"{new['error_rate']}, {new['latency_ms_avg']} ms; old {old['calls']} calls / "
            f"{old['tenants']} tenants, error rate {old['error_rate']}, {old['latency_ms_avg']} ms"
        )
    )
    for test in comparison["tests"]:
        p_value = "not computable" if test["p_value"] is None else f"{test['p_value']:.4g}"
        console.print(
            line(
                f"  {test['metric']}: {test['test']}, p = {p_value} → ",
                (test["result"], "bold"),
                f" (alpha {comparison['alpha']})",
            )
        )
    console.print(line("verdict: ", (comparison["verdict"], "bold"), f" ({comparison['reason']})"))


def _follow(deployment_id: str, *, as_json: bool, timeout: float) -> dict[str, Any]:
    """Print each stage as it passes until the deployment ends or waits for a person."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        view = _describe(deployment_id)
        if not as_json:
            for entry in view["timeline"][seen:]:
                detail = {k: v for k, v in entry.items() if k not in ("at", "event")}
                console.print(
                    line(
                        entry["at"][11:19],
                        " ",
                        (entry["event"], "bold"),
                        " ",
                        json.dumps(detail)[:100],
                    )
                )
            seen = len(view["timeline"])
        if view["status"] in _STOPS or time.monotonic() > deadline:
            return view
        time.sleep(0.3)


def _act(
    task: str, deployment_id: str, actor: str | None, *, as_json: bool, **extra: Any
) -> dict[str, Any]:
    full_id = _resolve(deployment_id)
    result = _answer(
        call(
            f"cul8er.deployments.{task}",
            {"deployment_id": full_id, "actor": _actor(actor), **extra},
        ),
        as_json,
    )
    if as_json:
        emit(result)
    else:
        status = result.get("status")
        console.print(line((full_id, "bold"), f": {task} → {status}"))
    return result


def _release_kwargs(
    tenant_id: str, version: str, artifact: list[str] | None, error_rate: float, latency_ms: float
) -> dict[str, Any]:
    artifacts = {}
    for item in artifact or []:
        platform, sep, ref = item.partition("=")
        if not sep:
            raise fail("validation_error", f"--artifact {item!r}: expected PLATFORM=ARTIFACT")
        artifacts[platform] = ref
    return {
        "tenant_id": tenant_id,
        "release": {
            "version": version,
            "artifacts": artifacts,
            "settings": {"error_rate": error_rate, "latency_ms": latency_ms},
        },
    }


def _plugin_kwargs(
    plugin: str, version: str, tenants: str | None, plan: str | None, environment: str | None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"plugin": plugin, "version": version}
    if tenants:
        kwargs["tenants"] = [t.strip() for t in tenants.split(",") if t.strip()]
    if plan:
        kwargs["plan"] = plan
    if environment:
        kwargs["environment"] = environment
    return kwargs


@deploy_cli.command("create")
def deploy_create(
    tenant_id: Annotated[
        str | None, typer.Argument(help="The tenant whose instances take the release.")
    ] = None,
    version: Annotated[str, typer.Option(help="The release's (or plugin's) version.")] = "",
    plugin: Annotated[
        str | None, typer.Option(help="Move tenants to --version of this plugin instead.")
    ] = None,
    tenants: Annotated[
        str | None, typer.Option(help="With --plugin: only these tenants (comma-separated).")
    ] = None,
    plan: Annotated[str | None, typer.Option(help="With --plugin: only this plan's.")] = None,
    environment: Annotated[
        str | None, typer.Option(help="With --plugin: only this environment's tenants.")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="direct, rolling, blue_green, canary or ab_test.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="The strategy's settings as JSON, e.g. '{\"step_weight\": 20}'."),
    ] = None,
    artifact: Annotated[
        list[str] | None,
        typer.Option(help="PLATFORM=ARTIFACT: a Docker tag, an Incus alias, a local command."),
    ] = None,
    error_rate: Annotated[
        float, typer.Option(help="Instance server setting: share of requests answered 500.")
    ] = 0.0,
    latency_ms: Annotated[
        float, typer.Option(help="Instance server setting: added latency.")
    ] = 0.0,
    actor: ActorOpt = "",
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 600.0,
) -> None:
    """Roll a release over a tenant's instances, or (--plugin) a plugin version over tenants."""
    if not version:
        raise fail("validation_error", "--version is required")
    if plugin is not None:
        kwargs = _plugin_kwargs(plugin, version, tenants, plan, environment)
        if tenant_id:
            kwargs["tenant_id"] = tenant_id  # refused by the task, naming the field
    elif tenant_id:
        kwargs = _release_kwargs(tenant_id, version, artifact, error_rate, latency_ms)
    else:
        raise fail("validation_error", "give a TENANT_ID (a release) or --plugin (a plugin)")
    try:
        kwargs["strategy_config"] = json.loads(config) if config else {}
    except json.JSONDecodeError as exc:
        raise fail("validation_error", f"--config is not JSON: {exc}") from None
    kwargs["actor"] = _actor(actor)
    if strategy:
        kwargs["strategy"] = strategy
    result = _answer(call("cul8er.deployments.create", kwargs), as_json)
    if not wait:
        if as_json:
            emit(result)
        else:
            console.print(
                line("deployment ", (result["deployment_id"], "bold"), f": {result['status']}")
            )
        return
    view = _follow(result["deployment_id"], as_json=as_json, timeout=timeout)
    if as_json:
        emit(view)
    else:
        _print(view)
    if view["status"] != DeploymentStatus.SUCCEEDED:
        raise typer.Exit(1)


@deploy_cli.command("show")
def deploy_show(deployment_id: IdArg, as_json: JsonOpt = False) -> None:
    """A deployment's timeline: stages, weights read back, measurements, approvals."""
    view = _describe(deployment_id)
    if as_json:
        emit(view)
    else:
        _print(view)


@deploy_cli.command("list")
def deploy_list(
    tenant_id: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's.")] = None,
    plugin: Annotated[str | None, typer.Option(help="Only this plugin's.")] = None,
    status: Annotated[DeploymentStatus | None, typer.Option(help="Only in this status.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Deployments, newest first."""
    # The public task's payload model checks the filters as ``cul8er.deployments.list`` does.
    from schemas.tasks import ListDeployments

    payload = ListDeployments(
        tenant_id=tenant_id, plugin=plugin, status=status.value if status else None
    )
    with reader() as read:
        rows = deployment_views.list_deployments(
            read,
            tenant_id=payload.tenant_id,
            plugin=payload.plugin,
            status=payload.status,
            limit=payload.limit,
        )
    if as_json:
        emit(rows)
        return
    table = Table("deployment", "tenant", "version", "strategy", "status", "stage")
    for r in rows:
        add_row(
            table,
            r["deployment_id"],
            r["tenant_id"] or f"{r['plugin']} ×{r['targets']}",
            f"{r['previous_version'] or '-'} → {r['version']}",
            r["strategy"],
            r["status"],
            f"{r['stage_index']}/{r['stages']}",
        )
    console.print(table)


@deploy_cli.command("approve")
def deploy_approve(
    deployment_id: IdArg, actor: ActorOpt = "", comment: str = "", as_json: JsonOpt = False
) -> None:
    """Approve a production deployment (each approver once)."""
    _act("approve", deployment_id, actor, as_json=as_json, reason=comment)


@deploy_cli.command("reject")
def deploy_reject(
    deployment_id: IdArg, actor: ActorOpt = "", reason: str = "", as_json: JsonOpt = False
) -> None:
    """Refuse a production deployment."""
    _act("reject", deployment_id, actor, as_json=as_json, reason=reason)


@deploy_cli.command("promote")
def deploy_promote(
    deployment_id: IdArg,
    full: Annotated[bool, typer.Option("--full", help="Skip every stage up to promotion.")] = False,
    actor: ActorOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """End the current pause or gate now."""
    _act("promote", deployment_id, actor, as_json=as_json, full=full)


@deploy_cli.command("pause")
def deploy_pause(
    deployment_id: IdArg, actor: ActorOpt = "", reason: str = "", as_json: JsonOpt = False
) -> None:
    """Hold a deployment after its current stage."""
    _act("pause", deployment_id, actor, as_json=as_json, reason=reason)


@deploy_cli.command("resume")
def deploy_resume(deployment_id: IdArg, actor: ActorOpt = "", as_json: JsonOpt = False) -> None:
    """Go on after a pause, or look again after an inconclusive analysis."""
    _act("resume", deployment_id, actor, as_json=as_json)


@deploy_cli.command("abort")
def deploy_abort(
    deployment_id: IdArg, actor: ActorOpt = "", reason: str = "", as_json: JsonOpt = False
) -> None:
    """Stop a deployment: traffic back to stable, its new instances removed."""
    _act("abort", deployment_id, actor, as_json=as_json, reason=reason)


@deploy_cli.command("retry")
def deploy_retry(deployment_id: IdArg, actor: ActorOpt = "", as_json: JsonOpt = False) -> None:
    """Run an aborted or rolled-back deployment again from its first stage."""
    _act("retry", deployment_id, actor, as_json=as_json)


@deploy_cli.command("rollback")
def deploy_rollback(
    deployment_id: IdArg, actor: ActorOpt = "", reason: str = "", as_json: JsonOpt = False
) -> None:
    """After a completed promotion: put the previous release back at once."""
    _act("rollback", deployment_id, actor, as_json=as_json, reason=reason)
