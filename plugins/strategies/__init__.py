"""Built-in deployment strategies: pure plans of stages, and the judge of their gates.

No strategy does I/O: each turns a deployment's ``strategy_config`` into stages the engine
carries out (docs/architecture.md §10), and judges each measurement of an analysis stage.
"""

from __future__ import annotations

from plugins.strategies.ab_test import ABTest, ABTestConfig
from plugins.strategies.blue_green import BlueGreen, BlueGreenConfig
from plugins.strategies.canary import Canary, CanaryConfig
from plugins.strategies.direct import Direct, DirectConfig
from plugins.strategies.rolling import Rolling, RollingConfig

__all__ = [
    "ABTest",
    "ABTestConfig",
    "BlueGreen",
    "BlueGreenConfig",
    "Canary",
    "CanaryConfig",
    "Direct",
    "DirectConfig",
    "Rolling",
    "RollingConfig",
]
