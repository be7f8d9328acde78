"""The context a plugin's factory receives (re-exported by :mod:`workers.plugin_api`).

A plugin module names a factory in its manifest (``"factory": "Plugin"``); cul8er
calls ``factory(config, context)`` with the validated config model (or ``None`` when
the plugin has none) and a :class:`PluginContext`. The object returned implements the
contract of the plugin's type (:mod:`workers.pluginhost.contracts`). It may define
``self_test(self) -> None``: raising there refuses the plugin (and a reload keeps the
previous version serving).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from pathlib import Path

    from workers.runtime.settings import Settings

__all__ = ["PluginContext"]


@dataclass(frozen=True)
class PluginContext:
    """A plugin's view of cul8er: its name, a folder of its own, a bound logger."""

    name: str
    version: str
    #: A folder only this plugin writes to (created on first use of the context).
    data_dir: Path
    #: cul8er's settings; built-in plugins read their engine settings here.
    settings: Settings

    @property
    def log(self) -> Any:
        """A structlog logger bound to the plugin's name and version."""
        return structlog.get_logger(f"plugins.{self.name}").bind(
            plugin=self.name, plugin_version=self.version
        )
