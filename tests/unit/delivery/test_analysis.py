"""Gate measurements and their judgement: conditions, limits, probes of real instances."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.delivery import AnalysisConfig, Condition
from workers.delivery.analysis import Tally, measure
from workers.runtime.waiting import wait_until


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Callable]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> str:
        folder = tmp_path / f"i{len(started)}"
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "plugins.platforms.instance_server",
                "--name",
                "x",
                "--dir",
                str(folder),
                "--port",
                "0",
                *args,
            ],
        )
        started.append(process)
        port = wait_until(
            lambda: (folder / "port").exists() and (folder / "port").read_text().strip(),
            timeout=20,
            interval=0.05,
        )
        return f"127.0.0.1:{port}"

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def test_a_failure_condition_wins_over_success_and_names_the_figure() -> None:
    config = AnalysisConfig()
    judgement, reason = config.judge({"requests": 40, "error_rate": 0.5, "success_rate": 0.5})
    assert judgement == "failed" and "error_rate" in reason and "0.5" in reason
    assert config.judge({"requests": 40, "error_rate": 0.0, "success_rate": 1.0})[0] == "successful"
    # Between the two, or with no traffic and no probe, it is inconclusive
    assert config.judge({"requests": 40, "error_rate": 0.07, "success_rate": 0.93})[0] == (
        "inconclusive"
    )
    assert config.judge({"requests": 0})[0] == "inconclusive"


def test_conditions_on_latency_and_unmeasured_metrics() -> None:
    config = AnalysisConfig(
        success=[Condition(metric="probe_latency_ms_p95", op="<", value=100)], failure=[]
    )
    assert config.judge({"probes": 5, "probe_latency_ms_p95": 40})[0] == "successful"
    assert config.judge({"probes": 5, "probe_latency_ms_p95": 400})[0] == "inconclusive"
    assert config.judge({"probes": 5})[1] == "probe_latency_ms_p95 was not measured"


def test_the_tally_applies_the_limits_as_argo_does() -> None:
    config = AnalysisConfig(
        count=3, failure_limit=1, inconclusive_limit=0, consecutive_error_limit=1
    )
    tally = Tally()
    tally.add("fail")
    assert tally.outcome(config) == "running"  # one failure is within failure_limit 1
    tally.add("fail")
    assert tally.outcome(config) == "failed"
    tally = Tally()
    tally.add("inconclusive")
    assert tally.outcome(config) == "inconclusive"
    tally = Tally()
    tally.error()
    tally.error()
    assert tally.outcome(config) == "failed"
    tally = Tally()
    tally.error()
    tally.add("pass")  # a good measurement resets the run of errors
    tally.error()
    assert tally.outcome(config) == "running"
    for _ in range(3):
        tally.add("pass")
    assert tally.outcome(config) == "successful"
    # A dry run records everything and never fails
    dry = AnalysisConfig(count=2, dry_run=True)
    tally = Tally()
    tally.add("fail")
    tally.add("fail")
    assert tally.outcome(dry) == "successful"
    assert Tally.load({"tally": tally.dump()}) == tally


def test_probes_of_a_bad_release_measure_its_errors_and_latency(instance) -> None:  # noqa: ANN001
    good = instance("--version", "1")
    bad = instance("--version", "2", "--error-rate", "0.5", "--latency-ms", "50")
    metrics, after = measure(None, "acme", [good], {}, probes=4, timeout=2)
    assert after == {}
    assert metrics["probes"] == 4 and metrics["error_rate"] == 0.0
    assert metrics["probe_success_rate"] == 1.0
    metrics, _ = measure(None, "acme", [bad], {}, probes=4, timeout=2)
    assert metrics["error_rate"] == 0.5 and metrics["probe_success_rate"] == 0.5
    assert metrics["probe_latency_ms_p50"] >= 50
    assert AnalysisConfig().judge(metrics)[0] == "failed"
