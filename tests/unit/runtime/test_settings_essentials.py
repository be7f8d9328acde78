"""``essentials()`` reads the four fields every command needs exactly as ``Settings`` reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.runtime.essentials import Essentials, essentials
from workers.runtime.settings import Settings, get_settings


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """No ``CUL8ER_*`` variable, a working folder of the test's own, no loaded settings."""
    for name in [n for n in os.environ if n.lower().startswith("cul8er_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def same_as_settings() -> Essentials:
    """``essentials()`` read fresh, after checking it against a freshly built ``Settings``."""
    read = essentials()
    assert read == Essentials.of(Settings())
    return read


def test_the_defaults_are_the_settings_defaults(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    read = same_as_settings()
    assert read.data_dir == tmp_path / "var" and read.database_url is None
    assert read.sqlalchemy_url == Settings().sqlalchemy_url


@pytest.mark.parametrize(
    "variables",
    [
        {"CUL8ER_DATA_DIR": "~/elsewhere", "CUL8ER_LOG_FORMAT": "json"},
        {"cul8er_database_url": "postgresql+psycopg://u@h/db", "Cul8er_Log_Level": "debug"},
        {"CUL8ER_DATA_DIR": "", "CUL8ER_DATABASE_URL": ""},
        {"CUL8ER_DATA_DIR": "rel/dir", "CUL8ER_LOG_FORMAT": "console"},
    ],
)
def test_the_environment_in_any_case(clean: pytest.MonkeyPatch, variables: dict[str, str]) -> None:
    for name, value in variables.items():
        clean.setenv(name, value)
    same_as_settings()


def test_a_dotenv_file_under_the_environment(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given a .env file in the working folder, and one of its names also in the environment
    (tmp_path / ".env").write_text(
        "CUL8ER_DATA_DIR=from-file\n"
        "cul8er_log_level='WARNING'\n"
        'CUL8ER_DATABASE_URL="sqlite:///${HOME}/x.db"\n'
        "cul8er_log_format\n"
        "OTHER=1\n"
    )
    clean.setenv("CUL8ER_DATA_DIR", "from-env")
    # Then both read the environment first, then the file, as written there (a name without
    # a value is unset)
    read = same_as_settings()
    assert read.data_dir == tmp_path / "from-env" and read.log_level == "WARNING"
    assert read.log_format == "auto" and read.database_url == f"sqlite:///{Path.home()}/x.db"


@pytest.mark.parametrize(
    "where, text",
    [
        ("env", "CUL8ER_LOG_FORMAT=yaml"),
        ("file", "CUL8ER_LOG_FORMAT=yaml"),
    ],
)
def test_what_it_cannot_judge_fails_as_settings_fail(
    clean: pytest.MonkeyPatch, tmp_path: Path, where: str, text: str
) -> None:
    if where == "env":
        name, value = text.split("=")
        clean.setenv(name, value)
    else:
        (tmp_path / ".env").write_text(text + "\n")
    with pytest.raises(ValidationError):
        Settings()
    with pytest.raises(ValidationError):
        essentials()


def test_loaded_settings_answer(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given this process's settings loaded, then the environment changed
    clean.setenv("CUL8ER_DATA_DIR", "first")
    loaded = get_settings()
    clean.setenv("CUL8ER_DATA_DIR", "second")
    # Then essentials agree with the process's settings, as every other reader does
    assert essentials() == Essentials.of(loaded)
    assert essentials().data_dir == tmp_path / "first"


def test_reading_them_imports_no_pydantic_settings(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from workers.runtime.essentials import essentials\n"
            "print(essentials().sqlalchemy_url)\n"
            "print('pydantic_settings' in sys.modules, 'pydantic' in sys.modules)\n",
        ],
        env={"PATH": "/usr/bin:/bin", "CUL8ER_DATA_DIR": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.splitlines() == [f"sqlite:///{tmp_path}/cul8er.db", "False False"]
