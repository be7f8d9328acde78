"""The root command imports a group's module only when that group runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.cli.main import COMMANDS, load_command
from workers.runtime.migrate import upgrade


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_listed_command_loads_with_the_help_the_root_shows(name: str) -> None:
    command = load_command(name)
    assert command.name == name
    first = " ".join((command.help or "").strip().split("\n\n")[0].split())
    assert first == COMMANDS[name][3]
    names = {p.name for p in command.params}
    assert not names & {"install_completion", "show_completion"}


def test_the_root_help_imports_no_command_module() -> None:
    probe = (
        "import sys\n"
        "from workers.cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('workers.cli.') "
        "and m != 'workers.cli.main')\n"
        "heavy = sorted(m for m in ('sqlalchemy', 'celery', 'pydantic_settings') "
        "if m in sys.modules)\n"
        "print(loaded, heavy, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "tenant" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "[] []", done.stderr


#: What a read command has no need of: the ORM, Celery, structlog, the full settings.
HEAVY = (
    "sqlalchemy",
    "celery",
    "pydantic_settings",
    "structlog",
    "workers.runtime.models",
    "workers.runtime.settings",
)
#: ``usage show`` reads the billing period, a field only the full settings have.
FULL_SETTINGS = ["pydantic_settings", "workers.runtime.settings"]


@pytest.mark.parametrize(
    "args, loaded",
    [
        (["tenant", "list", "--json"], []),
        (["tenant", "show", "nope", "--json"], []),
        (["workflow", "list", "--json"], []),
        (["workflow", "show", "nope"], []),
        (["invoice", "list", "--json"], []),
        (["deploy", "show", "nope", "--json"], []),
        (["deploy", "list", "--json"], []),
        (["usage", "show", "nope", "--json"], FULL_SETTINGS),
    ],
)
def test_a_read_command_imports_no_orm_celery_structlog_or_full_settings(
    args: list[str], loaded: list[str], tmp_path: Path
) -> None:
    # Given a migrated data dir and nothing else configured
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
    env["CUL8ER_DATA_DIR"] = str(tmp_path)
    upgrade(f"sqlite:///{tmp_path / 'cul8er.db'}")
    probe = (
        "import sys\n"
        "from workers.cli.main import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(heavy, file=sys.stderr)\n"
    )
    # When the command runs
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    # Then it answered from the database without loading any of them
    assert done.stderr.strip().splitlines()[-1] == repr(loaded), done.stderr
