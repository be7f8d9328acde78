"""Task module the benchmark workers import: a 7-step no-op ledger workflow and a bare no-op."""

from __future__ import annotations

from typing import Any

from workers.engine.steps import step
from workers.engine.workflow import Step, StepContext, Workflow, workflows
from workers.runtime.app import app

#: Steps in the benchmark workflow.
STEPS = 7


def _noop(ctx: StepContext) -> dict[str, Any]:
    return {"step": ctx.step}


NOOP_TASKS = [step(f"bench.noop_{i}")(_noop).name for i in range(STEPS)]
NOOP = Workflow(kind="bench.noop", steps=tuple(Step(name) for name in NOOP_TASKS))
workflows(NOOP)


@app.task(name="bench.bare_noop", acks_late=True)
def bare_noop() -> None:
    """A bare Celery task that does nothing, for the baseline chain."""
    return None


#: A one-step no-op workflow, for the step throughput bench (bench/throughput.py).
ONE_STEP_TASK = step("bench.noop_one")(_noop).name
ONE_STEP = Workflow(kind="bench.noop_one", steps=(Step(ONE_STEP_TASK),))
workflows(ONE_STEP)
