#!/usr/bin/env bash
# The one command that installs cul8er and starts it on its embedded default:
# a worker and beat on an embedded Redis broker and a SQLite database under var/.
# No PostgreSQL, Redis or RabbitMQ service is needed.
#
#   scripts/start.sh [cul8er up options...]      e.g. scripts/start.sh --flower
#
# Stop it with Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh python
exec .venv/bin/cul8er up "$@"
