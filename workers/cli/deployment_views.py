"""Deployments as JSON for ``cul8er deploy show|list`` (and ``--wait``), from driver rows.

``describe`` and ``summary`` answer what ``workers.delivery.commands.describe`` and
``workers.delivery.rows.summary`` answer, without the models, the plugin host or Celery
(the delivery room imports all three); ``tests/unit/cli/test_reads.py`` holds each pair to
the same output.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Final

from workers.cli.console import fail

if TYPE_CHECKING:
    from workers.cli.reads import Reader, Row

__all__ = ["describe", "find_id", "list_deployments"]

_COLUMNS: Final = (
    "id, tenant_id, plugin, targets, status, strategy, strategy_config, environment, release,"
    " previous_release, stages, stage_index, stage_state, measurements, timeline,"
    " approvals_required, approval_expires_at, workflow_id, requests, reason, actor,"
    " rollback_of, created_at, finished_at"
)
#: The JSON columns of ``deployments``.
_JSON: Final = (
    "targets",
    "strategy_config",
    "release",
    "previous_release",
    "stages",
    "stage_state",
    "measurements",
    "timeline",
    "requests",
    "reason",
)


def find_id(read: Reader, prefix: str) -> str:
    """The id of the deployment ``prefix`` names, whole or as a unique prefix (exit if not)."""
    if read.rows("SELECT id FROM deployments WHERE id = :id", id=prefix):
        return prefix
    # As SQLAlchemy's ``startswith``: the prefix is a LIKE pattern of its own.
    rows = read.rows("SELECT id FROM deployments WHERE id LIKE :prefix || '%'", prefix=prefix)
    if len(rows) != 1:
        what = "no deployment" if not rows else f"{len(rows)} deployments"
        raise fail("not_found", f"{what} matching {prefix!r}")
    return str(rows[0]["id"])


def list_deployments(
    read: Reader, *, tenant_id: str | None, plugin: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    """Deployments, newest first, optionally of one tenant or plugin or in one status."""
    wanted = {"tenant_id": tenant_id, "plugin": plugin, "status": status}
    where = [f"{name} = :{name}" for name, value in wanted.items() if value]
    sql = (
        f"SELECT {_COLUMNS} FROM deployments"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + " ORDER BY created_at DESC LIMIT :limit"
    )
    return [summary(_decoded(read, row)) for row in read.rows(sql, **wanted, limit=limit)]


def summary(row: Row) -> dict[str, Any]:
    """The short form of a (decoded) deployment row."""
    return {
        "deployment_id": row["id"],
        "tenant_id": row["tenant_id"],
        "plugin": row["plugin"],
        "targets": len(row["targets"]) if row["plugin"] else None,
        "status": row["status"],
        "strategy": row["strategy"],
        "version": row["release"].get("version"),
        "previous_version": row["previous_release"].get("version"),
        "environment": row["environment"],
        "stage_index": row["stage_index"],
        "stages": len(row["stages"]),
        "workflow_id": row["workflow_id"],
    }


def describe(read: Reader, deployment_id: str) -> dict[str, Any]:
    """Everything about the deployment ``deployment_id``: stages, timeline, approvals."""
    row = _decoded(
        read, read.rows(f"SELECT {_COLUMNS} FROM deployments WHERE id = :id", id=deployment_id)[0]
    )
    approvals = read.rows(
        "SELECT actor, decision, comment, created_at, expires_at FROM approvals"
        " WHERE deployment_id = :id ORDER BY created_at",
        id=deployment_id,
    )
    now = dt.datetime.now(dt.UTC)
    stages, index = row["stages"], row["stage_index"]
    expires = read.utc(row["approval_expires_at"])
    finished = read.utc(row["finished_at"])
    return {
        **summary(row),
        "release": row["release"],
        "previous_release": row["previous_release"],
        "strategy_config": row["strategy_config"],
        "stages": stages,
        "stage": stages[index]["name"] if index < len(stages) else None,
        "stage_state": {k: v for k, v in row["stage_state"].items() if k != "before"},
        "measurements": row["measurements"],
        "timeline": row["timeline"],
        "approvals_required": row["approvals_required"],
        "approval_expires_at": expires.isoformat() if expires else None,
        "approvals": [_approval(read, a, now) for a in approvals],
        "requests": row["requests"],
        "moved": _moved(read, row),
        "reason": row["reason"],
        "actor": row["actor"],
        "rollback_of": row["rollback_of"],
        "created_at": _utc(read, row["created_at"]).isoformat(),
        "finished_at": finished.isoformat() if finished else None,
    }


def _approval(read: Reader, a: Row, now: dt.datetime) -> dict[str, Any]:
    return {
        "actor": a["actor"],
        "decision": a["decision"],
        "comment": a["comment"],
        "at": _utc(read, a["created_at"]).isoformat(),
        "expired": a["decision"] == "approve" and _utc(read, a["expires_at"]) <= now,
    }


def _moved(read: Reader, row: Row) -> list[str] | None:
    """A plugin deployment's targets on its version now, in move order (``None``: a release)."""
    if row["plugin"] is None:
        return None
    on = read.rows(
        "SELECT tenant_id FROM tenant_plugins WHERE plugin = :plugin"
        " AND deployment_id = :id AND version = :version",
        plugin=row["plugin"],
        id=row["id"],
        version=str(row["release"]["version"]),
    )
    tenants = {r["tenant_id"] for r in on}
    return [str(t) for t in row["targets"] if str(t) in tenants]


def _decoded(read: Reader, row: Row) -> Row:
    """``row`` with its JSON columns decoded."""
    return {**row, **{name: read.json(row[name]) for name in _JSON}}


def _utc(read: Reader, value: Any) -> dt.datetime:
    moment = read.utc(value)
    assert moment is not None
    return moment
