"""What the engine's unit tests share: a real Redis broker to read, and a worker's delivery.

The application is pointed at Redis on 127.0.0.1:6379 (database ``REDIS_DB``, every key under
a prefix of the test's own), so what a task sends can be read back from the queues, and a
message taken from a queue runs through Celery's own worker request (``Request.execute``):
the tracer, the chain, retries and results behave as in a worker, without a worker process.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import redis
from celery import Celery
from celery.worker.request import Request
from kombu.message import Message

from tests.conftest import require
from workers.runtime import liveness
from workers.runtime.app import app
from workers.runtime.settings import Settings

T = TypeVar("T")

#: Outside the databases the stack fixtures take (4-15); keys are prefixed per test besides.
REDIS_DB = 3
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"

#: The app's settings a private broker replaces, and puts back afterwards.
_BROKER_KEYS = (
    "broker_url",
    "result_backend",
    "broker_transport_options",
    "result_backend_transport_options",
)


@dataclass(frozen=True)
class Sent:
    """A message waiting in a queue, decoded."""

    queue: str
    task: str
    id: str
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    #: The chain's remaining signatures, last one first (as Celery carries them).
    chain: list[dict[str, Any]]

    @property
    def eta(self) -> dt.datetime | None:
        eta = self.headers.get("eta")
        return dt.datetime.fromisoformat(eta) if eta else None

    @property
    def chain_tasks(self) -> list[str]:
        """The tasks this message's chain sends after it, in order."""
        return [sig["task"] for sig in reversed(self.chain)]


def _reset_connections(app: Celery) -> None:
    # Celery caches its connection pool, producer pool and (per thread) result backend on
    # first use; a changed broker URL only takes effect once they are dropped.
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    app._local.__dict__.pop("backend", None)


class Broker:
    """The app's broker for one test: read what was sent, deliver it as a worker would."""

    def __init__(self, app: Celery, prefix: str) -> None:
        self.app = app
        self.prefix = prefix
        self.client = redis.Redis.from_url(REDIS_URL)

    def _queues(self) -> list[str]:
        found = []
        for key in self.client.scan_iter(match=f"{self.prefix}*"):
            name = key.decode()[len(self.prefix) :]
            if not name.startswith("_kombu") and self.client.type(key) == b"list":
                found.append(name)
        return sorted(found)

    def sent(self) -> list[Sent]:
        """Every message waiting in any queue, oldest first per queue (nothing is taken)."""
        messages = []
        for queue in self._queues():
            # kombu pushes on the left and pops on the right: the oldest is last.
            for raw in reversed(self.client.lrange(f"{self.prefix}{queue}", 0, -1)):
                envelope = json.loads(raw)
                _args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
                headers = envelope["headers"]
                messages.append(
                    Sent(
                        queue=queue,
                        task=headers["task"],
                        id=headers["id"],
                        kwargs=kwargs,
                        headers=headers,
                        chain=embed.get("chain") or [],
                    )
                )
        return messages

    def take(self, task: str | None = None) -> Message:
        """Take the oldest waiting message (of ``task``, when named) off its queue."""
        for queue in self._queues():
            key = f"{self.prefix}{queue}"
            for raw in reversed(self.client.lrange(key, 0, -1)):
                payload = json.loads(raw)
                if task is not None and payload["headers"]["task"] != task:
                    continue
                if self.client.lrem(key, -1, raw):
                    with self.app.connection_for_read() as conn:
                        channel = conn.default_channel
                        message: Message = channel.Message(payload, channel=channel)
                        return message
        raise AssertionError(f"no message of {task or 'any task'} waits; sent: {self.sent()}")

    def deliver(self, message: Message) -> Any:
        """Run ``message`` through Celery's worker request, as a worker's pool would."""
        request = Request(message, app=self.app, task=self.app.tasks[message.headers["task"]])
        return request.execute()

    def run_next(self, task: str | None = None) -> Any:
        """Take the oldest message (of ``task``) and deliver it."""
        return self.deliver(self.take(task))

    def result(self, task_id: str, timeout: float = 10) -> Any:
        """The stored result of ``task_id``."""
        return self.app.AsyncResult(task_id).get(timeout=timeout)

    def state(self, task_id: str) -> str:
        return str(self.app.AsyncResult(task_id).state)

    def clear(self) -> None:
        for key in self.client.scan_iter(match=f"{self.prefix}*"):
            self.client.delete(key)


@contextmanager
def private_broker(app: Celery) -> Iterator[Broker]:
    """Point ``app`` at the private Redis broker and result store; put it back afterwards."""
    prefix = f"cul8er-unit-{uuid.uuid4().hex[:12]}:"
    saved = {key: app.conf.get(key) for key in _BROKER_KEYS}
    _reset_connections(app)
    app.conf.update(
        broker_url=REDIS_URL,
        result_backend=REDIS_URL,
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
    )
    broker = Broker(app, prefix)
    try:
        yield broker
    finally:
        _reset_connections(app)
        app.conf.update(saved)
        broker.clear()


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """Run each call in its own thread, all released at once; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run, call) for call in calls]
        return [future.result(timeout=120) for future in futures]


# -- fixtures (the conftests of tests/unit/engine and tests/unit/tasks take them from here) --

DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=DATABASES)
def configure(
    request: pytest.FixtureRequest, process_settings: Callable[..., Settings]
) -> Iterator[Callable[..., Settings]]:
    """``configure(**settings)`` → this process's settings on the test's database (migrated).

    The process's heartbeat is stopped before and after: it beats against the database it
    first met, and each test has its own.
    """
    liveness.stop_current()

    def make(**values: str) -> Settings:
        return process_settings(request.param, **values)

    yield make
    liveness.stop_current()


@pytest.fixture
def broker() -> Iterator[Broker]:
    """The app on a private Redis broker and result store for this test."""
    require("redis")
    with private_broker(app) as made:
        yield made
