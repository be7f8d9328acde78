"""Fixtures: real stacks (broker + database + worker processes) per backend.

A service that is missing skips its tests on a laptop and fails them in CI.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.stack import (
    AMQP_URL,
    REDIS_URL,
    Stack,
    create_pg_database,
    drop_pg_database,
    instance_processes,
    reachable,
)
from workers.runtime.migrate import upgrade
from workers.runtime.settings import Settings, get_settings

IN_CI = bool(os.environ.get("CI"))
SERVICES = {"postgres": 5432, "redis": 6379, "rabbitmq": 5672}
#: Redis database indexes the tests own, one per live stack (each flushed before use), so the
#: workers of two stacks never take each other's messages. A stack claims its index with a
#: key in database 0 (SET NX with an expiry), so two test runs on one machine never share one.
_REDIS_DBS = range(4, 16)
_CLAIM_TTL = 3600


def _claim_key(db: int) -> str:
    return f"cul8er-tests:redis-db:{db}"


def claim_redis_db(wait: float = 120.0) -> int:
    """A Redis database index no other live stack (of this run or another) is using."""
    claims = redis.Redis(host="127.0.0.1", port=6379, db=0)
    owner = f"{os.getpid()}:{random.random()}"
    deadline = time.monotonic() + wait
    while True:
        for db in random.sample(list(_REDIS_DBS), len(_REDIS_DBS)):
            if claims.set(_claim_key(db), owner, nx=True, ex=_CLAIM_TTL):
                return db
        if time.monotonic() > deadline:
            raise RuntimeError(f"every test Redis database {_REDIS_DBS} is claimed")
        time.sleep(0.5)


def release_redis_db(url: str) -> None:
    db = int(url.rsplit("/", 1)[1])
    redis.Redis(host="127.0.0.1", port=6379, db=0).delete(_claim_key(db))


def require(service: str) -> None:
    """Skip (locally) or fail (in CI) when a service is not on its loopback port."""
    if reachable("127.0.0.1", SERVICES[service]):
        return
    message = (
        f"{service} is not running on 127.0.0.1:{SERVICES[service]} (scripts/setup.sh services)"
    )
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _cleanup_instances(data_dir: Path) -> None:
    from plugins.platforms.local import LocalPlatform

    platform = LocalPlatform(state_dir=data_dir / "instances")
    for info in platform.list_instances():
        platform.destroy_instance(info.name)
    for process in instance_processes(data_dir):
        with contextlib.suppress(Exception):
            process.kill()


def build_stack(kind: str, data_dir: Path) -> Stack:
    """A prepared stack of ``kind``: embedded, redis-postgres or rabbitmq."""
    if kind == "embedded":
        stack = Stack(kind, data_dir, f"sqlite:///{data_dir / 'cul8er.db'}", None)
    elif kind == "redis-postgres":
        require("redis")
        require("postgres")
        url = REDIS_URL.format(db=claim_redis_db())
        redis.Redis.from_url(url).flushdb()
        stack = Stack(kind, data_dir, create_pg_database(), url)
    elif kind == "rabbitmq":
        require("rabbitmq")
        require("postgres")
        stack = Stack(kind, data_dir, create_pg_database(), AMQP_URL, result_backend="rpc://")
    else:  # pragma: no cover
        raise ValueError(kind)
    stack.prepare()
    return stack


def teardown_stack(stack: Stack) -> None:
    """Stop processes, remove instances, drop the database, stop the embedded broker."""
    stack.stop()
    _cleanup_instances(stack.data_dir)
    haproxy = stack.extra_env.get("CUL8ER_HAPROXY_DIR")
    if haproxy:
        # Its folder lives outside the data dir (socket paths must be short): remove it too.
        shutil.rmtree(haproxy, ignore_errors=True)
    if stack.database_url.startswith("postgresql"):
        drop_pg_database(stack.database_url)
    stack.stop_broker()
    if stack.name == "redis-postgres" and stack.broker_url:
        release_redis_db(stack.broker_url)


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """``create(kind)`` → a fresh stack with no processes; everything is torn down after."""
    made: list[Stack] = []

    def create(kind: str = "embedded") -> Stack:
        stack = build_stack(kind, tmp_path / f"{kind}-{len(made)}")
        made.append(stack)
        return stack

    yield create
    for stack in made:
        teardown_stack(stack)


@pytest.fixture(scope="session", params=["embedded", "redis-postgres"])
def running_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A stack with a worker and beat running, shared by the lifecycle tests."""
    stack = build_stack(request.param, tmp_path_factory.mktemp(request.param))
    try:
        stack.start_worker("main", concurrency=2)
        stack.start_beat()
        yield stack
    finally:
        teardown_stack(stack)


@pytest.fixture
def process_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Settings]]:
    """``configure(database="sqlite"|"postgres", **settings)`` → this process's ``get_settings()``.

    Every ``CUL8ER_*`` variable of the environment is cleared first; the data dir is the
    test's own, the settings name an in-memory broker and result backend, and the database
    is migrated. Keyword arguments become ``CUL8ER_<NAME>`` variables. The Celery app keeps
    the broker it was configured with when first imported: a test that sends through it
    brings a broker of its own (``tests/unit/engine/harness.py``).
    """
    databases: list[str] = []

    def configure(database: str = "sqlite", **values: str) -> Settings:
        for name in [n for n in os.environ if n.startswith("CUL8ER_")]:
            monkeypatch.delenv(name)
        if database == "postgres":
            require("postgres")
            databases.append(create_pg_database())
            monkeypatch.setenv("CUL8ER_DATABASE_URL", databases[-1])
        monkeypatch.setenv("CUL8ER_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("CUL8ER_BROKER_URL", "memory://")
        monkeypatch.setenv("CUL8ER_RESULT_BACKEND", "cache+memory://")
        for name, value in values.items():
            monkeypatch.setenv(f"CUL8ER_{name.upper()}", value)
        get_settings.cache_clear()
        settings = get_settings()
        upgrade(settings.sqlalchemy_url)
        return settings

    yield configure
    get_settings.cache_clear()
    for url in databases:
        drop_pg_database(url)
