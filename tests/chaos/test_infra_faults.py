"""Provisions survive their infrastructure failing under them: the broker restarted empty,
and every database connection cut, while ten tenants are being provisioned at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos._faults import (
    RedisServer,
    assert_provisioned_once,
    deprovision_all,
    describe_unfinished,
    ledger_figures,
    log_counts,
    own_stack,
    running_steps,
    seeded_random,
    start_provisions,
    terminate_backends,
    until,
    wait_runs,
)
from tests.stack import Stack
from workers.runtime.models import utcnow

pytestmark = pytest.mark.integration

#: Half the tenants boot for 4 s, so steps are in flight whenever the fault strikes.
PLANS = ["slowboot", "free"] * 5
#: Log events that tell which recovery paths a fault took.
RECOVERY_EVENTS = (
    "workflow_stalled",
    "step_taken_over",
    "step_retrying",
    "step_claim_failed",
    "step_completion_refused",
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _wait_for_steps_in_flight(stack: Stack, run_ids: list[str], at_least: int = 2) -> list[str]:
    found: list[str] = []

    def busy() -> bool:
        nonlocal found
        found = running_steps(stack, run_ids)
        return len(found) >= at_least

    assert until(busy, timeout=60, interval=0.05), f"no steps ran; see {stack.data_dir}"
    return found


@pytest.mark.timeout(360)
def test_redis_restarted_empty_during_ten_provisions(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    rng = seeded_random("redis-restart")
    with own_stack(tmp_path / "stack", redis_server.url(0)) as stack:
        # Given two workers (two processes each) and beat on a Redis of the test's own
        stack.start_worker("a", concurrency=2)
        stack.start_worker("b", concurrency=2)
        stack.start_beat()
        # and ten provisions sent at once, half of them slow to boot
        provisions = start_provisions(stack, PLANS, prefix="r")
        run_ids = [p.run_id for p in provisions]
        in_flight = _wait_for_steps_in_flight(stack, run_ids)

        # When Redis is killed while those steps run, and comes back empty after 2-3 s
        redis_server.stop()
        down_for = rng.uniform(2.0, 3.0)
        time.sleep(down_for)
        redis_server.start()
        back = utcnow()

        # Then every provision succeeds
        finished = wait_runs(stack, run_ids, timeout=180)
        assert set(finished.status.values()) == {"succeeded"}, describe_unfinished(stack, finished)
        figures = {**ledger_figures(stack, run_ids), **log_counts(stack, *RECOVERY_EVENTS)}
        recovery = (finished.last_end - back).total_seconds()
        print(
            f"[redis-restart] killed with {len(in_flight)} steps running {sorted(in_flight)}, "
            f"down {down_for:.1f} s; last workflow ended {recovery:.1f} s after Redis came back; "
            f"{figures}"
        )
        # And nothing was made twice: one instance row and process, subnet and store each
        assert_provisioned_once(stack, provisions)

        # And after deprovisioning no instance process is left behind
        deprovision_all(stack, provisions)


@pytest.mark.timeout(360)
def test_database_connections_killed_during_ten_provisions(
    stack_factory: Callable[..., Stack],
) -> None:
    rng = seeded_random("pg-kill")
    # Given two workers (two processes each) and beat on Redis and PostgreSQL
    stack = stack_factory("redis-postgres")
    stack.start_worker("a", concurrency=2)
    stack.start_worker("b", concurrency=2)
    stack.start_beat()
    # and ten provisions sent at once, half of them slow to boot
    provisions = start_provisions(stack, PLANS, prefix="p")
    run_ids = [p.run_id for p in provisions]
    in_flight = _wait_for_steps_in_flight(stack, run_ids)

    # When every connection to the database is terminated, 3 to 5 times a second apart
    rounds = rng.randint(3, 5)
    killed = []
    for n in range(rounds):
        if n:
            time.sleep(1.0)
        killed.append(terminate_backends(stack.database_url))
    last_kill = utcnow()

    # Then every provision succeeds
    finished = wait_runs(stack, run_ids, timeout=180)
    assert set(finished.status.values()) == {"succeeded"}, describe_unfinished(stack, finished)
    figures = {**ledger_figures(stack, run_ids), **log_counts(stack, *RECOVERY_EVENTS)}
    recovery = (finished.last_end - last_kill).total_seconds()
    print(
        f"[pg-kill] {rounds} rounds terminated {killed} connections, the first with "
        f"{len(in_flight)} steps running {sorted(in_flight)}; last workflow ended "
        f"{recovery:.1f} s after the last kill; {figures}"
    )
    assert sum(killed) > 0  # the fault did strike
    # And nothing was made twice: one instance row and process, subnet and store each
    assert_provisioned_once(stack, provisions)

    # And after deprovisioning no instance process is left behind
    deprovision_all(stack, provisions)
