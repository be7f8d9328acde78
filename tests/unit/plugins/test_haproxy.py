"""The HAProxy load balancer against a real HAProxy and real instance processes (no mocks).

HAProxy runs through the module's own ``serve`` entry in a short folder under /tmp (unix
socket paths must stay short); every request goes to a 127.0.0.1 frontend.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from plugins.load_balancers.haproxy import HAProxy, group_weight, wait_ready
from schemas.plugins import Backend, Frontend, HeaderRoute, Weights

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
if HAPROXY is None:
    if os.environ.get("CI"):
        pytest.fail(
            "HAProxy is missing in CI: scripts/setup.sh services installs it", pytrace=False
        )
    pytest.skip(
        "HAProxy is not installed (scripts/setup.sh services installs it)",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[3]
#: Entry ports of the balancers under test (away from cul8er's default 21000-21999).
PORT_MIN, PORT_MAX = 29100, 29899
TENANT = "acme"


# -- helpers ----------------------------------------------------------------------------------


def request(address: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET / on ``address`` over a new connection: (status, body)."""
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/", headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def tally(address: str, count: int, headers: dict[str, str] | None = None) -> Counter[str]:
    """Who answered ``count`` requests: instance names, or ``status N`` for anything else."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        status, body = request(address, headers)
        match = re.match(r"cul8er instance (\S+)", body)
        seen[match.group(1) if status == 200 and match else f"status {status}"] += 1
    return seen


def reloads(folder: Path) -> int:
    """How many times HAProxy's master has reloaded, from its master CLI."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(folder / "master.sock"))
        sock.sendall(b"show proc\n")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    match = re.search(r"master\s+(\d+)", answer.decode())
    assert match, answer
    return int(match.group(1))


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short folder for HAProxy's files and sockets."""
    path = Path(tempfile.mkdtemp(prefix="hap", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_haproxy(folder: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start ``python -m plugins.load_balancers.haproxy serve`` on ``folder``; stopped after."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        with open(folder / "serve.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "plugins.load_balancers.haproxy", "serve"]
                + ["--dir", str(folder), "--binary", str(HAPROXY)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        wait_ready(folder, timeout=20)
        return proc

    yield start
    for proc in started:
        stop(proc)


@pytest.fixture
def serving(start_haproxy: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """The ``serve`` process running HAProxy on ``folder``."""
    return start_haproxy()


@pytest.fixture
def lb(folder: Path, serving: subprocess.Popen[bytes]) -> HAProxy:
    """The balancer, with its HAProxy running."""
    return HAProxy(folder, binary=str(HAPROXY), port_min=PORT_MIN, port_max=PORT_MAX)


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start instance servers by name: ``create(name)`` answers ``127.0.0.1:PORT``."""
    procs: list[subprocess.Popen[bytes]] = []

    def create(name: str) -> str:
        directory = tmp_path / name
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "plugins.platforms.instance_server"]
                + ["--name", name, "--dir", str(directory), "--port", "0"],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        port_file = directory / "port"
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert time.monotonic() < deadline, f"instance {name} did not start"
            time.sleep(0.05)
        return f"127.0.0.1:{port_file.read_text().strip()}"

    yield create
    for proc in procs:
        stop(proc)


class _Failing(BaseHTTPRequestHandler):
    """Answers every request with 500, except ``/health`` (so the check keeps it UP)."""

    def do_GET(self) -> None:
        status = 200 if self.path == "/health" else 500
        body = b"ok\n" if status == 200 else b"boom\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def failing() -> Iterator[str]:
    """A backend that answers 500: ``127.0.0.1:PORT``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def backend(name: str, address: str, group: str = "stable", state: str = "ready") -> Backend:
    return Backend.model_validate(
        {"tenant_id": TENANT, "name": name, "address": address, "group": group, "state": state}
    )


def split(stable: int, canary: int) -> Weights:
    return Weights(tenant_id=TENANT, weights={"stable": stable, "canary": canary})


@pytest.fixture
def two_groups(lb: HAProxy, instances: Callable[[str], str]) -> str:
    """Tenant ``acme`` with stable ``s1`` and canary ``c1``, both ready: its entry address."""
    entry = lb.ensure_frontend(Frontend(tenant_id=TENANT))
    lb.add_backend(backend("s1", instances("s1")))
    lb.add_backend(backend("c1", instances("c1"), group="canary"))
    return entry.address


# -- the contract and pure parts --------------------------------------------------------------


def test_the_class_fulfils_the_load_balancer_contract() -> None:
    from schemas.manifest import PluginType
    from workers.pluginhost.contracts import check_contract

    check_contract("haproxy", PluginType.LOAD_BALANCER, HAProxy)


def test_group_weight_shares_256_between_ready_servers() -> None:
    assert [group_weight(70, 1), group_weight(30, 1)] == [179, 77]
    assert group_weight(100, 2) == 128
    assert group_weight(1, 16) == 1  # A group with traffic never drops to 0.
    assert group_weight(0, 3) == 0
    assert group_weight(50, 0) == 0


def test_from_settings_uses_the_haproxy_folder_and_entry_ports(folder: Path) -> None:
    settings = SimpleNamespace(
        haproxy_folder=folder, haproxy_binary="hap", entry_port_min=1000, entry_port_max=1001
    )
    balancer = HAProxy.from_settings(settings)  # type: ignore[arg-type]
    assert (balancer.folder, balancer.binary) == (folder.resolve(), "hap")
    assert (balancer.port_min, balancer.port_max) == (1000, 1001)


def test_a_folder_too_long_for_unix_sockets_is_refused() -> None:
    from workers.plugin_api import PermanentError

    long_folder = Path("/tmp") / ("x" * 120)
    with pytest.raises(PermanentError, match=str(long_folder)):
        HAProxy(long_folder)


# -- frontends --------------------------------------------------------------------------------


def test_ensure_frontend_twice_gives_the_same_port_and_reloads_once(
    lb: HAProxy, folder: Path
) -> None:
    # Given a running HAProxy with no tenant
    # When the tenant's frontend is ensured twice
    first = lb.ensure_frontend(Frontend(tenant_id=TENANT))
    second = lb.ensure_frontend(Frontend(tenant_id=TENANT))
    # Then it has one port in the range, and only the first call reloaded
    assert first.address == second.address
    assert PORT_MIN <= int(first.address.rsplit(":", 1)[1]) <= PORT_MAX
    assert (first.reloaded, second.reloaded) == (True, False)
    assert reloads(folder) == 1
    # And the frontend answers (503: no server yet), and is unhealthy for that reason
    assert request(first.address)[0] == 503
    assert not lb.health(TENANT).healthy


def test_a_port_held_by_another_tenant_is_refused(lb: HAProxy) -> None:
    from workers.plugin_api import PermanentError

    entry = lb.ensure_frontend(Frontend(tenant_id=TENANT))
    port = int(entry.address.rsplit(":", 1)[1])
    with pytest.raises(PermanentError, match=f"port {port} is taken by tenant {TENANT}"):
        lb.ensure_frontend(Frontend(tenant_id="other", port=port))
    # The tenant's own port is honoured
    assert lb.ensure_frontend(Frontend(tenant_id=TENANT, port=port)).address == entry.address


def test_a_second_tenant_gets_another_port_and_runtime_weights_survive_its_reload(
    lb: HAProxy, two_groups: str, instances: Callable[[str], str]
) -> None:
    # Given tenant acme split 70/30 at run time
    lb.set_weights(split(70, 30))
    # When a second tenant is added (a reload)
    other = lb.ensure_frontend(Frontend(tenant_id="beta"))
    # Then it has its own port, and acme's split is still what HAProxy applies
    assert other.reloaded and other.address != two_groups
    stats = lb.stats(TENANT)
    assert stats.weights == {"stable": 70, "canary": 30}
    assert [(s.name, s.weight) for s in stats.servers] == [("s1", 179), ("c1", 77)]
    # And the second tenant serves its own backend
    lb.add_backend(Backend(tenant_id="beta", name="b1", address=instances("b1")))
    assert tally(other.address, 5) == {"b1": 5}


def test_remove_backend_and_frontend_are_idempotent(
    lb: HAProxy, two_groups: str, folder: Path
) -> None:
    s1 = lb.stats(TENANT).servers[0]
    gone = backend("s1", s1.address)
    assert lb.remove_backend(gone).ok
    assert lb.remove_backend(gone).ok
    assert [s.name for s in lb.stats(TENANT).servers] == ["c1"]
    # At 100/0 with no stable server, nothing answers
    assert request(two_groups)[0] == 503
    before = reloads(folder)
    assert lb.remove_frontend(TENANT).ok
    assert lb.remove_frontend(TENANT).ok
    assert reloads(folder) == before + 1
    port = int(two_groups.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    # Removing a backend of a tenant that is gone is success too
    assert lb.remove_backend(gone).ok


# -- backends and weights ---------------------------------------------------------------------


def test_adding_a_backend_twice_keeps_one_server_and_updates_it(
    lb: HAProxy, instances: Callable[[str], str]
) -> None:
    lb.ensure_frontend(Frontend(tenant_id=TENANT))
    address = instances("s1")
    lb.add_backend(backend("s1", address))
    lb.add_backend(backend("s1", address, state="drain"))
    servers = lb.stats(TENANT).servers
    assert [(s.name, s.address, s.state) for s in servers] == [("s1", address, "DRAIN")]


def test_traffic_reaches_only_the_stable_group_at_100_0(lb: HAProxy, two_groups: str) -> None:
    assert tally(two_groups, 40) == {"s1": 40}
    assert lb.stats(TENANT).weights == {"stable": 100, "canary": 0}
    assert lb.health(TENANT).healthy


def test_a_70_30_split_sends_about_70_30_of_the_traffic(lb: HAProxy, two_groups: str) -> None:
    # When the tenant is split 70/30
    lb.set_weights(split(70, 30))
    # Then 200 requests go about 140/60, and the split reads back from HAProxy
    seen = tally(two_groups, 200)
    assert set(seen) == {"s1", "c1"}
    assert 45 <= seen["c1"] <= 75, seen
    assert lb.stats(TENANT).weights == {"stable": 70, "canary": 30}
    # And back to 100/0, the canary gets nothing
    lb.set_weights(split(100, 0))
    assert tally(two_groups, 20) == {"s1": 20}


def test_drain_and_maint_take_a_server_out(
    lb: HAProxy, two_groups: str, instances: Callable[[str], str]
) -> None:
    s2 = instances("s2")
    lb.add_backend(backend("s2", s2))
    assert tally(two_groups, 20) == {"s1": 10, "s2": 10}
    for state in ("drain", "maint"):
        lb.add_backend(backend("s2", s2, state=state))
        assert tally(two_groups, 20) == {"s1": 20}, state
    lb.add_backend(backend("s2", s2))
    assert tally(two_groups, 20) == {"s1": 10, "s2": 10}


def test_weights_must_add_up_to_100(lb: HAProxy, two_groups: str) -> None:
    from workers.plugin_api import PermanentError

    with pytest.raises(PermanentError, match="weights"):
        lb.set_weights(split(60, 39))
    assert lb.stats(TENANT).weights == {"stable": 100, "canary": 0}


def test_canary_traffic_needs_a_ready_canary_backend(
    lb: HAProxy, instances: Callable[[str], str]
) -> None:
    from workers.plugin_api import PermanentError

    lb.ensure_frontend(Frontend(tenant_id=TENANT))
    lb.add_backend(backend("s1", instances("s1")))
    with pytest.raises(PermanentError, match="no ready canary backend"):
        lb.set_weights(split(50, 50))


def test_a_non_loopback_address_is_refused(lb: HAProxy) -> None:
    from workers.plugin_api import PermanentError

    lb.ensure_frontend(Frontend(tenant_id=TENANT))
    for address in ("10.0.0.5:8080", "localhost:8080", "127.0.0.1"):
        with pytest.raises(PermanentError, match=re.escape(address)):
            lb.add_backend(backend("x", address))


def test_concurrent_adds_from_two_threads_both_land(
    lb: HAProxy, instances: Callable[[str], str]
) -> None:
    # Given a tenant and two instances
    lb.ensure_frontend(Frontend(tenant_id=TENANT))
    addresses = {name: instances(name) for name in ("s1", "s2")}
    # When two threads add them at the same moment
    barrier = threading.Barrier(len(addresses))
    errors: list[BaseException] = []

    def add(name: str) -> None:
        barrier.wait()
        try:
            lb.add_backend(backend(name, addresses[name]))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(name,)) for name in addresses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then both are there, in different slots, with the split shared between them
    assert errors == []
    servers = lb.stats(TENANT).servers
    assert sorted(s.name for s in servers) == ["s1", "s2"]
    assert [s.weight for s in servers] == [128, 128]


# -- routes -----------------------------------------------------------------------------------


def test_a_header_route_sends_matching_requests_to_the_canary(
    lb: HAProxy, two_groups: str, folder: Path
) -> None:
    route = HeaderRoute(tenant_id=TENANT, header="X-Canary", value="always")
    lb.route_by_header(route)
    before = reloads(folder)
    # An identical route changes nothing and does not reload
    assert lb.route_by_header(route).detail == "routes unchanged"
    assert reloads(folder) == before
    assert tally(two_groups, 10, {"x-canary": "always"}) == {"c1": 10}
    assert tally(two_groups, 10, {"x-canary": "never"}) == {"s1": 10}
    assert tally(two_groups, 10) == {"s1": 10}
    assert [(r.header, r.value) for r in lb.stats(TENANT).routes] == [("x-canary", "always")]
    # When the routes are cleared, the header no longer matters
    lb.route_by_header(HeaderRoute(tenant_id=TENANT, group=None))
    assert tally(two_groups, 10, {"x-canary": "always"}) == {"s1": 10}
    assert lb.stats(TENANT).routes == []


def test_a_cookie_route_sends_matching_requests_to_the_canary(lb: HAProxy, two_groups: str) -> None:
    lb.route_by_header(HeaderRoute(tenant_id=TENANT, cookie="cul8er_canary", value="yes"))
    assert tally(two_groups, 10, {"Cookie": "a=b; cul8er_canary=yes"}) == {"c1": 10}
    assert tally(two_groups, 10, {"Cookie": "cul8er_canary=no"}) == {"s1": 10}


def test_a_route_needs_exactly_one_of_header_and_cookie(lb: HAProxy, two_groups: str) -> None:
    from workers.plugin_api import PermanentError

    for fields in ({}, {"header": "x-a", "cookie": "a"}):
        with pytest.raises(PermanentError, match="exactly one of header and cookie"):
            lb.route_by_header(HeaderRoute(tenant_id=TENANT, value="v", **fields))


# -- stats ------------------------------------------------------------------------------------


def test_stats_count_requests_and_5xx_per_server(
    lb: HAProxy, two_groups: str, failing: str
) -> None:
    # Given a canary that answers 500, at half of the traffic
    lb.remove_backend(backend("c1", "127.0.0.1:1"))
    lb.add_backend(backend("bad", failing, group="canary"))
    lb.set_weights(split(50, 50))
    before = lb.stats(TENANT).frontend_requests
    # When 20 requests come in
    seen = tally(two_groups, 20)
    # Then the clients saw the 500s (no retry on 5xx), and the counters say the same
    assert seen == {"s1": 10, "status 500": 10}
    servers = {s.name: s for s in lb.stats(TENANT).servers}
    assert (servers["s1"].requests, servers["s1"].responses_2xx) == (10, 10)
    assert (servers["bad"].requests, servers["bad"].responses_5xx) == (10, 10)
    assert servers["bad"].group == "canary" and servers["bad"].address == failing
    assert servers["s1"].response_ms >= 0
    # and the frontend counted every request its users sent (what metering bills)
    assert lb.stats(TENANT).frontend_requests - before == 20


# -- availability -----------------------------------------------------------------------------


def test_when_haproxy_is_not_running_operations_are_transient(folder: Path) -> None:
    from workers.plugin_api import TransientError

    balancer = HAProxy(folder, port_min=PORT_MIN, port_max=PORT_MAX)
    status = balancer.health("")
    assert not status.healthy and "not running" in status.detail
    with pytest.raises(TransientError, match="HAProxy is not running"):
        balancer.ensure_frontend(Frontend(tenant_id=TENANT))
    # Nothing was recorded for a frontend that was not served
    assert not (folder / "state.json").exists()


def test_a_restart_restores_the_runtime_state_from_state_json(
    lb: HAProxy,
    two_groups: str,
    serving: subprocess.Popen[bytes],
    start_haproxy: Callable[[], subprocess.Popen[bytes]],
) -> None:
    # Given a split set at run time, after the last reload
    lb.set_weights(split(70, 30))
    # When HAProxy is stopped and served again
    stop(serving)
    start_haproxy()
    # Then the tenant's servers and split are back
    assert lb.stats(TENANT).weights == {"stable": 70, "canary": 30}
    assert set(tally(two_groups, 10)) == {"s1", "c1"}


def test_no_request_fails_during_reloads_and_weight_changes(lb: HAProxy, two_groups: str) -> None:
    # Given a client sending about 50 requests a second
    results: list[str] = []
    stopping = threading.Event()

    def client() -> None:
        while not stopping.is_set():
            try:
                status, _ = request(two_groups)
                results.append("ok" if status == 200 else f"status {status}")
            except OSError as exc:
                results.append(f"error {exc}")
            time.sleep(0.02)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        # When routes are switched (3 reloads) and the split moves meanwhile
        route = HeaderRoute(tenant_id=TENANT, header="x-canary", value="always")
        for step, weights in enumerate([(70, 30), (0, 100), (100, 0)]):
            if step != 1:
                lb.route_by_header(route)
            else:
                lb.route_by_header(HeaderRoute(tenant_id=TENANT, group=None))
            lb.set_weights(split(*weights))
            time.sleep(1.0)
    finally:
        stopping.set()
        thread.join()
    # Then no request failed
    failed = [r for r in results if r != "ok"]
    assert len(results) > 100
    assert failed == []


def test_a_dead_backend_costs_no_failed_request_and_its_check_takes_it_out(
    lb: HAProxy, two_groups: str
) -> None:
    # Given a stable backend whose port nothing listens on, next to a live one
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    lb.add_backend(backend("dead", dead))
    # When requests come in at once: retried on the live server (conn-failure, redispatch)
    assert tally(two_groups, 20) == {"s1": 20}
    # Then the health check marks it DOWN within a few seconds (inter 1s, fall 3)
    deadline = time.monotonic() + 10
    while {s.name: s.state for s in lb.stats(TENANT).servers}["dead"] != "DOWN":
        assert time.monotonic() < deadline, lb.stats(TENANT)
        time.sleep(0.2)
    assert lb.health(TENANT).detail.startswith("2 of 3 servers up")
