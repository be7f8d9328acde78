"""Built-in secrets plugins: where ``${secret:path}`` values come from (env, file)."""

from __future__ import annotations

__all__: list[str] = []
