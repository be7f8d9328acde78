#!/usr/bin/env bash
# The one command that installs everything the tests need and runs them:
#
#   scripts/test.sh [pytest arguments...]        e.g. scripts/test.sh -q -k lifecycle
#
# Runs scripts/setup.sh all (Python environment and the PostgreSQL, Redis and
# RabbitMQ services), then pytest from the repo root. Exits with pytest's exit
# code, except that a run that collects no tests (exit 5) counts as a failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh all

status=0
.venv/bin/python -m pytest "$@" || status=$?

if [[ $status -eq 5 ]]; then
    echo "test: pytest collected no tests (check the arguments or tests/); failing" >&2
    exit 1
fi
exit "$status"
