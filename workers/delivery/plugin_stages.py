"""The stages of a plugin deployment: tenants, not instances, move to a plugin version.

See docs/architecture.md §10. The strategy's plan is the same as for a release; its actions
mean, for a plugin:

- ``sandbox`` (always first): the version's checks and its own tests on the sandbox queue;
- ``approval`` (production): wait for the approvers (``cul8er deploy approve``);
- ``create_group``: load the new version on this worker beside the old one, self-tested;
- ``set_weight``: the first ``weight`` % of the tenants (in hash order) on the new version;
- ``route``: every other tenant on the new version (an A/B split for the gate to compare);
- ``replace``: the batch of tenants ``params.instances`` on the new version;
- ``promote``: every targeted tenant on the new version.

A failed gate puts every moved tenant back at once, before anything else; the rollback step
makes sure of it and ends the deployment.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, cast

import structlog
from celery.result import AsyncResult

from schemas.plugins import DeploymentSpec, Stage
from schemas.states import DEPLOYMENT_FINAL, DeploymentStatus
from workers.delivery import rows
from workers.delivery.cohorts import Cohort
from workers.delivery.rows import Done, Result, Wait
from workers.engine.steps import Park
from workers.pluginhost.calls import registry
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import PermanentError, TransientError
from workers.runtime.models import AuditEvent, Deployment
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from schemas.events import EventType

__all__ = [
    "STAGES",
    "SandboxFailed",
    "counters",
    "load",
    "measure",
    "restore_now",
    "roll_back",
    "spec_of",
    "succeed",
]

log = structlog.get_logger(__name__)

#: How often the sandbox stage looks for its check's answer (seconds).
_POLL = 0.25


class SandboxFailed(PermanentError):
    """The new version failed a check in the sandbox: no tenant moves."""

    code = "sandbox_failed"


def load(row: Deployment) -> Cohort:
    """The deployment's cohort."""
    assert row.plugin is not None
    return Cohort(
        deployment_id=row.id,
        plugin=row.plugin,
        version=str(row.release["version"]),
        targets=[str(t) for t in row.targets],
    )


def spec_of(row: Deployment, cohort: Cohort) -> DeploymentSpec:
    """The deployment as its strategy sees it: the tenants stand where instances would."""
    return DeploymentSpec(
        deployment_id=row.id,
        tenant_id="",
        plugin=cohort.plugin,
        version=cohort.version,
        previous_version=row.previous_release.get("version"),
        instances=cohort.targets,
        config=row.strategy_config,
        environment=row.environment,
    )


# -- stages -----------------------------------------------------------------------------------


def _sandbox(row: Deployment, stage: Stage, cohort: Cohort) -> Result:
    state = dict(row.stage_state)
    settings = get_settings()
    if "task_id" not in state:
        task_id = f"{row.id}-sandbox-{len(row.timeline)}"
        app.send_task(
            "cul8er.plugins.sandbox_check",
            kwargs={
                "name": cohort.plugin,
                "version": cohort.version,
                "overrides": cohort.overrides(),
            },
            task_id=task_id,
            queue=settings.sandbox_queue,
        )
        state = {"task_id": task_id, "deadline": rows.ts(rows.now()) + settings.plugin_call_timeout}
        rows.write(row.id, stage_state=state)
        return Wait(_POLL)
    result: AsyncResult[Any] = AsyncResult(state["task_id"], app=app)
    if not result.ready():
        if rows.ts(rows.now()) > state["deadline"]:
            # Sent again on the next try: a lost message or a missing sandbox worker.
            rows.write(row.id, stage_state={})
            raise TransientError(
                f"no answer from the sandbox queue {settings.sandbox_queue!r} within "
                f"{settings.plugin_call_timeout:g} s: is a worker consuming it?"
            )
        return Wait(_POLL)
    if result.failed():
        raise SandboxFailed(
            f"sandbox check of {cohort.plugin} {cohort.version} died: {result.result}"
        )
    answer = cast("dict[str, Any]", result.result)
    if not answer.get("ok"):
        raise SandboxFailed(f"sandbox: {cohort.plugin} {cohort.version}: {answer.get('error')}")
    return Done({"checks": answer.get("checks", []), "tests": answer.get("tests")})


def _approval(row: Deployment, stage: Stage, cohort: Cohort) -> Result:
    if row.approvals_required <= 0 or row.stage_state.get("approved"):
        return Done({"approvals": row.stage_state.get("approvers", [])})
    if row.status != DeploymentStatus.AWAITING_APPROVAL:
        expires = rows.now() + dt.timedelta(seconds=get_settings().approval_ttl)
        rows.write(
            row.id,
            status=DeploymentStatus.AWAITING_APPROVAL,
            approval_expires_at=expires,
            timeline={"event": "awaiting_approval", "required": row.approvals_required},
        )
        rows.event(row, "deployment.paused", reason="awaiting approval")
    # Not a person's hold (that would make it ``paused``): ``approve`` wakes the step.
    raise Park(rows.HOLD, "awaiting approval")


def _load_version(row: Deployment, stage: Stage, cohort: Cohort) -> Result:
    reg = registry()
    try:
        served = reg.version(cohort.plugin, cohort.version)
        if served.trusted:
            reg.instance(served)  # built: its self_test runs here too (untrusted: sandbox only)
    except PermanentError as exc:
        raise SandboxFailed(f"{cohort.plugin} {cohort.version} does not load here: {exc}") from exc
    return Done({"loaded": cohort.version})


def _moved_note(cohort: Cohort, moved_now: list[str]) -> dict[str, Any]:
    moved = cohort.moved()
    return {"tenants": len(moved), "of": len(cohort.targets), "moved_now": moved_now}


def _set_weight(row: Deployment, stage: Stage, cohort: Cohort) -> Result:
    assert stage.weight is not None
    moved_now = cohort.move_first(cohort.count_for(stage.weight))
    return Done({"weight": stage.weight, **_moved_note(cohort, moved_now)})


def _split(row: Deployment, stage: Stage, cohort: Cohort) -> Result:
    if row.strategy != "ab_test":
        # A blue-green preview: tenants are not requests; none moves before the switch.
        return Done({"preview": "no tenant moves before the switch"})
    moved_now = cohort.move(cohort.targets[1::2])
    return Done({"split": "every other tenant", **_moved_note(cohort, moved_now)})


def _batch(row: Deployment, stage: Stage, cohort: Cohort) -> Result:
    batch = [str(t) for t in stage.params.get("instances", []) if str(t) in cohort.targets]
    moved_now = cohort.move(batch)
    return Done({"batch": batch, "batch_size": len(batch), **_moved_note(cohort, moved_now)})


def _promote(row: Deployment, stage: Stage, cohort: Cohort) -> Result:
    moved_now = cohort.move(cohort.targets)
    return Done(_moved_note(cohort, moved_now))


#: The plugin meaning of each strategy action (``pause`` and ``analysis`` are shared).
STAGES: dict[str, Callable[[Deployment, Stage, Cohort], Result]] = {
    "sandbox": _sandbox,
    "approval": _approval,
    "create_group": _load_version,
    "set_weight": _set_weight,
    "route": _split,
    "replace": _batch,
    "promote": _promote,
}


# -- analysis ---------------------------------------------------------------------------------


def counters(row: Deployment, cohort: Cohort) -> dict[str, Any]:
    """Where a measurement starts: the calls from now on."""
    return {"since": rows.now().isoformat()}


def measure(
    row: Deployment, stage: Stage, cohort: Cohort, before: dict[str, Any]
) -> tuple[dict[str, float], dict[str, Any], dict[str, Any] | None]:
    """The new version's calls since ``before``: (metrics, the next start, a comparison)."""
    from workers.pluginhost import callstats

    # This process's own counts first (the deploying worker may serve calls too).
    callstats.flush()
    since = dt.datetime.fromisoformat(before["since"])
    compare = row.strategy == "ab_test"
    taken = counters(row, cohort)
    metrics = cohort.measure(since, compare=compare)
    comparison = metrics.pop("comparison", None)
    return metrics, taken, comparison


def restore_now(row: Deployment, cohort: Cohort, measurement: dict[str, Any]) -> None:
    """Every moved tenant back, first thing after a failed measurement."""
    restored = cohort.restore()
    taken = dt.datetime.fromisoformat(measurement["at"])
    elapsed = (rows.now() - taken).total_seconds()
    rows.write(
        row.id,
        timeline={
            "event": "tenants_restored",
            "tenants": len(restored),
            "seconds_after_measurement": round(elapsed, 3),
        },
    )
    log.warning("plugin_tenants_restored", tenants=len(restored), seconds=round(elapsed, 3))


# -- the end ----------------------------------------------------------------------------------


def succeed(row: Deployment, cohort: Cohort) -> dict[str, Any]:
    """Every stage done: the targeted tenants run the new version."""
    with session_scope() as session:
        dep = session.get(Deployment, row.id, with_for_update=True)
        assert dep is not None
        if dep.status != DeploymentStatus.SUCCEEDED:
            dep.status = DeploymentStatus.SUCCEEDED
            dep.finished_at = rows.now()
            dep.reason = None
            dep.timeline = [*dep.timeline, {"at": rows.now().isoformat(), "event": "succeeded"}]
            session.add(
                AuditEvent(
                    tenant_id=None,
                    kind="deployment.succeeded",
                    data={"deployment_id": dep.id, "plugin": dep.plugin, "version": cohort.version},
                )
            )
    rows.event(row, "deployment.promoted", strategy=row.strategy, plugin=cohort.plugin)
    return {"deployment_id": row.id, "status": DeploymentStatus.SUCCEEDED}


def roll_back(row: Deployment, error: dict[str, Any] | None) -> dict[str, Any]:
    """Every moved tenant back on the version it came from; the deployment ends."""
    cohort = load(row)
    if row.status not in (DeploymentStatus.ROLLING_BACK, *DEPLOYMENT_FINAL):
        rows.write(row.id, status=DeploymentStatus.ROLLING_BACK)
    restored = cohort.restore()
    code = (error or {}).get("code")
    status = DeploymentStatus.ABORTED if code == rows.Aborted.code else DeploymentStatus.ROLLED_BACK
    with session_scope() as session:
        dep = session.get(Deployment, row.id, with_for_update=True)
        assert dep is not None
        if dep.status not in DEPLOYMENT_FINAL:
            dep.status = status
            dep.finished_at = rows.now()
            dep.reason = error
            dep.requests = {}
            dep.timeline = [
                *dep.timeline,
                {"at": rows.now().isoformat(), "event": status.value, "restored": restored},
            ]
            session.add(
                AuditEvent(
                    tenant_id=None,
                    kind=f"deployment.{status.value}",
                    data={"deployment_id": dep.id, "plugin": dep.plugin, "error": error},
                )
            )
    ended: EventType = (
        "deployment.aborted" if status == DeploymentStatus.ABORTED else "deployment.rolled_back"
    )
    rows.event(row, ended, reason=(error or {}).get("message"), plugin=cohort.plugin)
    return {"status": status, "restored": restored}
