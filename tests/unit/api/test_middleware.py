"""The request middleware: request ids, the one access line, secrets kept out, proxies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from workers.api import middleware, problems

SECRETS = ("s3cret-bearer-token", "tok-in-query-42", "key-in-query-43", "pw-in-query-44")


def build_app() -> FastAPI:
    app = FastAPI()
    problems.install(app)
    app.add_middleware(middleware.RequestLog)

    router = APIRouter()

    @router.get("/tenants/{tenant_id}")
    def show(tenant_id: str, request: Request) -> dict[str, Any]:
        request.state.subject = "user:alice"
        return {
            "tenant_id": tenant_id,
            "bound": structlog.contextvars.get_contextvars().get("request_id"),
            "state": request.state.request_id,
        }

    app.include_router(router, prefix="/api/v1")

    @app.get("/peer")
    def peer(request: Request) -> dict[str, Any]:
        assert request.client is not None
        return {"host": request.client.host, "scheme": request.url.scheme}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("kaput")

    return app


@pytest.fixture
def app() -> FastAPI:
    return build_app()


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


def access_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == "api_request"]


def test_a_request_without_an_id_gets_a_new_one_bound_and_echoed(client: TestClient) -> None:
    with structlog.testing.capture_logs() as lines:
        response = client.get("/api/v1/tenants/acme")
    assert response.status_code == 200
    request_id = response.headers["X-Request-ID"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    # The route saw the same id in the log context and on request.state
    assert response.json()["bound"] == request_id == response.json()["state"]
    [line] = access_lines(lines)
    assert line["request_id"] == request_id
    # And nothing stays bound once the request is over
    assert "request_id" not in structlog.contextvars.get_contextvars()


def test_a_valid_incoming_id_is_kept(client: TestClient) -> None:
    given = "edge-7f3a9c2e.0001:b"
    response = client.get("/api/v1/tenants/acme", headers={"X-Request-ID": given})
    assert response.headers["X-Request-ID"] == given
    assert response.json()["bound"] == given


@pytest.mark.parametrize(
    "bad", ["short", "has spaces in it", "x" * 129, "a;DROP TABLE tenants", "../../etc/passwd"]
)
def test_a_bad_incoming_id_is_replaced(client: TestClient, bad: str) -> None:
    response = client.get("/api/v1/tenants/acme", headers={"X-Request-ID": bad})
    request_id = response.headers["X-Request-ID"]
    assert request_id != bad and len(request_id) == 32
    assert response.json()["bound"] == request_id


def test_one_line_per_request_with_the_route_template_and_no_secrets(client: TestClient) -> None:
    token, query_token, query_key, query_password = SECRETS
    with structlog.testing.capture_logs() as lines:
        response = client.get(
            f"/api/v1/tenants/acme?token={query_token}&api_key={query_key}&password={query_password}",
            headers={"Authorization": f"Bearer {token}", "X-Api-Key": query_key},
        )
    assert response.status_code == 200
    [line] = access_lines(lines)
    assert line["method"] == "GET"
    assert line["path"] == "/api/v1/tenants/{tenant_id}"
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["subject"] == "user:alice"
    assert line["client"] == "testclient"
    assert line["log_level"] == "info"
    logged = repr(lines)
    for secret in SECRETS:
        assert secret not in logged
    assert "Bearer" not in logged and "acme" not in logged


def test_an_unmatched_path_is_logged_as_it_came_without_its_query(client: TestClient) -> None:
    with structlog.testing.capture_logs() as lines:
        response = client.get("/nowhere?secret=hide-me-45")
    assert response.status_code == 404
    assert response.headers["X-Request-ID"]
    [line] = access_lines(lines)
    assert line["path"] == "/nowhere" and line["status"] == 404 and line["subject"] is None
    assert "hide-me-45" not in repr(lines)


def test_a_crash_is_logged_as_500_and_the_answer_still_carries_the_id(
    client: TestClient,
) -> None:
    token = SECRETS[0]
    with structlog.testing.capture_logs() as lines:
        response = client.get(
            "/boom",
            headers={"X-Request-ID": "trace-0123456789", "Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "trace-0123456789"
    assert response.json()["code"] == "internal"
    assert "trace-0123456789" in response.json()["detail"]
    [line] = access_lines(lines)
    assert line["status"] == 500 and line["request_id"] == "trace-0123456789"
    [crash] = [line for line in lines if line["event"] == "api_unhandled_error"]
    assert crash["request_id"] == "trace-0123456789"
    # The traceback is text without locals: no renderer can print the request's headers
    assert "exc_info" not in crash
    assert "RuntimeError: kaput" in crash["exception"]
    rendered = "".join(
        structlog.dev.ConsoleRenderer(colors=False)(None, "error", dict(line)) for line in lines
    )
    assert token not in rendered and "kaput" in rendered


def test_forwarded_headers_count_only_from_a_trusted_proxy(app: FastAPI) -> None:
    # As `cul8er api serve` runs it: uvicorn's proxy headers (its --forwarded-allow-ips)
    # around the app, trusting the loopback proxy only
    served = ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1")
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    # From the trusted proxy, the headers name the client and scheme, and the log has them
    trusted = TestClient(served, client=("127.0.0.1", 40000))
    with structlog.testing.capture_logs() as lines:
        assert trusted.get("/peer", headers=forwarded).json() == {
            "host": "203.0.113.7",
            "scheme": "https",
        }
    assert access_lines(lines)[0]["client"] == "203.0.113.7"
    # From anyone else they are ignored
    stranger = TestClient(served, client=("198.51.100.9", 40000))
    with structlog.testing.capture_logs() as lines:
        assert stranger.get("/peer", headers=forwarded).json() == {
            "host": "198.51.100.9",
            "scheme": "http",
        }
    assert access_lines(lines)[0]["client"] == "198.51.100.9"


def test_other_scopes_pass_through_untouched() -> None:
    seen: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    asyncio.run(middleware.RequestLog(inner)({"type": "lifespan"}, None, None))
    assert seen == [{"type": "lifespan"}]
