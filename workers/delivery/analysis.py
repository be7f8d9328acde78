"""Gate measurements: the canary group's counters on the load balancer, and active probes.

See docs/architecture.md §10. A measurement covers the window since the previous one: the
load balancer's per-server counters are read at both ends (HAProxy resets them on a reload,
so a counter that went backwards counts from zero), and each new instance is probed
``probes`` times on ``/health``, which a bad release answers as badly as ``/``. The
strategy judges the figures (``Strategy.analyze``); :class:`Tally` applies the gate's
limits to the judgements, as Argo Rollouts does.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from workers.engine.instances import probe

if TYPE_CHECKING:
    from schemas.delivery import AnalysisConfig
    from workers.pluginhost.contracts import LoadBalancer

__all__ = ["Tally", "counters", "measure"]


def counters(lb: LoadBalancer | None, tenant_id: str) -> dict[str, list[float]]:
    """The canary servers' ``[requests, 5xx, response_ms]`` now, by server name."""
    if lb is None:
        return {}
    return {
        s.name: [float(s.requests), float(s.responses_5xx), s.response_ms]
        for s in lb.stats(tenant_id).servers
        if s.group == "canary"
    }


def _probe_once(endpoint: str, timeout: float) -> tuple[bool, float]:
    started = time.perf_counter()
    ok, _ = probe(endpoint, timeout=timeout)
    return ok, (time.perf_counter() - started) * 1000


def _percentile(values: list[float], p: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def measure(
    lb: LoadBalancer | None,
    tenant_id: str,
    endpoints: list[str],
    before: dict[str, list[float]],
    *,
    probes: int,
    timeout: float,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One measurement of the canary group since ``before``; and the counters now."""
    after = counters(lb, tenant_id)
    requests = errors = 0.0
    response = []
    for name, (req, err, ms) in after.items():
        base = before.get(name, [0.0, 0.0, 0.0])
        # A reload resets HAProxy's counters: a counter that went down counts from zero.
        requests += req - base[0] if req >= base[0] else req
        errors += err - base[1] if err >= base[1] else err
        response.append(ms)
    ok_count, latencies = 0, []
    for endpoint in endpoints:
        for _ in range(probes):
            ok, ms = _probe_once(endpoint, timeout)
            ok_count += ok
            latencies.append(ms)
    metrics: dict[str, float] = {"requests": requests, "errors": errors, "probes": len(latencies)}
    seen = requests + len(latencies)
    if seen:
        failed = errors + (len(latencies) - ok_count)
        metrics["error_rate"] = round(failed / seen, 4)
        metrics["success_rate"] = round(1 - failed / seen, 4)
    if response:
        metrics["latency_ms_avg"] = round(statistics.fmean(response), 2)
    if latencies:
        metrics["probe_success_rate"] = round(ok_count / len(latencies), 4)
        for p in (50, 95, 99):
            metrics[f"probe_latency_ms_p{p}"] = round(_percentile(latencies, p), 2)
    return metrics, after


Outcome = Literal["running", "successful", "failed", "inconclusive"]


@dataclass
class Tally:
    """An analysis run's counts so far, kept in the deployment's ``stage_state``."""

    taken: int = 0
    failed: int = 0
    inconclusive: int = 0
    errors: int = 0
    consecutive_errors: int = 0

    @classmethod
    def load(cls, state: dict[str, Any]) -> Tally:
        """The tally stored in ``state`` (a fresh one if none)."""
        return cls(**state.get("tally", {}))

    def dump(self) -> dict[str, int]:
        """As JSON, for ``stage_state``."""
        return dict(vars(self))

    def add(self, decision: str) -> None:
        """Count one judged measurement: ``pass``, ``fail`` or ``inconclusive``."""
        self.taken += 1
        self.consecutive_errors = 0
        if decision == "fail":
            self.failed += 1
        elif decision == "inconclusive":
            self.inconclusive += 1

    def error(self) -> None:
        """Count a measurement that could not be taken."""
        self.errors += 1
        self.consecutive_errors += 1

    def outcome(self, config: AnalysisConfig) -> Outcome:
        """Where the run stands under the gate's limits (a dry run never fails)."""
        if not config.dry_run:
            if self.failed > config.failure_limit:
                return "failed"
            if self.consecutive_errors > config.consecutive_error_limit:
                return "failed"
            if self.inconclusive > config.inconclusive_limit:
                return "inconclusive"
        if self.taken >= config.count:
            return "successful"
        return "running"
