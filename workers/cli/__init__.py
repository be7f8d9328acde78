"""The ``cul8er`` command line: one module per command group, sharing one console."""

__all__: list[str] = []
