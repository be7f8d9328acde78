"""Built-in load balancers: where a tenant's traffic enters and how it is split.

``HAProxy`` is imported on first access, so that running
``python -m plugins.load_balancers.haproxy serve`` does not import the module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plugins.load_balancers.haproxy import HAProxy

__all__ = ["HAProxy"]


def __getattr__(name: str) -> Any:
    """Import ``HAProxy`` lazily (PEP 562)."""
    if name == "HAProxy":
        return importlib.import_module("plugins.load_balancers.haproxy").HAProxy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
