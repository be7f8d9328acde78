"""The economics: plans, metering, billing periods and pricing, quotas and autoscale rules.

Pure decisions and SQL over the runtime's models; it never calls a plugin itself (the tasks
hand it what it needs). Built on the engine and the runtime.
"""

__all__: list[str] = []
