"""The ``canary`` strategy: traffic to the new release in weight steps, each paused and gated.

In Flagger's words (``initial_weight``, ``step_weight``, ``max_weight`` or explicit
``step_weights``) or Argo Rollouts' (explicit ``steps``). The product's default: 10 % first,
then +20 % per evaluation period (10, 30, 50, 70, 90, 100), each weight held
``interval_seconds`` then analysed. The last weight is always ``max_weight``, even when the
steps do not land on it, so a canary is never promoted before it was measured at its
highest weight (Flagger #189).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from plugins.strategies._config import (
    RouteMatch,
    Stages,
    StrategyBase,
    StrategyConfig,
    invalid,
    read_config,
)
from schemas.delivery import AnalysisConfig

if TYPE_CHECKING:
    from schemas.plugins import DeploymentSpec, StagePlan

__all__ = ["Canary", "CanaryConfig", "CanaryStep", "PauseStep", "weights"]

#: A share of traffic in percent.
Percent = Annotated[int, Field(ge=1, le=100)]

#: Fields that shape the generated steps: explicit ``steps`` replace them all.
_GENERATED = ("initial_weight", "step_weight", "max_weight", "interval_seconds", "analysis")


class PauseStep(BaseModel):
    """Argo's ``pause``: ``seconds``, or ``None`` (``{}``) until a person promotes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seconds: float | None = Field(default=None, ge=0)


class CanaryStep(BaseModel):
    """One of Argo's canary steps: exactly one of its fields is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    set_weight: int | None = Field(default=None, ge=0, le=100)
    pause: PauseStep | None = None
    #: A gate; ``{}`` is the default gate.
    analysis: AnalysisConfig | None = None
    set_header_route: RouteMatch | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "a step has exactly one of set_weight, pause, analysis, set_header_route"
            )
        return self


class CanaryConfig(StrategyConfig):
    """Weight steps (generated or explicit), their pauses and their gate."""

    #: The first weight, then +``step_weight`` per step up to ``max_weight``.
    initial_weight: Percent = 10
    step_weight: Percent = 20
    max_weight: Percent = 100
    #: Explicit weights, strictly increasing (replaces the three fields above).
    step_weights: list[Percent] | None = Field(default=None, min_length=1, max_length=100)
    #: Hold each weight this long before its analysis (0: no pause; ``None``: until a person
    #: promotes, at every step).
    interval_seconds: float | None = Field(default=10, ge=0)
    #: The gate after each pause (``None``: none).
    analysis: AnalysisConfig | None = AnalysisConfig()
    #: Instances of the new release (``None``: as many as the stable group).
    canary_instances: int | None = Field(default=1, ge=1)
    #: Argo-style explicit steps, replacing every generated one (and the fields above).
    steps: list[CanaryStep] | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("step_weights")
    @classmethod
    def _increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("weights must be strictly increasing")
        return value

    def check(self) -> None:
        """Fields that contradict each other, or that another field makes unused."""
        given = self.model_fields_set
        if self.steps is not None:
            unused = [f for f in (*_GENERATED, "step_weights") if f in given]
            if unused:
                raise invalid("not used with explicit steps; remove it", *unused)
        elif self.step_weights is not None:
            unused = [f for f in ("initial_weight", "step_weight", "max_weight") if f in given]
            if unused:
                raise invalid("not used with step_weights; remove it", *unused)
        elif self.initial_weight > self.max_weight:
            raise invalid(
                "initial_weight may not exceed max_weight", "initial_weight", "max_weight"
            )


def weights(config: CanaryConfig) -> list[int]:
    """The weights of the generated steps; the last one is always the highest wanted."""
    if config.step_weights is not None:
        return list(config.step_weights)
    result = list(range(config.initial_weight, config.max_weight, config.step_weight))
    # ``max_weight`` is reached exactly even when the steps skip over it (Flagger #189).
    return [*result, config.max_weight]


class Canary(StrategyBase):
    """``create-canary``, then per weight ``weight-W``, ``pause-W``, ``analysis-W``; ``promote``.

    The final ``promote`` moves all traffic, also when ``max_weight`` is below 100.
    """

    def plan(self, deployment: DeploymentSpec) -> StagePlan:
        """The stages; ``ValidationFailedError`` naming a bad ``strategy_config`` field."""
        config = read_config(CanaryConfig, deployment.config)
        stages = Stages()
        stages.create_group(config.canary_instances)
        if config.steps is not None:
            _explicit(stages, config.steps)
            return stages.promote()
        for weight in weights(config):
            stages.set_weight(weight)
            if config.interval_seconds is None or config.interval_seconds > 0:
                stages.pause(config.interval_seconds, f"pause-{weight}")
            if config.analysis is not None:
                stages.analysis(config.analysis, f"analysis-{weight}")
        return stages.promote()


def _explicit(stages: Stages, steps: list[CanaryStep]) -> None:
    """Argo-style steps as stages, named after the weight they follow."""
    weight = 0
    for step in steps:
        if step.set_weight is not None:
            weight = step.set_weight
            stages.set_weight(weight)
        elif step.pause is not None:
            stages.pause(step.pause.seconds, f"pause-{weight}")
        elif step.analysis is not None:
            stages.analysis(step.analysis, f"analysis-{weight}")
        elif step.set_header_route is not None:
            stages.route(step.set_header_route)
