"""Owners, heartbeats and takeovers, on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from uuid import uuid4

import pytest
import structlog
from sqlalchemy import select, update

from tasks import workflows as wf
from workers.engine import ledger, takeover
from workers.runtime import liveness
from workers.runtime.db import session_scope
from workers.runtime.models import StepRun, WorkerProcess, WorkflowRun, utcnow
from workers.runtime.settings import Settings

STEPS = wf.PROVISION.forward_tasks


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, process_settings: Callable[..., Settings]) -> str:
    return process_settings(database=request.param).sqlalchemy_url


def new_run(db: str) -> str:
    with session_scope(db) as session:
        return ledger.new_run(
            session, kind=wf.PROVISION.kind, tenant_id="acme", input={}, grace=60
        ).id


def claim(db: str, run_id: str, name: str, owner: str, **kwargs: object) -> ledger.Claim:
    with session_scope(db) as session:
        return ledger.claim_step(
            session,
            run_id=run_id,
            phase="forward",
            name=name,
            task_id=uuid4().hex,
            lease=float(kwargs.pop("lease", 300)),  # type: ignore[arg-type]
            owner=takeover.Owner(boot_id=owner, timeout=10, **kwargs),  # type: ignore[arg-type]
        )


def step_row(db: str, run_id: str, name: str) -> StepRun:
    with session_scope(db) as session:
        return session.scalars(
            select(StepRun).where(StepRun.run_id == run_id, StepRun.name == name)
        ).one()


def age(db: str, run_id: str, name: str, seconds: float) -> None:
    """Make the step's last renewal ``seconds`` old, as a dead owner leaves it."""
    with session_scope(db) as session:
        session.execute(
            update(StepRun)
            .where(StepRun.run_id == run_id, StepRun.name == name)
            .values(heartbeat_at=utcnow() - dt.timedelta(seconds=seconds))
        )


def beating(db: str, node: str = "w1@host") -> liveness.Heartbeat:
    beat = liveness.Heartbeat(database_url=db, interval=0.1, node=node)
    beat.beat()
    return beat


def test_a_renewed_step_is_never_taken_and_a_silent_one_is(db: str) -> None:
    # Given a step claimed by a live process that renews it
    run_id = new_run(db)
    owner = beating(db)
    first = claim(db, run_id, STEPS[0], owner.boot_id)
    assert first.outcome == "claimed" and first.step_id is not None
    with owner.holding(first.step_id, "test"):
        # When its owner renews it for longer than the owner timeout would allow unrenewed
        for _ in range(3):
            age(db, run_id, STEPS[0], 9)
            assert owner.beat() == 1
            # Then another delivery steps aside every time
            assert claim(db, run_id, STEPS[0], "b" * 32).outcome == "busy"
    # When the owner stops renewing (dead, frozen or done without recording)
    age(db, run_id, STEPS[0], 11)
    taken = claim(db, run_id, STEPS[0], "b" * 32)
    # Then the step is taken over, and the history says whose it was and for how long silent
    assert taken.outcome == "claimed" and taken.takeover is not None
    assert taken.context is not None and taken.context.attempt == 2
    row = step_row(db, run_id, STEPS[0])
    assert row.owner_id == "b" * 32 and row.attempts == 2
    (record,) = row.history or []
    assert record["reason"] == "owner_silent" and record["by"] == "delivery"
    assert record["previous_owner"] == {
        "boot_id": owner.boot_id,
        "node": "w1@host",
        "pid": owner.pid,
    }
    assert 10 < record["silent_for"] < 20


def test_a_late_completion_is_refused_and_changes_nothing(db: str) -> None:
    run_id = new_run(db)
    claim(db, run_id, STEPS[0], "a" * 32)
    age(db, run_id, STEPS[0], 30)
    claim(db, run_id, STEPS[0], "b" * 32)
    # When the frozen first owner wakes and records its outcome
    with session_scope(db) as session:
        late = ledger.complete_step(
            session,
            run_id=run_id,
            phase="forward",
            name=STEPS[0],
            output={"from": "late"},
            grace=60,
            attempt=1,
            owner="a" * 32,
        )
        refused_fail = ledger.fail_step(
            session,
            run_id=run_id,
            phase="forward",
            name=STEPS[0],
            error={"code": "x", "message": "late"},
            grace=60,
            attempt=1,
            owner="a" * 32,
        )
        ledger.refuse_late(
            session, run_id=run_id, phase="forward", name=STEPS[0], attempt=1, owner="a" * 32
        )
    # Then both are refused, the new owner still holds the step, and the refusal is noted
    assert late is False and refused_fail is None
    row = step_row(db, run_id, STEPS[0])
    assert (row.status, row.owner_id, row.output) == ("running", "b" * 32, None)
    assert [h["event"] for h in row.history or []] == ["takeover", "late_completion_refused"]
    # and the new owner's completion is the one recorded
    with session_scope(db) as session:
        assert ledger.complete_step(
            session,
            run_id=run_id,
            phase="forward",
            name=STEPS[0],
            output={"from": "heir"},
            grace=60,
            attempt=2,
            owner="b" * 32,
        )
    assert step_row(db, run_id, STEPS[0]).output == {"from": "heir"}


def test_the_lease_still_bounds_a_hung_but_renewed_step(db: str) -> None:
    run_id = new_run(db)
    claim(db, run_id, STEPS[0], "a" * 32, lease=-1)  # a lease already run out
    taken = claim(db, run_id, STEPS[0], "b" * 32)
    assert taken.takeover is not None and taken.takeover["reason"] == "lease_expired"


def test_a_process_takes_back_its_own_abandoned_step_at_once(db: str) -> None:
    # Given a step this process claimed, whose outcome it could not record (database gone)
    run_id = new_run(db)
    first = claim(db, run_id, STEPS[0], "a" * 32)
    assert first.step_id is not None
    # When the same process gets the message again while running it: it is busy
    holding = frozenset({first.step_id})
    assert claim(db, run_id, STEPS[0], "a" * 32, holding=holding).outcome == "busy"
    # When it is not running it any more, it takes it back without waiting
    again = claim(db, run_id, STEPS[0], "a" * 32)
    assert again.takeover is not None and again.takeover["reason"] == "abandoned"


def test_two_deliveries_taking_over_at_once_one_wins(db: str) -> None:
    run_id = new_run(db)
    claim(db, run_id, STEPS[0], "a" * 32)
    age(db, run_id, STEPS[0], 60)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def deliver(owner: str) -> None:
        barrier.wait()
        outcomes.append(claim(db, run_id, STEPS[0], owner).outcome)

    threads = [threading.Thread(target=deliver, args=(c * 32,)) for c in "bcde"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["busy", "busy", "busy", "claimed"]
    row = step_row(db, run_id, STEPS[0])
    assert row.attempts == 2 and len(row.history or []) == 1


def test_reconcile_frees_a_dead_owners_step_once_and_leaves_live_ones(db: str) -> None:
    dead_run, live_run = new_run(db), new_run(db)
    dead, live = beating(db, "dead@host"), beating(db, "live@host")
    claim(db, dead_run, STEPS[0], dead.boot_id)
    live_claim = claim(db, live_run, STEPS[0], live.boot_id)
    assert live_claim.step_id is not None
    # Given the dead process stopped beating 12 s ago and the live one beats on
    age(db, dead_run, STEPS[0], 12)
    with session_scope(db) as session:
        session.execute(
            update(WorkerProcess)
            .where(WorkerProcess.boot_id == dead.boot_id)
            .values(beat_at=utcnow() - dt.timedelta(seconds=12))
        )
    # When reconcile looks (the run's deadline is far off: no grace is waited out)
    with session_scope(db) as session:
        lost = takeover.lost_workers(session, owner_timeout=10)
        freed = takeover.abandoned_steps(session, owner_timeout=10, grace=60)
    # Then the dead process is reported once, with what it held
    assert [(w["node"], w["held"]) for w in lost] == [
        ("dead@host", [{"workflow_id": dead_run, "step": STEPS[0]}])
    ]
    # and its step is put back, handed to a fresh message, the takeover noted
    assert [(f.run_id, f.step) for f in freed] == [(dead_run, STEPS[0])]
    with session_scope(db) as session:
        assert ledger.pending_tasks(session, dead_run, "forward") == STEPS
    row = step_row(db, dead_run, STEPS[0])
    assert (row.status, row.owner_id, row.task_id) == ("pending", None, freed[0].task_id)
    assert row.history is not None and row.history[0]["by"] == "reconcile"
    assert row.history[0]["previous_owner"]["node"] == "dead@host"
    # A second reconcile finds nothing more, and the live step was never touched
    with session_scope(db) as session:
        assert takeover.lost_workers(session, owner_timeout=10) == []
        assert takeover.abandoned_steps(session, owner_timeout=10, grace=60) == []
    assert step_row(db, live_run, STEPS[0]).owner_id == live.boot_id
    with session_scope(db) as session:
        run = session.get(WorkflowRun, dead_run)
        assert run is not None and run.status == "running"


def test_an_overdue_countdown_is_freed(db: str) -> None:
    run_id = new_run(db)
    first = claim(db, run_id, STEPS[0], "a" * 32)
    assert first.context is not None
    with session_scope(db) as session:
        assert ledger.wait_step(
            session,
            run_id=run_id,
            phase="forward",
            name=STEPS[0],
            delay=0,
            error=None,
            in_ledger=False,
            attempt=1,
            owner="a" * 32,
            slack=-1,  # its countdown message should have claimed it by now
        )
    with session_scope(db) as session:
        freed = takeover.abandoned_steps(session, owner_timeout=10, grace=60)
    assert [f.takeover["reason"] for f in freed] == ["countdown_lost"]


def test_the_heartbeat_thread_renews_while_the_process_lives_and_stops_when_told(db: str) -> None:
    run_id = new_run(db)
    beat = liveness.Heartbeat(database_url=db, interval=0.1, node="t@host").start()
    try:
        first = claim(db, run_id, STEPS[0], beat.boot_id)
        assert first.step_id is not None
        with beat.holding(first.step_id, "test"):
            age(db, run_id, STEPS[0], 60)
            time.sleep(0.5)
            renewed = step_row(db, run_id, STEPS[0]).heartbeat_at
            assert renewed is not None and (utcnow() - renewed).total_seconds() < 1
        # Released: once a beat already under way has ended, the thread renews the
        # process, not the step
        time.sleep(0.3)
        age(db, run_id, STEPS[0], 60)
        time.sleep(0.5)
        stale = step_row(db, run_id, STEPS[0]).heartbeat_at
        assert stale is not None and (utcnow() - stale).total_seconds() > 50
    finally:
        beat.stop()
    with session_scope(db) as session:
        row = session.get(WorkerProcess, beat.boot_id)
        assert row is not None and row.stopped_at is not None and row.node == "t@host"


def test_a_beat_warns_of_a_held_step_taken_over_and_not_of_one_that_finished(db: str) -> None:
    run_id = new_run(db)
    beat = liveness.Heartbeat(database_url=db, interval=60, node="t@host")
    mine = claim(db, run_id, STEPS[0], beat.boot_id)
    assert mine.step_id is not None
    with beat.holding(mine.step_id, "test"), structlog.testing.capture_logs() as lines:
        # Given a held step this process still owns: renewed, nothing to tell
        assert beat.beat() == 1
        assert not [line for line in lines if line["event"] == "step_ownership_lost"]
        # When another process takes it over while this one still runs it
        with session_scope(db) as session:
            session.execute(
                update(StepRun).where(StepRun.id == mine.step_id).values(owner_id="heir")
            )
        # Then the next beat renews nothing and says the step was lost
        assert beat.beat() == 0
        (lost,) = [line for line in lines if line["event"] == "step_ownership_lost"]
        assert lost["held"] == 1
    # And once the step is released, a beat renews the process alone and says nothing
    with structlog.testing.capture_logs() as lines:
        assert beat.beat() == 0
    assert lines == []


def test_settings_refuse_an_owner_timeout_a_missed_beat_would_trip() -> None:
    with pytest.raises(ValueError, match="owner_timeout"):
        Settings(owner_timeout=3, heartbeat_interval=2)
    with pytest.raises(ValueError, match="broker_visibility_timeout"):
        Settings(broker_visibility_timeout=4, max_broker_countdown=5)


def test_an_owner_that_exited_on_this_host_is_taken_over_at_once(db: str) -> None:
    # Given a step owned by a process of this host that has exited (a killed pool child)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with session_scope(db) as session:
        session.add(
            WorkerProcess(
                boot_id="c" * 32,
                node="w1@host",
                host="host",
                pid=gone.pid,
                namespace=liveness.namespace(),
                started_at=utcnow() - dt.timedelta(seconds=5),
                beat_at=utcnow(),
            )
        )
    run_id = new_run(db)
    claim(db, run_id, STEPS[0], "c" * 32)
    # When its message is redelivered at once, its heartbeat still fresh
    here = liveness.namespace()
    elsewhere = claim(db, run_id, STEPS[0], "d" * 32, namespace="other-host/x/1")
    taken = claim(db, run_id, STEPS[0], "d" * 32, namespace=here)
    # Then a claimer on another host must wait for the owner timeout, one on this host need not
    assert elsewhere.outcome == "busy"
    assert taken.takeover is not None and taken.takeover["reason"] == "owner_exited"
    # and an owner that is this very (live) process is never "exited"
    assert liveness.exited(os.getpid(), utcnow()) is False
