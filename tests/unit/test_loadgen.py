"""The test load generator, against real instance server processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.loadgen import LoadGenerator
from tests.unit.plugins.test_instance_server import instance_server


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """A factory: ``serve(*args)`` starts an instance server and returns its base URL."""
    with contextlib.ExitStack() as stack:
        made = 0

        def create(*args: str) -> str:
            nonlocal made
            made += 1
            endpoint = stack.enter_context(instance_server(tmp_path / f"server-{made}", *args))
            return f"http://{endpoint}"

        yield create


def test_a_steady_rate_is_held_without_failures(serve: Callable[..., str]) -> None:
    # Given a healthy server
    url = serve("--version", "v1")

    # When 25 requests a second are sent for 2 s
    with LoadGenerator(f"{url}/", rate=25) as load:
        time.sleep(2)

    # Then at least 20 a second went out and every one succeeded
    assert load.rate_achieved() >= 20
    assert load.count >= 40
    assert load.failures == []
    assert load.skipped == []
    assert load.by_version() == Counter({"v1": load.count})
    assert 0 < load.percentile(50) <= load.percentile(99) < 2


def test_failures_are_counted(serve: Callable[..., str]) -> None:
    # Given a server failing every other request
    url = serve("--error-rate", "0.5")

    # When loaded for a second
    with LoadGenerator(f"{url}/", rate=40) as load:
        time.sleep(1)

    # Then half of the requests (give or take the last in flight) are failures, all 500s
    assert load.count >= 20
    assert abs(len(load.failures) - load.count / 2) <= 1
    assert {record.status for record in load.failures} == {500}
    assert sum(load.by_version().values()) == load.count - len(load.failures)


def test_by_version_counts_successes_per_version(serve: Callable[..., str]) -> None:
    # Given two servers of two versions, loaded at once
    old, new = serve("--version", "v1"), serve("--version", "v2")
    with LoadGenerator(f"{old}/", rate=20) as a, LoadGenerator(f"{new}/version", rate=10) as b:
        time.sleep(1)

    # Then each names its version, from the header (and /version from its body too)
    assert set(a.by_version()) == {"v1"}
    assert set(b.by_version()) == {"v2"}
    assert a.by_version()["v1"] == a.count


def test_window_and_percentile_follow_latency(serve: Callable[..., str]) -> None:
    # Given a server answering / after 100 ms
    url = serve("--latency-ms", "100")

    # When loaded, and a window is taken around the middle of the run
    with LoadGenerator(f"{url}/", rate=20) as load:
        time.sleep(0.5)
        t0 = time.monotonic()
        time.sleep(0.5)
        t1 = time.monotonic()
        time.sleep(0.3)

    # Then the window holds only requests sent in it, and latency is at least 100 ms
    middle = load.window(t0, t1)
    assert 5 <= len(middle) <= 15
    assert all(t0 <= record.sent_at < t1 for record in middle)
    assert load.percentile(0) >= 0.1
    assert load.failures == []


def test_a_full_pool_skips_instead_of_queueing(serve: Callable[..., str]) -> None:
    # Given a slow server and a single worker
    url = serve("--latency-ms", "300")

    # When 20 requests a second are due
    with LoadGenerator(f"{url}/", rate=20, workers=1) as load:
        time.sleep(1)

    # Then most are skipped, not queued, and the few sent succeeded
    assert 2 <= load.count <= 5
    assert len(load.skipped) >= 10
    assert load.failures == []
    assert all(record.status is None for record in load.skipped)


def test_an_unreachable_target_is_a_failure_with_the_exception(tmp_path: Path) -> None:
    # Given a port nothing listens on (a server's, once stopped)
    with instance_server(tmp_path / "gone") as endpoint:
        pass

    # When loaded
    with LoadGenerator(f"http://{endpoint}/", rate=10, timeout=1) as load:
        time.sleep(0.35)

    # Then every request is a failure carrying the exception text
    assert load.count >= 3
    assert len(load.failures) == load.count
    assert all("ConnectionRefusedError" in (record.error or "") for record in load.failures)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.78.0.5:8080/",
        "http://172.17.0.2/",
        "http://example.com/",
        "http://localhost:8080/",
        "https://127.0.0.1/",
        "ftp://127.0.0.1/",
    ],
)
def test_a_non_loopback_target_is_refused(url: str) -> None:
    # Given a target off loopback (or not plain http) / When a generator is made / Then ValueError
    with pytest.raises(ValueError):
        LoadGenerator(url)


def test_a_generator_runs_once(serve: Callable[..., str]) -> None:
    # Given a generator that ran / When started again / Then RuntimeError
    load = LoadGenerator(f"{serve()}/", rate=5)
    load.start()
    load.stop()
    load.stop()  # stopping twice is harmless
    with pytest.raises(RuntimeError):
        load.start()
