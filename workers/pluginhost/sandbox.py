"""The sandbox stage of a plugin deployment: a version's checks, run where untrusted code runs.

Before any tenant moves to a new plugin version, the sandbox worker (the ``plugins.sandbox``
queue, under its time, memory and CPU limits) checks it as an install would: manifest hashes
and signature, plugin API range, dependencies and conflicts, contract, config, and the
plugin's ``self_test()``; then runs the plugin's own tests when it ships them (a ``tests``
folder beside its manifest), with pytest, in a child process.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Final

import structlog

from workers.pluginhost.admin import _candidate, _check
from workers.pluginhost.loader import validate_config
from workers.runtime.db import session_scope
from workers.runtime.errors import Cul8erError, PluginError
from workers.runtime.models import Plugin

if TYPE_CHECKING:
    from pathlib import Path

    from workers.pluginhost.loader import LoadedPlugin
    from workers.runtime.settings import Settings

__all__ = ["CHECKS", "check_version"]

log = structlog.get_logger(__name__)

#: What passing ``_check`` means, in the order it checks.
CHECKS: Final = (
    "manifest hashes and signature",
    "plugin API range, dependencies and conflicts",
    "contract",
    "config",
    "self_test",
)
#: The plugin's own tests get this long (seconds).
TESTS_TIMEOUT: Final = 300.0


def check_version(
    name: str,
    version: str,
    *,
    settings: Settings,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every check of ``name`` ``version``: ``{"ok", "checks", "tests", "error"}``.

    ``overrides``: tenants' own config (references, never values), each checked merged over the
    plugin's config by this version's config model, before any of them moves to it.
    """
    try:
        candidate = _candidate(name, settings, version)
        config = settings.plugin_config.get(name)
        if config is None:
            with session_scope(settings.sqlalchemy_url) as session:
                row = session.get(Plugin, name)
                config = dict(row.config or {}) if row is not None else {}
        loaded = _check(candidate, settings, config)
    except Cul8erError as exc:
        log.warning("sandbox_check_failed", plugin=name, version=version, error=str(exc))
        return {"ok": False, "checks": [], "tests": None, "error": str(exc)}
    misfits = _misfits(loaded, config, overrides or {})
    if misfits:
        return {
            "ok": False,
            "checks": list(CHECKS),
            "tests": None,
            "error": f"tenants' config overrides do not fit {version}: {'; '.join(misfits[:5])}",
        }
    tests = _own_tests(loaded.root, name) if loaded.root is not None else None
    ok = tests is None or tests["ok"] is not False
    return {
        "ok": ok,
        "checks": list(CHECKS),
        "tests": tests,
        "error": None if ok else f"the plugin's own tests failed: {tests and tests['tail']}",
    }


def _misfits(
    loaded: LoadedPlugin, config: dict[str, Any], overrides: dict[str, dict[str, Any]]
) -> list[str]:
    """``tenant: why`` for each tenant whose overrides this version's config model refuses."""
    misfits = []
    for tenant_id, own in sorted(overrides.items()):
        try:
            validate_config(loaded, {**config, **own})
        except PluginError as exc:
            misfits.append(f"{tenant_id}: {exc}")
    return misfits


def _own_tests(root: Path, name: str) -> dict[str, Any] | None:
    """Run ``root/tests`` with pytest; ``None`` when the plugin ships no tests."""
    folder = root / "tests"
    if not folder.is_dir():
        return None
    if importlib.util.find_spec("pytest") is None:
        return {"ok": None, "tail": "pytest is not installed on the sandbox worker: not run"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
            cwd=root.parent,
            capture_output=True,
            text=True,
            timeout=TESTS_TIMEOUT,
            # The plugin's module imports from its root (a folder holding the package) or
            # from the folder above it (the module folder itself holds the manifest).
            env={"PYTHONPATH": f"{root}:{root.parent}", "PATH": "/usr/bin:/bin"},
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "tail": f"timed out after {TESTS_TIMEOUT:g} s"}
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    log.info("plugin_tests_ran", plugin=name, returncode=done.returncode, tail=tail[0])
    return {"ok": done.returncode == 0, "tail": tail[0][:300]}
