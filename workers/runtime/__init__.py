"""The runtime: the Celery app and what every process needs under it.

Settings, the database and its models, logging (with secret redaction), worker signals and
liveness, queues, errors, metrics, the embedded broker, beat slots and migrations. It imports
nothing from the other rooms.
"""

__all__: list[str] = []
