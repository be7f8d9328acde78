"""Comparing two versions' calls with stated statistical tests (A/B plugin deployments).

As Kayenta judges a canary against its baseline, metric by metric, with a test rather than a
single number, each comparison here names its test and its p-value:

- error rate: Fisher's exact test on the 2×2 table of (errors, successes) per version, pooled
  over tenants (exact for any count, so a handful of calls does not fake significance);
- latency: Welch's t-test from each version's mean, standard deviation and count (unequal
  variances);
- per-tenant error rates: the Mann-Whitney U test (Kayenta's own), when each side has at least
  three tenants with calls: it asks whether the new version's tenants fare worse as a group,
  not whether one noisy tenant drags the pooled rate.

A metric is ``higher`` or ``lower`` for the new version when its p-value is under ``alpha``,
else ``same``; the verdict fails when the new version's error rate is higher.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from workers.pluginhost.callstats import Tally

__all__ = ["ALPHA", "compare"]

#: Significance level of every test.
ALPHA: Final = 0.05
#: Fewer tenants with calls than this on a side: no Mann-Whitney U test.
_MIN_TENANTS: Final = 3


def compare(new: list[Tally], old: list[Tally], *, alpha: float = ALPHA) -> dict[str, Any]:
    """The new version's per-tenant tallies against the old one's: tests, p-values, verdict."""
    pooled_new, pooled_old = _pool(new), _pool(old)
    tests = [_error_rate(pooled_new, pooled_old, alpha), _latency(pooled_new, pooled_old, alpha)]
    per_tenant = _per_tenant(new, old, alpha)
    if per_tenant is not None:
        tests.append(per_tenant)
    worse = [t for t in tests if t["metric"].startswith("error_rate") and t["result"] == "higher"]
    return {
        "alpha": alpha,
        "new": _summary(pooled_new, len(new)),
        "old": _summary(pooled_old, len(old)),
        "tests": tests,
        "verdict": "failed" if worse else "successful",
        "reason": (
            f"{worse[0]['metric']} higher for the new version ({worse[0]['test']}, "
            f"p = {worse[0]['p_value']:.3g} < {alpha:g})"
            if worse
            else f"no error rate higher for the new version at alpha {alpha:g}"
        ),
    }


def _pool(tallies: list[Tally]) -> dict[str, float]:
    calls = sum(t.calls for t in tallies)
    errors = sum(t.errors for t in tallies)
    total = sum(t.latency_ms_sum for t in tallies)
    squares = sum(t.latency_ms_sq for t in tallies)
    mean = total / calls if calls else 0.0
    variance = (squares - calls * mean * mean) / (calls - 1) if calls > 1 else 0.0
    return {"calls": calls, "errors": errors, "mean": mean, "sd": math.sqrt(max(0.0, variance))}


def _summary(pooled: dict[str, float], tenants: int) -> dict[str, Any]:
    calls = pooled["calls"]
    return {
        "tenants": tenants,
        "calls": int(calls),
        "errors": int(pooled["errors"]),
        "error_rate": round(pooled["errors"] / calls, 4) if calls else None,
        "latency_ms_avg": round(pooled["mean"], 3),
    }


def _result(p_value: float, new: float, old: float, alpha: float) -> str:
    if math.isnan(p_value) or p_value >= alpha:
        return "same"
    return "higher" if new > old else "lower"


def _error_rate(new: dict[str, float], old: dict[str, float], alpha: float) -> dict[str, Any]:
    table = [
        [int(new["errors"]), int(new["calls"] - new["errors"])],
        [int(old["errors"]), int(old["calls"] - old["errors"])],
    ]
    if new["calls"] == 0 or old["calls"] == 0:
        p_value = float("nan")
    else:
        p_value = float(_scipy_stats().fisher_exact(table, alternative="two-sided").pvalue)
    rate_new = new["errors"] / new["calls"] if new["calls"] else 0.0
    rate_old = old["errors"] / old["calls"] if old["calls"] else 0.0
    return {
        "metric": "error_rate",
        "test": "Fisher's exact test, two-sided",
        "p_value": _rounded(p_value),
        "result": _result(p_value, rate_new, rate_old, alpha),
    }


def _latency(new: dict[str, float], old: dict[str, float], alpha: float) -> dict[str, Any]:
    if new["calls"] < 2 or old["calls"] < 2 or (new["sd"] == 0 and old["sd"] == 0):
        p_value = float("nan")
    else:
        p_value = float(
            _scipy_stats()
            .ttest_ind_from_stats(
                new["mean"],
                new["sd"],
                new["calls"],
                old["mean"],
                old["sd"],
                old["calls"],
                equal_var=False,
            )
            .pvalue
        )
    return {
        "metric": "latency_ms_avg",
        "test": "Welch's t-test, two-sided",
        "p_value": _rounded(p_value),
        "result": _result(p_value, new["mean"], old["mean"], alpha),
    }


def _per_tenant(new: list[Tally], old: list[Tally], alpha: float) -> dict[str, Any] | None:
    rates_new = [t.error_rate for t in new if t.calls]
    rates_old = [t.error_rate for t in old if t.calls]
    if len(rates_new) < _MIN_TENANTS or len(rates_old) < _MIN_TENANTS:
        return None
    if len(set(rates_new + rates_old)) == 1:
        p_value = 1.0  # every tenant alike: nothing to rank
    else:
        p_value = float(
            _scipy_stats().mannwhitneyu(rates_new, rates_old, alternative="two-sided").pvalue
        )
    return {
        "metric": "error_rate_per_tenant",
        "test": "Mann-Whitney U test, two-sided",
        "p_value": _rounded(p_value),
        "result": _result(
            p_value, sum(rates_new) / len(rates_new), sum(rates_old) / len(rates_old), alpha
        ),
    }


def _rounded(p_value: float) -> float | None:
    return None if math.isnan(p_value) else float(f"{p_value:.6g}")


def _scipy_stats() -> Any:
    """``scipy.stats``, imported on the first test: it costs a worker ~80 MB and seconds at boot."""
    from scipy import stats

    return stats
