"""The ``rolling`` strategy: stable instances get the new release in place, batch by batch.

Batch sizes come from ``max_surge`` and ``max_unavailable`` as Kubernetes resolves them for
a Deployment: each is a count or a percentage of the tenant's instances, the surge rounded
up and the unavailable rounded down. Both may not be zero; when both round down to zero, one
instance at a time is unavailable (Kubernetes does the same).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Final

from pydantic import BeforeValidator, Field

from plugins.strategies._config import (
    Stages,
    StrategyBase,
    StrategyConfig,
    invalid,
    read_config,
)
from schemas.delivery import AnalysisConfig
from workers.plugin_api import ValidationFailedError

if TYPE_CHECKING:
    from schemas.plugins import DeploymentSpec, StagePlan

__all__ = ["Amount", "Rolling", "RollingConfig", "batches"]

_PERCENT: Final = re.compile(r"(100|[1-9]?[0-9])%")


def _amount(value: Any) -> int | str:
    """A count (0 or more) or a percentage such as ``"25%"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _PERCENT.fullmatch(value):
        return value
    raise ValueError("must be a count (0 or more) or a percentage from '0%' to '100%'")


#: A number of instances, or a percentage of the tenant's instances.
Amount = Annotated[int | str, BeforeValidator(_amount)]


def _is_zero(amount: int | str) -> bool:
    return amount in (0, "0%")


def _resolve(amount: int | str, total: int, *, round_up: bool) -> int:
    """``amount`` as a number of instances out of ``total``."""
    if isinstance(amount, int):
        return amount
    share = int(amount[:-1]) * total
    return -(-share // 100) if round_up else share // 100


class RollingConfig(StrategyConfig):
    """How many instances are replaced at once, and what gates each batch."""

    #: Extra instances of the new release while a batch is replaced (count or percentage).
    max_surge: Amount = 1
    #: Instances of a batch that may be out of service at once (count or percentage).
    max_unavailable: Amount = 0
    #: Gate run after each batch (``None``: none).
    analysis: AnalysisConfig | None = None
    #: Wait after each batch, in seconds (0: none; ``None``: until a person promotes).
    pause_seconds: float | None = Field(default=0, ge=0)

    def check(self) -> None:
        """Both amounts zero would never replace anything."""
        if _is_zero(self.max_surge) and _is_zero(self.max_unavailable):
            raise invalid(
                "max_surge and max_unavailable may not both be 0", "max_surge", "max_unavailable"
            )


def batches(instances: list[str], config: RollingConfig) -> list[tuple[list[str], int]]:
    """``instances`` cut into batches, each with the surge it is replaced under."""
    total = len(instances)
    surge = _resolve(config.max_surge, total, round_up=True)
    unavailable = _resolve(config.max_unavailable, total, round_up=False)
    size = max(1, surge + unavailable)
    return [
        (instances[start : start + size], min(surge, len(instances[start : start + size])))
        for start in range(0, total, size)
    ]


class Rolling(StrategyBase):
    """Per batch: ``replace-N``, then ``pause-N`` and ``analysis-N`` when set; ``promote``.

    With the defaults (surge 1, unavailable 0) one instance at a time is drained and given
    the new release while one extra instance of the new release carries its share, so
    capacity never drops.
    """

    def plan(self, deployment: DeploymentSpec) -> StagePlan:
        """The batches of ``deployment.instances``.

        Raises:
            ValidationFailedError: a bad ``strategy_config``, or a tenant without instances
                (there is nothing to roll: the plan would succeed without running anything).
        """
        config = read_config(RollingConfig, deployment.config)
        if not deployment.instances:
            message = "the tenant has no instances to replace; a rolling update needs one"
            raise ValidationFailedError(
                message, errors=[{"field": "instances", "message": message}]
            )
        stages = Stages()
        for n, (batch, surge) in enumerate(batches(list(deployment.instances), config), 1):
            stages.replace(batch, surge, f"replace-{n}")
            if config.pause_seconds is None or config.pause_seconds > 0:
                stages.pause(config.pause_seconds, f"pause-{n}")
            if config.analysis is not None:
                stages.analysis(config.analysis, f"analysis-{n}")
        return stages.promote()
