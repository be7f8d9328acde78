"""The instance server's release settings, against real server processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from workers.runtime.waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]
#: Never route loopback requests through an HTTP proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
#: The release variables a test must not inherit from the environment running it.
RELEASE_ENV = ("CUL8ER_RELEASE_VERSION", "CUL8ER_RELEASE_ERROR_RATE", "CUL8ER_RELEASE_LATENCY_MS")


@contextlib.contextmanager
def instance_server(
    directory: Path, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Run the instance server with ``args``; yields its endpoint ``127.0.0.1:PORT``."""
    environ = {k: v for k, v in os.environ.items() if k not in RELEASE_ENV} | dict(env or {})
    command = [sys.executable, "-m", "plugins.platforms.instance_server"]
    command += ["--name", "web", "--dir", str(directory), *args]
    process = subprocess.Popen(command, cwd=ROOT, env=environ)
    try:
        port = wait_until(
            lambda: (directory / "port").exists() and (directory / "port").read_text().strip(),
            timeout=20,
            message="the instance server wrote no port file",
        )
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """A factory: ``serve(*args, env=...)`` starts a server and returns its endpoint."""
    with contextlib.ExitStack() as stack:
        made = 0

        def create(*args: str, env: Mapping[str, str] | None = None) -> str:
            nonlocal made
            made += 1
            directory = tmp_path / f"server-{made}"
            return stack.enter_context(instance_server(directory, *args, env=env))

        yield create


def get(endpoint: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``path``: (status, headers, body)."""
    try:
        with OPENER.open(f"http://{endpoint}{path}", timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def run_briefly(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the server expecting it to refuse to start."""
    environ = {k: v for k, v in os.environ.items() if k not in RELEASE_ENV} | dict(env or {})
    command = [sys.executable, "-m", "plugins.platforms.instance_server", "--name", "web"]
    return subprocess.run(
        [*command, *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30
    )


def test_the_version_is_in_the_body_the_header_and_on_version(serve: Callable[..., str]) -> None:
    # Given a server of version v2
    endpoint = serve("--version", "v2")

    # When / , /version, /health and an unknown path are asked
    root = get(endpoint, "/")
    version = get(endpoint, "/version")
    health = get(endpoint, "/health")
    missing = get(endpoint, "/nope")

    # Then / names it in text, /version in JSON, and every answer carries the header
    assert root[0] == 200
    assert root[1]["Content-Type"] == "text/plain"
    assert root[2] == b"cul8er instance web version v2\n"
    assert (version[0], json.loads(version[2])) == (200, {"name": "web", "version": "v2"})
    assert health[0] == 200
    assert missing[0] == 404
    for _, headers, _ in (root, version, health, missing):
        assert headers["X-Cul8er-Version"] == "v2"


def test_without_settings_the_version_is_0_and_nothing_fails(serve: Callable[..., str]) -> None:
    # Given a server started with no release options or variables
    endpoint = serve()

    # When asked 10 times
    statuses = [get(endpoint, "/")[0] for _ in range(10)]

    # Then version "0" answers every time
    assert statuses == [200] * 10
    assert json.loads(get(endpoint, "/version")[2])["version"] == "0"
    assert json.loads(get(endpoint, "/metrics")[2])["errors"] == 0


def test_an_error_rate_of_half_fails_exactly_every_other_request(serve: Callable[..., str]) -> None:
    # Given a server with error rate 0.5
    endpoint = serve("--error-rate", "0.5")

    # When / is asked 20 times, with /health probes and /version in between
    statuses = []
    for _ in range(20):
        statuses.append(get(endpoint, "/")[0])
        get(endpoint, "/health")
        assert get(endpoint, "/version")[0] == 200

    # Then exactly every other request to / got a 500, probes not shifting the pattern
    assert statuses == [200, 500] * 10
    metrics = json.loads(get(endpoint, "/metrics")[2])
    # ... and /metrics counts the 500s of / and /health alike
    assert metrics["errors"] == 20
    assert metrics["version"] == "0"


@pytest.mark.parametrize(("rate", "errors"), [(0.25, 5), (0.3, 6), (1.0, 20), (0.0, 0)])
def test_an_error_rate_fails_its_share_exactly(
    serve: Callable[..., str], rate: float, errors: int
) -> None:
    # Given a server with an error rate / When / is asked 20 times
    endpoint = serve("--error-rate", str(rate))
    statuses = [get(endpoint, "/")[0] for _ in range(20)]

    # Then exactly floor(20 * rate) of them failed
    assert statuses.count(500) == errors
    assert set(statuses) <= {200, 500}


def test_a_failed_answer_still_names_the_version(serve: Callable[..., str]) -> None:
    # Given a server that fails everything / When asked
    endpoint = serve("--error-rate", "1", "--version", "bad.1")
    status, headers, body = get(endpoint, "/")

    # Then the 500 carries the version, in the header and the body
    assert status == 500
    assert headers["X-Cul8er-Version"] == "bad.1"
    assert json.loads(body)["version"] == "bad.1"


def test_latency_delays_root_and_health_but_not_version(serve: Callable[..., str]) -> None:
    # Given a server with 200 ms of latency
    endpoint = serve("--latency-ms", "200")

    # When /, /health and /version are timed
    def timed(path: str) -> float:
        started = time.monotonic()
        assert get(endpoint, path)[0] == 200
        return time.monotonic() - started

    # Then / and /health take at least 0.2 s, /version does not wait
    assert timed("/") >= 0.2
    assert timed("/health") >= 0.2
    assert timed("/version") < 0.2


def test_the_release_variables_are_honoured(serve: Callable[..., str]) -> None:
    # Given the environment ReleaseSettings.env() builds
    env = {
        "CUL8ER_RELEASE_VERSION": "v3",
        "CUL8ER_RELEASE_ERROR_RATE": "0.5",
        "CUL8ER_RELEASE_LATENCY_MS": "100.0",
    }
    endpoint = serve(env=env)

    # When asked twice
    started = time.monotonic()
    statuses = [get(endpoint, "/")[0] for _ in range(2)]
    elapsed = time.monotonic() - started

    # Then version, error rate and latency all come from it
    assert json.loads(get(endpoint, "/version")[2]) == {"name": "web", "version": "v3"}
    assert statuses == [200, 500]
    assert elapsed >= 0.2
    metrics = json.loads(get(endpoint, "/metrics")[2])
    assert (metrics["error_rate"], metrics["latency_ms"]) == (0.5, 100.0)


def test_an_option_beats_its_variable(serve: Callable[..., str]) -> None:
    # Given a variable and an option that disagree / When started
    endpoint = serve("--version", "v5", env={"CUL8ER_RELEASE_VERSION": "v4"})

    # Then the option wins
    assert json.loads(get(endpoint, "/version")[2])["version"] == "v5"


def test_version_and_metrics_are_probes(serve: Callable[..., str]) -> None:
    # Given a server / When asked / once and each probe path once
    endpoint = serve()
    for path in ("/", "/health", "/version"):
        get(endpoint, path)
    metrics = json.loads(get(endpoint, "/metrics")[2])

    # Then all four count as requests, and all but / as probes
    assert (metrics["requests"], metrics["probe_requests"]) == (4, 3)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--error-rate", "1.5"], {}, "--error-rate"),
        (["--error-rate", "-0.1"], {}, "--error-rate"),
        (["--error-rate", "nan"], {}, "--error-rate"),
        (["--latency-ms", "-1"], {}, "--latency-ms"),
        (["--latency-ms", "soon"], {}, "--latency-ms"),
        (["--version", "v 1"], {}, "--version"),
        ([], {"CUL8ER_RELEASE_ERROR_RATE": "half"}, "--error-rate"),
        ([], {"CUL8ER_RELEASE_ERROR_RATE": "2"}, "--error-rate"),
        ([], {"CUL8ER_RELEASE_LATENCY_MS": "-5"}, "--latency-ms"),
        ([], {"CUL8ER_RELEASE_VERSION": "v1\r\nX-Evil: 1"}, "--version"),
    ],
)
def test_a_bad_value_exits_naming_the_option(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    # Given a bad release value / When the server is started
    result = run_briefly("--dir", str(tmp_path), *args, env=env)

    # Then it exits non-zero before listening, naming the option (and the variable, if any)
    assert result.returncode != 0
    assert named in result.stderr
    for variable in env:
        assert variable in result.stderr
    assert not (tmp_path / "port").exists()
