"""The plugin registry and operator actions on real plugin folders and a real SQLite database.

Every refusal is seen twice: by ``cul8er plugin validate`` (``plugin_admin.validate_path``)
and by a registry booting with the plugin on ``CUL8ER_PLUGIN_PATH``, whose ``status()`` and
``plugins`` row say ``failed`` and why. Then the lifecycle: boot, enable/disable, reload,
config, and the choice between versions found on the plugin path.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from schemas.events import Event
from tests.plugin_factory import (
    make_plugin,
    module_path,
    plugin_path,
    plugin_root,
    sign,
)
from workers.pluginhost.admin import reload, set_enabled, validate_path
from workers.pluginhost.registry import PluginRegistry, PluginUnavailableError
from workers.pluginhost.trust import MANIFEST_FILE, generate_keypair
from workers.runtime.db import session_scope
from workers.runtime.embedded import EmbeddedRedis
from workers.runtime.errors import ConflictError, PluginError
from workers.runtime.migrate import upgrade
from workers.runtime.models import AuditEvent, Plugin
from workers.runtime.settings import Settings, get_settings

#: Exact lines of the observer template (``workers.pluginhost.template``) the tests edit.
FLUSH = '''
    def flush(self) -> Ack:
        """Nothing is buffered."""
        return Ack()
'''
REPORT_METRIC = (
    "    def report_metric(self, metric: MetricSample) -> Ack:\n"
    '        """Remember the latest value of each metric."""\n'
    "        self.metrics[metric.name] = metric.value\n"
)
DETAIL = 'return Ack(detail=f"{self.config.prefix}{event.event_type}")'
SELF_TEST = '        """Run at load and on reload: raise to refuse this version."""\n'
CONFIG_FIELD = '    prefix: str = "seen: "\n'
FUTURE = "from __future__ import annotations\n"


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def process_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """This process's own settings (``get_settings``): a migrated data dir of the test's own.

    ``set_enabled`` and ``reload`` publish a ``plugin.state_changed`` event, which may ask
    the process-wide registry (``get_settings()``) who observes: it must not reach ``./var``
    of the working directory, nor another test's data. The broker is in memory.
    """
    import workers.pluginhost.calls as plugin_tasks

    monkeypatch.setenv("CUL8ER_DATA_DIR", str(tmp_path / "process"))
    monkeypatch.setenv("CUL8ER_BROKER_URL", "memory://")
    monkeypatch.setenv("CUL8ER_RESULT_BACKEND", "cache+memory://")
    for name in ("CUL8ER_DATABASE_URL", "CUL8ER_PLUGIN_PATH", "CUL8ER_PLUGIN_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    monkeypatch.setattr(plugin_tasks, "_registry", None)
    settings = get_settings()
    upgrade(settings.sqlalchemy_url)
    yield settings
    get_settings.cache_clear()
    EmbeddedRedis(tmp_path / "process").stop()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """``make_settings(*roots, **overrides)``: settings serving ``roots``, database migrated."""

    def make(*roots: Path, **overrides: Any) -> Settings:
        settings = Settings(
            data_dir=tmp_path,
            database_url=f"sqlite:///{tmp_path}/cul8er.db",
            plugin_path=plugin_path(*roots),
            plugin_state_ttl=0,
            **overrides,
        )
        upgrade(settings.sqlalchemy_url)
        return settings

    return make


def view(registry: PluginRegistry, name: str) -> dict[str, Any]:
    """``name``'s line of ``registry.status()``."""
    lines = {line["name"]: line for line in registry.status()}
    assert name in lines, sorted(lines)
    return lines[name]


def row(settings: Settings, name: str) -> Plugin:
    """``name``'s row of the ``plugins`` table, detached."""
    with session_scope(settings.sqlalchemy_url) as session:
        found = session.get(Plugin, name)
        assert found is not None, f"no plugins row for {name!r}"
        session.expunge(found)
        return found


def transitions(settings: Settings, name: str) -> list[tuple[str | None, str]]:
    """``(from, to)`` of every ``plugin.state_changed`` audit event of ``name``, oldest first."""
    with session_scope(settings.sqlalchemy_url) as session:
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.kind == "plugin.state_changed")
            .order_by(AuditEvent.id)
        ).all()
        return [(e.data["from"], e.data["to"]) for e in events if e.data["plugin"] == name]


def detail(registry: PluginRegistry, name: str) -> str:
    """What the served version of observer ``name`` answers to an event."""
    plugin = registry.instance(registry.get(name))
    return str(plugin.observe_event(Event(event_type="workflow.started")).detail)


def validation_error(root: Path, settings: Settings, *causes: str) -> str:
    """``cul8er plugin validate root`` refuses it, naming every one of ``causes``."""
    with pytest.raises(PluginError) as caught:
        validate_path(root, settings=settings)
    message = str(caught.value)
    for cause in causes:
        assert cause in message, message
    return message


def registry_error(settings: Settings, name: str, *causes: str) -> str:
    """A registry booting with ``name`` on the plugin path refuses it, naming ``causes``."""
    registry = PluginRegistry(settings).boot()
    line = view(registry, name)
    assert line["state"] == "failed", line
    for cause in causes:
        assert cause in line["error"], line["error"]
    stored = row(settings, name)
    assert (stored.state, stored.enabled) == ("failed", True)
    for cause in causes:
        assert cause in (stored.error or ""), stored.error
    with pytest.raises(PluginUnavailableError, match="is not loaded"):
        registry.get(name)
    assert name not in registry.served
    return str(line["error"])


def assert_refused(root: Path, settings: Settings, name: str, *causes: str) -> None:
    """Refused both by validation and by the registry, each naming ``causes``."""
    validation_error(root, settings, *causes)
    registry_error(settings, name, *causes)


# -- refusals ---------------------------------------------------------------------------------


def test_missing_operation_is_refused(tmp_path, make_settings):
    # Given an observer without its flush operation
    root = make_plugin(tmp_path / "src", "noflush", edits=[(FLUSH, "")])
    settings = make_settings(root)
    # When it is validated, and when a registry boots with it
    # Then both refuse it for the missing operation
    assert_refused(root, settings, "noflush", "missing operations: flush")


def test_wrong_signature_is_refused(tmp_path, make_settings):
    # Given an observer whose report_metric takes ``sample`` instead of ``metric``
    renamed = REPORT_METRIC.replace("metric: ", "sample: ").replace("[metric.", "[sample.")
    renamed = renamed.replace("= metric.", "= sample.")
    root = make_plugin(tmp_path / "src", "renamed", edits=[(REPORT_METRIC, renamed)])
    settings = make_settings(root)
    # When it is validated, and when a registry boots with it
    # Then both refuse it, showing the signature expected
    assert_refused(
        root,
        settings,
        "renamed",
        "wrong signatures",
        "report_metric(sample) should be report_metric(metric)",
    )


def test_file_changed_after_hashing_is_refused(tmp_path, make_settings):
    # Given a plugin whose module was edited after its manifest was written
    root = make_plugin(tmp_path / "src", "tampered")
    module = module_path(root)
    module.write_text(module.read_text() + "\nTAMPERED = True\n")
    settings = make_settings(root)
    # When it is validated, and when a registry boots with it
    # Then both refuse it, naming the file that changed
    assert_refused(root, settings, "tampered", "file __init__.py changed")


def test_unsigned_plugin_is_refused_when_signatures_are_required(tmp_path, make_settings):
    # Given an unsigned plugin, and signatures required
    root = make_plugin(tmp_path / "src", "unsigned")
    _, public = generate_keypair()
    settings = make_settings(
        root,
        require_signed_plugins=True,
        plugin_trusted_keys=[base64.b64encode(public).decode()],
    )
    # When it is validated, and when a registry boots with it
    # Then both refuse it as unsigned
    assert_refused(root, settings, "unsigned", "is unsigned")


def test_plugin_signed_by_a_trusted_key_is_valid_and_served(tmp_path, make_settings):
    # Given a plugin signed by a key the settings trust, and signatures required
    private, public = generate_keypair()
    root = make_plugin(tmp_path / "src", "signed")
    sign(root, private)
    settings = make_settings(
        root,
        require_signed_plugins=True,
        plugin_trusted_keys=[base64.b64encode(public).decode()],
    )
    # When it is validated
    described = validate_path(root, settings=settings)
    # Then it is valid and known to be signed
    assert described["valid"] is True
    assert described["signed"] is True
    # And a registry serves it
    registry = PluginRegistry(settings).boot()
    assert view(registry, "signed")["state"] == "active"
    assert registry.get("signed").loaded.signed is True


def test_plugin_signed_by_an_untrusted_key_is_refused(tmp_path, make_settings):
    # Given a plugin signed by a key the settings do not trust (they trust another one)
    stranger, _ = generate_keypair()
    _, trusted = generate_keypair()
    root = make_plugin(tmp_path / "src", "stranger")
    sign(root, stranger)
    settings = make_settings(
        root,
        require_signed_plugins=True,
        plugin_trusted_keys=[base64.b64encode(trusted).decode()],
    )
    # When it is validated, and when a registry boots with it
    # Then both refuse it: its signature does not verify
    assert_refused(root, settings, "stranger", "does not verify")


def test_plugin_for_another_api_is_refused(tmp_path, make_settings):
    # Given a plugin supporting only cul8er plugin API 2
    root = make_plugin(tmp_path / "src", "future", api=">=2,<3")
    settings = make_settings(root)
    # When it is validated, and when a registry boots with it
    # Then both refuse it, naming the API range and the API this is
    assert_refused(root, settings, "future", "plugin API >=2,<3", "but this is 1.0")


def test_plugin_missing_a_dependency_is_refused(tmp_path, make_settings):
    # Given a plugin requiring a plugin that is nowhere
    root = make_plugin(tmp_path / "src", "needy", requires=[{"name": "nope"}])
    settings = make_settings(root)
    # When it is validated, and when a registry boots with it
    # Then both refuse it, naming the missing dependency
    assert_refused(root, settings, "needy", "requires 'nope'", "not installed")


def test_dependency_cycle_is_refused_by_the_registry(tmp_path, make_settings):
    # Given plugins a and b, each requiring the other
    a = make_plugin(tmp_path / "src", "a", requires=[{"name": "b"}])
    b = make_plugin(tmp_path / "src", "b", requires=[{"name": "a"}])
    settings = make_settings(a, b)
    # When a registry boots with both
    # Then a is refused for the cycle, shown as a chain
    registry_error(settings, "a", "dependency cycle: a -> b -> a")
    # And b, whose dependency is refused, does not serve either
    registry_error(settings, "b", "requires 'a'")


def test_dependency_cycle_is_named_by_validation(tmp_path, make_settings):
    # Given plugins a and b, each requiring the other, both on the plugin path
    a = make_plugin(tmp_path / "src", "a", requires=[{"name": "b"}])
    b = make_plugin(tmp_path / "src", "b", requires=[{"name": "a"}])
    settings = make_settings(a, b)
    # When a is validated
    # Then the error names the cycle (today: "requires 'b', which is not installed")
    validation_error(a, settings, "a -> b -> a")


@pytest.mark.parametrize("builtin", ["log", "local"])
def test_plugin_conflicting_with_a_builtin_is_refused(tmp_path, make_settings, builtin):
    # Given a plugin declaring a conflict with a built-in (validation sees the conflict only
    # while that built-in serves: ``local`` always does, ``log`` once its module imports)
    root = make_plugin(tmp_path / "src", "rival", conflicts=[{"name": builtin}])
    settings = make_settings(root)
    # When it is validated, and when a registry boots with it
    # Then both refuse it, naming the conflict
    assert_refused(root, settings, "rival", f"conflicts with {builtin!r}")
    # And the built-in is not blamed for it
    refusal = PluginRegistry(settings).boot().refused.get(builtin)
    assert refusal is None or "rival" not in refusal.error


def test_forbidden_import_is_refused_naming_file_line_and_permission(tmp_path, make_settings):
    # Given an untrusted observer importing socket without the network permission
    root = make_plugin(
        tmp_path / "src", "snoop", trusted=False, edits=[(FUTURE, FUTURE + "\nimport socket\n")]
    )
    line = module_path(root).read_text().splitlines().index("import socket") + 1
    settings = make_settings(root)
    # When it is validated, and when a registry boots with it
    # Then both refuse it, naming the file, the line and the permission it lacks
    assert_refused(
        root,
        settings,
        "snoop",
        f"__init__.py:{line}: imports 'socket'",
        "'network' permission",
    )


# -- lifecycle --------------------------------------------------------------------------------


def test_good_plugin_is_active_with_its_row_and_audit_trail(tmp_path, make_settings):
    # Given a plugin that passes every check, and an empty plugins table
    root = make_plugin(tmp_path / "src", "good")
    settings = make_settings(root)
    # When a registry boots
    registry = PluginRegistry(settings).boot()
    # Then it serves the plugin, as well as the built-ins that need nothing
    line = view(registry, "good")
    assert (line["state"], line["version"], line["error"]) == ("active", "0.1.0", None)
    assert line["queue"] == settings.sandbox_queue  # untrusted
    for builtin in ("local", "env"):
        assert view(registry, builtin)["state"] == "active"
    assert detail(registry, "good") == "seen: workflow.started"
    # And its row records the state, version, manifest checksum and generation
    stored = row(settings, "good")
    manifest_sha = hashlib.sha256((root / MANIFEST_FILE).read_bytes()).hexdigest()
    assert (stored.state, stored.enabled, stored.version) == ("active", True, "0.1.0")
    assert stored.checksum == manifest_sha
    assert stored.generation == 1
    assert stored.root == str(root)
    assert stored.error is None
    # And the audit trail walks it through every state
    assert [to for _, to in transitions(settings, "good")] == [
        "discovered",
        "validated",
        "loaded",
        "active",
    ]
    # And a second boot changes nothing
    PluginRegistry(settings).boot()
    assert row(settings, "good").generation == 1
    assert len(transitions(settings, "good")) == 4


def test_disable_and_enable_reach_a_booted_registry(tmp_path, make_settings):
    # Given a registry serving a plugin
    root = make_plugin(tmp_path / "src", "toggle")
    settings = make_settings(root)
    registry = PluginRegistry(settings).boot()
    assert registry.get("toggle").state == "active"
    # When an operator disables it
    result = set_enabled("toggle", False, settings=settings)
    assert result == {"name": "toggle", "version": "0.1.0", "state": "disabled", "changed": True}
    # Then the booted registry stops serving it, saying it is disabled
    registry.refresh(force=True)
    with pytest.raises(PluginUnavailableError, match="disabled"):
        registry.get("toggle")
    assert view(registry, "toggle")["state"] == "disabled"
    assert (row(settings, "toggle").state, row(settings, "toggle").enabled) == ("disabled", False)
    assert transitions(settings, "toggle")[-1] == ("active", "disabled")
    # When it is enabled again
    assert set_enabled("toggle", True, settings=settings)["state"] == "active"
    # Then the same registry serves it again
    registry.refresh(force=True)
    assert registry.get("toggle").state == "active"
    assert detail(registry, "toggle") == "seen: workflow.started"
    assert transitions(settings, "toggle")[-1] == ("disabled", "active")
    # And a fresh boot agrees with the table
    assert PluginRegistry(settings).boot().get("toggle").state == "active"


def test_reload_serves_a_new_version_and_keeps_it_when_the_next_fails(tmp_path, make_settings):
    # Given 0.1.0 of a plugin served by a booted registry, with room for newer versions
    v1 = make_plugin(tmp_path / "v1", "reloaded")
    v2, v3 = plugin_root(tmp_path / "v2", "reloaded"), plugin_root(tmp_path / "v3", "reloaded")
    settings = make_settings(v1, v2, v3)
    registry = PluginRegistry(settings).boot()
    assert detail(registry, "reloaded") == "seen: workflow.started"
    # When 0.2.0, answering differently, appears on the plugin path and is reloaded
    make_plugin(
        tmp_path / "v2",
        "reloaded",
        version="0.2.0",
        edits=[(DETAIL, 'return Ack(detail=f"v2 {event.event_type}")')],
    )
    result = reload("reloaded", settings=settings)
    # Then the reload succeeds and the table points at 0.2.0
    assert result["ok"] is True, result
    assert (result["version"], result["previous"], result["changed"]) == ("0.2.0", "0.1.0", True)
    stored = row(settings, "reloaded")
    assert (stored.version, stored.root, stored.state) == ("0.2.0", str(v2), "active")
    # And the registry booted earlier serves 0.2.0 once it refreshes
    registry.refresh(force=True)
    assert registry.get("reloaded").loaded.version == "0.2.0"
    assert detail(registry, "reloaded") == "v2 workflow.started"
    # When 0.3.0, whose self-test fails, appears and is reloaded
    make_plugin(
        tmp_path / "v3",
        "reloaded",
        version="0.3.0",
        edits=[(SELF_TEST, SELF_TEST + '        raise RuntimeError("v3 is broken")\n')],
    )
    result = reload("reloaded", settings=settings)
    # Then the reload fails with the self-test's error, and 0.2.0 still serves
    assert result["ok"] is False, result
    assert "v3 is broken" in result["error"]
    assert result["serving"] == "0.2.0"
    stored = row(settings, "reloaded")
    assert (stored.version, stored.root, stored.state) == ("0.2.0", str(v2), "active")
    assert "reload to 0.3.0 failed" in (stored.error or "")
    # And the booted registry keeps serving 0.2.0 after it refreshes
    registry.refresh(force=True)
    assert registry.get("reloaded").loaded.version == "0.2.0"
    assert detail(registry, "reloaded") == "v2 workflow.started"
    # And so does a registry booted afterwards, though 0.3.0 is the newest found
    fresh = PluginRegistry(settings).boot()
    assert fresh.get("reloaded").loaded.version == "0.2.0"
    assert detail(fresh, "reloaded") == "v2 workflow.started"


REQUIRED_FIELD = [(CONFIG_FIELD, CONFIG_FIELD + "    endpoint: str\n")]


def test_plugin_without_its_required_config_waits_disabled(tmp_path, make_settings):
    # Given a plugin whose config has a required field, and no config for it
    root = make_plugin(tmp_path / "src", "configured", edits=REQUIRED_FIELD)
    settings = make_settings(root)
    # When a registry boots
    registry = PluginRegistry(settings).boot()
    # Then the plugin waits for its config: disabled, naming the missing field
    line = view(registry, "configured")
    assert line["state"] == "disabled", line
    assert "endpoint" in line["error"] and "required" in line["error"], line["error"]
    stored = row(settings, "configured")
    assert (stored.state, stored.enabled) == ("disabled", False)
    assert "endpoint" in (stored.error or "")
    with pytest.raises(PluginUnavailableError, match="endpoint"):
        registry.get("configured")
    # And validation says the same
    validation_error(root, settings, "endpoint")


def test_enabling_a_plugin_waiting_for_its_config_is_refused(tmp_path, make_settings):
    # Given a plugin disabled because its required config is missing
    root = make_plugin(tmp_path / "src", "configured", edits=REQUIRED_FIELD)
    settings = make_settings(root)
    PluginRegistry(settings).boot()
    assert row(settings, "configured").state == "disabled"
    # When an operator enables it
    # Then it is refused until it has its config
    with pytest.raises(ConflictError):
        set_enabled("configured", True, settings=settings)


def test_plugin_with_an_invalid_config_fails_naming_the_field(tmp_path, make_settings):
    # Given a plugin whose required field is given a value of the wrong type
    root = make_plugin(tmp_path / "src", "configured", edits=REQUIRED_FIELD)
    settings = make_settings(root, plugin_config={"configured": {"endpoint": ["not", "a", "str"]}})
    # When a registry boots
    # Then the plugin failed, naming the field (never its value)
    error = registry_error(settings, "configured", "endpoint", "valid string")
    assert "not" not in error.split("config:", 1)[1]
    # And validation says the same
    validation_error(root, settings, "endpoint")
    # When the config is right
    good = make_settings(root, plugin_config={"configured": {"endpoint": "http://x"}})
    # Then it serves
    assert PluginRegistry(good).boot().get("configured").state == "active"


def test_newest_version_on_the_plugin_path_serves_when_the_table_names_none(
    tmp_path, make_settings
):
    # Given 0.1.0 and 0.2.0 of one plugin in two folders of the plugin path, no row yet
    v1 = make_plugin(tmp_path / "v1", "twice")
    v2 = make_plugin(
        tmp_path / "v2",
        "twice",
        version="0.2.0",
        edits=[(DETAIL, 'return Ack(detail=f"v2 {event.event_type}")')],
    )
    settings = make_settings(v1, v2)
    # When a registry boots
    registry = PluginRegistry(settings).boot()
    # Then 0.2.0 serves and is recorded
    assert view(registry, "twice")["version"] == "0.2.0"
    assert registry.get("twice").loaded.root == v2
    assert detail(registry, "twice") == "v2 workflow.started"
    assert (row(settings, "twice").version, row(settings, "twice").root) == ("0.2.0", str(v2))
    # And both versions were seen
    assert sorted(registry.candidates["twice"]) == ["0.1.0", "0.2.0"]


# -- robustness (bugs found) ------------------------------------------------------------------


def test_registry_on_an_unmigrated_database_serves_without_state(tmp_path):
    # Given settings whose database was never migrated
    settings = Settings(
        data_dir=tmp_path / "fresh",
        database_url=f"sqlite:///{tmp_path}/fresh.db",
        plugin_state_ttl=0,
    )
    # When a registry boots
    registry = PluginRegistry(settings).boot()
    # Then it serves the built-ins, keeping no state (the docstring's promise)
    assert registry.get("local").state == "active"


def test_set_enabled_does_not_need_this_process_database(tmp_path, make_settings, monkeypatch):
    import workers.pluginhost.calls as plugin_tasks

    # Given a plugin in a migrated database, while this process's own settings point at an
    # unmigrated one (the CLI run with --database-url from another folder)
    root = make_plugin(tmp_path / "src", "toggle")
    settings = make_settings(root)
    PluginRegistry(settings).boot()
    monkeypatch.setenv("CUL8ER_DATA_DIR", str(tmp_path / "unmigrated"))
    get_settings.cache_clear()
    monkeypatch.setattr(plugin_tasks, "_registry", None)
    # When the plugin is disabled
    result = set_enabled("toggle", False, settings=settings)
    # Then the call succeeds (publishing its event must never fail it) and the table says so
    assert result["state"] == "disabled"
    assert row(settings, "toggle").state == "disabled"
