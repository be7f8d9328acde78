"""The ``ab_test`` strategy: a header or cookie picks the new release; promote on analysis.

As Flagger's A/B testing: only requests that match reach the new release, with no weight
shift before the promotion; ``iterations`` (Flagger's word) is the gate's measurement count.
With neither ``header`` nor ``cookie`` given, the match is the header ``X-Canary: always``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

from pydantic import Field

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

__all__ = ["ABTest", "ABTestConfig", "DEFAULT_HEADER"]

#: The header matched when the config names neither a header nor a cookie.
DEFAULT_HEADER: Final = "X-Canary"


class ABTestConfig(StrategyConfig):
    """Which requests reach the new release, and how it is judged before promotion."""

    #: Match on this header (default ``X-Canary`` when no cookie is given either) ...
    header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    #: ... or on this cookie; not both.
    cookie: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    #: The header's or cookie's value that picks the new release.
    value: str = Field(default="always", pattern=r"^[A-Za-z0-9._-]{1,128}$")
    #: The gate against the new release's instances.
    analysis: AnalysisConfig = AnalysisConfig(count=5)
    #: Flagger's ``iterations``: the gate's measurement count (overrides ``analysis.count``).
    iterations: int | None = Field(default=None, ge=1, le=1000)
    #: ``manual``: after a passing analysis, wait for a person to promote.
    promote: Literal["auto", "manual"] = "auto"
    #: Instances of the new release (``None``: as many as the stable group).
    canary_instances: int | None = Field(default=1, ge=1)

    def check(self) -> None:
        """A header or a cookie, not both; one measurement count, not two."""
        if self.header is not None and self.cookie is not None:
            raise invalid("give a header or a cookie, not both", "header", "cookie")
        if (
            self.iterations is not None
            # The default gate's count of 5 is not the user's: only a given one can disagree.
            and "analysis" in self.model_fields_set
            and "count" in self.analysis.model_fields_set
            and self.analysis.count != self.iterations
        ):
            raise invalid(
                "iterations and analysis.count disagree; give one", "iterations", "analysis.count"
            )

    def match(self) -> RouteMatch:
        """The requests that reach the new release."""
        if self.cookie is not None:
            return RouteMatch(cookie=self.cookie, value=self.value)
        return RouteMatch(header=self.header or DEFAULT_HEADER, value=self.value)

    def gate(self) -> AnalysisConfig:
        """The analysis gate, with ``iterations`` as its count when given."""
        if self.iterations is None:
            return self.analysis
        return self.analysis.model_copy(update={"count": self.iterations})


class ABTest(StrategyBase):
    """``create-canary``, ``route-canary``, ``analysis``, ``await-promotion`` if manual, promote.

    Nothing but matching requests reaches the new release until ``promote`` moves all
    traffic to it.
    """

    def plan(self, deployment: DeploymentSpec) -> StagePlan:
        """The stages; ``ValidationFailedError`` naming a bad ``strategy_config`` field."""
        config = read_config(ABTestConfig, deployment.config)
        stages = Stages()
        stages.create_group(config.canary_instances)
        stages.route(config.match())
        stages.analysis(config.gate(), "analysis")
        if config.promote == "manual":
            stages.pause(None, "await-promotion")
        return stages.promote()
