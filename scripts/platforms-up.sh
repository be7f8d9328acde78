#!/usr/bin/env bash
# Install and start the container engines behind cul8er's Docker and Incus platforms,
# and build the small local images their instances start from.
#
#   scripts/platforms-up.sh [--smoke]
#
# For a Debian 12 machine without systemd (CI runners, dev VMs), run as root (or with sudo).
# No image registry is needed: both images are built locally from Debian's busybox-static.
#
#   Docker   docker.io from Debian, dockerd started in the background
#            (log /var/log/cul8er-dockerd.log, pid /run/cul8er-dockerd.pid),
#            image cul8er/instance:latest, release images cul8er/instance:v1 and :v2
#   Incus    incus-base + incus-client from bookworm-backports, incusd started in the
#            background (log /var/log/incus/incus.log, pid /run/cul8er-incusd.pid),
#            dir pool "default", bridge incusbr0 10.78.0.1/24 with NAT,
#            image alias cul8er-instance, release aliases cul8er-instance-v1 and -v2
#
# All images run `busybox httpd -f -p 8080 -h /www`, which serves /health ("ok") and
# /index.html, so health checks have a real target. The release images (one per version in
# CUL8ER_RELEASE_VERSIONS) are the base image plus /www/version holding the version, with
# /index.html naming it, so a deployment test can tell which release answered.
#
# Safe to run again and again: each step is skipped when it is already done, so a second
# run takes about a second. Progress goes to stderr (lines start with "platforms:"); stdout
# gets only the two settings the tests need:
#
#   DOCKER_HOST=unix:///var/run/docker.sock
#   CUL8ER_INCUS_SOCKET=/var/lib/incus/unix.socket
#
# Options:
#   --smoke    also start a throwaway container on each engine, publish its port 8080 on
#              127.0.0.1 and check that /health answers "ok" (and, for each release image,
#              that /version names its version); all are removed afterwards
#
# Environment knobs:
#   CUL8ER_DOCKER_IMAGE    Docker image tag to build (default: cul8er/instance:latest)
#   CUL8ER_INCUS_IMAGE     Incus image alias to build (default: cul8er-instance)
#   CUL8ER_RELEASE_VERSIONS release images to build besides, space-separated (default: "v1 v2");
#                          Docker tags REPO:VERSION (REPO from CUL8ER_DOCKER_IMAGE), Incus
#                          aliases CUL8ER_INCUS_IMAGE-VERSION
#   INCUS_BRIDGE_CIDR      address of incusbr0 when it is first created (default: 10.78.0.1/24)
#   PLATFORMS_WAIT_SECONDS how long to wait for a daemon to answer (default: 60)
#
# Stop the daemons later with  kill "$(cat /run/cul8er-dockerd.pid)"  and
# kill "$(cat /run/cul8er-incusd.pid)"  (delete Incus containers first: incus delete -f NAME).
set -euo pipefail

SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

usage() {
    sed -n '2,/^set -euo pipefail$/p' "$SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//'
}

SMOKE=0
for arg in "$@"; do
    case "$arg" in
    --smoke) SMOKE=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "platforms: unknown argument: $arg" >&2
        usage >&2
        exit 2
        ;;
    esac
done

if [[ ${EUID:-$(id -u)} -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo --preserve-env=CUL8ER_DOCKER_IMAGE,CUL8ER_INCUS_IMAGE,CUL8ER_RELEASE_VERSIONS,INCUS_BRIDGE_CIDR,PLATFORMS_WAIT_SECONDS \
            bash "$SCRIPT" "$@"
    fi
    echo "platforms: error: needs root (and sudo is not available)" >&2
    exit 1
fi

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive
# This script manages the local engine: talk to its socket whatever the caller's DOCKER_HOST says.
export DOCKER_HOST="unix:///var/run/docker.sock"
INCUS_SOCKET="/var/lib/incus/unix.socket"

DOCKER_IMAGE="${CUL8ER_DOCKER_IMAGE:-cul8er/instance:latest}"
INCUS_IMAGE="${CUL8ER_INCUS_IMAGE:-cul8er-instance}"
read -r -a RELEASE_VERSIONS <<<"${CUL8ER_RELEASE_VERSIONS-v1 v2}"
# A release's Docker tag replaces the base tag (cul8er/instance:latest -> cul8er/instance:v1);
# only a colon in the last path part is a tag, not a registry's port.
DOCKER_REPO="$DOCKER_IMAGE"
[[ "${DOCKER_IMAGE##*/}" == *:* ]] && DOCKER_REPO="${DOCKER_IMAGE%:*}"
for v in "${RELEASE_VERSIONS[@]}"; do
    # Both a Docker tag and an Incus alias suffix, and written into the served pages.
    [[ "$v" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] || {
        echo "platforms: error: bad release version in CUL8ER_RELEASE_VERSIONS: '$v'" >&2
        exit 2
    }
done
INCUS_CIDR="${INCUS_BRIDGE_CIDR:-10.78.0.1/24}"
WAIT_SECONDS="${PLATFORMS_WAIT_SECONDS:-60}"
DOCKERD_LOG=/var/log/cul8er-dockerd.log
DOCKERD_PIDFILE=/run/cul8er-dockerd.pid
INCUSD=/usr/libexec/incus/incusd
INCUSD_PIDFILE=/run/cul8er-incusd.pid
INSTANCE_PORT=8080

log() { echo "platforms: $*" >&2; }
die() {
    echo "platforms: error: $*" >&2
    exit 1
}

# Temporary directories and throwaway containers, removed on exit whatever happens.
TMP_DIRS=()
DOCKER_SMOKE=""
INCUS_SMOKE=""
cleanup() {
    if [[ -n "$DOCKER_SMOKE" ]]; then
        docker rm -f "$DOCKER_SMOKE" >/dev/null 2>&1 || true
    fi
    if [[ -n "$INCUS_SMOKE" ]]; then
        incus delete -f "$INCUS_SMOKE" >/dev/null 2>&1 || true
    fi
    local d
    for d in "${TMP_DIRS[@]}"; do
        rm -rf -- "$d"
    done
}
trap cleanup EXIT

# One run at a time: a second concurrent run waits, then finds everything done.
exec 9>/run/cul8er-platforms.lock
if ! flock -n 9; then
    log "another run is in progress; waiting for it"
    flock -w 900 9 || die "timed out waiting for /run/cul8er-platforms.lock"
fi

T_START=$SECONDS
step_time() { echo "$((SECONDS - $1))s"; }

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

# Incus is not in bookworm main, only in backports: add that suite when no source has it.
BACKPORTS=""
ensure_backports_source() {
    local codename
    codename="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")"
    BACKPORTS="${codename:-bookworm}-backports"
    if ! grep -rqs -- "$BACKPORTS" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding $BACKPORTS to the apt sources"
        cat >"/etc/apt/sources.list.d/$BACKPORTS.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $BACKPORTS
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        APT_UPDATED=0
    fi
}

incus_installed() {
    [[ -x "$INCUSD" ]] && command -v incus >/dev/null 2>&1 &&
        command -v dnsmasq >/dev/null 2>&1 && busybox_ok
}

# A statically linked /bin/busybox: the images copy it into a rootfs without any libraries.
busybox_ok() {
    [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1
}

# daemon_alive NAME: whether a live (non-zombie) daemon process NAME exists. Helper
# subprocesses of the same binary (incusd forkproxy, forkexec, ...) do not count.
daemon_alive() {
    local name="$1" p stat cmd first
    for p in /proc/[0-9]*; do
        [[ "$(cat "$p/comm" 2>/dev/null)" == "$name" ]] || continue
        stat="$(cat "$p/stat" 2>/dev/null)" || continue
        stat="${stat##*) }"
        [[ "${stat:0:1}" == Z ]] && continue
        cmd="$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)" || continue
        read -r _ first _ <<<"$cmd" || true
        if [[ -z "${first:-}" || "$first" == -* ]]; then
            return 0
        fi
    done
    return 1
}

# wait_until SECONDS CMD...: poll CMD every half second until it passes or time runs out.
wait_until() {
    local limit="$1"
    shift
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# http_get PORT PATH: body of http://127.0.0.1:PORT/PATH (loopback only).
http_get() {
    local port="$1" path="$2"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time 2 "http://127.0.0.1:$port$path"
    else
        timeout 3 bash -c '
            exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
            printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$2" >&3
            sed "1,/^\r\{0,1\}$/d" <&3' _ "$port" "$path"
    fi
}

# probe_health PORT: wait up to 15 s for /health on 127.0.0.1:PORT to answer "ok".
probe_health() {
    local port="$1" deadline=$((SECONDS + 15)) body=""
    while ((SECONDS < deadline)); do
        body="$(http_get "$port" /health 2>/dev/null || true)"
        [[ "$body" == ok ]] && return 0
        sleep 0.3
    done
    return 1
}

# free_port: a TCP port nothing listens on at 127.0.0.1.
free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 30000))
        if ! timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$p" 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# write_www ROOTFS [VERSION]: the pages busybox httpd serves. With VERSION (a release
# image), /version holds it and /index.html names it; without, the base image's pages.
write_www() {
    local r="$1" version="${2:-}"
    mkdir -p "$r/www"
    echo ok >"$r/www/health"
    if [[ -z "$version" ]]; then
        cat >"$r/www/index.html" <<'EOF'
<!doctype html>
<html><head><title>cul8er instance</title></head>
<body><h1>cul8er instance</h1><p>busybox httpd on port 8080; health check at /health.</p></body></html>
EOF
        return
    fi
    echo "$version" >"$r/www/version"
    cat >"$r/www/index.html" <<EOF
<!doctype html>
<html><head><title>cul8er instance version $version</title></head>
<body><h1>cul8er instance version $version</h1><p>busybox httpd on port 8080; health check at /health, version at /version.</p></body></html>
EOF
}

# busybox_rootfs ROOTFS [VERSION]: a minimal busybox userland with root user and /tmp.
busybox_rootfs() {
    local r="$1" version="${2:-}"
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,proc,sys,dev,root,run,var/run}
    chmod 1777 "$r/tmp"
    cp /bin/busybox "$r/bin/busybox"
    chroot "$r" /bin/busybox --install -s
    echo 'root:x:0:0:root:/root:/bin/sh' >"$r/etc/passwd"
    echo 'root:x:0:' >"$r/etc/group"
    write_www "$r" "$version"
}

# build_incus_image OUT.tar.gz [VERSION]: a unified Incus/LXD image (metadata.yaml + rootfs/)
# whose busybox init brings up lo, gets eth0 by DHCP and keeps httpd running on port 8080.
build_incus_image() {
    local out="$1" version="${2:-}" b r
    b="$(mktemp -d /tmp/cul8er-incus-img.XXXXXX)"
    TMP_DIRS+=("$b")
    r="$b/rootfs"
    busybox_rootfs "$r" "$version" # /sbin/init -> busybox init
    mkdir -p "$r/etc/init.d" "$r/etc/udhcpc"
    echo cul8er-instance >"$r/etc/hostname"
    # Debian's busybox runs the udhcpc hook /etc/udhcpc/default.script (not
    # /usr/share/udhcpc/default.script): without it udhcpc gets a lease but never sets the IP.
    cat >"$r/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc hook: apply the lease to the interface, default route and resolv.conf.
[ -n "$1" ] || { echo "Error: should be called from udhcpc"; exit 1; }
NETMASK=""
[ -n "$subnet" ] && NETMASK="/$subnet"
BROADCAST="broadcast +"
[ -n "$broadcast" ] && BROADCAST="broadcast $broadcast"
case "$1" in
	deconfig)
		ip -4 addr flush dev "$interface"
		ip link set dev "$interface" up
		;;
	renew|bound)
		ip -4 addr flush dev "$interface"
		ip addr add "$ip$NETMASK" $BROADCAST dev "$interface"
		if [ -n "$router" ]; then
			while route del default gw 0.0.0.0 dev "$interface" 2>/dev/null; do :; done
			metric=0
			for i in $router; do
				[ "$subnet" = "255.255.255.255" ] && ip route add "$i" dev "$interface"
				route add default gw "$i" dev "$interface" metric $((metric++))
			done
		fi
		tmpfile="/etc/resolv.conf.$$"
		: >"$tmpfile"
		[ -n "$domain" ] && echo "search $domain" >>"$tmpfile"
		for i in $dns; do echo "nameserver $i" >>"$tmpfile"; done
		mv "$tmpfile" /etc/resolv.conf
		;;
esac
exit 0
EOF
    chmod +x "$r/etc/udhcpc/default.script"
    cat >"$r/etc/init.d/rcS" <<'EOF'
#!/bin/sh
ip link set lo up
[ -e /sys/class/net/eth0 ] && udhcpc -i eth0 -b -t 10 -T 1 >/dev/null 2>&1
exit 0
EOF
    chmod +x "$r/etc/init.d/rcS"
    cat >"$r/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
::respawn:/bin/busybox httpd -f -p 8080 -h /www
::shutdown:/bin/sh -c 'kill -TERM -1; sleep 0.2'
EOF
    cat >"$b/metadata.yaml" <<EOF
architecture: $(uname -m)
creation_date: $(date +%s)
properties:
  description: cul8er instance${version:+ version $version} (busybox httpd on 8080, /health) local test image
  os: busybox
  release: "$(/bin/busybox 2>&1 | sed -n '1s/^BusyBox v\([0-9.]*\).*/\1/p')"
EOF
    tar -C "$b" -czf "$out" metadata.yaml rootfs
}

# ---------------------------------------------------------------------------
# Docker
# ---------------------------------------------------------------------------

docker_install() {
    local t=$SECONDS
    if command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 && busybox_ok; then
        log "docker: docker.io and busybox-static already installed"
        return
    fi
    # One apt-get update for both steps when Incus is going to be installed too.
    incus_installed || ensure_backports_source
    apt_update_once
    log "docker: installing docker.io busybox-static (apt-get)"
    # The package cannot start the service here (policy-rc.d); dockerd is started below.
    apt-get install -y -qq docker.io busybox-static >/dev/null || die "apt-get install docker.io failed"
    busybox_ok || die "/bin/busybox is not the static busybox (install busybox-static)"
    log "docker: installed in $(step_time "$t")"
}

docker_start() {
    local t=$SECONDS
    if docker version >/dev/null 2>&1; then
        log "docker: engine already answering on /var/run/docker.sock"
        return
    fi
    if daemon_alive dockerd; then
        log "docker: dockerd is running but not answering yet; waiting"
    else
        log "docker: starting dockerd (log $DOCKERD_LOG)"
        # No dockerd is alive, so a leftover pid file is stale; dockerd refuses to start
        # when the pid in it has been reused by another process.
        rm -f /var/run/docker.pid
        # 9>&-: the daemon must not inherit (and so hold) the run lock.
        setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &
        echo $! >"$DOCKERD_PIDFILE"
    fi
    if ! wait_until "$WAIT_SECONDS" docker version; then
        tail -n 30 "$DOCKERD_LOG" >&2 || true
        die "dockerd did not answer within ${WAIT_SECONDS} s (log: $DOCKERD_LOG)"
    fi
    log "docker: engine up in $(step_time "$t") ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
}

# docker_image TAG [VERSION]: build TAG from a fresh busybox rootfs unless it exists.
docker_image() {
    local tag="$1" version="${2:-}" t=$SECONDS r
    if docker image inspect "$tag" >/dev/null 2>&1; then
        log "docker: image $tag already present"
        return
    fi
    log "docker: building image $tag"
    r="$(mktemp -d /tmp/cul8er-docker-root.XXXXXX)"
    TMP_DIRS+=("$r")
    busybox_rootfs "$r" "$version"
    tar -C "$r" -c . |
        docker import -c "CMD [\"/bin/busybox\",\"httpd\",\"-f\",\"-p\",\"$INSTANCE_PORT\",\"-h\",\"/www\"]" \
            - "$tag" >/dev/null
    log "docker: image $tag built in $(step_time "$t")"
}

# docker_smoke TAG [VERSION]: /health answers ok, and /version answers VERSION when given.
docker_smoke() {
    local tag="$1" version="${2:-}" t=$SECONDS port body
    DOCKER_SMOKE="cul8er-smoke-$$"
    log "docker: smoke test of $tag (container $DOCKER_SMOKE)"
    docker run -d --rm --name "$DOCKER_SMOKE" -p "127.0.0.1::$INSTANCE_PORT" "$tag" >/dev/null
    port="$(docker port "$DOCKER_SMOKE" "$INSTANCE_PORT/tcp" | sed -n 's/^127\.0\.0\.1:\([0-9]*\)$/\1/p' | head -n 1)"
    [[ -n "$port" ]] || die "docker smoke: no port published on 127.0.0.1"
    probe_health "$port" || die "docker smoke: http://127.0.0.1:$port/health did not answer ok"
    body="$(http_get "$port" /index.html)" || die "docker smoke: /index.html failed"
    [[ "$body" == *"cul8er instance"* ]] || die "docker smoke: unexpected /index.html"
    if [[ -n "$version" ]]; then
        body="$(http_get "$port" /version)" || die "docker smoke: /version failed"
        [[ "$body" == "$version" ]] || die "docker smoke: /version of $tag answered '$body'"
    fi
    docker rm -f "$DOCKER_SMOKE" >/dev/null
    DOCKER_SMOKE=""
    log "docker: smoke ok ($tag: 127.0.0.1:$port/health -> ok${version:+, /version -> $version}) in $(step_time "$t")"
}

# ---------------------------------------------------------------------------
# Incus
# ---------------------------------------------------------------------------

incus_install() {
    local t=$SECONDS
    if incus_installed; then
        log "incus: incus-base, incus-client and dnsmasq-base already installed"
        return
    fi
    ensure_backports_source
    apt_update_once
    log "incus: installing incus-base incus-client dnsmasq-base busybox-static (apt-get, $BACKPORTS)"
    # --no-install-recommends skips ~80 qemu/ffmpeg packages (VM support, unusable without
    # vhost_vsock); dnsmasq-base is only a Recommends but the managed bridge needs it for DHCP.
    apt-get install -y -qq --no-install-recommends -t "$BACKPORTS" \
        incus-base incus-client dnsmasq-base busybox-static >/dev/null || die "apt-get install incus failed"
    log "incus: installed in $(step_time "$t")"
}

incus_start() {
    local t=$SECONDS
    if incus info >/dev/null 2>&1; then
        log "incus: daemon already answering on $INCUS_SOCKET"
        return
    fi
    if daemon_alive incusd; then
        log "incus: incusd is running but not answering yet; waiting"
    else
        log "incus: starting incusd (log /var/log/incus/incus.log)"
        mkdir -p /var/log/incus
        setsid nohup "$INCUSD" --group incus-admin --logfile=/var/log/incus/incus.log \
            >/var/log/incus/incusd.stdout 2>&1 </dev/null 9>&- &
        echo $! >"$INCUSD_PIDFILE"
    fi
    if ! "$INCUSD" waitready --timeout="$WAIT_SECONDS" || ! wait_until 10 incus info; then
        tail -n 30 /var/log/incus/incus.log >&2 || true
        die "incusd did not answer within ${WAIT_SECONDS} s (log: /var/log/incus/incus.log)"
    fi
    log "incus: daemon up in $(step_time "$t")"
}

incus_init() {
    local t=$SECONDS
    if incus storage show default >/dev/null 2>&1; then
        log "incus: already initialised (storage pool default)"
    else
        log "incus: initialising (dir pool default, bridge incusbr0 $INCUS_CIDR)"
        incus admin init --preseed <<EOF
networks:
- name: incusbr0
  type: bridge
  config: {ipv4.address: "$INCUS_CIDR", ipv4.nat: "true", ipv6.address: none}
storage_pools:
- {name: default, driver: dir}
profiles:
- name: default
  devices:
    root: {path: /, pool: default, type: disk}
    eth0: {name: eth0, network: incusbr0, type: nic}
EOF
        log "incus: initialised in $(step_time "$t")"
    fi
    # Docker sets the FORWARD policy to DROP and loads br_netfilter, which otherwise drops
    # traffic between Incus containers on incusbr0. Only possible once Docker's chain exists.
    if command -v iptables >/dev/null 2>&1 && iptables -nL DOCKER-USER >/dev/null 2>&1; then
        local dir added=0
        for dir in -i -o; do
            if ! iptables -C DOCKER-USER "$dir" incusbr0 -j ACCEPT 2>/dev/null; then
                iptables -I DOCKER-USER "$dir" incusbr0 -j ACCEPT
                added=1
            fi
        done
        if [[ $added -eq 1 ]]; then
            log "incus: added DOCKER-USER accept rules for incusbr0"
        else
            log "incus: DOCKER-USER accept rules for incusbr0 already present"
        fi
    else
        log "incus: no DOCKER-USER chain; no forwarding rules needed"
    fi
}

# incus_image ALIAS [VERSION]: build and import ALIAS unless it exists.
incus_image() {
    local alias="$1" version="${2:-}" t=$SECONDS d
    if incus image info "$alias" >/dev/null 2>&1; then
        log "incus: image $alias already present"
        return
    fi
    log "incus: building image $alias"
    d="$(mktemp -d /tmp/cul8er-incus-out.XXXXXX)"
    TMP_DIRS+=("$d")
    build_incus_image "$d/cul8er-instance.tar.gz" "$version"
    incus image import "$d/cul8er-instance.tar.gz" --alias "$alias" >/dev/null
    log "incus: image $alias imported in $(step_time "$t")"
}

# incus_smoke ALIAS [VERSION]: /health answers ok, and /version answers VERSION when given.
incus_smoke() {
    local alias="$1" version="${2:-}" t=$SECONDS port body
    INCUS_SMOKE="cul8er-smoke-$$"
    port="$(free_port)" || die "incus smoke: no free port on 127.0.0.1"
    log "incus: smoke test of $alias (container $INCUS_SMOKE)"
    incus init "$alias" "$INCUS_SMOKE" -c limits.memory=64MiB -q >/dev/null
    incus config device add "$INCUS_SMOKE" web proxy \
        "listen=tcp:127.0.0.1:$port" "connect=tcp:127.0.0.1:$INSTANCE_PORT" >/dev/null
    incus start "$INCUS_SMOKE"
    probe_health "$port" || die "incus smoke: http://127.0.0.1:$port/health did not answer ok"
    if [[ -n "$version" ]]; then
        body="$(http_get "$port" /version)" || die "incus smoke: /version failed"
        [[ "$body" == "$version" ]] || die "incus smoke: /version of $alias answered '$body'"
    fi
    incus delete -f "$INCUS_SMOKE" >/dev/null
    INCUS_SMOKE=""
    log "incus: smoke ok ($alias: 127.0.0.1:$port/health -> ok${version:+, /version -> $version}) in $(step_time "$t")"
}

# ---------------------------------------------------------------------------

# Docker first: the Incus step adds its DOCKER-USER rules only when Docker's chain exists.
docker_install
docker_start
docker_image "$DOCKER_IMAGE"
for v in "${RELEASE_VERSIONS[@]}"; do
    docker_image "$DOCKER_REPO:$v" "$v"
done
incus_install
incus_start
incus_init
incus_image "$INCUS_IMAGE"
for v in "${RELEASE_VERSIONS[@]}"; do
    incus_image "$INCUS_IMAGE-$v" "$v"
done

if [[ $SMOKE -eq 1 ]]; then
    docker_smoke "$DOCKER_IMAGE"
    for v in "${RELEASE_VERSIONS[@]}"; do
        docker_smoke "$DOCKER_REPO:$v" "$v"
    done
    incus_smoke "$INCUS_IMAGE"
    for v in "${RELEASE_VERSIONS[@]}"; do
        incus_smoke "$INCUS_IMAGE-$v" "$v"
    done
fi

log "ready in $(step_time "$T_START")"
echo "DOCKER_HOST=unix:///var/run/docker.sock"
echo "CUL8ER_INCUS_SOCKET=$INCUS_SOCKET"
