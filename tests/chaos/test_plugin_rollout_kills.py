"""Chaos: the worker carrying a canary plugin deployment is SIGKILLed between two cohorts.

Twenty tenants call the ``gateway`` plugin without pause (``PluginLoad``) while a canary
moves them to 1.1.0 in hash-ordered cohorts (2 → 6 → 10 → 14 → 18 → 20). Once the cohort of
6 has moved, the whole worker running ``cul8er.deployments.advance`` is SIGKILLed and a new
one is started. The deployment must resume at the next cohort (10, 14, 18, 20: none skipped,
none repeated), move no tenant twice or back, and succeed with every tenant on 1.1.0. The
calls the load makes meanwhile fail, if at all, only as messages the killed worker held; a
call never answers with a version its tenant was not on.

A second worker serves plugin calls only (the ``celery`` queue), so the load goes on through
the kill and the step can only be resumed by the worker started after it.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.conftest import build_stack, teardown_stack
from tests.integration.test_plugin_deployments import (
    Answer,
    PluginLoad,
    create,
    deployment,
    install_beside,
    pins,
    tenants,
    wait_status,
)
from tests.stack import Stack
from workers.runtime.models import AuditEvent, StepRun, Tenant
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

ADVANCE = "cul8er.deployments.advance"
#: Each weight held 2 s (slept in the step) and gated on 1.5 s of calls: ~3.5 s per cohort.
SLOW_CANARY: dict[str, Any] = {
    "interval_seconds": 2,
    "analysis": {"interval_seconds": 1.5, "count": 1, "probes": 0},
}
#: How long after a move's audit row a call that starts may still run the old version: the
#: commit follows the row by milliseconds; a worker sees a plugin's first pinned tenant
#: within CUL8ER_PLUGIN_STATE_TTL (0.5 s here).
MOVE_GRACE = 1.5


@pytest.fixture
def rollout(tmp_path: Path) -> Iterator[Stack]:
    """20 active development tenants on gateway 1.0.0; a sandbox worker, a calls-only
    worker and beat (the test starts the worker that runs steps, then installs 1.1.0)."""
    stack = build_stack("redis-postgres", tmp_path / "stack")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    stack.extra_env.update(
        CUL8ER_PLUGIN_PATH=str(plugins),
        CUL8ER_PLUGIN_STATE_TTL="0.5",
        CUL8ER_PLUGIN_STATS_WINDOW="1",
        CUL8ER_STEP_TIME_LIMIT="60",
        CUL8ER_RECONCILE_INTERVAL="1",
        CUL8ER_OWNER_TIMEOUT="6",
    )
    install_beside(stack, "1.0.0")
    for i in range(20):
        stack.add_tenant(f"shop-{i:02d}", f"Shop {i}")
    with stack.session() as session:
        session.execute(update(Tenant).values(status="active", environment="development"))
    try:
        stack.start_worker("sandbox", queues="plugins.sandbox", concurrency=1)
        stack.start_worker("calls", queues="celery", concurrency=3)
        stack.start_beat()
        yield stack
    finally:
        teardown_stack(stack)


def _cohorts(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in timeline if e.get("action") == "set_weight"]


def _moves(stack: Stack, deployment_id: str) -> tuple[list[dict[str, Any]], list[AuditEvent]]:
    """The deployment's ``plugin.tenants_moved`` audit data in order, and any restores."""
    with stack.session() as session:
        found = list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.kind.in_(("plugin.tenants_moved", "plugin.tenants_restored")))
                .order_by(AuditEvent.id)
            )
        )
        for row in found:
            session.expunge(row)
    mine = [r for r in found if r.data.get("deployment_id") == deployment_id]
    moved = [
        {**r.data, "at": r.occurred_at.timestamp()}
        for r in mine
        if r.kind == "plugin.tenants_moved"
    ]
    return moved, [r for r in mine if r.kind == "plugin.tenants_restored"]


def _wrong_versions(
    answers: list[Answer], moved_at: dict[str, float], new: str, old: str
) -> list[tuple[Answer, str]]:
    """Answers whose version the tenant was not on while the call could have run."""
    wrong = []
    for a in answers:
        if not a.ok:
            continue
        at = moved_at.get(a.tenant_id)
        if a.version not in (old, new):
            wrong.append((a, "unknown version"))
        elif at is not None and a.done < at and a.version != old:
            wrong.append((a, "new version before the tenant moved"))
        elif at is not None and a.sent > at + MOVE_GRACE and a.version != new:
            wrong.append((a, "old version after the tenant moved"))
    return wrong


def test_a_worker_killed_between_cohorts_resumes_the_canary_at_the_next_cohort(
    rollout: Stack,
) -> None:
    first = rollout.start_worker("first", concurrency=3)
    install_beside(rollout, "1.1.0")  # beside 1.0.0, which serves
    everyone = tenants(rollout)
    with PluginLoad(rollout, everyone) as load:
        # Given a canary of 1.1.0 over 20 tenants under load
        created = create(rollout, "1.1.0", "canary", SLOW_CANARY)
        deployment_id, run_id = created["deployment_id"], created["workflow_id"]

        # When the cohort of 6 has moved, the worker running the advance step is SIGKILLed
        def six_moved() -> bool:
            return any(
                e["tenants"] == 6 for e in _cohorts(deployment(rollout, deployment_id).timeline)
            )

        wait_until(six_moved, timeout=90, interval=0.05, error=AssertionError)
        owner = rollout.wait_step_running(run_id, ADVANCE, timeout=10).owner_id
        worker, pid = rollout.worker_of(owner)
        assert worker is first, "the advance step runs on the only worker serving steps"
        # A call sent until the worker is dead may be one it took: the kill is a window
        kill_started = time.time()
        rollout.kill(worker)
        killed_at = time.time()
        # And a new worker is started
        rollout.start_worker("after", concurrency=3)
        restarted_at = time.time()
        done = wait_status(
            rollout, deployment_id, "succeeded", "rolled_back", "failed", timeout=180
        )
        finished_at = time.time()
        time.sleep(1.5)

    # Then it succeeded with every tenant on 1.1.0
    assert done.status == "succeeded", (done.reason, done.timeline[-5:])
    assert pins(rollout) == {t: "1.1.0" for t in everyone}

    # And the cohorts went 2 → 6, then, after the kill, 10 → 14 → 18 → 20: none skipped or
    # repeated, each stage done once and in order
    cohorts = _cohorts(done.timeline)
    assert [e["tenants"] for e in cohorts] == [2, 6, 10, 14, 18, 20], done.timeline
    after_kill = [
        e["tenants"] for e in cohorts if dt.datetime.fromisoformat(e["at"]).timestamp() > killed_at
    ]
    assert after_kill == [10, 14, 18, 20], done.timeline
    stages_done = [e["stage"] for e in done.timeline if e["event"] == "stage_done"]
    assert stages_done == [s["name"] for s in done.stages], done.timeline

    # And each tenant moved once, in hash order, and none was moved back
    moved, restored = _moves(rollout, deployment_id)
    assert restored == []
    order = [t for m in moved for t in m["tenants"]]
    assert order == list(done.targets), moved
    assert [t for e in cohorts for t in e["moved_now"]] == list(done.targets)

    # And the step was taken over by the new worker (the killed owner's pid is gone)
    step = rollout.step_row(run_id, ADVANCE)
    takeovers = [h for h in step.history or [] if h.get("event") == "takeover"]
    assert takeovers, step.history
    with rollout.session() as session:
        running = session.scalars(
            select(StepRun.owner_id).where(StepRun.run_id == run_id, StepRun.name == ADVANCE)
        ).one()
    assert running != owner

    # And no call answered with a version its tenant was not on
    moved_at = {t: m["at"] for m in moved for t in m["tenants"]}
    wrong = _wrong_versions(load.answers, moved_at, new="1.1.0", old="1.0.0")
    assert wrong == [], wrong[:5]

    # And the only failed or slow calls are those in flight at the kill: messages the killed
    # worker held, lost with it or handed back by the broker after its visibility timeout
    def held(a: Answer) -> bool:
        return a.sent <= killed_at and a.done >= kill_started

    in_flight = [a for a in load.answers if held(a)]
    failed = load.failed()
    slow = [a for a in load.answers if a.done - a.sent > 5]
    assert [a for a in failed if not held(a)] == [], failed[:5]
    assert [a for a in failed if "declined" in a.error] == []
    assert [a for a in slow if not held(a)] == [], slow[:5]
    # And calls kept being answered during the recovery (the calls-only worker served them)
    during = [a for a in load.answers if killed_at < a.sent and a.done < restarted_at + 1]
    answered_ok = [a for a in load.answers if a.ok]
    print(
        f"\nkilled pid {pid} (owner {owner}) at cohort 6; new worker up "
        f"{restarted_at - killed_at:.1f} s later; finished {finished_at - restarted_at:.1f} s "
        f"after it. calls: {len(load.answers)} ({len(answered_ok)} ok, {load.rate():.0f}/s), "
        f"{len(in_flight)} in flight at the kill, {len(slow)} slower than 5 s "
        f"(max {max((a.done - a.sent for a in load.answers), default=0):.1f} s), "
        f"{len(failed)} failed {[a.error[:80] for a in failed[:3]]}, "
        f"{len(during)} sent and answered while no worker served steps"
    )
    assert during, "no call was answered between the kill and the new worker"
