"""Releases and analysis gates: what a deployment rolls out and how it is judged.

See docs/architecture.md §10.

A release is what a tenant's instances run: a version and, per platform, an artifact (a
Docker image tag, an Incus image alias, for ``local`` a command line) plus settings the
shipped instance server honours (error rate, added latency), so a release can be made good
or bad on purpose. An analysis gate is Argo Rollouts' ``AnalysisTemplate`` with structured
conditions instead of expressions: each measurement is judged successful, failed or
inconclusive, and the run ends on its limits.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "AnalysisConfig",
    "Condition",
    "Judgement",
    "METRICS",
    "Release",
    "ReleaseSettings",
]

#: A release version: short, printable, fits a label and an environment variable.
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]

#: What a measurement holds, and so what a condition may name.
MetricName = Literal[
    "requests",
    "errors",
    "success_rate",
    "error_rate",
    "latency_ms_avg",
    "probe_success_rate",
    "probe_latency_ms_p50",
    "probe_latency_ms_p95",
    "probe_latency_ms_p99",
]
METRICS: Final[tuple[str, ...]] = get_args(MetricName)

_OPS: Final = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReleaseSettings(_Model):
    """Settings the shipped instance server takes, to make a release good or bad on purpose."""

    #: Share of requests to ``/`` and ``/health`` answered with 500.
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    #: Added to every answer of ``/`` and ``/health``.
    latency_ms: float = Field(default=0.0, ge=0.0, le=60_000.0)

    def env(self, version: str) -> dict[str, str]:
        """The environment an instance of this release starts with."""
        return {
            "CUL8ER_RELEASE_VERSION": version,
            "CUL8ER_RELEASE_ERROR_RATE": repr(self.error_rate),
            "CUL8ER_RELEASE_LATENCY_MS": repr(self.latency_ms),
        }


class Release(_Model):
    """A version of a tenant's application and, per platform, what its instances run."""

    version: Version
    #: Platform name → artifact: a Docker image tag, an Incus image alias, a ``local``
    #: command line. A platform not named runs the platform's default artifact.
    artifacts: dict[
        Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")],
        Annotated[str, StringConstraints(min_length=1, max_length=500)],
    ] = Field(default_factory=dict, max_length=16)
    settings: ReleaseSettings = ReleaseSettings()

    def artifact(self, platform: str) -> str | None:
        """What ``platform`` runs for this release (``None``: the platform's default)."""
        return self.artifacts.get(platform)


class Condition(_Model):
    """``metric op value``, for example ``error_rate <= 0.05``."""

    metric: MetricName
    op: Literal["<", "<=", ">", ">="]
    value: float

    def holds(self, metrics: dict[str, float]) -> bool | None:
        """Whether the condition holds; ``None`` when the metric was not measured."""
        if self.metric not in metrics:
            return None
        return bool(_OPS[self.op](metrics[self.metric], self.value))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


Judgement = Literal["successful", "failed", "inconclusive"]


def _default_success() -> list[Condition]:
    return [Condition(metric="success_rate", op=">=", value=0.95)]


def _default_failure() -> list[Condition]:
    return [Condition(metric="error_rate", op=">", value=0.10)]


class AnalysisConfig(_Model):
    """An analysis gate, as Argo Rollouts' ``AnalysisTemplate`` with structured conditions.

    Each of ``count`` measurements, ``interval_seconds`` apart after ``initial_delay_seconds``,
    is judged: failed if any failure condition holds, successful if every success condition
    holds, inconclusive otherwise (or when fewer than ``min_requests`` requests and no probe
    answered). The run fails once failed measurements exceed ``failure_limit``, pauses for a
    person once inconclusive ones exceed ``inconclusive_limit``, and fails after more than
    ``consecutive_error_limit`` measurements in a row could not be taken. ``dry_run``
    records every measurement and never fails the deployment.
    """

    interval_seconds: float = Field(default=1.0, ge=0.05, le=3600.0)
    count: int = Field(default=3, ge=1, le=1000)
    initial_delay_seconds: float = Field(default=0.0, ge=0.0, le=3600.0)
    success: list[Condition] = Field(default_factory=_default_success, max_length=20)
    failure: list[Condition] = Field(default_factory=_default_failure, max_length=20)
    failure_limit: int = Field(default=0, ge=0)
    inconclusive_limit: int = Field(default=0, ge=0)
    consecutive_error_limit: int = Field(default=4, ge=0)
    #: Probes of each new instance per measurement (0: HAProxy's counters only).
    probes: int = Field(default=5, ge=0, le=100)
    #: Fewer requests than this through the load balancer, and no probes: inconclusive.
    min_requests: int = Field(default=1, ge=0)
    dry_run: bool = False

    def judge(self, metrics: dict[str, float]) -> tuple[Judgement, str]:
        """One measurement's judgement, and the condition that decided it."""
        for condition in self.failure:
            if condition.holds(metrics):
                return (
                    "failed",
                    f"failure condition {condition} holds ({_value(metrics, condition)})",
                )
        enough = metrics.get("requests", 0) >= self.min_requests or metrics.get("probes", 0) > 0
        if not enough:
            return "inconclusive", f"too few requests ({metrics.get('requests', 0):g})"
        for condition in self.success:
            verdict = condition.holds(metrics)
            if verdict is None:
                return "inconclusive", f"{condition.metric} was not measured"
            if not verdict:
                return (
                    "inconclusive",
                    f"success condition {condition} does not hold ({_value(metrics, condition)})",
                )
        return "successful", "every success condition holds"


def _value(metrics: dict[str, Any], condition: Condition) -> str:
    return f"{condition.metric} = {metrics[condition.metric]:g}"
