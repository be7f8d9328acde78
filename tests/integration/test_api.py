"""The HTTP API end to end: a real uvicorn server, real workers, tokens of every role.

The server is ``cul8er api serve`` as an operator runs it; the calls are plain HTTP on
127.0.0.1 with bearer tokens that ``issue_token`` signs with the server's secret.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import build_stack, teardown_stack
from tests.integration.test_deployments import _need_haproxy
from tests.integration.test_plugins import observer
from tests.stack import ROOT, Stack
from workers.api.auth import issue_token
from workers.api.roles import POLICY, Action, Role
from workers.runtime.settings import Settings
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

SECRET = "s" * 48


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(stack: Stack, *args: str, scheme: str = "http", **env: str) -> Iterator[str]:
    """``cul8er api serve ARGS`` on a free loopback port with ``env`` on top; its base URL."""
    port = free_port()
    log = (stack.data_dir / f"api-{port}.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "workers.cli.main", "api", "serve", "--port", str(port), *args],
        env={**stack.env, **env},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"{scheme}://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base), timeout=30, interval=0.2, error=AssertionError)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    """A stack with a worker and beat, and ``cul8er api serve`` on a loopback port."""
    _need_haproxy()
    stack = build_stack("redis-postgres", tmp_path_factory.mktemp("api"))
    stack.extra_env.update(CUL8ER_API_JWT_SECRET=SECRET, CUL8ER_PRODUCTION_APPROVALS="1")
    try:
        stack.start_haproxy()
        stack.start_worker("main", concurrency=3)
        stack.start_beat()
        with serve(stack) as base:
            yield stack, base
    finally:
        teardown_stack(stack)


def _answers(base: str) -> bool:
    try:
        # A TLS server's certificate is checked by the test itself, not here.
        return httpx.get(f"{base}/healthz", timeout=1, verify=False).status_code == 200
    except httpx.HTTPError:
        return False


def token(role: Role, subject: str | None = None, tenants: tuple[str, ...] = (), **kw: Any) -> str:
    settings = Settings(api_jwt_secret=SECRET)  # type: ignore[arg-type]
    return issue_token(
        settings, subject=subject or f"{role.value}-1", role=role, tenants=tenants, **kw
    )


def client(base: str, role: Role, **kw: Any) -> httpx.Client:
    return httpx.Client(
        base_url=f"{base}/api/v1",
        headers={"Authorization": f"Bearer {token(role, **kw)}"},
        timeout=120,
    )


# -- a tenant's whole life --------------------------------------------------------------------


def test_a_tenant_s_whole_life_over_http(api: tuple[Stack, str]) -> None:
    _, base = api
    ops = client(base, Role.OPERATOR)
    created = ops.post("/tenants?wait=90", json={"name": "Web Shop", "plan": "free"})
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "succeeded"
    assert created.headers["Location"].startswith("/api/v1/workflows/")
    tenant_id = created.json()["tenant_id"]
    shown = ops.get(f"/tenants/{tenant_id}").json()
    assert shown["status"] == "active" and shown["plan"] == "free"
    listed = ops.get("/tenants", params={"plan": "free"}).json()
    assert tenant_id in [t["tenant_id"] for t in listed["items"]]
    for path, body in (
        (f"/tenants/{tenant_id}/plan", {"plan": "starter"}),
        (f"/tenants/{tenant_id}/suspend", {"reason": "unpaid"}),
        (f"/tenants/{tenant_id}/resume", None),
    ):
        done = ops.post(f"{path}?wait=90", json=body)
        assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    assert ops.get(f"/tenants/{tenant_id}").json()["plan"] == "starter"
    # Without ?wait a write answers 202 and the Location to poll
    accepted = ops.delete(f"/tenants/{tenant_id}")
    assert accepted.status_code == 202, accepted.text
    location = accepted.headers["Location"].removeprefix("/api/v1")
    wait_until(
        lambda: ops.get(location).json().get("status") == "succeeded",
        timeout=90,
        interval=0.5,
        error=AssertionError,
    )
    # And every request in the audit trail names the token's subject
    audit = ops.get("/audit", params={"tenant_id": tenant_id}).json()["items"]
    requested = {
        e["kind"]: e["data"].get("actor") for e in audit if e["kind"].endswith("requested")
    }
    assert set(requested) == {
        f"tenant.{kind}.requested"
        for kind in ("provision", "change_plan", "suspend", "resume", "deprovision")
    }, requested
    assert set(requested.values()) == {"operator-1"}, requested


# -- authentication ---------------------------------------------------------------------------


def _none_token() -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "sub": "x",
        "role": "admin",
        "iss": "cul8er",
        "aud": "cul8er-api",
        "iat": now,
        "exp": now + 600,
    }
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def _signed(**changes: Any) -> str:
    now = int(time.time())
    claims = {
        "sub": "x",
        "role": "admin",
        "iss": "cul8er",
        "aud": "cul8er-api",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(changes)
    key = claims.pop("key", SECRET)
    return jwt.encode(claims, key, algorithm="HS256")


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("expired", lambda: _signed(exp=int(time.time()) - 3600)),
        ("not yet valid", lambda: _signed(nbf=int(time.time()) + 3600)),
        ("wrongly signed", lambda: _signed(key="o" * 48)),
        ("wrong audience", lambda: _signed(aud="someone-else")),
        ("alg none", _none_token),
        ("garbage", lambda: "not-a-token"),
    ],
)
def test_bad_tokens_are_refused_with_401(api: tuple[Stack, str], name: str, make: Any) -> None:
    _, base = api
    answer = httpx.get(
        f"{base}/api/v1/tenants", headers={"Authorization": f"Bearer {make()}"}, timeout=30
    )
    assert answer.status_code == 401, (name, answer.text)
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["code"] == "unauthorized"
    assert "WWW-Authenticate" in answer.headers


def test_no_token_is_refused_and_health_needs_none(api: tuple[Stack, str]) -> None:
    _, base = api
    assert httpx.get(f"{base}/api/v1/tenants", timeout=30).status_code == 401
    assert httpx.get(f"{base}/healthz", timeout=30).json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text


def test_the_openapi_document_is_served(api: tuple[Stack, str]) -> None:
    _, base = api
    document = httpx.get(f"{base}/api/v1/openapi.json", timeout=30).json()
    assert "/api/v1/tenants" in document["paths"]
    assert "/api/v1/deployments/{deployment_id}/approve" in document["paths"]
    assert httpx.get(f"{base}/api/v1/docs", timeout=30).status_code == 200


# -- problems ---------------------------------------------------------------------------------


def test_bad_input_is_a_problem_naming_the_field(api: tuple[Stack, str]) -> None:
    _, base = api
    ops = client(base, Role.OPERATOR, subject="ops-bad-input")
    answer = ops.post("/tenants", json={"name": "x", "plan": 5})
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["code"] == "validation_error"
    assert "plan" in {e["field"] for e in body["errors"]}
    missing = ops.get("/tenants/no-such-tenant")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


# -- rate limits ------------------------------------------------------------------------------


def test_the_eleventh_call_in_a_window_of_ten_is_refused_for_that_subject_only(
    api: tuple[Stack, str],
) -> None:
    stack, _ = api
    # A server allowing 10 reads a minute per subject
    with serve(stack, CUL8ER_API_RATE_READ="10/minute") as base:
        busy = client(base, Role.VIEWER, subject="busy-viewer")
        calm = client(base, Role.VIEWER, subject="calm-viewer")
        answers = [busy.get("/tenants") for _ in range(11)]
        assert [a.status_code for a in answers[:10]] == [200] * 10
        assert answers[0].headers["RateLimit-Limit"] == "10"
        refused = answers[10]
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["code"] == "rate_limited"
        # And another subject is not affected
        assert calm.get("/tenants").status_code == 200


# -- who may do what: every route × every role ------------------------------------------------


def _routes() -> list[tuple[str, str, Action, bool, dict[str, Any] | None]]:
    """(method, path, action, tenant-scoped, body) of every route. ``{t}``: a tenant the
    tenant owner does not own; ``{d}``: a plugin deployment; ``{w}``: a workflow; ``{p}``: a
    plugin."""
    a = Action
    return [
        ("GET", "/tenants", a.TENANT_READ, False, None),
        ("GET", "/tenants/{t}", a.TENANT_READ, True, None),
        ("GET", "/tenants/{t}/plugins", a.TENANT_READ, True, None),
        ("GET", "/workflows", a.WORKFLOW_READ, False, None),
        ("GET", "/workflows/{w}", a.WORKFLOW_READ, True, None),
        ("GET", "/deployments", a.DEPLOYMENT_READ, False, None),
        ("GET", "/deployments/{d}", a.DEPLOYMENT_READ, True, None),
        ("GET", "/plugins", a.PLUGIN_READ, False, None),
        ("GET", "/plugins/{p}", a.PLUGIN_READ, False, None),
        ("GET", "/plugins/search?q=acme", a.PLUGIN_READ, False, None),
        ("GET", "/tenants/{t}/usage", a.USAGE_READ, True, None),
        ("GET", "/tenants/{t}/autoscale", a.USAGE_READ, True, None),
        ("GET", "/invoices", a.USAGE_READ, False, None),
        ("GET", "/audit", a.AUDIT_READ, False, None),
        ("POST", "/tenants", a.TENANT_WRITE, False, {"name": "Nope", "plan": "free"}),
        ("POST", "/tenants/{t}/plan", a.TENANT_WRITE, True, {"plan": "starter"}),
        ("POST", "/tenants/{t}/suspend", a.TENANT_WRITE, True, {"reason": ""}),
        ("POST", "/tenants/{t}/resume", a.TENANT_WRITE, True, None),
        ("DELETE", "/tenants/{t}", a.TENANT_WRITE, True, None),
        ("PUT", "/tenants/{t}/plugins/{p}", a.TENANT_PLUGIN_WRITE, True, {"config": {}}),
        (
            "POST",
            "/deployments",
            a.DEPLOYMENT_WRITE,
            True,
            {"tenant_id": "{t}", "release": {"version": "2"}, "strategy": "direct"},
        ),
        ("POST", "/deployments/{d}/approve", a.DEPLOYMENT_APPROVE, True, {"reason": ""}),
        ("POST", "/deployments/{d}/reject", a.DEPLOYMENT_APPROVE, True, {"reason": ""}),
        ("POST", "/deployments/{d}/promote", a.DEPLOYMENT_WRITE, True, {"full": False}),
        *[
            ("POST", f"/deployments/{{d}}/{verb}", a.DEPLOYMENT_WRITE, True, {"reason": ""})
            for verb in ("pause", "resume", "abort", "retry", "rollback")
        ],
        ("POST", "/plugins", a.PLUGIN_INSTALL, False, {"source": "/nonexistent/plugin"}),
        *[
            ("POST", f"/plugins/{{p}}/{verb}", a.PLUGIN_ADMIN, False, None)
            for verb in ("enable", "disable", "reload")
        ],
        ("POST", "/tenants/{t}/payments/failed", a.BILLING_WRITE, True, {}),
        ("POST", "/tenants/{t}/payments/succeeded", a.BILLING_WRITE, True, {}),
    ]


def _refusal(role: Role, action: Action, scoped: bool, route: str) -> int | None:
    """The status a role must get on a route, or ``None`` when it may call it."""
    if role is Role.TENANT_OWNER and scoped:
        return 404  # another tenant's: answered as if it did not exist
    if action not in POLICY[role]:
        return 403
    if role is Role.PLUGIN_DEVELOPER and route == "POST /deployments":
        return 403  # a release deployment: plugin developers deploy plugins only
    return None


@pytest.fixture(scope="module")
def subjects(api: tuple[Stack, str]) -> dict[str, str]:
    """A tenant (development), its create workflow, a plugin deployment over it, a plugin."""
    _, base = api
    admin = client(base, Role.ADMIN, subject="matrix-admin")
    made = admin.post("/tenants?wait=90", json={"name": "Matrix Shop", "plan": "free"})
    assert made.status_code == 200, made.text
    tenant_id, workflow_id = made.json()["tenant_id"], made.json()["workflow_id"]
    plugin = next(p for p in admin.get("/plugins").json()["items"] if p["name"] == "log")
    deployed = admin.post(
        "/deployments",
        json={
            "plugin": "log",
            "version": plugin["version"],
            "tenants": [tenant_id],
            "strategy": "direct",
        },
    )
    assert deployed.status_code == 202, deployed.text
    return {
        "t": tenant_id,
        "w": workflow_id,
        "d": deployed.json()["deployment_id"],
        "p": "log",
    }


@pytest.mark.parametrize("role", list(Role))
def test_every_route_refuses_every_role_it_must(
    api: tuple[Stack, str], subjects: dict[str, str], role: Role
) -> None:
    _, base = api
    caller = client(
        base,
        role,
        subject=f"matrix-{role.value}",
        tenants=("owned-shop",) if role is Role.TENANT_OWNER else (),
    )
    checked = 0
    for method, path, action, scoped, body in _routes():
        expected = _refusal(role, action, scoped, f"{method} {path.split('?')[0]}")
        url = path.format(**subjects)
        payload = (
            json.loads(json.dumps(body).replace("{t}", subjects["t"])) if body is not None else None
        )
        if expected is None:
            if method != "GET":
                continue  # allowed writes change things: the flows above exercise them
            answer = caller.request(method, url, json=payload)
            assert answer.status_code not in (401, 403, 404), (role, method, url, answer.text)
            continue
        answer = caller.request(method, url, json=payload)
        assert answer.status_code == expected, (role, method, url, answer.text)
        assert answer.json()["code"] == ("not_found" if expected == 404 else "forbidden")
        checked += 1
    assert checked > 0 or role is Role.ADMIN


def test_a_tenant_owner_sees_and_changes_only_its_own_tenants(
    api: tuple[Stack, str], subjects: dict[str, str]
) -> None:
    _, base = api
    admin = client(base, Role.ADMIN, subject="owner-setup")
    mine = admin.post("/tenants?wait=90", json={"name": "Owned Shop", "plan": "free"})
    assert mine.status_code == 200, mine.text
    own_id = mine.json()["tenant_id"]
    owner = client(base, Role.TENANT_OWNER, subject="owner", tenants=(own_id,))
    # Its own tenant: read, listed, its plugins configured
    assert owner.get(f"/tenants/{own_id}").status_code == 200
    listed = [t["tenant_id"] for t in owner.get("/tenants").json()["items"]]
    assert listed == [own_id]
    assert owner.get(f"/tenants/{own_id}/plugins").status_code == 200
    pinned = owner.put(f"/tenants/{own_id}/plugins/prometheus", json={"config": {}})
    assert pinned.status_code == 200, pinned.text
    # Another tenant: 404 everywhere, with the same answer as a tenant that does not exist
    other = subjects["t"]
    ghost = owner.get("/tenants/no-such-shop").json()["detail"]
    refused = owner.get(f"/tenants/{other}")
    assert refused.status_code == 404
    assert refused.json()["detail"] == ghost.replace("no-such-shop", other)
    assert other not in [r["tenant_id"] for r in owner.get("/workflows").json()["items"]]
    assert owner.get(f"/workflows/{subjects['w']}").status_code == 404
    assert owner.get("/deployments").json()["items"] == []


def test_an_idempotency_key_replays_the_first_answer_and_refuses_another_body(
    api: tuple[Stack, str],
) -> None:
    _, base = api
    ops = client(base, Role.OPERATOR, subject="ops-idempotent")
    key = {"Idempotency-Key": "signup-4711"}
    first = ops.post("/tenants", json={"name": "Key Shop", "plan": "free"}, headers=key)
    again = ops.post("/tenants", json={"name": "Key Shop", "plan": "free"}, headers=key)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert first.json() == again.json()
    other = ops.post("/tenants", json={"name": "Other Shop", "plan": "free"}, headers=key)
    assert other.status_code == 422, other.text
    assert [e["field"] for e in other.json()["errors"]] == ["Idempotency-Key"]
    # Another caller's same key is its own
    someone = client(base, Role.OPERATOR, subject="ops-someone-else")
    theirs = someone.post("/tenants", json={"name": "Their Shop", "plan": "free"}, headers=key)
    assert theirs.status_code == 202, theirs.text
    names = [t["name"] for t in ops.get("/tenants", params={"limit": 500}).json()["items"]]
    assert names.count("Key Shop") == 1 and "Other Shop" not in names


def test_a_production_release_is_deployed_by_an_admin_and_approved_by_an_approver(
    api: tuple[Stack, str],
) -> None:
    _, base = api
    admin = client(base, Role.ADMIN, subject="alice-admin")
    made = admin.post(
        "/tenants?wait=90", json={"name": "Prod Shop", "plan": "free", "environment": "production"}
    )
    assert made.status_code == 200 and made.json()["status"] == "succeeded", made.text
    tenant_id = made.json()["tenant_id"]
    release = {"tenant_id": tenant_id, "release": {"version": "2"}, "strategy": "direct"}
    # An operator may not deploy to production; an admin may
    assert client(base, Role.OPERATOR).post("/deployments", json=release).status_code == 403
    created = admin.post("/deployments", json=release)
    assert created.status_code == 202, created.text
    deployment_id = created.json()["deployment_id"]
    assert created.json()["status"] == "awaiting_approval"
    # An approver approves; the deployment runs to its end
    approver = client(base, Role.APPROVER, subject="bob-approver")
    approved = approver.post(f"/deployments/{deployment_id}/approve", json={"reason": "ok"})
    assert approved.status_code == 200, approved.text
    wait_until(
        lambda: admin.get(f"/deployments/{deployment_id}").json().get("status") == "succeeded",
        timeout=120,
        interval=0.5,
        error=AssertionError,
    )
    shown = admin.get(f"/deployments/{deployment_id}").json()
    assert [a["actor"] for a in shown["approvals"]] == ["bob-approver"]
    assert shown["actor"] == "alice-admin"


def test_a_plugin_developer_installs_a_plugin_over_http(
    api: tuple[Stack, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, base = api
    folder = observer(tmp_path_factory.mktemp("apiplug"), "apiplug", "0.1.0")
    developer = client(base, Role.PLUGIN_DEVELOPER, subject="dana-dev")
    installed = developer.post("/plugins", json={"source": str(folder)})
    assert installed.status_code == 200, installed.text
    listed = {p["name"]: p for p in developer.get("/plugins").json()["items"]}
    assert listed["apiplug"]["state"] == "active"
    audit = client(base, Role.ADMIN).get("/audit", params={"kind": "plugin.installed"}).json()
    assert [e["data"]["actor"] for e in audit["items"] if e["data"]["plugin"] == "apiplug"] == [
        "dana-dev"
    ]
    assert (
        client(base, Role.VIEWER).post("/plugins", json={"source": str(folder)}).status_code == 403
    )


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_the_api_serves_tls_with_the_certificate_it_is_given(
    api: tuple[Stack, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    stack, _ = api
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    args = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    with serve(stack, *args, scheme="https") as base:
        answer = httpx.get(
            f"{base}/api/v1/tenants",
            headers={"Authorization": f"Bearer {token(Role.VIEWER)}"},
            verify=ssl.create_default_context(cafile=str(cert)),
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", timeout=5)  # not the system's trust: refused
