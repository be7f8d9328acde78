"""Rate limits per subject and route class, on the real Redis (db 14) and in memory."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import require
from workers.api.ratelimit import (
    KEY_PREFIX,
    Decision,
    RateLimiter,
    default_storage_uri,
    limited,
)
from workers.runtime.embedded import EmbeddedRedis
from workers.runtime.errors import ConfigError, TransientError
from workers.runtime.settings import Settings

#: The Redis database these tests count in; they touch only keys of their own run.
REDIS_URL = "redis://127.0.0.1:6379/14"


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(data_dir=tmp_path, **values)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
        return
    require("redis")
    yield REDIS_URL


@pytest.fixture
def run_tag() -> Iterator[str]:
    tag = uuid.uuid4().hex
    yield tag
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{KEY_PREFIX}:*{tag}*"))
        if keys:
            client.delete(*keys)
    except redis.ConnectionError:
        pass
    finally:
        client.close()


def test_the_eleventh_call_in_a_window_of_ten_is_refused(
    tmp_path: Path, store: str, run_tag: str
) -> None:
    limiter = RateLimiter(settings(tmp_path, api_rate_write="10/minute"), storage_uri=store)
    subject = f"alice-{run_tag}"
    # When ten calls are made, each is allowed and the remaining budget counts down
    decisions = [limiter.check(subject, "write") for _ in range(10)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions] == list(range(9, -1, -1))
    assert {d.limit for d in decisions} == {10}
    assert 0 < decisions[0].reset_after <= 60
    assert "Retry-After" not in decisions[0].headers()
    # Then the eleventh is refused, with the RateLimit headers and a Retry-After
    refused = limiter.check(subject, "write")
    assert not refused.allowed and refused.remaining == 0
    headers = refused.headers()
    assert headers["RateLimit-Limit"] == "10"
    assert headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert 0 <= int(headers["RateLimit-Reset"]) <= 60
    # And the 429 answer is a rate_limited problem carrying them
    response = limited(refused)
    assert response.status_code == 429
    assert response.media_type == "application/problem+json"
    assert response.headers["Retry-After"] == headers["Retry-After"]
    assert response.headers["RateLimit-Remaining"] == "0"
    body = json.loads(bytes(response.body))
    assert body["code"] == "rate_limited" and body["status"] == 429
    assert body["type"] == "https://cul8er.dev/problems/rate_limited"


def test_subjects_and_route_classes_are_counted_apart(
    tmp_path: Path, store: str, run_tag: str
) -> None:
    limiter = RateLimiter(
        settings(tmp_path, api_rate_read="3/minute", api_rate_write="2/minute"),
        storage_uri=store,
    )
    alice, bob = f"alice-{run_tag}", f"bob-{run_tag}"
    # Given alice spent her whole write budget
    assert [limiter.check(alice, "write").allowed for _ in range(3)] == [True, True, False]
    # Then her reads and bob's writes are untouched
    assert [limiter.check(alice, "read").remaining for _ in range(3)] == [2, 1, 0]
    assert not limiter.check(alice, "read").allowed
    assert limiter.check(bob, "write").remaining == 1
    # And clearing alice's writes gives them back
    limiter.clear(alice, "write")
    assert limiter.check(alice, "write").allowed


def test_two_limiters_on_redis_share_one_count(tmp_path: Path, run_tag: str) -> None:
    require("redis")
    config = settings(tmp_path, api_rate_write="2/minute")
    first, second = RateLimiter(config, REDIS_URL), RateLimiter(config, REDIS_URL)
    subject = f"carol-{run_tag}"
    assert first.check(subject, "write").allowed
    assert second.check(subject, "write").remaining == 0
    assert not first.check(subject, "write").allowed


def test_an_unreachable_redis_refuses_with_a_transient_error(tmp_path: Path) -> None:
    # Port 1 on loopback: nothing listens there
    limiter = RateLimiter(settings(tmp_path), "redis://:s3cret-pass@127.0.0.1:1/0")
    with pytest.raises(TransientError, match="rate limit store"):
        limiter.check("dave", "read")


def test_the_store_follows_the_broker(tmp_path: Path) -> None:
    embedded = default_storage_uri(settings(tmp_path))
    assert embedded == f"redis+unix://{EmbeddedRedis(tmp_path).socket_path}"
    assert (
        default_storage_uri(settings(tmp_path, broker_url="redis://h:6379/3")) == "redis://h:6379/3"
    )
    assert (
        default_storage_uri(
            settings(tmp_path, broker_url="redis+socket:///run/r.sock?virtual_host=2")
        )
        == "redis+unix:///run/r.sock?db=2"
    )
    assert default_storage_uri(settings(tmp_path, broker_url="amqp://guest@h//")) == "memory://"


def test_bad_limits_and_stores_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_rate_read"):
        RateLimiter(settings(tmp_path, api_rate_read="lots"), "memory://")
    with pytest.raises(ConfigError, match="no rate limit store"):
        RateLimiter(settings(tmp_path), "bogus://x")


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    refused = Decision(allowed=False, limit=5, remaining=0, reset_after=0.2)
    assert refused.headers()["Retry-After"] == "1"
    assert Decision(allowed=False, limit=5, remaining=0, reset_after=12.01).retry_after == 13
