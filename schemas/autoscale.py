"""Autoscale rules: a metric over a window against a threshold, and what to do about it."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AUTOSCALE_ACTIONS",
    "AutoscaleAction",
    "AutoscaleMetric",
    "AutoscaleRule",
    "SCALE_DOWN_ACTIONS",
]

#: ``cpu_utilization``: CPU seconds per second over the window divided by the plan's
#: ``cpu_cores`` × instances, in %; ``memory_utilization``: mean memory over the plan's
#: ``memory_gb`` × instances, in %; ``requests_per_second``: requests over the window's seconds.
AutoscaleMetric = Literal["cpu_utilization", "memory_utilization", "requests_per_second"]
AutoscaleAction = Literal["add_instance", "remove_instance", "upgrade_plan", "downgrade_plan"]

#: Every action, in the order above.
AUTOSCALE_ACTIONS: tuple[str, ...] = get_args(AutoscaleAction)
#: Actions that shrink a tenant: they wait out the stabilization window, as HPA's scale-down.
SCALE_DOWN_ACTIONS: frozenset[str] = frozenset({"remove_instance", "downgrade_plan"})


class AutoscaleRule(BaseModel):
    """One rule; ``cooldown`` and ``stabilization`` default to the settings when ``None``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A tenant's rule replaces the plan's rule of the same name.
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    metric: AutoscaleMetric
    comparison: Literal["above", "below"] = "above"
    threshold: float = Field(ge=0)
    #: Seconds of usage the metric is computed over.
    window: float = Field(default=300.0, gt=0)
    action: AutoscaleAction
    #: The plan ``upgrade_plan`` / ``downgrade_plan`` move to.
    target_plan: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    #: No action of this rule within this many seconds of the tenant's last autoscale action.
    cooldown: float | None = Field(default=None, ge=0)
    #: Scale-down only: the condition must have held for this many seconds.
    stabilization: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _target_matches_action(self) -> AutoscaleRule:
        plan_action = self.action in ("upgrade_plan", "downgrade_plan")
        if plan_action and self.target_plan is None:
            raise ValueError(f"action {self.action} needs target_plan")
        if not plan_action and self.target_plan is not None:
            raise ValueError(f"action {self.action} takes no target_plan")
        return self

    @property
    def scale_down(self) -> bool:
        """Whether the action shrinks the tenant (and so waits out the stabilization)."""
        return self.action in SCALE_DOWN_ACTIONS
