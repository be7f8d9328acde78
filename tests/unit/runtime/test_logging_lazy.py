"""``configure_logging(lazy=True)``: structlog is imported only when needed, and configured then.

Each case runs in a fresh interpreter: whether structlog has been imported is the point.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Configures lazily for JSON lines, then prints whether structlog was imported.
PRELUDE = (
    "import logging, sys\n"
    "from workers.runtime.logging import configure_logging\n"
    "configure_logging(fmt='json', level='INFO', lazy=True)\n"
    "print('structlog' in sys.modules)\n"
)


def run(code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


def test_configuring_lazily_imports_no_structlog() -> None:
    # When logging is configured lazily and nothing logs
    done = run("print('structlog' in sys.modules)\n")
    # Then structlog was never imported, and nothing was written
    assert done.stdout.split() == ["False", "False"]
    assert done.stderr == ""


def test_a_standard_library_record_is_formatted_by_structlog_on_first_use() -> None:
    # When a standard library logger logs after a lazy configuration
    done = run("logging.getLogger('celery.x').warning('lost %s', 'a worker')\n")
    # Then the line on stderr is structlog's JSON, with level, logger and timestamp
    line = json.loads(done.stderr.strip().splitlines()[-1])
    assert line["event"] == "lost a worker" and line["level"] == "warning"
    assert line["logger"] == "celery.x" and line["timestamp"].endswith("Z")
    assert done.stdout.split() == ["False"]


@pytest.mark.parametrize("bind", ["structlog.get_logger('m').bind(tenant_id='t1')", ""])
def test_structlog_imported_later_is_configured_before_it_logs(bind: str) -> None:
    # When a module imports structlog after the lazy configuration and logs through it
    logger = bind or "structlog.get_logger('m')"
    done = run(
        "import structlog\n"
        "from workers.runtime.redaction import remember\n"
        "remember('s3cr3t-value')\n"
        f"{logger}.info('tenant_read', token='s3cr3t-value')\n"
    )
    # Then the line goes to stderr as JSON (never to stdout, which --json output owns),
    # with the secret masked
    assert done.stdout.split() == ["False"]
    line = json.loads(done.stderr.strip().splitlines()[-1])
    assert line["event"] == "tenant_read" and line["token"] == "**********"
    assert line["logger"] == "m" and line["level"] == "info"
    assert line.get("tenant_id") == ("t1" if bind else None)


def test_configuring_eagerly_still_configures_at_once() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from workers.runtime.logging import configure_logging\n"
            "configure_logging(fmt='json')\n"
            "import structlog\n"
            "print(structlog.is_configured())\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["True"], done.stderr
