"""Carrying a deployment's stages out, and rolling it back.

See docs/architecture.md §10. One ledger step (``cul8er.deployments.advance``) runs the
stages in order; the deployment row holds where it is (``stage_index``, ``stage_state``),
so a delivery after a crash resumes at the stage it stopped in, and every stage is
idempotent. Waits up to :data:`INLINE_WAIT` are slept in the step, watching for people's
requests; longer ones, and holds for a person, park the step in the ledger (``Park``), and
the tick, or a person's command (``ledger.wake``), sends it again.

A failed gate puts all traffic back on the stable group in the same delivery, before
anything else, then fails the step; the ledger's compensation (``roll_back``) removes the
new instances and restores any stable instance already replaced.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

import structlog

from schemas.delivery import AnalysisConfig, Release
from schemas.plugins import AnalysisInput, DeploymentSpec, HeaderRoute, Stage
from schemas.states import DEPLOYMENT_FINAL, DeploymentStatus
from workers.delivery import analysis, plugin_stages, rows, traffic
from workers.delivery.cohorts import Cohort
from workers.delivery.groups import Target, load_target
from workers.delivery.rows import Done, Hold, Result, Wait
from workers.engine.steps import Park, backoff
from workers.pluginhost.handles import get_strategy
from workers.runtime.db import session_scope
from workers.runtime.errors import PermanentError, TransientError
from workers.runtime.models import AuditEvent, Deployment, Tenant
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from schemas.events import EventType

__all__ = [
    "Aborted",
    "GateFailed",
    "HOLD",
    "INLINE_WAIT",
    "advance",
    "roll_back",
    "spec_of",
]

log = structlog.get_logger(__name__)

INLINE_WAIT = rows.INLINE_WAIT
HOLD = rows.HOLD
Aborted = rows.Aborted
GateFailed = rows.GateFailed


def spec_of(row: Deployment, target: Target) -> DeploymentSpec:
    """The deployment as its strategy sees it."""
    release = Release.model_validate(row.release)
    return DeploymentSpec(
        deployment_id=row.id,
        tenant_id=_tenant(row),
        version=release.version,
        previous_version=row.previous_release.get("version"),
        artifact=release.artifact(target.platform_name),
        instances=target.group("app").names,
        config=row.strategy_config,
        environment=row.environment,
    )


# -- advance ----------------------------------------------------------------------------------


def advance(deployment_id: str, run_id: str) -> dict[str, Any]:
    """Run the deployment's stages from where it stands to the end, or until it waits."""
    row = rows.read(deployment_id)
    going: tuple[DeploymentStatus, ...] = (DeploymentStatus.PROGRESSING, DeploymentStatus.PAUSED)
    if row.plugin is not None:
        going = (*going, DeploymentStatus.AWAITING_APPROVAL)  # its approval is a stage
    if row.workflow_id != run_id or row.status not in going:
        return {"skipped": f"deployment is {row.status} under run {row.workflow_id}"}
    stages = [Stage.model_validate(s) for s in row.stages]
    target: Target | Cohort
    if row.plugin is not None:
        target, handlers = plugin_stages.load(row), _PLUGIN_STAGES
    else:
        target, handlers = load_target(_tenant(row)), _STAGES
        needs_traffic = any(s.action in ("set_weight", "route") for s in stages)
        if needs_traffic and target.lb is None:
            # The balancer went away mid-deployment: wait for it like any engine outage.
            _, reason = traffic.availability()
            return _errored(row, TransientError(reason))
    # One delivery runs stages for at most half the step's time limit; then it parks and
    # the tick hands the deployment to a fresh delivery (a canary may take hours).
    budget = time.monotonic() + get_settings().step_time_limit / 2
    while True:
        row = rows.read(deployment_id)
        if time.monotonic() > budget:
            raise Park(0.0, "time budget of this delivery spent")
        if "abort" in row.requests:
            actor = row.requests["abort"].get("actor", "?")
            raise Aborted(f"aborted by {actor}")
        index = row.stage_index
        if index >= len(stages):
            if isinstance(target, Cohort):
                return plugin_stages.succeed(row, target)
            return _succeed(row, target)
        stage = stages[index]
        if "promote_full" in row.requests and stage.action != "promote":
            last = max(i for i, s in enumerate(stages) if s.action == "promote")
            taken = rows.consume(deployment_id, "promote_full") or {}
            rows.write(
                deployment_id,
                stage_index=last,
                stage_state={},
                timeline={
                    "event": "promoted_full",
                    "actor": taken.get("actor"),
                    "from": stage.name,
                },
            )
            continue
        if "pause" in row.requests:
            actor = row.requests["pause"].get("actor", "?")
            _hold(row, f"paused by {actor}", code="paused")
        if row.status == DeploymentStatus.PAUSED:
            rows.write(deployment_id, status=DeploymentStatus.PROGRESSING, reason=None)
            rows.event(row, "deployment.resumed", stage=stage.name)
        if "resume" in row.requests and not row.stage_state.get("held"):
            rows.consume(deployment_id, "resume")  # only a held gate looks at it
        try:
            result = handlers[stage.action](row, stage, target)
        except TransientError as exc:
            return _errored(row, exc)
        if row.stage_state.get("errors"):
            rows.write(
                deployment_id,
                stage_state={k: v for k, v in row.stage_state.items() if k != "errors"},
            )
        if isinstance(result, Done):
            rows.write(
                deployment_id,
                stage_index=index + 1,
                stage_state={},
                timeline={
                    "event": "stage_done",
                    "stage": stage.name,
                    "action": stage.action,
                    **result.note,
                },
            )
            following = stages[index + 1].name if index + 1 < len(stages) else None
            rows.event(row, "deployment.stage_changed", stage=stage.name, next=following)
        elif isinstance(result, Wait):
            if result.seconds > INLINE_WAIT or time.monotonic() + result.seconds > budget:
                raise Park(result.seconds, f"{stage.name}: waiting {result.seconds:.1f} s")
            _sleep_watching(deployment_id, result.seconds)
        else:
            _hold(row, result.reason, code="held")


def _hold(row: Deployment, reason: str, *, code: str) -> None:
    """Pause the deployment for a person, and park the step until they act."""
    if row.status != DeploymentStatus.PAUSED or (row.reason or {}).get("message") != reason:
        rows.write(
            row.id,
            status=DeploymentStatus.PAUSED,
            reason={"code": code, "message": reason},
            timeline={"event": "paused", "reason": reason},
        )
        rows.event(row, "deployment.paused", reason=reason)
    raise Park(HOLD, reason)


#: Requests that cut an inline wait short.
_URGENT = frozenset({"abort", "pause", "promote", "promote_full"})


def _sleep_watching(deployment_id: str, seconds: float) -> None:
    """Sleep up to ``seconds``, waking early when a person asks for something."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(0.2, left))
        if _URGENT & rows.read(deployment_id).requests.keys():
            return


def _errored(row: Deployment, exc: TransientError) -> dict[str, Any]:
    """A stage could not reach an engine: try again later; past the limit, roll back."""
    settings = get_settings()
    errors = int(row.stage_state.get("errors", 0)) + 1
    if errors > settings.step_max_attempts:
        raise PermanentError(f"gave up after {errors} attempts: {exc}")
    rows.write(
        row.id,
        stage_state={**row.stage_state, "errors": errors},
        timeline={"event": "stage_error", "error": str(exc)[:300], "attempt": errors},
    )
    delay = backoff(errors, base=settings.retry_backoff_base, cap=settings.retry_backoff_max)
    log.warning("deployment_stage_error", error=str(exc), attempt=errors, delay=round(delay, 2))
    raise Park(delay, f"stage error: {exc}")


def _succeed(row: Deployment, target: Target) -> dict[str, Any]:
    """Every stage done: the release is the tenant's, the tenant is free again."""
    with session_scope() as session:
        dep = session.get(Deployment, row.id, with_for_update=True)
        tenant = session.get(Tenant, _tenant(row))
        assert dep is not None and tenant is not None
        if dep.status != DeploymentStatus.SUCCEEDED:
            dep.status = DeploymentStatus.SUCCEEDED
            dep.finished_at = rows.now()
            dep.reason = None
            dep.timeline = [*dep.timeline, {"at": rows.now().isoformat(), "event": "succeeded"}]
            tenant.release = dict(dep.release)
            if tenant.active_workflow_id == dep.workflow_id:
                tenant.active_workflow_id = None
            tenant.generation += 1
            session.add(
                AuditEvent(
                    tenant_id=tenant.id,
                    kind="deployment.succeeded",
                    data={"deployment_id": dep.id, "version": dep.release.get("version")},
                )
            )
    rows.event(row, "deployment.promoted", strategy=row.strategy)
    return {"deployment_id": row.id, "status": DeploymentStatus.SUCCEEDED}


# -- the stages -------------------------------------------------------------------------------


def _release(row: Deployment) -> Release:
    return Release.model_validate(row.release)


def _create_group(row: Deployment, stage: Stage, target: Target) -> Result:
    count = stage.params.get("count") or len(target.group("app").names) or 1
    names = target.start_canaries(_release(row), int(count))
    if target.lb is not None:
        traffic.set_canary_weight(target.lb, _tenant(row), 0)
    return Done({"instances": names})


def _set_weight(row: Deployment, stage: Stage, target: Target) -> Result:
    assert target.lb is not None and stage.weight is not None
    stats = traffic.set_canary_weight(target.lb, _tenant(row), stage.weight)
    log.info("deployment_weight", weight=stage.weight, read_back=stats.weights)
    return Done({"weight": stage.weight, "read_back": stats.weights})


def _route(row: Deployment, stage: Stage, target: Target) -> Result:
    assert target.lb is not None
    route = HeaderRoute(
        tenant_id=_tenant(row),
        header=stage.params.get("header"),
        cookie=stage.params.get("cookie"),
        value=str(stage.params.get("value", "")),
        group="canary",
    )
    target.lb.route_by_header(route)
    return Done({"route": route.model_dump(exclude={"tenant_id"}, exclude_none=True)})


def _pause(row: Deployment, stage: Stage, target: Target) -> Result:
    promoted = rows.consume(row.id, "promote")
    if promoted is not None:
        return Done({"promoted_by": promoted.get("actor")})
    if stage.pause_seconds is None:
        return Hold(f"{stage.name}: waiting for promotion")
    due = row.stage_state.get("due")
    if due is None:
        due = rows.ts(rows.now()) + stage.pause_seconds
        rows.write(row.id, stage_state={**row.stage_state, "due": due})
    left = due - rows.ts(rows.now())
    return Done({"paused_seconds": stage.pause_seconds}) if left <= 0 else Wait(left)


def _analysis(row: Deployment, stage: Stage, target: Target | Cohort) -> Result:
    config = AnalysisConfig.model_validate({k: v for k, v in stage.params.items() if k != "target"})
    state = dict(row.stage_state)
    promoted = rows.consume(row.id, "promote")
    if promoted is not None:
        return Done({"skipped_by": promoted.get("actor")})
    if isinstance(target, Cohort) and not target.moved():
        # A blue-green gate before the switch: the sandbox stage checked the version already.
        return Done({"skipped": "no tenant runs the new version yet: nothing to measure"})
    if state.get("held"):
        if rows.consume(row.id, "resume") is None:
            return Hold(state["held"])
        state = {}
    now = rows.ts(rows.now())
    if "next_at" not in state:
        state = {
            "next_at": now + config.initial_delay_seconds + config.interval_seconds,
            "before": _counters(row, target),
            "tally": {},
        }
        rows.write(row.id, stage_state=state)
        return Wait(state["next_at"] - now)
    if now < state["next_at"]:
        return Wait(state["next_at"] - now)
    tally = analysis.Tally.load(state)
    measurement = _measurement(row, stage, target, state, config, tally)
    outcome = tally.outcome(config)
    state.update(tally=tally.dump(), next_at=rows.ts(rows.now()) + config.interval_seconds)
    if outcome == "inconclusive":
        state["held"] = f"{stage.name}: analysis inconclusive ({measurement.get('reason', '')})"
    with session_scope() as session:
        dep = session.get(Deployment, row.id, with_for_update=True)
        assert dep is not None
        dep.measurements = [*dep.measurements, measurement]
        dep.stage_state = state
    log.info("deployment_measured", stage=stage.name, outcome=outcome, **measurement["metrics"])
    if outcome == "failed":
        if isinstance(target, Cohort):
            plugin_stages.restore_now(row, target, measurement)
        else:
            _restore_traffic(row, target, measurement)
        why = measurement.get("reason") or measurement.get("error")
        raise GateFailed(f"{stage.name}: analysis failed ({why})", measurement=measurement)
    if outcome == "successful":
        return Done({"analysis": tally.dump()})
    if outcome == "inconclusive":
        return Hold(state["held"])
    return Wait(max(0.0, state["next_at"] - rows.ts(rows.now())))


def _counters(row: Deployment, target: Target | Cohort) -> dict[str, Any]:
    """Where the next measurement starts counting."""
    if isinstance(target, Cohort):
        return plugin_stages.counters(row, target)
    return analysis.counters(target.lb, _tenant(row))


def _measurement(
    row: Deployment,
    stage: Stage,
    target: Target | Cohort,
    state: dict[str, Any],
    config: AnalysisConfig,
    tally: analysis.Tally,
) -> dict[str, Any]:
    """One measurement since ``state["before"]``, judged; ``state["before"]`` moves on."""
    taken_at = rows.now()
    measurement: dict[str, Any] = {"metrics": {}}
    try:
        comparison = None
        if isinstance(target, Cohort):
            metrics, after, comparison = plugin_stages.measure(row, stage, target, state["before"])
            spec = plugin_stages.spec_of(row, target)
        else:
            canaries = target.group("canary")
            endpoints = [endpoint for _, _, _, endpoint, _ in canaries.rows if endpoint]
            metrics, after = analysis.measure(
                target.lb,
                _tenant(row),
                endpoints,
                state["before"],
                probes=config.probes,
                timeout=get_settings().health_timeout,
            )
            spec = spec_of(row, target)
    except TransientError as exc:
        tally.error()
        measurement = {"metrics": {}, "error": str(exc)[:300]}
    else:
        verdict = get_strategy(row.strategy).analyze(
            AnalysisInput(deployment=spec, stage=stage, metrics=metrics)
        )
        decision, reason = verdict.decision, verdict.reason
        if comparison is not None:
            measurement["comparison"] = comparison
            if comparison["verdict"] == "failed":
                decision, reason = "fail", comparison["reason"]
        tally.add(decision)
        measurement = {**measurement, "metrics": metrics, "judgement": decision, "reason": reason}
        state["before"] = after
    measurement = {"stage": stage.name, "at": taken_at.isoformat(), "n": tally.taken, **measurement}
    if config.dry_run:
        measurement["dry_run"] = True
    return measurement


def _tenant(row: Deployment) -> str:
    assert row.tenant_id is not None, "a release deployment has its tenant"
    return row.tenant_id


def _restore_traffic(row: Deployment, target: Target, measurement: dict[str, Any]) -> None:
    """All traffic back on the stable group, first thing after a failed measurement."""
    if target.lb is None:
        return
    stats = traffic.restore_stable(target.lb, _tenant(row))
    taken = dt.datetime.fromisoformat(measurement["at"])
    elapsed = (rows.now() - taken).total_seconds()
    rows.write(
        row.id,
        timeline={
            "event": "traffic_restored",
            "read_back": stats.weights,
            "seconds_after_measurement": round(elapsed, 3),
        },
    )
    log.warning("deployment_traffic_restored", seconds=round(elapsed, 3))


def _replace(row: Deployment, stage: Stage, target: Target) -> Result:
    release = _release(row)
    names = [str(n) for n in stage.params.get("instances", [])]
    surge = int(stage.params.get("surge", 0))
    stable = target.group("app")
    if surge > 0:
        target.start_canaries(release, surge)
    if target.lb is not None and surge > 0:
        pending = [n for n in names if stable.release_of(n) != release.version]
        ready_after = len(stable.names) - len(pending)
        share = 100 if ready_after == 0 else round(100 * surge / (surge + ready_after))
        traffic.set_canary_weight(target.lb, _tenant(row), share)
    replaced = target.replace(names, release)
    if target.lb is not None and surge > 0:
        share = round(100 * surge / (surge + len(stable.names)))
        traffic.set_canary_weight(target.lb, _tenant(row), share)
    return Done({"batch": names, "batch_size": len(names), "replaced": replaced, "surge": surge})


def _promote(row: Deployment, stage: Stage, target: Target) -> Result:
    release = _release(row)
    stable = target.group("app")
    canaries = target.group("canary")
    pending = [n for n in stable.names if stable.release_of(n) != release.version]
    if pending and target.lb is not None and canaries.names:
        # The canary group carries all traffic while the stable instances take the release.
        traffic.set_canary_weight(target.lb, _tenant(row), 100)
    replaced = target.replace(pending, release)
    read_back: dict[str, int] = {}
    if target.lb is not None:
        read_back = traffic.restore_stable(target.lb, _tenant(row)).weights
    removed = target.remove_canaries()
    return Done({"replaced": replaced, "removed": removed, "read_back": read_back})


_STAGES: dict[str, Callable[[Deployment, Stage, Any], Result]] = {
    "create_group": _create_group,
    "set_weight": _set_weight,
    "route": _route,
    "pause": _pause,
    "analysis": _analysis,
    "replace": _replace,
    "promote": _promote,
}
#: A plugin deployment's stages: pauses and gates as a release's, the rest its own.
_PLUGIN_STAGES: dict[str, Callable[[Deployment, Stage, Any], Result]] = {
    **plugin_stages.STAGES,
    "pause": _pause,
    "analysis": _analysis,
}


# -- rollback ---------------------------------------------------------------------------------


def roll_back(deployment_id: str, run_id: str, error: dict[str, Any] | None) -> dict[str, Any]:
    """Traffic to stable, stable instances back on the previous release, new ones gone.

    Idempotent: each part finds its work done on a second delivery. The deployment ends
    ``aborted`` (a person's abort) or ``rolled_back`` (a failed gate or stage), with the
    error (and a failing measurement) as its reason.
    """
    row = rows.read(deployment_id)
    if row.workflow_id != run_id:
        return {"skipped": f"deployment is under run {row.workflow_id}"}
    if row.plugin is not None:
        return plugin_stages.roll_back(row, error)
    target = load_target(_tenant(row))
    if row.status not in (DeploymentStatus.ROLLING_BACK, *DEPLOYMENT_FINAL):
        rows.write(deployment_id, status=DeploymentStatus.ROLLING_BACK)
    problems: list[str] = []
    read_back: dict[str, int] = {}
    restored: list[str] = []
    removed: list[str] = []
    previous = Release.model_validate(row.previous_release) if row.previous_release else None
    version = previous.version if previous is not None else None

    def restore_traffic() -> None:
        nonlocal read_back
        if target.lb is not None and target.group("app").names:
            read_back = traffic.restore_stable(target.lb, _tenant(row)).weights

    def restore_stable() -> None:
        stable = target.group("app")
        restored.extend(
            target.replace([n for n in stable.names if stable.release_of(n) != version], previous)
        )

    def remove_new() -> None:
        removed.extend(target.remove_canaries())

    # Each part goes on whatever the one before did: traffic first, the new instances always
    # go. An engine that is away (TransientError) makes the ledger deliver this step again.
    for part in (restore_traffic, restore_stable, remove_new):
        try:
            part()
        except PermanentError as exc:
            log.error("rollback_part_failed", part=part.__name__, error=str(exc))
            problems.append(f"{part.__name__}: {exc}")
    code = (error or {}).get("code")
    status = DeploymentStatus.ABORTED if code == Aborted.code else DeploymentStatus.ROLLED_BACK
    if problems:
        status = DeploymentStatus.FAILED
        error = {**(error or {}), "rollback_errors": problems}
    with session_scope() as session:
        dep = session.get(Deployment, deployment_id, with_for_update=True)
        tenant = session.get(Tenant, _tenant(row))
        assert dep is not None and tenant is not None
        if dep.status not in DEPLOYMENT_FINAL:
            dep.status = status
            dep.finished_at = rows.now()
            dep.reason = error
            dep.requests = {}
            dep.timeline = [
                *dep.timeline,
                {
                    "at": rows.now().isoformat(),
                    "event": status.value,
                    "read_back": read_back,
                    "restored": restored,
                    "removed": removed,
                },
            ]
            session.add(
                AuditEvent(
                    tenant_id=tenant.id,
                    kind=f"deployment.{status.value}",
                    data={"deployment_id": dep.id, "error": error},
                )
            )
        if tenant.active_workflow_id == run_id:
            tenant.active_workflow_id = None
    ended: dict[str, EventType] = {
        DeploymentStatus.ABORTED: "deployment.aborted",
        DeploymentStatus.ROLLED_BACK: "deployment.rolled_back",
        DeploymentStatus.FAILED: "deployment.failed",
    }
    rows.event(row, ended[status], reason=(error or {}).get("message"))
    return {"status": status, "restored": restored, "removed": removed}
