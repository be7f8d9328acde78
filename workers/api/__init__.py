"""The HTTP API (``/api/v1``): a thin door onto the public task contract (docs/architecture.md)."""

__all__: list[str] = []
