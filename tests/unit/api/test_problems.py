"""Problem details: every error code's status and body, request validation paths, the 500."""

from __future__ import annotations

import json
from http import HTTPStatus

import pytest
import structlog
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from workers.api import problems
from workers.api.problems import STATUS, code_for_status, from_task_answer, problem
from workers.runtime import errors

#: One instance of every error class of workers/runtime/errors.py, and its status.
RAISED: list[tuple[errors.Cul8erError, int]] = [
    (errors.Cul8erError("bare"), 500),
    (errors.TransientError("database busy"), 503),
    (errors.PermanentError("never"), 400),
    (
        errors.ValidationFailedError(
            "invalid arguments", errors=[{"field": "plan", "message": "unknown plan"}]
        ),
        422,
    ),
    (errors.ConflictError("tenant acme exists already"), 409),
    (errors.NotFoundError("no tenant acme"), 404),
    (errors.PoolExhaustedError("no free /24 left"), 503),
    (errors.PluginRefusedError("enable broke a rule"), 409),
    (errors.UnavailableError("no load balancer"), 503),
    (errors.ConfigError("bad plans file /etc/cul8er/plans.yaml"), 500),
    (errors.PluginError("missing operations", plugin_name="local"), 422),
]


class Instance(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    cpu: int


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str
    instances: list[Instance] = []


def build_app() -> FastAPI:
    app = FastAPI()
    problems.install(app)

    @app.get("/raise/{index}")
    def raise_error(index: int) -> None:
        raise RAISED[index][0]

    @app.post("/tenants")
    def create(body: Body, limit: int = 10) -> dict[str, str]:
        return {"name": body.name}

    @app.get("/teapot")
    def teapot() -> None:
        raise HTTPException(401, "no token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("password=hunter2 at /srv/secret/db.sqlite")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(build_app(), raise_server_exceptions=False)


def test_every_code_of_the_errors_module_has_a_status() -> None:
    codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.Cul8erError)
    }
    assert codes <= set(STATUS)
    assert STATUS["unauthorized"] == 401 and STATUS["forbidden"] == 403
    assert STATUS["rate_limited"] == 429 and STATUS["internal"] == 500


@pytest.mark.parametrize("index", range(len(RAISED)), ids=[type(e).__name__ for e, _ in RAISED])
def test_each_error_class_is_answered_with_its_status_and_code(
    client: TestClient, index: int
) -> None:
    error, status = RAISED[index]
    response = client.get(f"/raise/{index}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"https://cul8er.dev/problems/{error.code}"
    assert body["code"] == error.code and body["status"] == status
    assert body["title"] and body["instance"] == f"/raise/{index}"
    if status == 500:
        # The message may name files and settings: it stays in the log.
        assert str(error) not in body["detail"]
    else:
        assert body["detail"] == str(error)
    if isinstance(error, errors.ValidationFailedError):
        assert body["errors"] == [{"field": "plan", "message": "unknown plan"}]
    else:
        assert "errors" not in body


def test_the_body_matches_a_task_rejection() -> None:
    # Given what a public task answers for a rejection
    exc = errors.ValidationFailedError(
        "invalid arguments for cul8er.tenants.create: name: Field required",
        errors=[{"field": "name", "message": "Field required"}],
    )
    answer = {"ok": False, "error": exc.to_dict()}
    # When it becomes a problem
    response = from_task_answer(answer)
    # Then code, detail and errors are the task's own
    assert response.status_code == 422
    assert response.media_type == "application/problem+json"
    body = json.loads(bytes(response.body))
    assert body == {
        "type": "https://cul8er.dev/problems/validation_error",
        "title": HTTPStatus(422).phrase,
        "status": 422,
        "detail": exc.to_dict()["message"],
        "code": "validation_error",
        "errors": [{"field": "name", "message": "Field required"}],
    }


def test_task_answers_map_codes_and_refuse_successes() -> None:
    assert (
        from_task_answer(
            {"ok": False, "error": {"code": "conflict", "message": "busy"}}
        ).status_code
        == 409
    )
    assert (
        from_task_answer({"ok": False, "error": {"code": "weird", "message": "?"}}).status_code
        == 500
    )
    assert from_task_answer({"ok": False}).status_code == 500
    with pytest.raises(ValueError):
        from_task_answer({"ok": True, "tenant_id": "t-1"})


def test_problem_sets_headers_and_optional_members() -> None:
    response = problem(429, "rate_limited", "slow down", headers={"Retry-After": "3"})
    assert response.headers["Retry-After"] == "3"
    assert b'"errors"' not in bytes(response.body) and b'"instance"' not in bytes(response.body)
    assert code_for_status(405) == "method_not_allowed" and code_for_status(404) == "not_found"


def test_request_validation_gives_dotted_body_paths_and_parameter_paths(client: TestClient) -> None:
    response = client.post(
        "/tenants?limit=many",
        json={"instances": [{"cpu": 1}, {"cpu": "2"}], "colour": "red"},
    )
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_error"
    fields = {e["field"] for e in body["errors"]}
    assert fields == {"name", "instances.1.cpu", "colour", "query.limit"}
    assert all(e["message"] for e in body["errors"])
    assert body["detail"].startswith("invalid request: ")


def test_an_unreadable_body_is_a_body_error(client: TestClient) -> None:
    response = client.post(
        "/tenants", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["body"]


def test_http_errors_keep_status_headers_and_detail(client: TestClient) -> None:
    response = client.get("/teapot")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["code"] == "unauthorized" and response.json()["detail"] == "no token"
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    wrong = client.delete("/tenants")
    assert wrong.status_code == 405 and wrong.json()["code"] == "method_not_allowed"


def test_an_unexpected_error_reveals_nothing_and_is_logged(client: TestClient) -> None:
    with structlog.testing.capture_logs() as lines:
        response = client.get("/boom")
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal" and body["type"].endswith("/internal")
    text = response.text
    assert "hunter2" not in text and "RuntimeError" not in text and "/srv" not in text
    [line] = [line for line in lines if line["event"] == "api_unhandled_error"]
    assert line["error_type"] == "RuntimeError" and line["log_level"] == "error"
