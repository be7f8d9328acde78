"""The ledger's rules, on a real SQLite database (no broker: these are the SQL guards)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import select, update

from tasks import workflows as wf
from workers.engine import ledger, takeover
from workers.engine.steps import backoff
from workers.runtime.db import session_scope
from workers.runtime.migrate import upgrade
from workers.runtime.models import StepRun, WorkflowRun, utcnow

STEPS = wf.PROVISION.forward_tasks


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    return url


def new_run(db: str, grace: float = 60) -> str:
    with session_scope(db) as session:
        return ledger.new_run(
            session, kind=wf.PROVISION.kind, tenant_id="acme", input={"plan": "free"}, grace=grace
        ).id


#: The process that claims in these tests, unless one is named, and another one.
ME = "a" * 32
OTHER = "b" * 32


def claim(
    db: str,
    run_id: str,
    name: str,
    phase: str = "forward",
    task_id: str | None = None,
    owner: str = ME,
    timeout: float = 10,
    next_task_id: str | None = None,
) -> ledger.Claim:
    with session_scope(db) as session:
        return ledger.claim_step(
            session,
            run_id=run_id,
            phase=phase,
            name=name,
            task_id=task_id or uuid4().hex,
            lease=30,
            owner=takeover.Owner(boot_id=owner, timeout=timeout),
            next_task_id=next_task_id,
        )


def complete(
    db: str,
    run_id: str,
    name: str,
    phase: str = "forward",
    output: dict | None = None,
    attempt: int = 1,
    owner: str = ME,
) -> bool:
    with session_scope(db) as session:
        return ledger.complete_step(
            session,
            run_id=run_id,
            phase=phase,
            name=name,
            output=output or {"ok": name},
            grace=60,
            attempt=attempt,
            owner=owner,
        )


def fail(db: str, run_id: str, name: str, error: dict, phase: str = "forward") -> list[str] | None:
    with session_scope(db) as session:
        return ledger.fail_step(
            session,
            run_id=run_id,
            phase=phase,
            name=name,
            error=error,
            grace=60,
            attempt=1,
            owner=ME,
        )


def test_a_claimed_step_is_busy_for_a_second_delivery(db: str) -> None:
    run_id = new_run(db)
    # Given one delivery holds the first step
    first = claim(db, run_id, STEPS[0])
    assert first.outcome == "claimed" and first.context is not None
    assert first.context.attempt == 1 and first.context.input == {"plan": "free"}
    # When a second delivery arrives meanwhile
    # Then it steps aside
    assert claim(db, run_id, STEPS[0], owner=OTHER).outcome == "busy"


def test_completion_hands_the_next_step_over_without_a_lease(db: str) -> None:
    run_id = new_run(db)
    ctx = claim(db, run_id, STEPS[0]).context
    assert ctx is not None and ctx.next_step == STEPS[1]
    # When step 0 completes, naming the message that carries step 1
    with session_scope(db) as session:
        assert ledger.complete_step(
            session,
            run_id=run_id,
            phase="forward",
            name=STEPS[0],
            output={},
            grace=60,
            attempt=1,
            owner=ME,
            next_step=STEPS[1],
            next_task_id="next-message",
        )
    # Then step 1 records that message but holds no lease: nobody has started it
    with session_scope(db) as session:
        handed = session.scalars(select(StepRun).where(StepRun.name == STEPS[1])).one()
        assert (handed.status, handed.task_id, handed.lease_until) == (
            "pending",
            "next-message",
            None,
        )
    # A redelivery of step 0 carrying that same next message goes on (it may never have
    # been sent); one of another chain leaves it to that message
    assert claim(db, run_id, STEPS[0], next_task_id="next-message").successor_pending is True
    assert claim(db, run_id, STEPS[0], next_task_id="other-chain").successor_pending is False
    # The lease starts when a worker starts the step
    owned = claim(db, run_id, STEPS[1], task_id="next-message")
    assert owned.outcome == "claimed" and owned.context is not None
    assert owned.context.attempt == 1


def test_a_done_step_returns_its_stored_output(db: str) -> None:
    run_id = new_run(db)
    claim(db, run_id, STEPS[0])
    assert complete(db, run_id, STEPS[0], output={"subnet": "10.100.0.0/24"})
    # A redelivery finds it done, with its output, and the next step untouched
    again = claim(db, run_id, STEPS[0])
    assert again.outcome == "done" and again.output == {"subnet": "10.100.0.0/24"}
    assert again.successor_pending is True
    # Completing again is a no-op for the same attempt and refused for any other
    assert complete(db, run_id, STEPS[0]) is True
    assert complete(db, run_id, STEPS[0], attempt=2) is False
    # once the next step started, the chain is not continued
    claim(db, run_id, STEPS[1])
    assert claim(db, run_id, STEPS[0]).successor_pending is False
    # Later steps see earlier outputs
    with session_scope(db) as session:
        session.execute(update(StepRun).where(StepRun.name == STEPS[1]).values(status="pending"))
    ctx = claim(db, run_id, STEPS[1]).context
    assert ctx is not None and ctx.output_of(STEPS[0]) == {"subnet": "10.100.0.0/24"}


def test_the_last_step_finishes_the_run(db: str) -> None:
    run_id = new_run(db)
    for name in STEPS:
        assert claim(db, run_id, name).outcome == "claimed"
        assert complete(db, run_id, name)
    assert complete(db, run_id, STEPS[-1], owner=OTHER) is False
    with session_scope(db) as session:
        run = session.get(WorkflowRun, run_id)
        assert run is not None
        assert (run.status, run.current_step, run.deadline_at) == ("succeeded", None, None)
        assert run.finished_at is not None
    # A step of a finished run is reported done, never run again
    assert claim(db, run_id, STEPS[-1]).outcome == "done"


def test_failure_compensates_completed_steps_in_reverse(db: str) -> None:
    run_id = new_run(db)
    for name in STEPS[:4]:
        claim(db, run_id, name)
        complete(db, run_id, name)
    claim(db, run_id, STEPS[4])
    # When the health check fails for good
    tasks = fail(db, run_id, STEPS[4], {"code": "permanent", "message": "boom"})
    assert tasks is not None
    # Then the completed steps with compensations are undone newest first, then on_failure
    assert tasks == [
        "cul8er.tenants.drop_datastore",
        "cul8er.tenants.destroy_instances",
        "cul8er.tenants.release_network",
        "cul8er.tenants.mark_failed",
    ]
    # and a late forward delivery finds the run inactive
    assert claim(db, run_id, STEPS[5]).outcome == "inactive"
    for name in tasks:
        ctx = claim(db, run_id, name, phase="compensate").context
        assert ctx is not None and ctx.error == {
            "step": STEPS[4],
            "code": "permanent",
            "message": "boom",
        }
        complete(db, run_id, name, phase="compensate")
    with session_scope(db) as session:
        assert session.get(WorkflowRun, run_id).status == "failed"  # type: ignore[union-attr]


def test_a_failed_compensation_is_recorded_and_the_rest_go_on(db: str) -> None:
    run_id = new_run(db)
    claim(db, run_id, STEPS[0])
    complete(db, run_id, STEPS[0])
    claim(db, run_id, STEPS[1])
    tasks = fail(db, run_id, STEPS[1], {"code": "permanent", "message": "no"})
    assert tasks == ["cul8er.tenants.release_network", "cul8er.tenants.mark_failed"]
    claim(db, run_id, tasks[0], phase="compensate")
    fail(db, run_id, tasks[0], {"code": "transient", "message": "db gone"}, phase="compensate")
    assert claim(db, run_id, tasks[1], phase="compensate").outcome == "claimed"
    complete(db, run_id, tasks[1], phase="compensate")
    with session_scope(db) as session:
        run = session.get(WorkflowRun, run_id)
        assert run is not None and run.status == "failed"
        assert run.error["compensation_errors"][0]["step"] == tasks[0]  # type: ignore[index]


def test_a_ledger_wait_is_dispatched_once_when_due(db: str) -> None:
    run_id = new_run(db)
    claim(db, run_id, STEPS[0])
    with session_scope(db) as session:
        ledger.wait_step(
            session,
            run_id=run_id,
            phase="forward",
            name=STEPS[0],
            delay=60,
            error=None,
            in_ledger=True,
            attempt=1,
            owner=ME,
            slack=10,
        )
    # Not due yet: nothing to dispatch, and an early delivery cannot take it
    with session_scope(db) as session:
        assert ledger.due_waits(session) == []
    assert claim(db, run_id, STEPS[0]).outcome == "busy"
    # When it is due, one tick takes it and a second tick finds nothing
    with session_scope(db) as session:
        session.execute(
            update(StepRun)
            .where(StepRun.name == STEPS[0])
            .values(due_at=utcnow() - dt.timedelta(seconds=1))
        )
    with session_scope(db) as session:
        assert ledger.due_waits(session) == [(run_id, "forward", STEPS)]
    with session_scope(db) as session:
        assert ledger.due_waits(session) == []
    assert claim(db, run_id, STEPS[0]).context.attempt == 2  # type: ignore[union-attr]


def test_stalled_runs_are_taken_once_and_held_steps_are_left_alone(db: str) -> None:
    stalled = new_run(db, grace=-1)  # its first message was lost
    held = new_run(db, grace=-1)
    claim(db, held, STEPS[0])  # a live delivery holds it
    with session_scope(db) as session:
        taken = ledger.stalled_runs(session, grace=60)
    assert taken == [(stalled, "forward", STEPS)]
    with session_scope(db) as session:
        assert ledger.stalled_runs(session, grace=60) == []


@pytest.mark.parametrize("attempt", [1, 2, 5, 20])
def test_backoff_grows_with_jitter_and_a_cap(attempt: int) -> None:
    full = min(300.0, 1.0 * 2 ** (attempt - 1))
    delays = {backoff(attempt, base=1.0, cap=300.0) for _ in range(50)}
    assert all(full / 2 <= d <= full for d in delays)
    assert len(delays) > 1


def test_a_run_that_never_started_is_offered_again_and_a_started_one_is_not(db: str) -> None:
    # Given a run committed by a public call that died before sending it
    run_id = new_run(db)
    with session_scope(db) as session:
        assert ledger.unstarted(session, run_id) == [(run_id, "forward", STEPS)]
        assert ledger.unstarted(session, None) == []
    # When its first step has been claimed once, a redelivered call sends nothing more
    claim(db, run_id, STEPS[0])
    with session_scope(db) as session:
        assert ledger.unstarted(session, run_id) == []


def test_an_untouched_step_idle_past_the_idle_grace_is_taken_before_its_deadline(db: str) -> None:
    # Given a run whose first message was lost 40 s ago, its deadline still far off
    lost = new_run(db, grace=600)
    held = new_run(db, grace=600)
    claim(db, held, STEPS[0])  # a delivery holds this one: never "lost"
    with session_scope(db) as session:
        session.execute(update(WorkflowRun).values(updated_at=utcnow() - dt.timedelta(seconds=40)))
    # When the queue is busy (no idle grace), nothing is taken before the deadline
    with session_scope(db) as session:
        assert ledger.stalled_runs(session, grace=600) == []
    # When the queue is empty, the untouched run is taken once, the held one never
    with session_scope(db) as session:
        assert ledger.stalled_runs(session, grace=600, idle_grace=30) == [(lost, "forward", STEPS)]
    with session_scope(db) as session:
        assert ledger.stalled_runs(session, grace=600, idle_grace=30) == []
