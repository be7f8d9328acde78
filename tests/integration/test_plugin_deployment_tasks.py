"""The tasks of plugin deployments delivered twice at once, and refusing bad input.

``cul8er.deployments.create`` for a plugin, the sandbox stage's ``cul8er.plugins.sandbox_check``
and the ``cul8er.deployments.advance`` step are each delivered twice at the same moment (as a
redelivery, a retrying client or a second beat would): one deployment, one run, one answer,
each cohort of tenants moved once. Bad input to a plugin deployment is answered with the
field at fault, never retried, and writes nothing.

The stack is ``fleet`` of ``test_plugin_deployments`` (20 production tenants, one approval,
gateway 1.0.0 serving), built again for this module.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from schemas.states import DEPLOYMENT_OPEN
from tests.integration import test_plugin_deployments
from tests.integration.test_plugin_deployments import (
    PLUGIN,
    approve,
    deployment,
    install_beside,
    pins,
    reset,
    tenants,
    wait_status,
)
from tests.stack import Stack
from workers.runtime.models import (
    Approval,
    AuditEvent,
    Deployment,
    Operation,
    Plugin,
    StepRun,
    TenantPlugin,
    WorkflowRun,
)
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

#: The fixture of test_plugin_deployments, set up anew for this module.
fleet = test_plugin_deployments.fleet

CREATE = "cul8er.deployments.create"
ADVANCE = "cul8er.deployments.advance"
SANDBOX_CHECK = "cul8er.plugins.sandbox_check"
#: Each weight held 3 s: longer than a step sleeps inline, so the step parks between cohorts.
PARKING_CANARY: dict[str, Any] = {"interval_seconds": 3, "analysis": None}


# -- helpers ----------------------------------------------------------------------------------


def _create_kwargs(**changes: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "plugin": PLUGIN,
        "version": "1.1.0",
        "strategy": "canary",
        "strategy_config": {"interval_seconds": 1, "analysis": None},
        "actor": "ops",
    }
    kwargs.update(changes)
    return {k: v for k, v in kwargs.items() if v is not None}


def _at_once(stack: Stack, task: str, kwargs: dict[str, Any], copies: int = 2, **options: Any):  # noqa: ANN202
    """Send ``copies`` messages of ``task`` back to back; their AsyncResults."""
    return [stack.client.send_task(task, kwargs=kwargs, **options) for _ in range(copies)]


def _runs_of(stack: Stack, deployment_id: str) -> list[str]:
    with stack.session() as session:
        rows = session.execute(
            select(WorkflowRun.id, WorkflowRun.input).where(WorkflowRun.kind == "deployment")
        ).all()
    return [r.id for r in rows if (r.input or {}).get("deployment_id") == deployment_id]


def _plugin_deployments(stack: Stack) -> list[Deployment]:
    with stack.session() as session:
        found = list(
            session.scalars(
                select(Deployment)
                .where(Deployment.plugin == PLUGIN)
                .order_by(Deployment.created_at)
            )
        )
        for row in found:
            session.expunge(row)
    return found


def _end(stack: Stack, deployment_id: str) -> None:
    """Reject a deployment waiting for approval and wait for its run to end."""
    wait_status(stack, deployment_id, "awaiting_approval", timeout=60)
    answer = stack.call(
        "cul8er.deployments.reject", deployment_id=deployment_id, actor="cto", reason="test"
    )
    assert answer["ok"], answer
    run_id = deployment(stack, deployment_id).workflow_id
    assert run_id is not None
    assert stack.wait_run(run_id, timeout=60)["status"] in ("succeeded", "failed")


def _snapshot(stack: Stack) -> dict[str, Any]:
    """What a plugin deployment task could write (beat's own rows left out)."""
    with stack.session() as session:
        return {
            "deployments": sorted(
                (d.id, d.status, d.stage_index) for d in session.scalars(select(Deployment))
            ),
            "runs": sorted(
                (r.id, r.status)
                for r in session.scalars(select(WorkflowRun))
                if r.kind == "deployment"
            ),
            "steps": sorted(
                (s.run_id, s.name, s.status, s.attempts) for s in session.scalars(select(StepRun))
            ),
            "tenant_plugins": sorted(
                (t.tenant_id, t.plugin, t.version, t.deployment_id)
                for t in session.scalars(select(TenantPlugin))
            ),
            "plugins": sorted(
                (
                    p.name,
                    p.version,
                    p.state,
                    p.generation,
                    p.checksum,
                    p.error,
                    json.dumps(p.config),
                )
                for p in session.scalars(select(Plugin))
            ),
            "approvals": sorted(a.id for a in session.scalars(select(Approval))),
            "audit": sorted(
                (a.id, a.kind)
                for a in session.scalars(select(AuditEvent))
                if a.kind.startswith(("deployment.", "plugin"))
            ),
            "operations": sorted(
                o.key
                for o in session.scalars(select(Operation))
                if o.key.startswith(("cul8er.deployments.", "cul8er.plugins."))
            ),
        }


def _files(folder: Path) -> list[tuple[str, int, int]]:
    """Every file under ``folder`` (bytecode caches aside), with its size and mtime."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def _task_log(stack: Stack, task_id: str) -> dict[str, Any]:
    """From the workers' logs: who received ``task_id``, how often, and when it ran."""
    seen: dict[str, Any] = {"received": [], "finished": [], "retried": 0}
    for path in sorted(stack.data_dir.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if task_id not in line or not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                text = str(entry.get("event", ""))
                if f"[{task_id}] received" in text:
                    seen["received"].append((entry.get("timestamp"), path.stem))
                elif f"[{task_id}] succeeded" in text or f"[{task_id}] failed" in text:
                    seen["finished"].append((entry.get("timestamp"), path.stem))
                elif f"[{task_id}] retry" in text:
                    seen["retried"] += 1
    return seen


def _assert_overlapped(stack: Stack, sent: list[Any]) -> None:
    """Each copy was received and finished once, and all were received before any finished."""
    wait_until(
        lambda: all(_task_log(stack, r.id)["finished"] for r in sent), timeout=10, interval=0.1
    )
    logs = [_task_log(stack, r.id) for r in sent]
    for seen in logs:
        assert len(seen["received"]) == 1 and len(seen["finished"]) == 1, seen
    received = max(seen["received"][0][0] for seen in logs)
    assert received < min(seen["finished"][0][0] for seen in logs), logs


# -- create, twice ----------------------------------------------------------------------------


def test_create_twice_with_one_key_makes_one_deployment_and_without_a_key_refuses_the_second(
    fleet: Stack,
) -> None:
    install_beside(fleet, "1.1.0")
    before = {d.id for d in _plugin_deployments(fleet)}
    # Given two creates with the same idempotency key, delivered at the same moment
    key = f"roll-{uuid.uuid4().hex[:8]}"
    sent = _at_once(fleet, CREATE, _create_kwargs(idempotency_key=key))
    answers = [r.get(timeout=60) for r in sent]
    _assert_overlapped(fleet, sent)
    # Then both answer the same deployment, and there is one deployment row and one run
    assert answers[0]["ok"], answers
    assert answers[0] == answers[1], answers
    deployment_id = answers[0]["deployment_id"]
    made = [d for d in _plugin_deployments(fleet) if d.id not in before]
    assert [d.id for d in made] == [deployment_id]
    assert _runs_of(fleet, deployment_id) == [answers[0]["workflow_id"]]
    with fleet.session() as session:
        assert session.get(Operation, f"{CREATE}:{key}") is not None
    _end(fleet, deployment_id)

    # Given two creates for the same plugin without a key, at the same moment
    before = {d.id for d in _plugin_deployments(fleet)}
    sent = _at_once(fleet, CREATE, _create_kwargs())
    answers = [r.get(timeout=60) for r in sent]
    _assert_overlapped(fleet, sent)
    # Then one is accepted and the other refused, naming the deployment in progress
    accepted = [a for a in answers if a["ok"]]
    refused = [a for a in answers if not a["ok"]]
    assert len(accepted) == 1 and len(refused) == 1, answers
    winner = accepted[0]["deployment_id"]
    assert refused[0]["error"]["code"] == "conflict", refused
    assert winner in refused[0]["error"]["message"], refused
    made = [d for d in _plugin_deployments(fleet) if d.id not in before]
    assert [d.id for d in made] == [winner]
    assert len(_runs_of(fleet, winner)) == 1
    _end(fleet, winner)
    assert [d for d in _plugin_deployments(fleet) if d.status in DEPLOYMENT_OPEN] == []
    assert pins(fleet) == {}


# -- the sandbox check, twice -----------------------------------------------------------------


def test_sandbox_check_twice_at_once_answers_the_same_and_writes_nothing(fleet: Stack) -> None:
    install_beside(fleet, "1.1.0")
    # A second sandbox worker, so two copies on the sandbox queue run side by side
    fleet.start_worker("sandbox-b", queues="plugins.sandbox", concurrency=1)
    folder = Path(fleet.extra_env["CUL8ER_PLUGIN_PATH"])
    kwargs = {"name": PLUGIN, "version": "1.1.0"}
    # Warm up: each worker has imported the version once (bytecode caches aside)
    fleet.client.send_task(SANDBOX_CHECK, kwargs=kwargs, queue="plugins.sandbox").get(timeout=60)
    before, files = _snapshot(fleet), _files(folder)

    # When the check is delivered twice at once on the sandbox queue, and twice on a
    # general worker with four processes
    sent = _at_once(fleet, SANDBOX_CHECK, kwargs, queue="plugins.sandbox")
    sent += _at_once(fleet, SANDBOX_CHECK, kwargs)
    answers = [r.get(timeout=120) for r in sent]

    # Then every copy answers the same, and passes
    assert answers[0]["ok"] is True, answers[0]
    assert all(a == answers[0] for a in answers), answers
    assert "self_test" in answers[0]["checks"]
    # And nothing was written: no row and no file of the plugin changed
    assert _snapshot(fleet) == before
    assert _files(folder) == files
    # And the copies on the general worker ran at the same time
    _assert_overlapped(fleet, sent[2:])
    print(f"\nsandbox copies ran on {[_task_log(fleet, r.id)['received'] for r in sent]}")


# -- the advance step, twice ------------------------------------------------------------------


def test_advance_delivered_twice_at_once_moves_each_cohort_once(fleet: Stack) -> None:
    install_beside(fleet, "1.1.0")
    everyone = tenants(fleet)
    # Given a canary in production, waiting for approval, whose step parks between cohorts
    created = fleet.call(CREATE, **_create_kwargs(strategy_config=PARKING_CANARY))
    assert created["ok"], created
    deployment_id, run_id = created["deployment_id"], created["workflow_id"]
    wait_status(fleet, deployment_id, "awaiting_approval", timeout=60)
    step_kwargs = {"run_id": run_id, "phase": "forward"}

    # When the advance step is delivered twice at once while it waits for approval,
    _at_once(fleet, ADVANCE, step_kwargs)
    time.sleep(1)
    # then approved (which wakes it) and delivered twice more at that moment,
    approve(fleet, deployment_id)
    _at_once(fleet, ADVANCE, step_kwargs)
    # and delivered twice at once each time it parks between cohorts
    rounds, last_due = 2, None
    deadline = time.monotonic() + 150
    while deployment(fleet, deployment_id).status not in ("succeeded", "rolled_back", "failed"):
        assert time.monotonic() < deadline, deployment(fleet, deployment_id).timeline[-3:]
        step = fleet.step_row(run_id, ADVANCE)
        if step.status == "waiting" and step.due_at != last_due:
            last_due = step.due_at
            _at_once(fleet, ADVANCE, step_kwargs)
            rounds += 1
        time.sleep(0.05)
    time.sleep(1)  # the last copies have been turned away by now
    done = deployment(fleet, deployment_id)

    # Then it succeeded, each cohort moved once, each stage done once and in order
    assert done.status == "succeeded", done.reason
    cohorts = [e for e in done.timeline if e.get("action") == "set_weight"]
    assert [e["tenants"] for e in cohorts] == [2, 6, 10, 14, 18, 20], done.timeline
    stages_done = [e["stage"] for e in done.timeline if e["event"] == "stage_done"]
    assert stages_done == [s["name"] for s in done.stages], done.timeline
    # And no tenant appears twice in the deployment's plugin.tenants_moved audit rows
    with fleet.session() as session:
        audit = [
            (a.kind, a.data)
            for a in session.scalars(
                select(AuditEvent)
                .where(AuditEvent.kind.in_(("plugin.tenants_moved", "plugin.tenants_restored")))
                .order_by(AuditEvent.id)
            )
            if a.data.get("deployment_id") == deployment_id
        ]
    assert [kind for kind, _ in audit] == ["plugin.tenants_moved"] * len(audit), audit
    moved = [t for _, data in audit for t in data["tenants"]]
    assert len(moved) == len(set(moved)) == 20, moved
    assert moved == list(done.targets)
    assert pins(fleet) == {t: "1.1.0" for t in everyone}
    print(
        f"\nadvance delivered twice at once {rounds} times; step attempts "
        f"{fleet.step_row(run_id, ADVANCE).attempts}"
    )
    reset(fleet)


# -- bad input --------------------------------------------------------------------------------

BAD_INPUT = [
    # (kwargs changes, the field the error must name)
    ({"plugin": "nosuch"}, "plugin"),
    ({"version": "9.9.9"}, "version"),
    ({"tenant_id": "shop-01"}, "tenant_id"),
    ({"tenants": ["shop-01", "nobody"]}, "tenants"),
    ({"version": "1.0"}, "version"),
    ({"strategy_config": {"initial_weight": 0}}, "strategy_config.initial_weight"),
]


@pytest.mark.parametrize(
    ("changes", "field"), BAD_INPUT, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_INPUT)]
)
def test_bad_input_to_a_plugin_deployment_is_refused_naming_the_field(
    fleet: Stack, changes: dict[str, Any], field: str
) -> None:
    install_beside(fleet, "1.1.0")
    before = _snapshot(fleet)
    # When a plugin deployment is asked for with one bad argument
    sent = fleet.client.send_task(CREATE, kwargs=_create_kwargs(**changes))
    result = sent.get(timeout=60)
    # Then the answer is a validation error naming the field
    assert result["ok"] is False, result
    assert result["error"]["code"] == "validation_error", result
    named = {e["field"] for e in result["error"]["errors"]}
    assert field in named, result["error"]
    # And the task ran once, successfully delivering the error, and was never retried
    assert sent.state == "SUCCESS"
    assert sent.retries in (0, None)
    wait_until(lambda: _task_log(fleet, sent.id)["finished"], timeout=10, interval=0.1)
    seen = _task_log(fleet, sent.id)
    assert len(seen["received"]) == 1 and len(seen["finished"]) == 1, seen
    assert seen["retried"] == 0
    # And nothing was written
    assert _snapshot(fleet) == before
