"""Built-in deployment strategies: pure plans of stages, and the judge of their gates.

No strategy does I/O: each turns a deployment's ``strategy_config`` into stages the engine
carries out (docs/architecture.md §10), and judges each measurement of an analysis stage.

Each name is imported on first access (PEP 562): loading one strategy plugin imports its
own module, not all five.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
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

#: Where each exported name lives.
_MODULES: Final = {
    "ABTest": "ab_test",
    "ABTestConfig": "ab_test",
    "BlueGreen": "blue_green",
    "BlueGreenConfig": "blue_green",
    "Canary": "canary",
    "CanaryConfig": "canary",
    "Direct": "direct",
    "DirectConfig": "direct",
    "Rolling": "rolling",
    "RollingConfig": "rolling",
}


def __getattr__(name: str) -> Any:
    """Import a strategy's module on first access to one of its names."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
