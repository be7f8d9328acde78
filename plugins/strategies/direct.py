"""The ``direct`` strategy: the new release everywhere at once, behind a full surge, no gates."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plugins.strategies._config import Stages, StrategyBase, StrategyConfig, read_config

if TYPE_CHECKING:
    from schemas.plugins import DeploymentSpec, StagePlan

__all__ = ["Direct", "DirectConfig"]


class DirectConfig(StrategyConfig):
    """Nothing to set: ``strategy_config`` must be empty (an unknown key is an error)."""


class Direct(StrategyBase):
    """A full new group (as many instances as stable), all traffic to it, promote.

    Stages: ``create-canary`` (count ``None``), ``weight-100``, ``promote``. The old group
    keeps running until the new one is up and health-checked, so there is no downtime; there
    is no analysis, so a bad release is seen only by the engine's health checks.
    """

    def plan(self, deployment: DeploymentSpec) -> StagePlan:
        """The three stages; ``ValidationFailedError`` for any ``strategy_config`` key."""
        read_config(DirectConfig, deployment.config)
        stages = Stages()
        stages.create_group(None)
        stages.set_weight(100)
        return stages.promote()
