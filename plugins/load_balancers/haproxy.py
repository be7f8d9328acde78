"""The ``haproxy`` load balancer: one HAProxy in master-worker mode per cul8er data folder.

The folder (``settings.haproxy_folder``) holds:

- ``state.json``: the plugin's truth: per tenant its entry port, header/cookie routes, split
  in percent and backends (group, slot, address, state);
- ``haproxy.cfg``: rendered from ``state.json``; it only says which frontends, backends and
  routes exist. Addresses, states and weights change at run time, without a reload;
- ``state.lock``: held (``flock``) around every read-modify-write of ``state.json`` and the
  HAProxy commands that go with it, so two worker processes never interleave;
- ``admin.sock`` (runtime API), ``master.sock`` (master CLI), ``servers.state`` (saved
  before each reload so the new worker starts with the runtime state), ``haproxy.pid``.

Per tenant ``T``: ``frontend fe_T`` on ``127.0.0.1:PORT``; ``backend be_T`` with
:data:`SLOTS` server-template slots per group (``st1``.. stable, ``cn1``.. canary), weighted
to the split; ``backend be_T_canary`` mirroring the canary slots, for header/cookie routes.
Each ready server of a group weighs ``round(pct * 256 / 100 / ready)``, at least 1 while the
group has traffic (:func:`group_weight`); drained and maintained ones weigh 0. Servers have
a light check (``GET /health`` every second, out after 3 failures): a slot leaves maintenance
UP, so a new backend serves at once; the check only takes a dead one out, and retries on
connection failures (never on 5xx) cover the seconds before it does.

The plugin never starts HAProxy: ``python -m plugins.load_balancers.haproxy serve --dir DIR``
does, under whatever supervises it. Counters in :meth:`HAProxy.stats` reset on every reload
(a new worker starts at zero): callers take deltas between two reads, and start over when a
counter goes down.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import fcntl
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, Literal, TypedDict, cast

import structlog

from schemas.plugins import (
    Ack,
    Backend,
    Entry,
    Frontend,
    HeaderRoute,
    HealthStatus,
    ServerStats,
    TrafficStats,
    Weights,
)
from workers.plugin_api import (
    NotFoundError,
    PermanentError,
    TransientError,
    ValidationFailedError,
    check_tenant_id,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType

    from workers.plugin_api import PluginContext, Settings

__all__ = ["HAProxy", "group_weight", "main", "render_config", "serve", "wait_ready"]

log = structlog.get_logger(__name__)

Group = Literal["stable", "canary"]
ServerState = Literal["ready", "drain", "maint"]

#: The backend groups of a tenant, in the order they are reported.
GROUPS: Final[tuple[Group, ...]] = ("stable", "canary")
#: Server-template slots per group: the most backends a group can hold.
SLOTS: Final = 16
#: The prefix of each group's slot names (``st1``..``st16``, ``cn1``..``cn16``).
PREFIXES: Final[dict[Group, str]] = {"stable": "st", "canary": "cn"}
#: The only address frontends bind and backends may have.
HOST: Final = "127.0.0.1"
#: HAProxy's largest server weight.
MAX_WEIGHT: Final = 256
#: Longest unix socket path accepted (``sockaddr_un`` holds 107 bytes): keep a margin.
MAX_SOCKET_PATH: Final = 100
#: Seconds one runtime API command may take.
COMMAND_TIMEOUT: Final = 5.0
#: Seconds a reload may take until the new worker serves every frontend.
RELOAD_TIMEOUT: Final = 15.0
#: Seconds ``serve`` and :func:`wait_ready` wait for the admin socket by default.
START_TIMEOUT: Final = 15.0
#: The split of a new tenant, in percent.
DEFAULT_WEIGHTS: Final[dict[Group, int]] = {"stable": 100, "canary": 0}
#: Answers of ``set server ... addr`` that mean success.
_ADDR_CHANGED: Final = re.compile(r"no need to change|changed from")
_ADDRESS: Final = re.compile(r"^(?P<host>[^:]+):(?P<port>\d{1,5})$")
_SLOT: Final = {group: re.compile(rf"{prefix}\d+") for group, prefix in PREFIXES.items()}
_FAILED_RELOADS: Final = re.compile(r"master\s+\d+\s+\[failed:\s*(\d+)\]")


class _Server(TypedDict):
    group: Group
    slot: int
    address: str
    state: ServerState


class _Route(TypedDict):
    header: str | None
    cookie: str | None
    value: str


class _Tenant(TypedDict):
    port: int
    weights: dict[Group, int]
    routes: list[_Route]
    backends: dict[str, _Server]


class _State(TypedDict):
    tenants: dict[str, _Tenant]


class _ReloadFailedError(TransientError):
    """The master kept the old worker: the new configuration did not start."""


class _Files:
    """The paths inside HAProxy's folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = folder / "haproxy.cfg"
        self.state = folder / "state.json"
        self.lock = folder / "state.lock"
        self.admin = folder / "admin.sock"
        self.master = folder / "master.sock"
        self.servers_state = folder / "servers.state"
        self.pid = folder / "haproxy.pid"
        for path in (self.admin, self.master):
            if len(os.fsencode(path)) > MAX_SOCKET_PATH:
                raise PermanentError(
                    f"HAProxy folder {folder} is too long for unix sockets: {path} has more "
                    f"than {MAX_SOCKET_PATH} bytes (set a shorter haproxy_dir)"
                )


# -- runtime API ------------------------------------------------------------------------------


def _send(path: Path, command: str, *, timeout: float = COMMAND_TIMEOUT) -> str:
    """Send one command to a HAProxy CLI socket and read its whole answer (``OSError`` if none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        # The master CLI answers only once it has seen the end of the input.
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _worker_pid(files: _Files) -> int | None:
    """The pid of the worker answering the admin socket; ``None`` when nothing answers."""
    try:
        info = _send(files.admin, "show info", timeout=1.0)
    except OSError:
        return None
    match = re.search(r"^Pid:\s*(\d+)", info, re.MULTILINE)
    return int(match.group(1)) if match else None


def wait_ready(folder: Path, *, timeout: float = START_TIMEOUT) -> int:
    """Wait until HAProxy in ``folder`` answers and ``serve`` has applied its state; its pid.

    Raises:
        TransientError: nothing answered within ``timeout`` seconds.
    """
    files = _Files(Path(folder).expanduser().resolve())
    pid = wait_until(
        lambda: _worker_pid(files),
        timeout=timeout,
        message=f"HAProxy's admin socket {files.admin} did not answer",
        error=TransientError,
    )
    # ``serve`` holds the lock until it has applied the runtime state: wait for that too.
    with open(files.lock, "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
    return pid


def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    """Whether ``127.0.0.1:port`` can be bound (nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _resolve_binary(binary: str) -> str:
    """``binary`` on ``PATH``, else in ``/usr/sbin`` (not on every user's ``PATH``)."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin")
    return found or binary


# -- configuration ----------------------------------------------------------------------------


def group_weight(percent: int, ready: int) -> int:
    """The HAProxy weight of each of a group's ``ready`` servers for ``percent`` of traffic.

    ``percent`` of :data:`MAX_WEIGHT` shared between the ready servers, at least 1 when the
    group gets traffic at all; 0 when it gets none or has no ready server.
    """
    if percent <= 0 or ready <= 0:
        return 0
    return max(1, min(MAX_WEIGHT, round(percent * MAX_WEIGHT / 100 / ready)))


def _percentages(sums: dict[Group, int]) -> dict[str, int]:
    """Per-group weight sums as whole percents adding up to 100 (largest remainder)."""
    total = sum(sums.values())
    if total == 0:
        return {group: 0 for group in GROUPS}
    exact = {group: sums[group] * 100 / total for group in GROUPS}
    result = {group: int(exact[group]) for group in GROUPS}
    missing = 100 - sum(result.values())
    for group in sorted(GROUPS, key=lambda g: exact[g] - result[g], reverse=True)[:missing]:
        result[group] += 1
    return {str(group): value for group, value in result.items()}


def _route_condition(route: _Route) -> str:
    if route["header"] is not None:
        return f"{{ req.hdr({route['header']}) -m str {route['value']} }}"
    return f"{{ req.cook({route['cookie']}) -m str {route['value']} }}"


def render_config(state: _State, folder: Path) -> str:
    """HAProxy's configuration for ``state``, with its sockets and files in ``folder``."""
    files = _Files(folder)
    lines = [
        "# Rendered by cul8er from state.json: edits here are lost at the next change.",
        "global",
        "    master-worker",
        f"    stats socket {files.admin} mode 600 level admin expose-fd listeners",
        f"    server-state-file {files.servers_state}",
        "    hard-stop-after 30s",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
        # A new loopback connection per request is cheap; a reused one waits out a delayed
        # ACK per response from servers that write headers and body apart (30 ms measured
        # with Python's http.server, under 1 ms with this option).
        "    option http-server-close",
        "    option redispatch",
        "    retries 3",
        # Never on 5xx: analysis gates must see a bad release's errors.
        "    retry-on conn-failure empty-response response-timeout",
        "    load-server-state-from-file global",
    ]
    # A slot leaves maintenance UP at once; the check only takes a dead server out later.
    check = "disabled check inter 1s fall 3 rise 2"
    for tenant, entry in sorted(state["tenants"].items()):
        lines += ["", f"frontend fe_{tenant}", f"    bind {HOST}:{entry['port']}"]
        lines += [
            f"    use_backend be_{tenant}_canary if {_route_condition(route)}"
            for route in entry["routes"]
        ]
        lines += [f"    default_backend be_{tenant}"]
        for backend, groups in ((f"be_{tenant}", GROUPS), (f"be_{tenant}_canary", ("canary",))):
            lines += [
                "",
                f"backend {backend}",
                "    balance roundrobin",
                "    option httpchk GET /health",
            ]
            lines += [f"    server-template {PREFIXES[g]} {SLOTS} {HOST}:1 {check}" for g in groups]
    return "\n".join(lines) + "\n"


def _split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a backend address; only ``127.0.0.1:PORT`` is accepted."""
    match = _ADDRESS.fullmatch(address)
    port = int(match.group("port")) if match else 0
    if match is None or match.group("host") != HOST or not 0 < port < 65536:
        raise PermanentError(
            f"backend address {address!r} refused: only loopback {HOST}:PORT is allowed"
        )
    return HOST, port


def _up(row: dict[str, str]) -> bool:
    """Whether a ``show stat`` server row takes new traffic (UP, or up without checks)."""
    status = row.get("status", "")
    return status.startswith("UP") or status == "no check"


# -- the plugin -------------------------------------------------------------------------------


class HAProxy:
    """The load balancer contract on one HAProxy, driven through its runtime API."""

    name: ClassVar[str] = "haproxy"

    def __init__(
        self,
        folder: Path,
        *,
        binary: str = "haproxy",
        port_min: int = 21000,
        port_max: int = 21999,
    ) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.binary = binary
        if not 0 < port_min <= port_max < 65536:
            raise PermanentError(f"bad entry port range {port_min}-{port_max}")
        self.port_min = port_min
        self.port_max = port_max
        self._files = _Files(self.folder)

    @classmethod
    def from_plugin(cls, _config: None, context: PluginContext) -> HAProxy:
        """The plugin factory: the balancer for cul8er's settings."""
        return cls.from_settings(context.settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> HAProxy:
        """The balancer in ``settings.haproxy_folder``, with the settings' entry ports."""
        return cls(
            settings.haproxy_folder,
            binary=settings.haproxy_binary,
            port_min=settings.entry_port_min,
            port_max=settings.entry_port_max,
        )

    # -- the LoadBalancer contract ----------------------------------------------------------

    def ensure_frontend(self, frontend: Frontend) -> Entry:
        """Serve the tenant on a stable 127.0.0.1 port; a new tenant costs one reload."""
        tenant = check_tenant_id(frontend.tenant_id)
        with self._locked():
            state = self._load()
            current = state["tenants"].get(tenant)
            if current is not None:
                port = current["port"]
                if frontend.port not in (0, port):
                    raise PermanentError(
                        f"tenant {tenant} is served on port {port}, not {frontend.port}"
                    )
                if (f"fe_{tenant}", "FRONTEND") in self._stat_rows():
                    return Entry(tenant_id=tenant, address=f"{HOST}:{port}")
                # In state.json but not in the running configuration: an earlier reload
                # did not finish; do it now.
                self._reload(state)
            else:
                port = self._choose_port(state, frontend.port)
                new = copy.deepcopy(state)
                new["tenants"][tenant] = {
                    "port": port,
                    "weights": dict(DEFAULT_WEIGHTS),
                    "routes": [],
                    "backends": {},
                }
                self._commit(state, new)
        log.info("frontend_ensured", tenant_id=tenant, port=port)
        return Entry(tenant_id=tenant, address=f"{HOST}:{port}", reloaded=True)

    def remove_frontend(self, tenant_id: str) -> Ack:
        """Stop serving the tenant (one reload); a missing frontend is success."""
        tenant = check_tenant_id(tenant_id)
        with self._locked():
            state = self._load()
            if tenant not in state["tenants"]:
                return Ack(detail=f"no frontend for tenant {tenant}")
            new = copy.deepcopy(state)
            del new["tenants"][tenant]
            self._commit(state, new)
        log.info("frontend_removed", tenant_id=tenant)
        return Ack(detail=f"frontend of tenant {tenant} removed")

    def add_backend(self, backend: Backend) -> Ack:
        """Put the backend into a slot of its group (its own slot if it has one); no reload."""
        tenant = check_tenant_id(backend.tenant_id)
        _split_address(backend.address)
        with self._locked():
            state = self._load()
            entry = self._tenant(state, tenant)
            old = entry["backends"].get(backend.name)
            if old is not None and old["group"] != backend.group:
                self._retire(tenant, entry, backend.name)
                old = None
            slot = old["slot"] if old is not None else self._free_slot(entry, backend.group)
            entry["backends"][backend.name] = {
                "group": backend.group,
                "slot": slot,
                "address": backend.address,
                "state": backend.state,
            }
            weights = self._server_weights(entry)
            self._apply_server(tenant, entry["backends"][backend.name], weights[backend.name])
            self._apply_weights(tenant, entry, weights, backend.group)
            self._save(state)
        log.info(
            "backend_added",
            tenant_id=tenant,
            backend=backend.name,
            slot=slot,
            group=backend.group,
            address=backend.address,
            state=backend.state,
        )
        return Ack(detail=f"{backend.name} in {PREFIXES[backend.group]}{slot}")

    def remove_backend(self, backend: Backend) -> Ack:
        """Take the backend out (maintenance) and free its slot; a missing one is success."""
        tenant = check_tenant_id(backend.tenant_id)
        with self._locked():
            state = self._load()
            entry = state["tenants"].get(tenant)
            if entry is None or backend.name not in entry["backends"]:
                return Ack(detail=f"no backend {backend.name} for tenant {tenant}")
            self._retire(tenant, entry, backend.name)
            self._save(state)
        log.info("backend_removed", tenant_id=tenant, backend=backend.name)
        return Ack(detail=f"{backend.name} removed")

    def set_weights(self, weights: Weights) -> Ack:
        """Split the tenant's traffic between its groups by per-server weights; no reload."""
        tenant = check_tenant_id(weights.tenant_id)
        split: dict[Group, int] = {group: weights.weights.get(group, 0) for group in GROUPS}
        if any(value < 0 for value in split.values()) or sum(split.values()) != 100:
            message = f"weights must be >= 0 and add up to 100, got {split}"
            raise ValidationFailedError(message, errors=[{"field": "weights", "message": message}])
        with self._locked():
            state = self._load()
            entry = self._tenant(state, tenant)
            for group, percent in split.items():
                ready = [
                    s
                    for s in entry["backends"].values()
                    if s["group"] == group and s["state"] == "ready"
                ]
                if percent > 0 and not ready:
                    raise PermanentError(
                        f"no ready {group} backend for tenant {tenant}: cannot send it {percent}%"
                    )
            entry["weights"] = split
            self._apply_weights(tenant, entry, self._server_weights(entry), *GROUPS)
            self._save(state)
        log.info("weights_set", tenant_id=tenant, **split)
        return Ack(detail=f"stable {split['stable']}% / canary {split['canary']}%")

    def route_by_header(self, route: HeaderRoute) -> Ack:
        """Route a header or cookie value to the canary group (one reload; ``None`` clears)."""
        tenant = check_tenant_id(route.tenant_id)
        wanted: _Route | None = None
        if route.group is not None:
            if (route.header is None) == (route.cookie is None):
                raise PermanentError("a route needs exactly one of header and cookie")
            if not route.value:
                raise PermanentError("a route needs a value to match")
            header = route.header.lower() if route.header is not None else None
            wanted = {"header": header, "cookie": route.cookie, "value": route.value}
        with self._locked():
            state = self._load()
            entry = state["tenants"].get(tenant)
            if entry is None and wanted is None:
                return Ack(detail=f"no frontend for tenant {tenant}")
            entry = self._tenant(state, tenant)
            if wanted is None:
                routes: list[_Route] = []
            else:
                # A new value for the same header (or cookie) replaces the old one.
                same = (wanted["header"], wanted["cookie"])
                routes = [r for r in entry["routes"] if (r["header"], r["cookie"]) != same]
                routes.append(wanted)
            if routes == entry["routes"]:
                return Ack(detail="routes unchanged")
            new = copy.deepcopy(state)
            new["tenants"][tenant]["routes"] = routes
            self._commit(state, new)
        log.info("routes_set", tenant_id=tenant, routes=routes)
        return Ack(detail=f"{len(routes)} route(s) to canary")

    def stats(self, tenant_id: str) -> TrafficStats:
        """Per-server counters (since the last reload) and the split as HAProxy weights it now.

        A canary server's counters add up its traffic through the split and through routes.
        ``weights`` are both 0 when no server takes traffic.
        """
        tenant = check_tenant_id(tenant_id)
        with self._locked():
            entry = self._tenant(self._load(), tenant)
            rows = self._stat_rows()
        servers = []
        for name, server in sorted(
            entry["backends"].items(), key=lambda kv: (GROUPS.index(kv[1]["group"]), kv[1]["slot"])
        ):
            slot = f"{PREFIXES[server['group']]}{server['slot']}"
            row = rows.get((f"be_{tenant}", slot), {})
            both = [row, rows.get((f"be_{tenant}_canary", slot), {})]
            count = [
                sum(int(r.get(key) or 0) for r in both) for key in ("stot", "hrsp_2xx", "hrsp_5xx")
            ]
            timed = sum(int(r.get("stot") or 0) * int(r.get("rtime") or 0) for r in both)
            servers.append(
                ServerStats(
                    name=name,
                    group=server["group"],
                    address=row.get("addr") or server["address"],
                    # "UP 1/3" (going down after a failed check): the state is "UP".
                    state=re.sub(r"\s+\d+/\d+$", "", row.get("status", "absent")),
                    weight=int(row.get("weight") or 0),
                    requests=count[0],
                    responses_2xx=count[1],
                    responses_5xx=count[2],
                    response_ms=timed / count[0] if count[0] else float(row.get("rtime") or 0),
                )
            )
        sums: dict[Group, int] = {group: 0 for group in GROUPS}
        for (proxy, slot), row in rows.items():
            for group in GROUPS:
                if proxy == f"be_{tenant}" and _up(row) and _SLOT[group].fullmatch(slot):
                    sums[group] += int(row.get("weight") or 0)
        routes = [
            HeaderRoute(tenant_id=tenant, header=r["header"], cookie=r["cookie"], value=r["value"])
            for r in entry["routes"]
        ]
        frontend = rows.get((f"fe_{tenant}", "FRONTEND"), {})
        return TrafficStats(
            tenant_id=tenant,
            servers=servers,
            weights=_percentages(sums),
            routes=routes,
            frontend_requests=int(frontend.get("req_tot") or 0),
        )

    def health(self, tenant_id: str) -> HealthStatus:
        """``""``: whether HAProxy answers; a tenant: its frontend is served with a server UP."""
        if not tenant_id:
            try:
                info = self._admin("show info")
            except TransientError as exc:
                return HealthStatus(healthy=False, detail=str(exc))
            version = re.search(r"^Version:\s*(\S+)", info, re.MULTILINE)
            return HealthStatus(
                healthy=True,
                detail=f"HAProxy {version.group(1) if version else '?'} answers at {self.folder}",
            )
        tenant = check_tenant_id(tenant_id)
        entry = self._load()["tenants"].get(tenant)
        if entry is None:
            return HealthStatus(healthy=False, detail=f"no frontend for tenant {tenant}")
        rows = self._stat_rows()
        if (f"fe_{tenant}", "FRONTEND") not in rows:
            return HealthStatus(healthy=False, detail=f"frontend fe_{tenant} is not served yet")
        up = [
            name
            for name, server in entry["backends"].items()
            if _up(rows.get((f"be_{tenant}", f"{PREFIXES[server['group']]}{server['slot']}"), {}))
        ]
        return HealthStatus(
            healthy=bool(up),
            detail=f"{len(up)} of {len(entry['backends'])} servers up behind "
            f"{HOST}:{entry['port']}",
        )

    # -- state ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold ``state.lock``: one read-modify-write (and its commands) at a time."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # flock locks belong to the open file: two threads of one process exclude each other.
        with open(self._files.lock, "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _load(self) -> _State:
        try:
            text = self._files.state.read_text()
        except FileNotFoundError:
            return {"tenants": {}}
        try:
            return cast("_State", json.loads(text))
        except ValueError as exc:
            raise PermanentError(f"{self._files.state} is not valid JSON: {exc}") from exc

    def _save(self, state: _State) -> None:
        self._write(self._files.state, json.dumps(state, indent=2, sort_keys=True) + "\n")

    def _write(self, path: Path, text: str) -> None:
        """Write through a temporary file, so that readers never see half of it."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def _tenant(self, state: _State, tenant: str) -> _Tenant:
        try:
            return state["tenants"][tenant]
        except KeyError:
            raise NotFoundError(
                f"no frontend for tenant {tenant} at {self.folder}: ensure_frontend first"
            ) from None

    def _choose_port(self, state: _State, wanted: int) -> int:
        held = {entry["port"]: name for name, entry in state["tenants"].items()}
        if wanted:
            if wanted in held:
                raise PermanentError(f"port {wanted} is taken by tenant {held[wanted]}")
            if not _port_free(wanted):
                raise PermanentError(f"port {HOST}:{wanted} is in use by another process")
            return wanted
        for port in range(self.port_min, self.port_max + 1):
            if port not in held and _port_free(port):
                return port
        raise PermanentError(f"no free entry port left in {self.port_min}-{self.port_max}")

    @staticmethod
    def _free_slot(entry: _Tenant, group: Group) -> int:
        taken = {s["slot"] for s in entry["backends"].values() if s["group"] == group}
        for slot in range(1, SLOTS + 1):
            if slot not in taken:
                return slot
        raise PermanentError(f"the {group} group is full: {SLOTS} backends at most")

    @staticmethod
    def _server_weights(entry: _Tenant) -> dict[str, int]:
        """Each backend's weight in ``be_T``: its group's share over the ready servers."""
        ready = {g: 0 for g in GROUPS}
        for server in entry["backends"].values():
            ready[server["group"]] += server["state"] == "ready"
        share = {g: group_weight(entry["weights"].get(g, 0), ready[g]) for g in GROUPS}
        return {
            name: share[server["group"]] if server["state"] == "ready" else 0
            for name, server in entry["backends"].items()
        }

    # -- HAProxy commands -------------------------------------------------------------------

    def _admin(self, command: str) -> str:
        try:
            return _send(self._files.admin, command)
        except OSError as exc:
            raise TransientError(
                f"HAProxy is not running at {self.folder} ({self._files.admin}: {exc}); "
                f"start it with python -m plugins.load_balancers.haproxy serve --dir {self.folder}"
            ) from exc

    def _set(self, command: str) -> None:
        """Run a ``set`` command; any answer but an address change is an error."""
        answer = self._admin(command).strip()
        if answer and not _ADDR_CHANGED.search(answer):
            raise PermanentError(f"HAProxy refused {command!r}: {answer}")

    def _stat_rows(self) -> dict[tuple[str, str], dict[str, str]]:
        """``show stat`` as ``{(proxy, server): row}``."""
        text = self._admin("show stat")
        reader = csv.DictReader(text.removeprefix("# ").splitlines())
        return {(row["pxname"], row["svname"]): row for row in reader if row.get("svname")}

    def _apply_server(self, tenant: str, server: _Server, weight: int) -> None:
        """Address, weight and state of one backend's slot (and its canary mirror)."""
        host, port = _split_address(server["address"])
        slot = f"{PREFIXES[server['group']]}{server['slot']}"
        proxies = [(f"be_{tenant}", weight)]
        if server["group"] == "canary":
            # The mirror takes every routed request: its servers share them equally.
            proxies.append((f"be_{tenant}_canary", int(server["state"] == "ready")))
        for proxy, proxy_weight in proxies:
            self._set(f"set server {proxy}/{slot} addr {host} port {port}")
            self._set(f"set server {proxy}/{slot} weight {proxy_weight}")
            self._set(f"set server {proxy}/{slot} state {server['state']}")

    def _apply_weights(
        self, tenant: str, entry: _Tenant, weights: dict[str, int], *groups: Group
    ) -> None:
        # Servers that keep or gain traffic first, those going to 0 last: one at a time, the
        # backend never passes through a moment where every server weighs 0 (a 503).
        order = sorted(entry["backends"].items(), key=lambda item: weights[item[0]] == 0)
        for name, server in order:
            if server["group"] in groups:
                slot = f"{PREFIXES[server['group']]}{server['slot']}"
                self._set(f"set server be_{tenant}/{slot} weight {weights[name]}")

    def _retire(self, tenant: str, entry: _Tenant, name: str) -> None:
        """Put a backend's slot(s) in maintenance, forget it and rebalance its group."""
        server = entry["backends"].pop(name)
        slot = f"{PREFIXES[server['group']]}{server['slot']}"
        proxies = [f"be_{tenant}"] + ([f"be_{tenant}_canary"] * (server["group"] == "canary"))
        for proxy in proxies:
            self._set(f"set server {proxy}/{slot} state maint")
        self._apply_weights(tenant, entry, self._server_weights(entry), server["group"])

    def _apply_tenant(self, tenant: str, entry: _Tenant) -> None:
        """Make HAProxy's runtime state of one tenant what ``state.json`` says."""
        weights = self._server_weights(entry)
        occupied = {(s["group"], s["slot"]): name for name, s in entry["backends"].items()}
        for group in GROUPS:
            for slot in range(1, SLOTS + 1):
                name = occupied.get((group, slot))
                if name is not None:
                    self._apply_server(tenant, entry["backends"][name], weights[name])
                    continue
                proxies = [f"be_{tenant}"] + ([f"be_{tenant}_canary"] * (group == "canary"))
                for proxy in proxies:
                    self._set(f"set server {proxy}/{PREFIXES[group]}{slot} state maint")

    def _apply_all(self, state: _State) -> None:
        for tenant, entry in sorted(state["tenants"].items()):
            self._apply_tenant(tenant, entry)

    # -- reloads ----------------------------------------------------------------------------

    def _validate(self, text: str) -> None:
        """Refuse a configuration HAProxy would not load (``haproxy -c``)."""
        path = self._files.config.with_name("haproxy.cfg.check")
        self._write(path, text)
        try:
            done = subprocess.run(
                [_resolve_binary(self.binary), "-c", "-q", "-f", str(path)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PermanentError(f"cannot run HAProxy {self.binary!r} to check: {exc}") from exc
        finally:
            path.unlink(missing_ok=True)
        if done.returncode != 0:
            raise PermanentError(f"HAProxy refused the rendered configuration: {done.stderr}")

    def _commit(self, old: _State, new: _State) -> None:
        """Write ``new`` and its configuration and reload; put ``old`` back if HAProxy refuses."""
        self._admin("show info")  # Fail before writing anything when HAProxy is down.
        text = render_config(new, self.folder)
        self._validate(text)
        self._save(new)
        self._write(self._files.config, text)
        try:
            self._reload(new)
        except _ReloadFailedError:
            self._save(old)
            self._write(self._files.config, render_config(old, self.folder))
            raise

    def _failed_reloads(self) -> int | None:
        try:
            match = _FAILED_RELOADS.search(_send(self._files.master, "show proc", timeout=1.0))
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def _master_failures(self) -> int:
        """The master's count of failed reloads, once its CLI answers."""
        answers: list[int] = []

        def answered() -> bool:
            count = self._failed_reloads()
            if count is not None:
                answers.append(count)
            return count is not None

        wait_until(
            answered,
            timeout=RELOAD_TIMEOUT,
            message=f"HAProxy's master CLI {self._files.master} did not answer",
            error=TransientError,
        )
        return answers[-1]

    def _reload(self, state: _State) -> None:
        """Seamless reload: save the runtime state, reload, wait for the new worker, re-apply.

        The master hands the listening sockets to the new worker (``expose-fd listeners``),
        so no connection is refused; the old worker finishes its open requests.
        """
        old_pid = _worker_pid(self._files)
        if old_pid is None:
            self._admin("show info")  # Raises the "not running" error.
        failed = self._master_failures()
        self._write(self._files.servers_state, self._admin("show servers state"))
        try:
            _send(self._files.master, "reload")
        except OSError as exc:
            raise TransientError(f"HAProxy's master CLI {self._files.master}: {exc}") from exc

        def switched() -> bool:
            pid = _worker_pid(self._files)
            if pid is not None and pid != old_pid:
                return True
            if (self._failed_reloads() or 0) > failed:
                raise _ReloadFailedError(f"HAProxy at {self.folder} failed to reload (see its log)")
            return False

        wait_until(
            switched,
            timeout=RELOAD_TIMEOUT,
            message=f"HAProxy at {self.folder} did not start a new worker",
            error=_ReloadFailedError,
        )
        for tenant, entry in state["tenants"].items():
            wait_until(
                functools.partial(_accepts, entry["port"]),
                timeout=RELOAD_TIMEOUT,
                message=f"frontend fe_{tenant} did not accept connections on {entry['port']}",
                error=TransientError,
            )
        # The master re-executes itself on reload: wait for its CLI, for the next reload.
        self._master_failures()
        self._apply_all(state)
        log.info("haproxy_reloaded", folder=str(self.folder), worker=_worker_pid(self._files))


# -- the process ------------------------------------------------------------------------------


def serve(folder: Path, *, binary: str = "haproxy", timeout: float = START_TIMEOUT) -> int:
    """Render the configuration from ``state.json`` and run HAProxy until it exits; its status.

    SIGTERM and SIGINT are passed on to HAProxy's master, which stops its worker. Once the
    admin socket answers, the runtime state of every tenant is applied from ``state.json``.
    """
    balancer = HAProxy(folder, binary=binary)
    files = balancer._files
    # The lock is held until the runtime state is applied: an operation that comes in
    # meanwhile waits, and so does wait_ready.
    with balancer._locked():
        state = balancer._load()
        balancer._write(files.config, render_config(state, balancer.folder))
        argv = [_resolve_binary(binary), "-W", "-db", "-S", f"{files.master},mode,600"]
        proc = subprocess.Popen([*argv, "-f", str(files.config), "-p", str(files.pid)])

        def forward(signum: int, frame: FrameType | None) -> None:
            proc.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        log.info("haproxy_started", folder=str(balancer.folder), pid=proc.pid)
        with contextlib.suppress(TransientError):
            wait_until(
                lambda: proc.poll() is not None or _worker_pid(files) is not None,
                timeout=timeout,
                error=TransientError,
            )
        if proc.poll() is None:
            try:
                balancer._apply_all(state)
            except (TransientError, PermanentError) as exc:
                log.warning(
                    "haproxy_state_not_applied", folder=str(balancer.folder), error=str(exc)
                )
    code = proc.wait()
    log.info("haproxy_exited", folder=str(balancer.folder), code=code)
    return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m plugins.load_balancers.haproxy serve --dir DIR [--binary haproxy]``."""
    parser = argparse.ArgumentParser(description="cul8er's HAProxy load balancer.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="render the configuration and run HAProxy")
    run.add_argument("--dir", required=True, type=Path, help="HAProxy's folder")
    run.add_argument("--binary", default="haproxy", help="the HAProxy binary")
    args = parser.parse_args(argv)
    return serve(args.dir, binary=args.binary)


if __name__ == "__main__":
    sys.exit(main())
