"""What the command line prints is the data itself: no rich markup is read out of it.

A refusal quoting the plugin-name pattern ``^[a-z][a-z0-9_]{0,63}$`` used to lose its
brackets (rich took ``[a-z]`` for a style tag); names and messages now come out verbatim,
through the real ``cul8er`` executable and through typer's runner on the real app.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from schemas.states import TenantStatus
from tests.plugin_factory import make_plugin, rewrite_manifest
from tests.stack import ROOT
from workers.cli.main import cli
from workers.runtime.db import session_scope
from workers.runtime.models import Tenant, utcnow
from workers.runtime.settings import Settings

PATTERN = "'^[a-z][a-z0-9_]{0,63}$'"
#: A terminal wide enough that no table cell is cut.
WIDE = {"COLUMNS": "200"}


def badly_named_plugin(parent: Path) -> Path:
    """A plugin folder whose manifest names it ``Bad-Name``, which the name pattern refuses."""
    root = make_plugin(parent, "fine")
    rewrite_manifest(root, name="Bad-Name")
    return root


def cul8er() -> list[str]:
    """The installed ``cul8er`` console script, or its module where it is not installed."""
    script = Path(sys.executable).with_name("cul8er")
    return [str(script)] if script.exists() else [sys.executable, "-m", "workers.cli.main"]


def test_the_real_cul8er_prints_a_refusal_verbatim(tmp_path: Path) -> None:
    root = badly_named_plugin(tmp_path / "plugins")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
    env.update(CUL8ER_DATA_DIR=str(tmp_path / "var"), COLUMNS="60")
    # When `cul8er plugin validate` refuses the plugin, in a terminal narrower than the message
    done = subprocess.run(
        [*cul8er(), "plugin", "validate", str(root)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it exits 1 with the reason on one line, the pattern whole
    assert done.returncode == 1, done.stderr
    (refusal,) = [line for line in done.stderr.splitlines() if line.startswith("refused: ")]
    assert "invalid cul8er-plugin.json: name: String should match pattern" in refusal
    assert refusal.endswith(PATTERN)


def test_the_app_prints_refusals_and_json_errors_verbatim(
    tmp_path: Path, process_settings: Callable[..., Settings]
) -> None:
    process_settings()
    root = badly_named_plugin(tmp_path / "plugins")
    runner = CliRunner()
    # When the refusal is printed for people
    human = runner.invoke(cli, ["plugin", "validate", str(root)])
    # Then the pattern is intact on stderr, and stdout is empty
    assert human.exit_code == 1
    assert human.stderr.startswith("refused: ") and PATTERN in human.stderr
    assert human.stdout == ""
    # When it is asked for as JSON
    as_json = runner.invoke(cli, ["plugin", "validate", str(root), "--json"])
    # Then the error's message carries the same text
    assert as_json.exit_code == 1
    error = json.loads(as_json.stdout)["error"]
    assert error["code"] == "plugin_error" and error["message"].endswith(PATTERN)


def test_names_that_look_like_markup_are_shown_as_they_are(
    process_settings: Callable[..., Settings],
) -> None:
    process_settings()
    # Given a tenant whose name looks like rich markup
    with session_scope() as session:
        session.add(
            Tenant(
                id="marked",
                name="[red]Acme[/] [bold]",
                plan="free",
                status=TenantStatus.ACTIVE,
                platform="local",
                resources={},
                meta={},
                billing_anchor=utcnow().date(),
            )
        )
    runner = CliRunner()
    # When it is listed and shown
    listed = runner.invoke(cli, ["tenant", "list"], env=WIDE)
    shown = runner.invoke(cli, ["tenant", "show", "marked"], env=WIDE)
    filtered = runner.invoke(cli, ["tenant", "list", "--status", "active", "--json"])
    # Then the name comes out exactly as stored
    assert listed.exit_code == 0, listed.output
    assert "[red]Acme[/] [bold]" in listed.stdout
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith("marked ([red]Acme[/] [bold]): active on free, local")
    assert [t["name"] for t in json.loads(filtered.stdout)] == ["[red]Acme[/] [bold]"]


def test_a_missing_tenant_and_an_unknown_status_are_refused(
    process_settings: Callable[..., Settings],
) -> None:
    process_settings()
    runner = CliRunner()
    # A tenant that does not exist: the one lookup every command shares says so
    for args in (["tenant", "show", "nope"], ["usage", "show", "nope"]):
        missing = runner.invoke(cli, args)
        assert missing.exit_code == 1, args
        assert missing.stderr == "not_found: tenant 'nope' does not exist\n"
    # A status no run or tenant can have is a usage error, not an empty list
    assert runner.invoke(cli, ["workflow", "list", "--status", "finished"]).exit_code == 2
    assert runner.invoke(cli, ["tenant", "list", "--status", "gone"]).exit_code == 2
