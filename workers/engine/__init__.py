"""The workflow engine: the ledger, workflow declarations, the step and public task bases.

Also the engine's event hook (:mod:`workers.engine.events`), takeover of abandoned steps, and
the instance naming and probe helpers that steps and provisioners share. Built on the runtime.
"""

__all__: list[str] = []
