"""Autoscale decisions: a tenant's rules, its metrics from usage rows, HPA-like timing.

Everything here is pure (no database, no broker): ``tasks.autoscale`` reads the rows,
calls :func:`decide` and records what it answers. A rule's condition is checked over its
window; a scale-down must also have held for the whole stabilization window (as the
Kubernetes HPA's scale-down); and no rule acts within the cooldown after the tenant's
last autoscale action, so a tenant is scaled once per condition, not once per evaluation.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pydantic import TypeAdapter, ValidationError

from schemas.autoscale import AutoscaleRule

if TYPE_CHECKING:
    from schemas.plans import Plan

__all__ = [
    "Decision",
    "NO_ACTION",
    "SOURCE_METRICS",
    "TenantState",
    "UsageWindow",
    "decide",
    "lookback",
    "measure",
    "resolve_rules",
]

#: The action recorded when a rule decides to do nothing.
NO_ACTION: Final = "none"
#: The usage metric (as metering records it) each autoscale metric is computed from.
SOURCE_METRICS: Final[Mapping[str, str]] = {
    "cpu_utilization": "cpu_seconds",
    "memory_utilization": "memory_bytes",
    "requests_per_second": "requests",
}
#: Bytes in the plans' GB (the catalog counts memory in binary units, as engines do).
GIB: Final = 1024**3

_RULES = TypeAdapter(list[AutoscaleRule])


@dataclass(frozen=True)
class UsageWindow:
    """One usage row of the rule's source metric: its window and its value."""

    start: dt.datetime
    end: dt.datetime
    value: float

    @property
    def seconds(self) -> float:
        """The window's length."""
        return max(0.0, (self.end - self.start).total_seconds())


@dataclass(frozen=True)
class TenantState:
    """What a decision needs to know of a tenant besides its usage."""

    tenant_id: str
    plan: Plan
    #: Instances the tenant runs now (its instance rows).
    instances: int
    #: The workflow that owns the tenant now, if any: no action starts while one does.
    busy_with: str | None = None
    #: When the tenant's last autoscale action started, and by which rule.
    last_action_at: dt.datetime | None = None
    last_action_rule: str | None = None


@dataclass(frozen=True)
class Decision:
    """What one rule decided: an action (or ``none``), why, and the inputs it saw."""

    action: str
    reason: str
    inputs: dict[str, Any]
    #: For instance actions, the count to scale to.
    instances: int | None = None
    #: For plan actions, the plan to move to.
    target_plan: str | None = None


def resolve_rules(plan: Plan, meta: Mapping[str, Any]) -> tuple[list[AutoscaleRule], list[str]]:
    """The tenant's effective rules (the plan's, overridden by name by ``meta["autoscale"]``).

    ``meta["autoscale"]`` is a list of rules, or that list as a JSON string (tenant metadata
    given at sign-up holds only scalars). Invalid tenant rules are left out and described
    in the second element, so one bad rule never stops the others.
    """
    rules = {rule.name: rule for rule in plan.autoscale}
    raw = meta.get("autoscale")
    if raw is None:
        return list(rules.values()), []
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
        own = _RULES.validate_python(data)
    except (ValueError, ValidationError) as exc:
        return list(rules.values()), [f"metadata.autoscale is invalid: {exc}"[:500]]
    for rule in own:
        rules[rule.name] = rule
    return list(rules.values()), []


def lookback(rule: AutoscaleRule, stabilization: float) -> float:
    """How many seconds of usage a decision on ``rule`` reads."""
    return max(rule.window, stabilization) if rule.scale_down else rule.window


def _capacity(metric: str, plan: Plan, instances: int) -> float | None:
    """What 100% is: CPU cores or memory bytes of all instances; ``None`` for a rate."""
    if metric == "cpu_utilization":
        return plan.cpu_cores * instances if plan.cpu_cores else None
    if metric == "memory_utilization":
        return plan.memory_gb * GIB * instances if plan.memory_gb else None
    return None


def measure(metric: str, plan: Plan, instances: int, windows: Iterable[UsageWindow]) -> float:
    """The metric over ``windows``: a utilisation in % of the plan's quota, or requests/s.

    Rates divide by the seconds the rows cover, not the nominal window, so a window with a
    missed metering run is neither diluted nor inflated.
    """
    rows = list(windows)
    covered = sum(w.seconds for w in rows)
    if covered <= 0:
        return 0.0
    if metric == "memory_utilization":
        # memory_bytes rows are time-weighted means: weigh them by their window's length.
        amount = sum(w.value * w.seconds for w in rows) / covered
    else:
        # cpu_seconds and requests rows are deltas: their sum over the time is a rate.
        amount = sum(w.value for w in rows) / covered
    capacity = _capacity(metric, plan, instances)
    if capacity is None:
        return amount
    return amount / capacity * 100.0


def _fmt(metric: str, value: float) -> str:
    if metric == "requests_per_second":
        return f"{value:.2f}/s"
    return f"{value:.1f}%"


def _fmt_threshold(metric: str, value: float) -> str:
    return f"{value:g}/s" if metric == "requests_per_second" else f"{value:g}%"


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _held_for(
    rule: AutoscaleRule, state: TenantState, windows: list[UsageWindow], now: dt.datetime
) -> float:
    """Seconds the condition has held without a break, going back from the newest row."""
    since: dt.datetime | None = None
    for window in sorted(windows, key=lambda w: w.start, reverse=True):
        value = measure(rule.metric, state.plan, state.instances, [window])
        if not _met(rule, value):
            break
        since = window.start
    return 0.0 if since is None else (now - since).total_seconds()


def _met(rule: AutoscaleRule, value: float) -> bool:
    return value > rule.threshold if rule.comparison == "above" else value < rule.threshold


def _bounds(rule: AutoscaleRule, state: TenantState, plans: Mapping[str, Plan]) -> str | None:
    """Why the action cannot go further (a quota, a floor, the target plan), or ``None``."""
    plan = state.plan
    if rule.action == "add_instance":
        if plan.max_instances is not None and state.instances >= plan.max_instances:
            return f"no action: at max_instances {plan.max_instances}"
    elif rule.action == "remove_instance":
        if state.instances <= plan.instances:
            return f"no action: at min instances {plan.instances} (plan {plan.name})"
    else:
        target = plans.get(rule.target_plan or "")
        if target is None:
            return f"no action: target plan {rule.target_plan!r} is not in the catalog"
        if target.name == plan.name:
            return f"no action: already on plan {plan.name}"
        if target.max_instances is not None and state.instances > target.max_instances:
            return (
                f"no action: {state.instances} instances exceed plan {target.name}'s "
                f"max_instances {target.max_instances}"
            )
    return None


def _no_action(reason: str, inputs: dict[str, Any]) -> Decision:
    """A decision to do nothing, with the reason an operator reads."""
    return Decision(action=NO_ACTION, reason=reason, inputs=inputs)


def _inputs(
    rule: AutoscaleRule,
    state: TenantState,
    recent: list[UsageWindow],
    now: dt.datetime,
    cooldown: float,
    stabilization: float,
) -> dict[str, Any]:
    """What a decision saw, recorded with it so an operator can tell why it went that way."""
    inputs: dict[str, Any] = {
        "metric": rule.metric,
        "source_metric": SOURCE_METRICS[rule.metric],
        "comparison": rule.comparison,
        "threshold": rule.threshold,
        "window": rule.window,
        "samples": len(recent),
        "covered_seconds": round(sum(w.seconds for w in recent), 3),
        "plan": state.plan.name,
        "instances": state.instances,
        "cooldown": cooldown,
        "last_action_at": _iso(state.last_action_at),
        "last_action_rule": state.last_action_rule,
        "now": now.isoformat(),
    }
    if rule.scale_down:
        inputs["stabilization"] = stabilization
    return inputs


def _unmeasurable(rule: AutoscaleRule, state: TenantState, recent: list[UsageWindow]) -> str | None:
    """Why the rule's metric cannot be measured for the tenant now, or ``None``."""
    if rule.metric != "requests_per_second":
        if state.instances <= 0:
            return "no action: the tenant has no instances of its own"
        if _capacity(rule.metric, state.plan, state.instances) is None:
            resource = "cpu_cores" if rule.metric == "cpu_utilization" else "memory_gb"
            return f"no action: plan {state.plan.name} sets no {resource} quota"
    if not recent:
        return f"no action: no usage data in the last {rule.window:g} s"
    return None


def _unmet_reason(rule: AutoscaleRule, value: float) -> str:
    """The reason of a rule whose condition does not hold: the value on the wrong side."""
    side = "below" if rule.comparison == "above" else "above"
    sign = "≤" if rule.comparison == "above" else "≥"
    shown, limit = _fmt(rule.metric, value), _fmt_threshold(rule.metric, rule.threshold)
    return (
        f"no action: {side} threshold ({rule.metric} {shown} {sign} {limit} over {rule.window:g} s)"
    )


def _action(
    rule: AutoscaleRule, state: TenantState, value: float, held: float, inputs: dict[str, Any]
) -> Decision:
    """The rule's action, its condition (held for ``held`` seconds) as the reason."""
    sign = ">" if rule.comparison == "above" else "<"
    shown, limit = _fmt(rule.metric, value), _fmt_threshold(rule.metric, rule.threshold)
    condition = f"{rule.metric} {shown} {sign} {limit} for {held:.0f} s"
    if rule.action in ("add_instance", "remove_instance"):
        count = state.instances + (1 if rule.action == "add_instance" else -1)
        return Decision(
            action=rule.action,
            reason=f"{condition}: {rule.action} {state.instances} → {count}",
            inputs=inputs,
            instances=count,
        )
    return Decision(
        action=rule.action,
        reason=f"{condition}: {rule.action} {state.plan.name} → {rule.target_plan}",
        inputs=inputs,
        target_plan=rule.target_plan,
    )


def decide(
    rule: AutoscaleRule,
    state: TenantState,
    windows: Iterable[UsageWindow],
    *,
    now: dt.datetime,
    plans: Mapping[str, Plan],
    default_cooldown: float,
    default_stabilization: float,
) -> Decision:
    """What ``rule`` does for the tenant now, given its usage rows of the rule's metric.

    ``windows`` may reach back further than the rule's window (the stabilization window
    of a scale-down); rows are used where they overlap the part being checked. The checks
    run in order (measurable, over the threshold, held, out of cooldown, within bounds,
    tenant free) and the first that fails is the reason nothing is done.
    """
    cooldown = default_cooldown if rule.cooldown is None else rule.cooldown
    stabilization = default_stabilization if rule.stabilization is None else rule.stabilization
    rows = [w for w in windows if w.start < now]
    recent = [w for w in rows if w.end > now - dt.timedelta(seconds=rule.window)]
    inputs = _inputs(rule, state, recent, now, cooldown, stabilization)
    unmeasurable = _unmeasurable(rule, state, recent)
    if unmeasurable is not None:
        return _no_action(unmeasurable, inputs)
    value = measure(rule.metric, state.plan, state.instances, recent)
    inputs["value"] = round(value, 4)
    if not _met(rule, value):
        return _no_action(_unmet_reason(rule, value), inputs)
    held = float(rule.window)
    if rule.scale_down:
        held = _held_for(rule, state, rows, now)
        inputs["held_seconds"] = round(held, 3)
        if held < stabilization:
            limit = _fmt_threshold(rule.metric, rule.threshold)
            return _no_action(
                f"no action: {rule.metric} {rule.comparison} {limit} for only {held:.0f} s of "
                f"the {stabilization:g} s stabilization window",
                inputs,
            )
    if state.last_action_at is not None:
        until = state.last_action_at + dt.timedelta(seconds=cooldown)
        inputs["cooldown_until"] = until.isoformat()
        if now < until:
            return _no_action(
                f"no action: in cooldown until {until.isoformat(timespec='seconds')} "
                f"(last action by rule {state.last_action_rule})",
                inputs,
            )
    blocked = _bounds(rule, state, plans)
    if blocked is None and state.busy_with is not None:
        blocked = f"no action: tenant busy with workflow {state.busy_with}"
    if blocked is not None:
        return _no_action(blocked, inputs)
    return _action(rule, state, value, held, inputs)
