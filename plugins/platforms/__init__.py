"""Built-in platforms: where a tenant's instances run.

``LocalPlatform`` is imported on first access, so that running
``python -m plugins.platforms.instance_server`` stays light (stdlib only).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plugins.platforms.local import LocalPlatform

__all__ = ["LocalPlatform"]


def __getattr__(name: str) -> Any:
    """Import ``LocalPlatform`` lazily (PEP 562)."""
    if name == "LocalPlatform":
        return importlib.import_module("plugins.platforms.local").LocalPlatform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
