"""A/B comparisons of plugin versions, call tallies and cohort arithmetic (pure functions)."""

from __future__ import annotations

import math

import pytest

from workers.delivery.cohorts import Cohort, hash_order
from workers.delivery.statistics import compare
from workers.pluginhost.callstats import Tally


def tally(calls: int, errors: int, latency_ms: float, spread: float = 1.0) -> Tally:
    """``calls`` calls, the first ``errors`` failing, latencies around ``latency_ms``."""
    made = Tally()
    for i in range(calls):
        made.add(i >= errors, latency_ms + spread * ((i % 5) - 2))
    return made


def test_a_version_failing_far_more_often_fails_the_verdict_with_its_p_value() -> None:
    result = compare([tally(100, 30, 5.0) for _ in range(10)], [tally(100, 1, 5.0)] * 10)
    assert result["verdict"] == "failed"
    tests = {t["metric"]: t for t in result["tests"]}
    assert tests["error_rate"]["test"] == "Fisher's exact test, two-sided"
    assert tests["error_rate"]["result"] == "higher" and tests["error_rate"]["p_value"] < 1e-10
    assert tests["error_rate_per_tenant"]["test"] == "Mann-Whitney U test, two-sided"
    assert tests["error_rate_per_tenant"]["result"] == "higher"
    assert tests["latency_ms_avg"]["result"] == "same"
    assert "p = " in result["reason"]


def test_alike_versions_pass_and_a_slower_one_is_reported_slower() -> None:
    same = compare([tally(200, 2, 5.0)] * 10, [tally(200, 2, 5.0)] * 10)
    assert same["verdict"] == "successful"
    assert {t["result"] for t in same["tests"]} == {"same"}
    slower = compare([tally(200, 0, 9.0)] * 10, [tally(200, 0, 5.0)] * 10)
    latency = next(t for t in slower["tests"] if t["metric"] == "latency_ms_avg")
    assert latency["test"] == "Welch's t-test, two-sided" and latency["result"] == "higher"
    # Slower is reported, not failed: the verdict fails on errors only
    assert slower["verdict"] == "successful"


def test_no_calls_on_a_side_gives_no_p_value_and_few_tenants_no_rank_test() -> None:
    result = compare([tally(10, 0, 5.0)], [])
    tests = {t["metric"]: t for t in result["tests"]}
    assert tests["error_rate"]["p_value"] is None and tests["error_rate"]["result"] == "same"
    assert "error_rate_per_tenant" not in tests  # fewer than three tenants a side
    assert result["old"]["error_rate"] is None


def test_a_tally_keeps_the_moments_a_t_test_needs() -> None:
    made = Tally()
    for ok, ms in [(True, 2.0), (False, 4.0), (True, 6.0)]:
        made.add(ok, ms)
    assert (made.calls, made.errors, made.latency_ms_max) == (3, 1, 6.0)
    assert made.error_rate == pytest.approx(1 / 3)
    assert made.latency_ms_avg == pytest.approx(4.0)
    assert made.latency_ms_sd == pytest.approx(2.0)
    other = Tally()
    other.add(True, 10.0)
    made.merge(other)
    assert (made.calls, made.latency_ms_max) == (4, 10.0)
    assert math.isclose(made.latency_ms_avg, 5.5)


def test_tenants_move_in_one_order_whatever_order_they_are_given() -> None:
    tenants = [f"shop-{i:02d}" for i in range(20)]
    order = hash_order("gateway", tenants)
    assert hash_order("gateway", list(reversed(tenants))) == order
    assert sorted(order) == tenants and order != tenants
    assert hash_order("billing", tenants) != order  # each plugin its own order


@pytest.mark.parametrize(
    ("weight", "count"), [(0, 0), (1, 1), (10, 2), (30, 6), (50, 10), (90, 18), (100, 20)]
)
def test_a_weight_is_a_share_of_the_tenants_rounded_up(weight: int, count: int) -> None:
    cohort = Cohort("d", "gateway", "1.1.0", [f"t{i}" for i in range(20)])
    assert cohort.count_for(weight) == count
