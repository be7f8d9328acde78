"""Step tasks: the Celery side of the ledger.

``@step("cul8er.tenants.allocate_network")`` turns a plain function of a
:class:`~workers.engine.workflow.StepContext` into a Celery task that claims its
ledger row, runs the function once, stores the output and lets the chain go on.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from schemas.states import Phase
from workers.engine import ledger, takeover
from workers.engine.events import emit
from workers.engine.workflow import StepContext
from workers.runtime import liveness
from workers.runtime.app import app
from workers.runtime.db import session_scope, statement_scope
from workers.runtime.errors import Cul8erError, TransientError
from workers.runtime.settings import get_settings
from workers.runtime.task import Cul8erTask

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session

    from schemas.events import EventType

T = TypeVar("T")
#: A session, or on the hot path a bare connection (:func:`statement_scope`).
S = TypeVar("S", "Session", "Connection")

__all__ = ["Park", "StepFunction", "StepTask", "backoff", "step"]

log = structlog.get_logger(__name__)

StepFunction = Callable[[StepContext], "dict[str, Any] | None"]

#: Tries of a step's outcome write over a dropped database connection.
_WRITE_ATTEMPTS = 4


class Park(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a step function to wait ``delay`` seconds in the ledger, then run again.

    Not a failure: nothing is counted against ``step_max_attempts`` and no error is
    recorded. The tick sends the step again when due (``ledger.due_waits``), and
    ``ledger.wake`` sends it at once. A step that parks keeps its progress in its own
    rows and picks up where it stopped.
    """

    def __init__(self, delay: float, reason: str = "") -> None:
        super().__init__(reason or f"parked for {delay:.1f} s")
        self.delay = max(0.0, delay)
        self.reason = reason


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay: float = min(cap, base * 2 ** max(0, attempt - 1))
    return delay / 2 + random.uniform(0, delay / 2)


class StepTask(Cul8erTask):
    """The base of every step task: it retries from the ledger, not Celery's way.

    acks_late with reject_on_worker_lost (global): a pool child that dies mid-step gets its
    message redelivered at once, and a wholly killed worker's message comes back
    after the broker's visibility timeout; the ledger row makes the rerun safe.
    The claim names this process as the step's owner and its heartbeat renews the
    step while the body runs, so a delivery that finds the owner dead takes the
    step over within ``owner_timeout``. Retries are decided here from the
    ledger's attempt count (TransientError), not by ``autoretry_for``: short waits
    go back to the broker as a countdown, long ones wait in the ledger for the tick.
    """

    ignore_result = True

    def execute(self, fn: StepFunction, run_id: str, phase: str) -> dict[str, Any] | None:
        """Claim the step, run ``fn`` once, record the outcome."""
        settings = get_settings()
        beat = liveness.current(
            database_url=settings.sqlalchemy_url, interval=settings.heartbeat_interval
        )
        structlog.contextvars.bind_contextvars(workflow_id=run_id, step=self.name)
        owner = takeover.Owner(
            boot_id=beat.boot_id,
            timeout=settings.owner_timeout,
            holding=frozenset(beat.held),
            namespace=beat.namespace if settings.owner_exit_check else None,
        )
        try:
            with statement_scope() as session:
                claim = ledger.claim_step(
                    session,
                    run_id=run_id,
                    phase=phase,
                    name=self.name,
                    task_id=self.request.id,
                    lease=settings.step_lease,
                    owner=owner,
                    next_task_id=self._next_task_id(),
                )
        except TransientError as exc:
            # The database is away before anything ran: deliver the step again shortly.
            # Had the claim committed after all, the retry finds it ours and idle.
            log.warning("step_claim_failed", error=str(exc))
            raise self.retry(countdown=1.0, max_retries=None, exc=exc) from exc
        if claim.outcome != "claimed":
            return self._not_claimed(claim, run_id)
        ctx = claim.context
        assert ctx is not None and claim.step_id is not None
        structlog.contextvars.bind_contextvars(tenant_id=ctx.tenant_id, attempt=ctx.attempt)
        with beat.holding(claim.step_id, f"{run_id}/{self.name}"):
            if claim.takeover is not None:
                takeover.announce(
                    claim.takeover,
                    tenant_id=ctx.tenant_id,
                    workflow_id=run_id,
                    step=self.name,
                    phase=phase,
                )
            self._event("step.started", ctx)
            return self._run(fn, ctx, beat.boot_id)

    def _run(self, fn: StepFunction, ctx: StepContext, owner: str) -> dict[str, Any] | None:
        try:
            output = fn(ctx) or {}
        except Park as park:
            self._park(ctx, park, owner)
            return None
        except TransientError as exc:
            self._transient(ctx, exc, owner)
            return None
        except Cul8erError as exc:
            self._fail(ctx, exc.to_dict(), owner)
            return None
        except Exception as exc:
            # A bug, not a plan: fail the step and compensate rather than loop on it.
            log.exception("step_crashed")
            self._fail(ctx, {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}, owner)
            return None
        settings = get_settings()
        recorded = _ledger_write(
            lambda session: ledger.complete_step(
                session,
                run_id=ctx.run_id,
                phase=ctx.phase,
                name=self.name,
                output=output,
                grace=settings.reconcile_grace,
                attempt=ctx.attempt,
                owner=owner,
                next_step=ctx.next_step,
                next_task_id=self._next_task_id(ctx.next_step),
            ),
            scope=statement_scope,
        )
        if not recorded:
            self._refused(ctx, owner)
            return None
        log.info("step_done")
        self._event("step.succeeded", ctx)
        return output

    def _refused(self, ctx: StepContext, owner: str) -> None:
        # This attempt lost the step (taken over while this process was frozen or cut
        # off): whatever it did is the new owner's to adopt; record nothing, stop here.
        log.warning("step_completion_refused")
        with contextlib.suppress(TransientError), session_scope() as session:
            ledger.refuse_late(
                session,
                run_id=ctx.run_id,
                phase=ctx.phase,
                name=self.name,
                attempt=ctx.attempt,
                owner=owner,
            )
        self._stop_chain()

    def _next_task_id(self, next_step: str | None = None) -> str | None:
        """The id of the chain message sent next (only if it carries ``next_step``, when named)."""
        # request.chain holds the rest of the chain, last element first.
        chain: Any = self.request.chain or []
        following = chain[-1] if chain else None
        if not isinstance(following, dict):
            return None
        if next_step is not None and following.get("task") != next_step:
            return None
        task_id = following.get("options", {}).get("task_id")
        return task_id if isinstance(task_id, str) else None

    def _not_claimed(self, claim: ledger.Claim, run_id: str) -> dict[str, Any] | None:
        # Another delivery ran (or runs) this step and continues the chain itself.
        # Only a redelivery that finds the next step untouched carries the chain on,
        # which covers a worker killed between recording the step and sending the next.
        if not (claim.outcome == "done" and claim.successor_pending):
            self._stop_chain()
        log.info("step_skipped", outcome=claim.outcome, workflow_id=run_id)
        return claim.output

    def _transient(self, ctx: StepContext, exc: TransientError, owner: str) -> None:
        settings = get_settings()
        if ctx.attempt >= settings.step_max_attempts:
            message = f"gave up after {ctx.attempt} attempts: {exc}"
            self._fail(ctx, {"code": exc.code, "message": message}, owner)
            return
        delay = backoff(
            ctx.attempt, base=settings.retry_backoff_base, cap=settings.retry_backoff_max
        )
        in_ledger = delay > settings.max_broker_countdown
        if not self._wait(
            ctx,
            owner,
            delay=delay,
            error=exc.to_dict(),
            in_ledger=in_ledger,
            slack=settings.owner_timeout,
        ):
            return
        log.warning("step_retrying", attempt=ctx.attempt, delay=round(delay, 2), error=str(exc))
        if in_ledger:
            self._stop_chain()
            return
        raise self.retry(countdown=delay, max_retries=None, exc=exc)

    def _wait(
        self,
        ctx: StepContext,
        owner: str,
        *,
        delay: float,
        error: dict[str, Any] | None,
        in_ledger: bool,
        slack: float,
    ) -> bool:
        """Record that the step waits ``delay`` s; False (and refused) if another owns it now."""
        parked = _ledger_write(
            lambda session: ledger.wait_step(
                session,
                run_id=ctx.run_id,
                phase=ctx.phase,
                name=self.name,
                delay=delay,
                error=error,
                in_ledger=in_ledger,
                attempt=ctx.attempt,
                owner=owner,
                slack=slack,
            )
        )
        if not parked:
            self._refused(ctx, owner)
        return bool(parked)

    def _park(self, ctx: StepContext, park: Park, owner: str) -> None:
        if not self._wait(ctx, owner, delay=park.delay, error=None, in_ledger=True, slack=0.0):
            return
        log.info("step_parked", delay=round(park.delay, 2), reason=park.reason)
        self._stop_chain()

    def _fail(self, ctx: StepContext, error: dict[str, Any], owner: str) -> None:
        settings = get_settings()
        compensations = _ledger_write(
            lambda session: ledger.fail_step(
                session,
                run_id=ctx.run_id,
                phase=ctx.phase,
                name=self.name,
                error=error,
                grace=settings.reconcile_grace,
                attempt=ctx.attempt,
                owner=owner,
            )
        )
        if compensations is None:
            self._refused(ctx, owner)
            return
        log.error("step_failed", error=error)
        self._event("step.failed", ctx, error=error)
        if ctx.phase == Phase.FORWARD:
            # The forward chain ends here; the compensation chain takes over.
            self._stop_chain()
            ledger.dispatch(self.app, ctx.run_id, Phase.COMPENSATE, compensations)

    def _event(self, event_type: EventType, ctx: StepContext, **data: Any) -> None:
        emit(
            event_type,
            tenant_id=ctx.tenant_id,
            workflow_id=ctx.run_id,
            subject=self.name,
            data={"phase": ctx.phase, "attempt": ctx.attempt, **data},
        )

    def _stop_chain(self) -> None:
        # Celery sends request.chain's next signature after we return; clearing it
        # ends this delivery's part of the workflow.
        self.request.chain = None
        self.request.callbacks = None


def _ledger_write(
    write: Callable[[S], T],
    *,
    scope: Callable[[], contextlib.AbstractContextManager[S]] = session_scope,  # type: ignore[assignment]
) -> T:
    """Record a step's outcome, retrying a few times over a dropped database connection.

    The outcome was earned by side effects already done; losing it to one killed
    connection would make the step run again. Fenced writes make a retry of a write
    that did commit harmless. If the database stays away, the error propagates, the
    heartbeat stops renewing the step, and reconcile frees it after the owner timeout.
    A plain loop, not tenacity: this runs once per step, where its machinery costs more
    than the write's own Python.
    """
    for attempt in range(1, _WRITE_ATTEMPTS + 1):
        try:
            with scope() as session:
                return write(session)
        except TransientError:
            if attempt == _WRITE_ATTEMPTS:
                raise
            time.sleep(backoff(attempt, base=0.2, cap=2.0))
    raise AssertionError("unreachable")  # pragma: no cover


def step(name: str) -> Callable[[StepFunction], StepTask]:
    """Register ``fn`` as the step task ``name``."""

    def register(fn: StepFunction) -> StepTask:
        def body(self: StepTask, run_id: str, phase: str = Phase.FORWARD) -> dict[str, Any] | None:
            return self.execute(fn, run_id, phase)

        body.__doc__ = fn.__doc__
        body.__name__ = fn.__name__
        task: StepTask = app.task(name=name, base=StepTask, bind=True)(body)
        return task

    return register
