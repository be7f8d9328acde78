"""The ``blue_green`` strategy: a full preview stack, checked, then one switch of all traffic.

As Argo Rollouts' blue-green: the new stack (the canary group, as many instances as the
stable one) is reachable only by a preview header until it is promoted; a pre-promotion
analysis runs against it; traffic switches in one step; an optional post-promotion analysis
runs against it while the old stack stays warm for ``scale_down_delay_seconds`` (a quick
way back), then the promotion completes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from plugins.strategies._config import (
    RouteMatch,
    Stages,
    StrategyBase,
    StrategyConfig,
    read_config,
)
from schemas.delivery import AnalysisConfig

if TYPE_CHECKING:
    from schemas.plugins import DeploymentSpec, StagePlan

__all__ = ["BlueGreen", "BlueGreenConfig"]


class BlueGreenConfig(StrategyConfig):
    """Argo's blue-green settings, in seconds."""

    #: Requests with this header (and ``preview_value``) reach the preview stack.
    preview_header: str = Field(default="X-Cul8er-Preview", pattern=r"^[A-Za-z0-9-]{1,64}$")
    preview_value: str = Field(default="true", pattern=r"^[A-Za-z0-9._-]{1,128}$")
    #: Gate against the preview stack before the switch (``None``: none).
    pre_promotion_analysis: AnalysisConfig | None = AnalysisConfig()
    #: Switch this long after the pre-promotion analysis (0: at once); ``None``: wait for a
    #: person to promote (Argo's ``autoPromotionEnabled: false``).
    auto_promotion_seconds: float | None = Field(default=None, ge=0)
    #: Gate against the new stack once it takes all traffic (``None``: none).
    post_promotion_analysis: AnalysisConfig | None = None
    #: How long the old stack stays up after the switch (Argo's default: 30).
    scale_down_delay_seconds: float = Field(default=30, ge=0)


class BlueGreen(StrategyBase):
    """``create-preview``, ``route-preview``, ``pre-promotion-analysis``, a pause, ``switch``.

    Then ``post-promotion-analysis`` when set, ``scale-down-delay`` and ``promote``. The
    pause is ``await-promotion`` (until a person promotes) by default, ``auto-promotion``
    with ``auto_promotion_seconds``.
    """

    def plan(self, deployment: DeploymentSpec) -> StagePlan:
        """The stages; ``ValidationFailedError`` naming a bad ``strategy_config`` field."""
        config = read_config(BlueGreenConfig, deployment.config)
        stages = Stages()
        stages.create_group(None, name="create-preview")
        stages.route(
            RouteMatch(header=config.preview_header, value=config.preview_value),
            name="route-preview",
        )
        if config.pre_promotion_analysis is not None:
            stages.analysis(config.pre_promotion_analysis, "pre-promotion-analysis")
        if config.auto_promotion_seconds is None:
            stages.pause(None, "await-promotion")
        elif config.auto_promotion_seconds > 0:
            stages.pause(config.auto_promotion_seconds, "auto-promotion")
        stages.set_weight(100, name="switch")
        if config.post_promotion_analysis is not None:
            stages.analysis(config.post_promotion_analysis, "post-promotion-analysis")
        if config.scale_down_delay_seconds > 0:
            stages.pause(config.scale_down_delay_seconds, "scale-down-delay")
        return stages.promote()
