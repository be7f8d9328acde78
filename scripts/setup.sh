#!/usr/bin/env bash
# Prepare a machine for cul8er development and tests.
#
#   scripts/setup.sh python     .venv in the repo root with cul8er installed editable, plus test tools
#   scripts/setup.sh services   PostgreSQL, Redis and RabbitMQ answering on loopback,
#                               the PostgreSQL database cul8er_test, and HAProxy installed
#   scripts/setup.sh haproxy    HAProxy (Debian package) for tenants' entry points, if missing
#   scripts/setup.sh platforms  Docker and Incus with their local test images, only in CI or
#                               with CUL8ER_PLATFORMS=1 (scripts/platforms-up.sh, needs root)
#   scripts/setup.sh all        all three (the default)
#
# Safe to run again and again: whatever is already in place is left alone, so a
# second run takes a second or two. Works from any directory.
#
# Environment knobs:
#   PYTHON                 interpreter that creates .venv (default: python3, needs >= 3.11)
#   SETUP_FORCE=1          reinstall the Python packages even when nothing changed
#   SETUP_WAIT_SECONDS     how long to wait for one service to answer (default: 90)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.cul8er-setup-stamp"
WAIT_SECONDS="${SETUP_WAIT_SECONDS:-90}"
TEST_DATABASE="cul8er_test"

log() { echo "setup: $*"; }
die() {
    echo "setup: error: $*" >&2
    exit 1
}

usage() {
    cat <<'EOF'
usage: scripts/setup.sh [python|services|haproxy|platforms|all]

  python     create .venv (if absent) and pip install -e '.[test]'
  services   make PostgreSQL, Redis and RabbitMQ answer on 127.0.0.1,
             create the database cul8er_test, and install HAProxy
  haproxy    install HAProxy when it is missing (cul8er up starts it)
  platforms  when CI is set or CUL8ER_PLATFORMS=1: install and start Docker and
             Incus and build their local test images (scripts/platforms-up.sh);
             otherwise skipped, and the Docker/Incus tests skip
  all        all three (default)
EOF
}

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [[ ${EUID:-$(id -u)} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$*' needs root and sudo is not available"
    fi
}

# ---------------------------------------------------------------------------
# python
# ---------------------------------------------------------------------------

# What the installed environment depends on: when this changes, reinstall.
python_fingerprint() {
    {
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
        cat "$ROOT/pyproject.toml"
    } | cksum | cut -d' ' -f1
}

python_env() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3.11)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is $("$PYTHON" -V 2>&1); cul8er needs Python >= 3.11 (set PYTHON=...)"

    local created=0
    if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
        log "creating virtual environment .venv ($("$PYTHON" -V 2>&1))"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
        created=1
    fi

    local fingerprint
    fingerprint="$(python_fingerprint)"
    if [[ $created -eq 0 && "${SETUP_FORCE:-0}" != 1 && -f "$STAMP" ]] &&
        [[ "$(cat "$STAMP")" == "$fingerprint" ]] &&
        [[ -x "$VENV/bin/cul8er" ]] &&
        "$VENV/bin/python" -c 'import workers, pytest' >/dev/null 2>&1; then
        log "python: .venv is up to date"
        return
    fi

    log "python: upgrading pip"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    log "python: installing cul8er with test extras (pip install -e '.[test]')"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
    echo "$fingerprint" >"$STAMP"
    log "python: ready ($("$VENV/bin/python" -V 2>&1) in .venv)"
}

# ---------------------------------------------------------------------------
# services
# ---------------------------------------------------------------------------

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" >/dev/null 2>&1
}

# wait_for NAME CHECK-COMMAND...: poll until the check passes or WAIT_SECONDS ran out.
wait_for() {
    local name="$1"
    shift
    local deadline=$((SECONDS + WAIT_SECONDS))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            die "$name did not answer within ${WAIT_SECONDS} s (raise SETUP_WAIT_SECONDS, or check its log)"
        fi
        sleep 1
    done
}

APT_UPDATED=0
# apt_install BINARY PACKAGE: install PACKAGE only when BINARY is missing entirely.
# Returns 0 when it installed something, 1 when the binary was already there.
apt_install() {
    local binary="$1" package="$2"
    if command -v "$binary" >/dev/null 2>&1 || [[ -x "/usr/sbin/$binary" ]]; then
        return 1
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "$binary is missing and there is no apt-get; install $package by hand"
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "services: apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "services: installing $package (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null ||
        die "apt-get install $package failed"
    return 0
}

postgres_ready() {
    pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1
}

postgres_login() {
    psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1
}

ensure_postgres() {
    local installed=0
    if apt_install pg_ctlcluster postgresql; then
        installed=1
    fi
    if ! postgres_ready; then
        local version
        version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
        [[ -n "$version" ]] || die "no PostgreSQL cluster under /etc/postgresql"
        log "services: starting PostgreSQL $version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
        wait_for "PostgreSQL (127.0.0.1:5432)" postgres_ready
    fi
    if ! postgres_login; then
        if [[ $installed -eq 1 ]]; then
            # A fresh Debian install asks for a password on TCP; the tests log in as
            # postgres without one, as on the development machines.
            local version hba
            version="$(ls /etc/postgresql | sort -V | tail -n 1)"
            hba="/etc/postgresql/$version/main/pg_hba.conf"
            log "services: allowing passwordless loopback logins in $hba"
            as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
            as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
            wait_for "PostgreSQL login as postgres" postgres_login
        else
            die "PostgreSQL answers but 'psql -h 127.0.0.1 -U postgres' cannot log in (allow trust auth for 127.0.0.1 in pg_hba.conf)"
        fi
    fi
    log "services: PostgreSQL is up on 127.0.0.1:5432"

    local exists
    exists="$(psql -h 127.0.0.1 -U postgres -d postgres -tAc \
        "select 1 from pg_database where datname='$TEST_DATABASE'")"
    if [[ "$exists" != 1 ]]; then
        log "services: creating database $TEST_DATABASE"
        createdb -h 127.0.0.1 -U postgres "$TEST_DATABASE"
    fi
    log "services: database $TEST_DATABASE exists"
}

redis_ready() {
    port_open 6379 && { ! command -v redis-cli >/dev/null 2>&1 ||
        [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == PONG ]]; }
}

ensure_redis() {
    apt_install redis-server redis-server || true
    if ! redis_ready; then
        log "services: starting Redis"
        as_root mkdir -p /var/lib/redis /var/log/redis
        as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
            --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
        wait_for "Redis (127.0.0.1:6379, log: /var/log/redis/ci.log)" redis_ready
    fi
    log "services: Redis is up on 127.0.0.1:6379"
}

rabbitmq_ready() {
    port_open 5672
}

ensure_rabbitmq() {
    apt_install rabbitmq-server rabbitmq-server || true
    if ! rabbitmq_ready; then
        log "services: starting RabbitMQ (this can take 10-20 s)"
        # A node that is already booting refuses a second start; the wait covers that.
        as_root rabbitmq-server -detached || true
        wait_for "RabbitMQ (127.0.0.1:5672, logs: /var/log/rabbitmq/)" rabbitmq_ready
    fi
    log "services: RabbitMQ is up on 127.0.0.1:5672"
}

# HAProxy is only installed here: the load balancer plugin's serve entry runs it
# (python -m plugins.load_balancers.haproxy serve --dir DIR), and its tests start their own.
ensure_haproxy() {
    apt_install haproxy haproxy || true
    local binary
    binary="$(command -v haproxy || echo /usr/sbin/haproxy)"
    log "services: HAProxy is installed ($("$binary" -v | head -n 1))"
}

services() {
    ensure_postgres
    ensure_redis
    ensure_rabbitmq
    ensure_haproxy
}

# ---------------------------------------------------------------------------
# platforms
# ---------------------------------------------------------------------------

# >>> platforms: container engines for the platform plugins <<<
# Docker and Incus are big, need root and start daemons, so they are only set up
# when asked for (CUL8ER_PLATFORMS=1) or in CI; scripts/platforms-up.sh does the work.
platforms() {
    if [[ -n "${CI:-}" || "${CUL8ER_PLATFORMS:-0}" == 1 ]]; then
        log "platforms: Docker and Incus (scripts/platforms-up.sh)"
        bash "$ROOT/scripts/platforms-up.sh"
    else
        log "container engines skipped (set CUL8ER_PLATFORMS=1 or run scripts/platforms-up.sh); their tests will skip"
    fi
}

# ---------------------------------------------------------------------------

main() {
    local command="${1:-all}"
    case "$command" in
    python) python_env ;;
    services) services ;;
    haproxy) ensure_haproxy ;;
    platforms) platforms ;;
    all)
        python_env
        services
        platforms
        ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
