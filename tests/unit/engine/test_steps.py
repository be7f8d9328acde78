"""The step task's ``execute``: claim, run once, record, retry, compensate.

Steps of these tests' own are registered with ``step`` on the application and run as a
worker runs them: each message is taken off a private Redis queue and delivered through
Celery's worker request, so the chain, ``self.retry`` and the results are Celery's own.
On SQLite and PostgreSQL; the ledger's rows and the queues are read afterwards.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.unit.engine.harness import Broker, Sent
from workers.engine import ledger, takeover
from workers.engine.steps import Park, step
from workers.engine.workflow import Step, StepContext, Workflow, workflows
from workers.runtime import liveness
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import ConflictError, TransientError
from workers.runtime.models import StepRun, WorkflowRun, utcnow
from workers.runtime.settings import Settings
from workers.runtime.waiting import wait_until

RESERVE, CHARGE, NOTIFY = "test.steps.reserve", "test.steps.charge", "test.steps.notify"
RELEASE, MARK_FAILED = "test.steps.release", "test.steps.mark_failed"

FLOW = Workflow(
    kind="test.steps.flow",
    steps=(
        Step(RESERVE, compensate=RELEASE),
        Step(CHARGE, compensate="test.steps.refund"),
        Step(NOTIFY),
    ),
    on_failure=(MARK_FAILED,),
)
workflows(FLOW)

Body = Callable[[StepContext], "dict[str, Any] | None"]


class Script:
    """What each step's body does in a test, and every context it ran with."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: dict[str, Body] = {}
        self.ran: list[StepContext] = []

    def run(self, ctx: StepContext) -> dict[str, Any] | None:
        with self.lock:
            self.ran.append(ctx)
            runs = sum(1 for c in self.ran if c.step == ctx.step)
        body = self.bodies.get(ctx.step)
        if body is not None:
            return body(ctx)
        return {"step": ctx.step, "run": runs}

    def steps(self) -> list[tuple[str, str, int]]:
        return [(c.step, c.phase, c.attempt) for c in self.ran]


script = Script()

for _name in (RESERVE, CHARGE, NOTIFY, RELEASE, "test.steps.refund", MARK_FAILED):
    step(_name)(script.run)


@pytest.fixture(autouse=True)
def _script() -> Iterator[None]:
    script.bodies.clear()
    script.ran.clear()
    yield
    script.bodies.clear()


def start(broker: Broker) -> str:
    """A run of FLOW, committed and dispatched as a public task does it."""
    with session_scope() as session:
        run_id = ledger.new_run(
            session, kind=FLOW.kind, tenant_id="acme", input={"plan": "free"}, grace=60
        ).id
    ledger.dispatch(app, run_id, "forward", FLOW.forward_tasks)
    return run_id


def row(run_id: str, name: str, phase: str = "forward") -> StepRun:
    with session_scope() as session:
        found = session.scalars(
            select(StepRun).where(
                StepRun.run_id == run_id, StepRun.phase == phase, StepRun.name == name
            )
        ).one()
        session.expunge(found)
        return found


def run_of(run_id: str) -> WorkflowRun:
    with session_scope() as session:
        found = session.get(WorkflowRun, run_id)
        assert found is not None
        session.expunge(found)
        return found


def boot_id(settings: Settings) -> str:
    """This process's heartbeat: the owner its deliveries claim as."""
    beat = liveness.current(
        database_url=settings.sqlalchemy_url, interval=settings.heartbeat_interval
    )
    return beat.boot_id


def only(broker: Broker) -> Sent:
    [message] = broker.sent()
    return message


# -- claim, run once, record --------------------------------------------------------------------


def test_a_delivery_claims_its_step_runs_it_records_it_and_hands_the_next_one_over(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    settings = configure()
    run_id = start(broker)
    first = only(broker)
    assert (first.task, first.chain_tasks) == (RESERVE, [CHARGE, NOTIFY])

    # When the first step's message is delivered
    output = broker.run_next(RESERVE)

    # Then its body ran once, with the run's input, and its output is the task's result
    assert output == {"step": RESERVE, "run": 1}
    [ctx] = script.ran
    assert (ctx.run_id, ctx.phase, ctx.attempt, ctx.tenant_id) == (run_id, "forward", 1, "acme")
    assert (ctx.input, ctx.outputs, ctx.next_step) == ({"plan": "free"}, {}, CHARGE)
    # And the ledger holds the output under this process's ownership
    done = row(run_id, RESERVE)
    assert (done.status, done.attempts, done.output) == ("done", 1, output)
    assert done.owner_id == boot_id(settings) and done.task_id == first.id
    assert done.history == []
    # And the chain goes on: the next step is sent, and noted as handed to that message
    sent = only(broker)
    assert (sent.task, sent.kwargs, sent.chain_tasks) == (
        CHARGE,
        {"run_id": run_id, "phase": "forward"},
        [NOTIFY],
    )
    assert row(run_id, CHARGE).task_id == sent.id
    assert run_of(run_id).current_step == CHARGE

    # When the rest runs, each step sees the outputs before it and the run succeeds
    broker.run_next(CHARGE)
    broker.run_next(NOTIFY)
    assert script.steps() == [
        (RESERVE, "forward", 1),
        (CHARGE, "forward", 1),
        (NOTIFY, "forward", 1),
    ]
    assert script.ran[2].outputs == {
        RESERVE: {"step": RESERVE, "run": 1},
        CHARGE: {"step": CHARGE, "run": 1},
    }
    assert run_of(run_id).status == "succeeded"
    assert broker.sent() == []


def test_a_step_already_done_returns_its_stored_output_and_never_runs_again(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    configure()
    run_id = start(broker)
    message = broker.take(RESERVE)
    stored = broker.deliver(message)
    handed_over = only(broker)

    # When the same message comes again (its worker died before acknowledging it)
    again = broker.deliver(message)

    # Then the stored output is the answer and the body did not run again
    assert again == stored == {"step": RESERVE, "run": 1}
    assert script.steps() == [(RESERVE, "forward", 1)]
    assert row(run_id, RESERVE).attempts == 1
    # The next step is still untouched and handed to the message this chain carries, which
    # may never have been sent: the redelivery sends it again, under the same id
    assert [(m.task, m.id) for m in broker.sent()] == [(CHARGE, handed_over.id)] * 2

    # When the next step has started and the message comes a third time
    broker.run_next(CHARGE)
    broker.clear()
    assert broker.deliver(message) == stored

    # Then it neither runs nor sends anything: the chain is the next step's now
    assert script.steps() == [(RESERVE, "forward", 1), (CHARGE, "forward", 1)]
    assert broker.sent() == []


def test_a_step_held_by_a_running_delivery_is_not_run_by_a_second_one(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    configure()
    run_id = start(broker)
    message = broker.take(RESERVE)
    release = threading.Event()
    script.bodies[RESERVE] = lambda ctx: {"held": release.wait(timeout=30)}

    # Given one delivery inside the step's body
    first: list[Any] = []
    worker = threading.Thread(target=lambda: first.append(broker.deliver(message)))
    worker.start()
    try:
        wait_until(
            lambda: len(script.ran) == 1 and row(run_id, RESERVE).status == "running",
            timeout=30,
            message="the first delivery never entered the step",
        )

        # When the same message is delivered again meanwhile
        second = broker.deliver(message)

        # Then the second delivery steps aside: no body, no output, nothing sent
        assert second is None
        assert len(script.ran) == 1
        assert broker.sent() == []
        assert row(run_id, RESERVE).attempts == 1
    finally:
        release.set()
        worker.join(timeout=30)

    # And the first one finishes the step and carries the chain on, once
    assert first == [{"held": True}]
    assert row(run_id, RESERVE).status == "done"
    assert only(broker).task == CHARGE


def claim_as_another_process(run_id: str, name: str, owner: str) -> None:
    with session_scope() as session:
        claim = ledger.claim_step(
            session,
            run_id=run_id,
            phase="forward",
            name=name,
            task_id="elsewhere",
            lease=300,
            owner=takeover.Owner(boot_id=owner, timeout=10),
        )
        assert claim.outcome == "claimed"


def test_a_step_held_by_another_live_process_is_not_run(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    configure()
    run_id = start(broker)
    # Given another process claimed the step and renews it
    claim_as_another_process(run_id, RESERVE, "e" * 32)

    # When its message is delivered here
    result = broker.run_next(RESERVE)

    # Then nothing runs and nothing is sent: the owner carries the chain on
    assert result is None
    assert script.ran == []
    assert broker.sent() == []
    held = row(run_id, RESERVE)
    assert (held.status, held.owner_id, held.attempts) == ("running", "e" * 32, 1)


def test_a_step_whose_owner_went_silent_is_taken_over_and_run(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    # The contrast: the same claim, silent for longer than the owner timeout
    settings = configure()
    run_id = start(broker)
    claim_as_another_process(run_id, RESERVE, "e" * 32)
    silent_since = utcnow() - dt.timedelta(seconds=settings.owner_timeout + 5)
    with session_scope() as session:
        session.execute(
            update(StepRun)
            .where(StepRun.run_id == run_id, StepRun.name == RESERVE)
            .values(heartbeat_at=silent_since)
        )

    result = broker.run_next(RESERVE)

    assert result == {"step": RESERVE, "run": 1}
    assert script.steps() == [(RESERVE, "forward", 2)]
    taken = row(run_id, RESERVE)
    assert (taken.status, taken.attempts, taken.owner_id) == ("done", 2, boot_id(settings))
    [record] = taken.history or []
    assert (record["event"], record["reason"], record["by"]) == (
        "takeover",
        "owner_silent",
        "delivery",
    )
    assert record["previous_owner"]["boot_id"] == "e" * 32
    assert only(broker).task == CHARGE


# -- transient errors ---------------------------------------------------------------------------


def fail_first_attempt(ctx: StepContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise TransientError("the engine is busy")
    return {"attempt": ctx.attempt}


def test_a_short_retry_is_a_countdown_message_due_when_the_ledger_says(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    # Backoff of the first retry: between 1 and 2 s, under the 5 s broker countdown limit
    settings = configure(retry_backoff_base="2", max_broker_countdown="5")
    run_id = start(broker)
    first = broker.take(RESERVE)
    script.bodies[RESERVE] = fail_first_attempt

    # When the step's first attempt hits a transient error
    before = utcnow()
    broker.deliver(first)

    # Then the step is parked as retrying, with its due time and a lease past it
    parked = row(run_id, RESERVE)
    assert parked.status == "retrying"
    assert parked.owner_id is None and parked.attempts == 1
    assert parked.error == {"code": "transient", "message": "the engine is busy"}
    assert parked.due_at is not None and parked.lease_until is not None
    delay = (parked.due_at - before).total_seconds()
    assert 1.0 <= delay <= 2.5
    assert parked.lease_until - parked.due_at == dt.timedelta(seconds=settings.owner_timeout)
    # And the retry is the same message again, in the broker with a countdown to that
    # due time, still carrying the chain; the next step is not sent
    retry = only(broker)
    assert (retry.task, retry.id, retry.headers["retries"]) == (RESERVE, first.headers["id"], 1)
    assert retry.chain_tasks == [CHARGE, NOTIFY]
    assert retry.eta is not None
    assert abs((retry.eta - parked.due_at).total_seconds()) < 1.0
    assert run_of(run_id).deadline_at == parked.due_at + dt.timedelta(seconds=30)

    # When the retry is delivered, the second attempt succeeds and the chain goes on
    assert broker.run_next(RESERVE) == {"attempt": 2}
    assert script.steps() == [(RESERVE, "forward", 1), (RESERVE, "forward", 2)]
    assert row(run_id, RESERVE).status == "done"
    assert only(broker).task == CHARGE


def test_a_long_retry_waits_in_the_ledger_for_the_tick_not_in_the_broker(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    # Backoff of the first retry: between 10 and 20 s, over the 5 s broker countdown limit
    configure(retry_backoff_base="20", max_broker_countdown="5")
    run_id = start(broker)
    script.bodies[RESERVE] = fail_first_attempt

    before = utcnow()
    assert broker.run_next(RESERVE) is None

    # Then the step waits in the ledger until its due time, and no message holds it
    waiting = row(run_id, RESERVE)
    assert waiting.status == "waiting"
    assert waiting.owner_id is None and waiting.lease_until is None
    assert waiting.due_at is not None
    assert 10.0 <= (waiting.due_at - before).total_seconds() <= 20.5
    assert broker.sent() == []
    # The tick leaves it alone until it is due, then hands it out once, from that step on
    with session_scope() as session:
        assert ledger.due_waits(session) == []
        session.execute(
            update(StepRun)
            .where(StepRun.id == waiting.id)
            .values(due_at=utcnow() - dt.timedelta(seconds=1))
        )
    with session_scope() as session:
        assert ledger.due_waits(session) == [(run_id, "forward", FLOW.forward_tasks)]
    with session_scope() as session:
        assert ledger.due_waits(session) == []


def test_a_transient_error_on_the_last_attempt_fails_the_step(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    configure(step_max_attempts="1")
    run_id = start(broker)
    script.bodies[RESERVE] = fail_first_attempt

    broker.run_next(RESERVE)

    failed = row(run_id, RESERVE)
    assert failed.status == "failed"
    assert failed.error == {
        "code": "transient",
        "message": "gave up after 1 attempts: the engine is busy",
    }
    # Nothing of the forward chain was done: only the failure handler runs
    sent = only(broker)
    assert (sent.task, sent.kwargs["phase"], sent.chain_tasks) == (MARK_FAILED, "compensate", [])


# -- permanent errors ---------------------------------------------------------------------------


def refuse(ctx: StepContext) -> None:
    raise ConflictError("card declined")


def crash(ctx: StepContext) -> None:
    raise ValueError("a bug")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (refuse, {"code": "conflict", "message": "card declined"}),
        (crash, {"code": "internal", "message": "ValueError: a bug"}),
    ],
)
def test_a_permanent_error_stops_the_chain_and_dispatches_the_compensations(
    configure: Callable[..., Settings], broker: Broker, body: Body, error: dict[str, str]
) -> None:
    configure()
    run_id = start(broker)
    broker.run_next(RESERVE)
    script.bodies[CHARGE] = body

    # When the second step fails for good
    assert broker.run_next(CHARGE) is None

    # Then the step and the run record the error, and the run turns to compensating
    assert (row(run_id, CHARGE).status, row(run_id, CHARGE).error) == ("failed", error)
    run = run_of(run_id)
    assert (run.status, run.phase, run.current_step) == ("compensating", "compensate", RELEASE)
    assert run.error == {"step": CHARGE, **error}
    assert row(run_id, NOTIFY).status == "pending"
    # And the compensation chain is sent instead of the forward one: the done step's undo,
    # then the failure handler (the failed step's own undo is not due)
    sent = only(broker)
    assert (sent.task, sent.kwargs, sent.chain_tasks) == (
        RELEASE,
        {"run_id": run_id, "phase": "compensate"},
        [MARK_FAILED],
    )

    # When the compensations run, they see the error, and the run ends failed
    broker.run_next(RELEASE)
    broker.run_next(MARK_FAILED)
    assert script.steps()[-2:] == [(RELEASE, "compensate", 1), (MARK_FAILED, "compensate", 1)]
    assert script.ran[-1].error == {"step": CHARGE, **error}
    assert run_of(run_id).status == "failed"
    assert broker.sent() == []


# -- parking --------------------------------------------------------------------------------------


def park_once(seconds: float) -> Body:
    def body(ctx: StepContext) -> dict[str, Any] | None:
        if sum(1 for c in script.ran if c.step == ctx.step) == 1:
            raise Park(seconds, "waiting on purpose")
        return {"parked": False}

    return body


def test_a_parked_step_waits_in_the_ledger_without_an_error_or_a_spent_attempt(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    configure(step_max_attempts="2")
    run_id = start(broker)
    script.bodies[RESERVE] = park_once(3600)

    assert broker.run_next(RESERVE) is None

    # Then the step waits for its due time, with no error, and no message holds it
    waiting = row(run_id, RESERVE)
    assert waiting.status == "waiting" and waiting.error is None
    assert waiting.due_at is not None and waiting.due_at > utcnow() + dt.timedelta(minutes=59)
    assert broker.sent() == []
    # A wake sends it now, once, from that step on; a second wake finds nothing to send
    with session_scope() as session:
        assert ledger.wake(session, run_id) == [(run_id, "forward", FLOW.forward_tasks)]
    with session_scope() as session:
        assert ledger.wake(session, run_id) == []
        assert ledger.due_waits(session) == []
    ledger.dispatch(app, run_id, "forward", FLOW.forward_tasks)
    # and the step runs again and the run goes on, parking having cost no attempt of the limit
    assert broker.run_next(RESERVE) == {"parked": False}
    assert row(run_id, RESERVE).status == "done"
    assert broker.run_next(CHARGE) is not None
    assert broker.run_next(NOTIFY) is not None
    assert run_of(run_id).status == "succeeded"


def test_wake_leaves_a_run_without_a_waiting_step_alone(
    configure: Callable[..., Settings], broker: Broker
) -> None:
    configure()
    run_id = start(broker)
    with session_scope() as session:
        assert ledger.wake(session, run_id) == []
        assert ledger.wake(session, "0" * 32) == []
    assert row(run_id, RESERVE).status == "pending"
