"""What the built-in strategies share: config reading, stage builders and the default judge.

A strategy reads the deployment's ``strategy_config`` into its own pydantic model with
:func:`read_config`; a bad value is a :class:`ValidationFailedError` whose errors name the
field as ``strategy_config.<path>``, so the caller sees which setting to fix. The stage
builders give every stage a readable name that is unique within its plan (:class:`Stages`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.delivery import AnalysisConfig
from schemas.plugins import AnalysisInput, Stage, StageAction, StagePlan, Verdict
from workers.plugin_api import ValidationFailedError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from workers.plugin_api import PluginContext

__all__ = [
    "CONFIG_FIELD",
    "RouteMatch",
    "Stages",
    "StrategyBase",
    "StrategyConfig",
    "invalid",
    "judge",
    "read_config",
]

#: The name a deployment's strategy config goes by in error messages and field paths.
CONFIG_FIELD: Final = "strategy_config"

#: At most this many problems are listed in one error.
_MAX_ERRORS: Final = 20

_DECISIONS: Final[dict[str, Literal["pass", "inconclusive", "fail"]]] = {
    "successful": "pass",
    "failed": "fail",
    "inconclusive": "inconclusive",
}

C = TypeVar("C", bound="StrategyConfig")


class StrategyConfig(BaseModel):
    """Base of every strategy's config: closed (an unknown key is an error) and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check(self) -> None:
        """Checks across fields, run after validation; raise :func:`invalid` to refuse."""


class RouteMatch(BaseModel):
    """Requests whose ``header`` (or ``cookie``) equals ``value``; exactly one of the two."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The patterns of ``schemas.plugins.HeaderRoute``: what a load balancer can match on.
    header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    cookie: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    value: str = Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("give exactly one of header or cookie")
        return self

    def params(self) -> dict[str, Any]:
        """The ``params`` of a ``route`` stage."""
        if self.header is not None:
            return {"header": self.header, "value": self.value}
        return {"cookie": self.cookie, "value": self.value}


def _field_path(data: Any, loc: Sequence[int | str]) -> str:
    """``strategy_config.<path>`` of an error location, up to the last place in the input.

    Pydantic's locations also name the union member or validator tried (``int``,
    ``function-after[...]``): those are not places a user can fix, so the path stops there.
    """
    parts = [CONFIG_FIELD]
    current = data
    for part in loc:
        if isinstance(current, dict) and isinstance(part, str):
            parts.append(part)
            if part not in current:
                break  # a missing (or unknown) field: the path ends at its name
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            parts.append(str(part))
            current = current[part]
        else:
            break
    return ".".join(parts)


def invalid(message: str, *fields: str) -> ValidationFailedError:
    """The error refusing a strategy config because of ``fields`` (paths inside the config)."""
    paths = [f"{CONFIG_FIELD}.{field}" for field in fields] or [CONFIG_FIELD]
    return ValidationFailedError(
        f"invalid {CONFIG_FIELD}: {', '.join(paths)}: {message}",
        errors=[{"field": path, "message": message} for path in paths],
    )


def read_config(model: type[C], config: Mapping[str, Any]) -> C:
    """``config`` (a deployment's ``strategy_config``) read into ``model`` and checked.

    Raises:
        ValidationFailedError: naming each bad field as ``strategy_config.<path>``.
    """
    data = dict(config)
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for err in exc.errors(include_input=False, include_url=False):
            message = err["msg"].removeprefix("Value error, ")
            errors.setdefault(_field_path(data, err["loc"]), message)
        listed = [{"field": f, "message": m} for f, m in list(errors.items())[:_MAX_ERRORS]]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in listed)
        raise ValidationFailedError(f"invalid {CONFIG_FIELD}: {summary}", errors=listed) from None
    parsed.check()
    return parsed


def judge(analysis: AnalysisInput) -> Verdict:
    """Judge one measurement of an ``analysis`` stage by its gate (``AnalysisConfig.judge``).

    Raises:
        ValidationFailedError: the stage is not an analysis, or its gate does not validate.
    """
    stage = analysis.stage
    if stage.action != "analysis":
        message = f"stage {stage.name!r} is a {stage.action} stage, not an analysis"
        raise ValidationFailedError(message, errors=[{"field": "stage", "message": message}])
    params = {key: value for key, value in stage.params.items() if key != "target"}
    try:
        gate = AnalysisConfig.model_validate(params)
    except ValidationError as exc:
        errors = [
            {
                "field": ".".join(["stage", "params", *(str(p) for p in err["loc"])]),
                "message": err["msg"],
            }
            for err in exc.errors(include_input=False, include_url=False)
        ][:_MAX_ERRORS]
        raise ValidationFailedError(
            f"stage {stage.name!r} holds an invalid analysis gate", errors=errors
        ) from None
    decision, reason = gate.judge(analysis.metrics)
    return Verdict(decision=_DECISIONS[decision], reason=reason)


class Stages:
    """A plan being built: each stage gets a readable name, unique within the plan."""

    def __init__(self) -> None:
        self._stages: list[Stage] = []
        self._names: set[str] = set()

    def _add(self, name: str, action: StageAction, **fields: Any) -> None:
        unique, n = name, 1
        while unique in self._names:
            n += 1
            unique = f"{name}-{n}"
        self._names.add(unique)
        self._stages.append(Stage(name=unique, action=action, **fields))

    def create_group(self, count: int | None, name: str = "create-canary") -> None:
        """Start ``count`` instances of the new release (``None``: as many as stable)."""
        self._add(name, "create_group", params={"count": count})

    def set_weight(self, weight: int, name: str | None = None) -> None:
        """Send ``weight`` percent of the traffic to the canary group."""
        self._add(name or f"weight-{weight}", "set_weight", weight=weight)

    def route(self, match: RouteMatch, name: str = "route-canary") -> None:
        """Send requests matching ``match`` to the canary group."""
        self._add(name, "route", params=match.params())

    def pause(self, seconds: float | None, name: str) -> None:
        """Wait ``seconds``, or until a person promotes when ``None``."""
        self._add(name, "pause", pause_seconds=seconds)

    def analysis(self, gate: AnalysisConfig, name: str) -> None:
        """Run the gate ``gate`` against the canary group."""
        self._add(name, "analysis", params={**gate.model_dump(mode="json"), "target": "canary"})

    def replace(self, instances: list[str], surge: int, name: str) -> None:
        """Give the stable ``instances`` the new release in place, ``surge`` extra meanwhile."""
        self._add(name, "replace", params={"instances": instances, "surge": surge})

    def promote(self) -> StagePlan:
        """End the plan with its one ``promote`` stage; the plan."""
        self._add("promote", "promote")
        return StagePlan(stages=self._stages)


class StrategyBase:
    """A built-in strategy: no config model of its own (it reads ``strategy_config``)."""

    def __init__(self, config: None = None, context: PluginContext | None = None) -> None:
        # The manifest names no config model: the registry passes None. What varies per
        # deployment comes in ``DeploymentSpec.config``.
        self.context = context

    def analyze(self, analysis: AnalysisInput) -> Verdict:
        """Judge one measurement of an ``analysis`` stage by the gate it carries."""
        return judge(analysis)
