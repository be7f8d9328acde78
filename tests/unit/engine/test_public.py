"""The public task decorator: validation, the idempotency key, and sends after the commit.

Public tasks of these tests' own are registered with ``public_task`` on the application; each
is sent by name to a private Redis broker and delivered through Celery's worker request, on
SQLite and PostgreSQL. What they send is read back from the queues.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery.signals import before_task_publish
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from tests.unit.engine.harness import Broker, concurrently
from workers.engine import ledger, takeover
from workers.engine.public import MAX_MESSAGE, Outcome, public_task
from workers.engine.workflow import Step, Workflow, workflows
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import ConflictError, TransientError
from workers.runtime.models import Operation, StepRun, WorkflowRun
from workers.runtime.settings import Settings

# -- the tasks under test ---------------------------------------------------------------------

FLOW = Workflow(
    kind="test.public.flow",
    steps=(Step("test.public.first"), Step("test.public.second"), Step("test.public.third")),
)
workflows(FLOW)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    cpu: float = Field(gt=0)
    memory_gb: float = Field(gt=0)


class Volume(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    size_gb: int = Field(gt=0)


class Reserve(BaseModel):
    """Reserve resources for a tenant (a test's public task)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    idempotency_key: str | None = None
    tenant_id: str = Field(pattern=r"^[a-z][a-z0-9-]+$")
    resources: Resources
    volumes: list[Volume] = Field(default_factory=list)
    label: str | int | None = None


class Calls:
    """What the services saw, and a hook a test sets to run inside the service."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[str] = []
        self.inside: Callable[[], None] | None = None

    def record(self, tenant_id: str) -> None:
        with self.lock:
            self.seen.append(tenant_id)
        if self.inside is not None:
            self.inside()


calls = Calls()


def _start(session: Session, payload: Reserve) -> Outcome:
    calls.record(payload.tenant_id)
    run = ledger.new_run(
        session,
        kind=FLOW.kind,
        tenant_id=payload.tenant_id,
        input={"cpu": payload.resources.cpu},
        grace=60,
    )
    return Outcome(
        data={"workflow_id": run.id, "cpu": payload.resources.cpu},
        tenant_id=payload.tenant_id,
        dispatch=[(run.id, "forward", FLOW.forward_tasks)],
    )


@public_task("test.public.reserve", Reserve)
def reserve(session: Session, payload: Reserve) -> Outcome:
    return _start(session, payload)


@public_task("test.public.reserve_then_refuse", Reserve)
def reserve_then_refuse(session: Session, payload: Reserve) -> Outcome:
    _start(session, payload)
    raise ConflictError(f"tenant {payload.tenant_id!r} changed its mind")


@public_task("test.public.reserve_unstorable", Reserve)
def reserve_unstorable(session: Session, payload: Reserve) -> Outcome:
    outcome = _start(session, payload)
    # An answer the operations table cannot store: the commit fails after the service returned.
    outcome.data["since"] = object()
    return outcome


@public_task("test.public.busy", Reserve)
def busy(session: Session, payload: Reserve) -> Outcome:
    calls.record(payload.tenant_id)
    raise TransientError("the database is busy")


@public_task("test.public.reserve_once", Reserve)
def reserve_once(session: Session, payload: Reserve) -> Outcome:
    """Like ``tenants.create``: refuses a tenant that has a run already ("exists already")."""
    calls.record(payload.tenant_id)
    taken = session.scalar(
        select(func.count())
        .select_from(WorkflowRun)
        .where(WorkflowRun.tenant_id == payload.tenant_id)
    )
    if taken:
        raise ConflictError(f"tenant {payload.tenant_id!r} exists already")
    run = ledger.new_run(session, kind=FLOW.kind, tenant_id=payload.tenant_id, input={}, grace=60)
    return Outcome(
        data={"workflow_id": run.id},
        tenant_id=payload.tenant_id,
        dispatch=[(run.id, "forward", FLOW.forward_tasks)],
    )


VALID: dict[str, Any] = {"tenant_id": "acme", "resources": {"cpu": 2.0, "memory_gb": 4.0}}


@pytest.fixture(autouse=True)
def settings(configure: Callable[..., Settings]) -> Iterator[Settings]:
    made = configure()
    calls.seen.clear()
    calls.inside = None
    yield made
    calls.inside = None


def send(broker: Broker, name: str, **kwargs: Any) -> dict[str, Any] | None:
    """Send ``name`` as a client would, deliver it, and return its stored result (if any)."""
    sent = app.send_task(name, kwargs=kwargs)
    broker.deliver(broker.take(name))
    if broker.state(sent.id) != "SUCCESS":
        return None
    result: dict[str, Any] = broker.result(sent.id)
    return result


def count(model: type) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fields"),
    [
        ({**VALID, "resources": {"cpu": "2", "memory_gb": 4.0}}, ["resources.cpu"]),
        ({**VALID, "resources": {"cpu": -1.0, "memory_gb": 4.0}}, ["resources.cpu"]),
        ({**VALID, "resources": {"cpu": 2.0}}, ["resources.memory_gb"]),
        (
            {**VALID, "resources": {"cpu": 0.0, "memory_gb": "lots"}},
            ["resources.cpu", "resources.memory_gb"],
        ),
        ({**VALID, "resources": {"cpu": 1.0, "memory_gb": 1.0, "gpu": 1}}, ["resources.gpu"]),
        ({**VALID, "volumes": [{"size_gb": 10}, {"size_gb": 0}]}, ["volumes.1.size_gb"]),
        ({**VALID, "label": [1]}, ["label"]),
        ({**VALID, "tenant_id": "Not Valid"}, ["tenant_id"]),
        ({"resources": VALID["resources"]}, ["tenant_id"]),
        ({**VALID, "colour": "red"}, ["colour"]),
        ({**VALID, "resources": [2.0, 4.0]}, ["resources"]),
    ],
)
def test_validation_errors_name_the_field_path_and_are_answered_not_retried(
    broker: Broker, kwargs: dict[str, Any], fields: list[str]
) -> None:
    # When a public task is sent with bad input
    sent = app.send_task("test.public.reserve", kwargs={**kwargs, "idempotency_key": "k"})
    broker.deliver(broker.take("test.public.reserve"))

    # Then the task succeeded with a rejection naming each field by its path
    assert broker.state(sent.id) == "SUCCESS"
    result = broker.result(sent.id)
    assert result["ok"] is False
    error = result["error"]
    assert error["code"] == "validation_error"
    assert [e["field"] for e in error["errors"]] == fields
    assert error["message"].startswith(f"invalid arguments for test.public.reserve: {fields[0]}: ")
    for field in fields:
        assert f"{field}: " in error["message"]
    # And the service never ran, nothing was kept under the key, nothing sent (no retry)
    assert calls.seen == []
    assert count(Operation) == 0 and count(WorkflowRun) == 0
    assert broker.sent() == []


def test_a_huge_bad_input_comes_back_cut_short(broker: Broker) -> None:
    volumes = [{"size_gb": -n} for n in range(1, 41)]
    result = send(broker, "test.public.reserve", **VALID, volumes=volumes)

    assert result is not None and result["ok"] is False
    errors = result["error"]["errors"]
    # At most 20 fields are listed, the first ones, and the message is cut
    assert [e["field"] for e in errors] == [f"volumes.{n}.size_gb" for n in range(20)]
    assert len(result["error"]["message"]) == MAX_MESSAGE
    assert broker.sent() == []


def test_a_refusal_by_the_service_is_answered_and_its_writes_are_undone(broker: Broker) -> None:
    result = send(broker, "test.public.reserve_then_refuse", **VALID, idempotency_key="k")

    assert result == {
        "ok": False,
        "error": {"code": "conflict", "message": "tenant 'acme' changed its mind"},
    }
    assert calls.seen == ["acme"]
    # the run the service had started is rolled back with the rest, and nothing is sent
    assert count(WorkflowRun) == 0 and count(StepRun) == 0 and count(Operation) == 0
    assert broker.sent() == []


def test_a_transient_error_is_retried_by_celery(broker: Broker) -> None:
    # The contrast to the rejections above: the same observation sees a retry when there is one
    sent = app.send_task("test.public.busy", kwargs={**VALID, "idempotency_key": "k"})
    broker.deliver(broker.take("test.public.busy"))

    assert broker.state(sent.id) == "RETRY"
    [retry] = broker.sent()
    assert (retry.task, retry.id, retry.headers["retries"]) == ("test.public.busy", sent.id, 1)
    assert retry.kwargs == {**VALID, "idempotency_key": "k"}
    assert count(Operation) == 0


# -- the idempotency key ------------------------------------------------------------------------


def test_two_deliveries_with_one_key_at_once_make_one_operation_and_one_send(
    broker: Broker, settings: Settings
) -> None:
    # Given two calls under the same key, taken off the queue by two workers at once
    kwargs = {**VALID, "idempotency_key": "same"}
    ids = [app.send_task("test.public.reserve", kwargs=kwargs).id for _ in range(2)]
    messages = [broker.take("test.public.reserve") for _ in ids]
    # Inside the service each waits (a while) for the other: on PostgreSQL both get there
    # before either commits; SQLite's write lock holds the second back until the first is done.
    rendezvous = threading.Barrier(2, timeout=3)

    def meet() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            rendezvous.wait()

    calls.inside = meet

    # When both run at once
    concurrently(*(lambda m=m: broker.deliver(m) for m in messages))

    # Then both answer the same, from one operation and one run
    first, second = (broker.result(i) for i in ids)
    assert first["ok"] is True and first == second
    assert count(Operation) == 1
    with session_scope() as session:
        assert session.scalars(select(WorkflowRun.id)).all() == [first["workflow_id"]]
    # And every message sent carries that run's chain, none the loser's
    chains = broker.sent()
    assert {(m.task, m.kwargs["run_id"]) for m in chains} == {
        (FLOW.forward_tasks[0], first["workflow_id"])
    }
    assert all(m.chain_tasks == FLOW.forward_tasks[1:] for m in chains)
    if settings.sqlalchemy_url.startswith("postgresql"):
        # The race was real: both services ran; the loser's insert of the key failed, it
        # answered with the winner's result and sent nothing
        assert calls.seen == ["acme", "acme"]
        assert len(chains) == 1
    else:
        # The write lock serialized them: the second found the key's answer and, the run
        # not being started yet, sent its chain again (the ledger turns a duplicate away)
        assert calls.seen == ["acme"]
        assert len(chains) == 2


# PostgreSQL only: on SQLite the write lock runs the two calls one after the other.
@pytest.mark.parametrize(
    "configure", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_key_whose_first_call_commits_mid_service_answers_as_that_call(
    broker: Broker, settings: Settings
) -> None:
    assert settings.sqlalchemy_url.startswith("postgresql")
    # Given two calls under one key: the second has read the key (absent) and is inside its
    # service when the first runs from start to commit
    kwargs = {**VALID, "idempotency_key": "interleaved"}
    ids = [app.send_task("test.public.reserve_once", kwargs=kwargs).id for _ in range(2)]
    first, second = (broker.take("test.public.reserve_once") for _ in ids)

    def the_first_call_commits() -> None:
        calls.inside = None
        runner = threading.Thread(target=broker.deliver, args=(first,))
        runner.start()
        runner.join(timeout=30)

    calls.inside = the_first_call_commits

    # When the second's service then finds the first's tenant and refuses ("exists already")
    broker.deliver(second)

    # Then the second answers as the first did, not with the conflict, and nothing is doubled
    answers = [broker.result(i) for i in ids]
    assert answers[0]["ok"] is True and answers[1] == answers[0]
    assert calls.seen == ["acme", "acme"]
    assert count(Operation) == 1 and count(WorkflowRun) == 1
    assert len(broker.sent()) == 1


def test_a_redelivered_message_without_a_key_answers_as_its_first_delivery(
    broker: Broker, settings: Settings
) -> None:
    # Given a call without an idempotency key, delivered once
    sent = app.send_task("test.public.reserve", kwargs=VALID)
    message = broker.take("test.public.reserve")
    broker.deliver(message)
    first = broker.result(sent.id)
    [chain] = broker.sent()

    # When the broker delivers the same message again (its worker died before acking)
    broker.deliver(message)

    # Then the answer is the first one, kept under the message's id, and nothing is re-done;
    # the run, not started yet, is sent again (the first send may never have gone out)
    assert broker.result(sent.id) == first
    assert calls.seen == ["acme"]
    assert count(WorkflowRun) == 1
    with session_scope() as session:
        assert session.get(Operation, f"test.public.reserve:task:{sent.id}") is not None
    assert [(m.task, m.kwargs, m.chain_tasks) for m in broker.sent()] == [
        (chain.task, chain.kwargs, chain.chain_tasks)
    ] * 2

    # When a worker has started the run's first step and the message comes a third time
    broker.clear()
    with session_scope() as session:
        claim = ledger.claim_step(
            session,
            run_id=first["workflow_id"],
            phase="forward",
            name=FLOW.forward_tasks[0],
            task_id=chain.id,
            lease=60,
            owner=takeover.Owner(boot_id="f" * 32, timeout=10),
        )
        assert claim.outcome == "claimed"
    broker.deliver(message)

    # Then it answers the same and sends nothing
    assert broker.result(sent.id) == first
    assert broker.sent() == []
    assert calls.seen == ["acme"]


# -- sends after the commit ---------------------------------------------------------------------


@pytest.fixture
def published(settings: Settings) -> Iterator[list[dict[str, Any]]]:
    """What another connection saw of the database at the moment each message was published."""
    seen: list[dict[str, Any]] = []
    # A plain engine: its reads take no write lock, and see only what was committed.
    observer = create_engine(settings.sqlalchemy_url)

    def look(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        with observer.connect() as conn:
            seen.append(
                {
                    "task": sender,
                    "operations": conn.execute(text("SELECT key FROM operations")).scalars().all(),
                    "runs": conn.execute(text("SELECT id FROM workflow_runs")).scalars().all(),
                }
            )

    before_task_publish.connect(look, weak=False)
    yield seen
    before_task_publish.disconnect(look)
    observer.dispose()


def test_the_first_step_is_sent_only_after_the_commit(
    broker: Broker, published: list[dict[str, Any]]
) -> None:
    app.send_task("test.public.reserve", kwargs={**VALID, "idempotency_key": "k"})
    published.clear()  # the client's own send
    broker.deliver(broker.take("test.public.reserve"))

    # When the chain went out, its run and the answer were already committed
    [moment] = published
    assert moment["task"] == FLOW.forward_tasks[0]
    [run_id] = moment["runs"]
    assert moment["operations"] == ["test.public.reserve:k"]
    assert [m.kwargs["run_id"] for m in broker.sent()] == [run_id]


def test_a_commit_that_fails_sends_nothing(broker: Broker, published: list[dict[str, Any]]) -> None:
    # Given a service that started a run and returned it to dispatch, and an answer that
    # cannot be stored (the commit fails after the service returned)
    sent = app.send_task("test.public.reserve_unstorable", kwargs={**VALID, "idempotency_key": "k"})
    published.clear()

    broker.deliver(broker.take("test.public.reserve_unstorable"))

    # Then the task failed, and neither the run, nor the key, nor any message exists
    assert calls.seen == ["acme"]
    assert broker.state(sent.id) == "FAILURE"
    assert count(WorkflowRun) == 0 and count(StepRun) == 0 and count(Operation) == 0
    assert published == []
    assert broker.sent() == []
