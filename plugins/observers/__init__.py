"""Built-in observer plugins: where the app's events and metrics go (log, webhook, prometheus)."""

from __future__ import annotations

__all__: list[str] = []
