"""Workflows are declared once, as ordered steps with compensations (docs/architecture.md §3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.runtime.errors import ConfigError

__all__ = [
    "Step",
    "StepContext",
    "Workflow",
    "get_workflow",
    "workflows",
]


@dataclass(frozen=True)
class Step:
    """One step: the task that does it and, optionally, the task that undoes it."""

    task: str
    compensate: str | None = None


@dataclass(frozen=True)
class Workflow:
    """An ordered list of steps; ``on_failure`` tasks run after the compensations."""

    kind: str
    steps: tuple[Step, ...]
    on_failure: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [step.task for step in self.steps]
        if len(set(names)) != len(names):
            raise ConfigError(f"workflow {self.kind!r} repeats a step: {names}")

    @property
    def forward_tasks(self) -> list[str]:
        """The forward step task names, in order."""
        return [step.task for step in self.steps]

    def compensations_for(self, done: list[str]) -> list[str]:
        """Compensation tasks for the ``done`` steps, newest first, then ``on_failure``."""
        undo = [
            step.compensate
            for step in reversed(self.steps)
            if step.task in done and step.compensate is not None
        ]
        return [*undo, *self.on_failure]


@dataclass(frozen=True)
class StepContext:
    """What a step function is given: the run's input and the outputs before it."""

    run_id: str
    kind: str
    phase: str
    step: str
    tenant_id: str | None
    input: dict[str, Any]
    #: Outputs of the forward steps done so far, by task name.
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: 1 on the first try of this step.
    attempt: int = 1
    #: The run's error, for compensation steps.
    error: dict[str, Any] | None = None
    #: The step after this one in its phase, if any.
    next_step: str | None = None

    def output_of(self, task: str) -> dict[str, Any]:
        """The stored output of an earlier step (empty if it produced none)."""
        return self.outputs.get(task) or {}


_registry: dict[str, Workflow] = {}


def workflows(*declared: Workflow) -> None:
    """Register declared workflows by kind."""
    for workflow in declared:
        existing = _registry.get(workflow.kind)
        if existing is not None and existing != workflow:
            raise ConfigError(f"two workflows named {workflow.kind!r}")
        _registry[workflow.kind] = workflow


def get_workflow(kind: str) -> Workflow:
    """The registered workflow of ``kind``."""
    try:
        return _registry[kind]
    except KeyError:
        raise ConfigError(f"unknown workflow kind {kind!r}") from None
