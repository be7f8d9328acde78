"""Plugin call outcomes: counted in memory, added up in ``plugin_call_stats`` by every process."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from schemas.events import Event
from workers.pluginhost.callstats import CallStats, read
from workers.pluginhost.tenancy import tenant_of
from workers.runtime.db import session_scope
from workers.runtime.settings import Settings


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_flushes_from_two_processes_add_up_per_version_and_tenant(
    process_settings: Callable[..., Settings], database: str
) -> None:
    process_settings(database, plugin_stats_window="60")
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    # Two processes' counters (each flushes its own)
    first, second = CallStats(window=60, every=3600), CallStats(window=60, every=3600)
    for ms in (2.0, 4.0):
        first.record("gateway", "1.1.0", "shop-01", ok=True, ms=ms)
    first.record("gateway", "1.1.0", "shop-01", ok=False, ms=9.0)
    second.record("gateway", "1.1.0", "shop-01", ok=True, ms=1.0)
    second.record("gateway", "1.0.0", "shop-02", ok=True, ms=3.0)
    assert first.flush() == 1 and second.flush() == 2
    # A second flush with nothing new writes nothing
    assert first.flush() == 0
    with session_scope() as session:
        new = read(session, "gateway", "1.1.0", None, since)
        old = read(session, "gateway", "1.0.0", ["shop-02"], since)
        other_tenant = read(session, "gateway", "1.0.0", ["shop-01"], since)
    assert set(new) == {"shop-01"}
    assert (new["shop-01"].calls, new["shop-01"].errors) == (4, 1)
    assert new["shop-01"].latency_ms_sum == pytest.approx(16.0)
    assert new["shop-01"].latency_ms_max == pytest.approx(9.0)
    assert old["shop-02"].calls == 1 and other_tenant == {}


def test_the_tenant_of_a_call_is_found_wherever_its_arguments_carry_it() -> None:
    event = Event(event_type="workflow.started", tenant_id="shop-07")
    assert tenant_of({"tenant_id": "shop-01"}) == "shop-01"
    assert tenant_of({"event": event}) == "shop-07"
    assert tenant_of({"metric": type("M", (), {"labels": {"tenant_id": "shop-09"}})()}) == "shop-09"
    assert tenant_of({"event": Event(event_type="workflow.started")}) is None
    assert tenant_of({}) is None
