#!/usr/bin/env bash
# The one command that installs cul8er and starts it on its embedded default:
# a worker and beat on an embedded Redis broker and a SQLite database under var/, and
# HAProxy for tenants' entry points (installed from Debian's packages when missing).
# No PostgreSQL, Redis or RabbitMQ service is needed.
#
#   scripts/start.sh [cul8er up options...]      e.g. scripts/start.sh --flower
#
# Stop it with Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh python
# HAProxy gives each tenant a stable entry point and lets deployments shift traffic; without
# it (no root, no apt) cul8er still runs and says what is missing.
bash scripts/setup.sh haproxy ||
    echo "start: HAProxy is not installed: tenants are reached at their instances' own addresses"
exec .venv/bin/cul8er up "$@"
