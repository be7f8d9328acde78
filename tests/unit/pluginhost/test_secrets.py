"""Secrets: the env and file providers, ``${secret:…}`` resolution, and log redaction.

Everything is real: environment variables, files under ``tmp_path``, writer processes,
threads, stdlib loggers and structlog pipelines.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from pydantic import SecretStr

from plugins.builtin import builtin_manifest
from plugins.secrets.env import EnvSecrets, EnvSecretsConfig, variable_name
from plugins.secrets.file import FileSecrets, FileSecretsConfig, generate_key
from schemas.manifest import PluginType
from schemas.plugins import SecretValue
from workers.plugin_api import PluginContext
from workers.pluginhost.contracts import Secrets, check_contract
from workers.pluginhost.secrets import find_refs, resolve
from workers.runtime.errors import ConfigError, NotFoundError, PermanentError
from workers.runtime.redaction import (
    MASK,
    RedactingFilter,
    redact,
    redact_processor,
    redact_text,
    remember,
)
from workers.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def fresh_secret() -> str:
    """A value no other test has remembered."""
    return f"s3cr3t-{secrets.token_hex(12)}"


def context(tmp_path: Path, key: str | None = None, name: str = "file") -> PluginContext:
    """A real plugin context over settings rooted at ``tmp_path``."""
    settings = Settings(data_dir=tmp_path, secrets_key=SecretStr(key) if key is not None else None)
    return PluginContext(
        name=name, version="1.0.0", data_dir=tmp_path / "plugins" / name, settings=settings
    )


@pytest.fixture
def env_prefix() -> Iterator[str]:
    """A variable prefix of this test only; its variables are removed afterwards."""
    prefix = f"CUL8ER_TEST_{uuid.uuid4().hex[:8].upper()}_"
    yield prefix
    for name in [n for n in os.environ if n.startswith(prefix)]:
        del os.environ[name]


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def store(tmp_path: Path, key: str) -> FileSecrets:
    return FileSecrets(FileSecretsConfig(), context(tmp_path, key))


# -- contracts --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["env", "file"])
def test_builtin_manifests_name_real_factories_and_configs(name: str) -> None:
    # Given the built-in manifest of a secrets provider
    manifest = builtin_manifest(name)
    assert manifest is not None and manifest.config_model is not None
    # When its module, factory and config model are imported
    module = importlib.import_module(manifest.module)
    factory = getattr(module, manifest.factory)
    config_module, config_name = manifest.config_model.split(":")
    config_model = getattr(importlib.import_module(config_module), config_name)
    # Then the factory fulfils the secrets contract and the config has defaults for all
    check_contract(name, PluginType.SECRETS, factory)
    assert config_model.model_validate({}) is not None


def test_plugins_are_instances_of_the_contract(tmp_path: Path, key: str) -> None:
    # Given both providers built as the registry builds them
    env = EnvSecrets(EnvSecretsConfig(), context(tmp_path, name="env"))
    file = FileSecrets(FileSecretsConfig(), context(tmp_path, key))
    # Then both satisfy the runtime-checkable contract
    assert isinstance(env, Secrets)
    assert isinstance(file, Secrets)


def test_secret_value_never_serialises_its_value() -> None:
    # Given a secret value as a provider answers it
    value = fresh_secret()
    answer = SecretValue(path="db/password", value=SecretStr(value), version="3")
    # When it is dumped as a task result would be
    dumped = answer.model_dump(mode="json")
    # Then the value is masked in every rendering
    assert dumped == {"path": "db/password", "value": "**********", "version": "3"}
    assert value not in answer.model_dump_json()
    assert value not in repr(answer) and value not in str(answer)
    assert answer.value.get_secret_value() == value


# -- env provider -----------------------------------------------------------------------------


def test_env_path_maps_to_an_upper_case_variable() -> None:
    assert variable_name("CUL8ER_SECRET_", "hello/token") == "CUL8ER_SECRET_HELLO_TOKEN"
    assert variable_name("CUL8ER_SECRET_", "db.main-pw/2") == "CUL8ER_SECRET_DB_MAIN_PW_2"
    assert variable_name("P_", "café") == "P_CAF_"


def test_env_get_reads_the_variable(tmp_path: Path) -> None:
    # Given the default prefix and a variable set in the environment
    value = fresh_secret()
    os.environ["CUL8ER_SECRET_HELLO_TOKEN"] = value
    try:
        # When the secret is read
        got = EnvSecrets(EnvSecretsConfig(), context(tmp_path, name="env")).get("hello/token")
    finally:
        del os.environ["CUL8ER_SECRET_HELLO_TOKEN"]
    # Then its value is answered with a 12-hex version derived from the value
    assert got.path == "hello/token"
    assert got.value.get_secret_value() == value
    assert got.version is not None and len(got.version) == 12
    int(got.version, 16)
    # And the value is masked in logs from now on
    assert redact_text(f"token={value}") == f"token={MASK}"


def test_env_version_changes_with_the_value(env_prefix: str) -> None:
    # Given a provider and a value put twice
    plugin = EnvSecrets(EnvSecretsConfig(prefix=env_prefix))
    plugin.put("api/key", fresh_secret())
    first = plugin.get("api/key").version
    plugin.put("api/key", fresh_secret())
    # Then the version of the second value differs, and a reread keeps it
    assert plugin.get("api/key").version != first
    assert plugin.get("api/key").version == plugin.get("api/key").version


def test_env_put_sets_the_variable_in_this_process(env_prefix: str) -> None:
    # Given a provider with its own prefix
    plugin = EnvSecrets(EnvSecretsConfig(prefix=env_prefix))
    value = fresh_secret()
    # When a value is put
    ack = plugin.put("db/password", value)
    # Then the variable is set here and the ack names it, not the value
    assert os.environ[f"{env_prefix}DB_PASSWORD"] == value
    assert ack.ok and f"{env_prefix}DB_PASSWORD" in ack.detail and value not in ack.detail
    assert plugin.get("db/password").value.get_secret_value() == value


def test_env_missing_names_the_variable_not_a_value(env_prefix: str) -> None:
    # Given a path whose variable is not set
    plugin = EnvSecrets(EnvSecretsConfig(prefix=env_prefix))
    # When it is read
    with pytest.raises(NotFoundError) as caught:
        plugin.get("missing/thing")
    # Then the error names the path and the variable
    assert "missing/thing" in str(caught.value)
    assert f"{env_prefix}MISSING_THING" in str(caught.value)


def test_env_rotate_is_refused(env_prefix: str) -> None:
    # Given an env secret
    plugin = EnvSecrets(EnvSecretsConfig(prefix=env_prefix))
    value = fresh_secret()
    plugin.put("x/y", value)
    # When it is rotated
    with pytest.raises(PermanentError) as caught:
        plugin.rotate("x/y")
    # Then the error explains who rotates it, and the value is untouched
    assert "whoever sets the environment" in str(caught.value)
    assert value not in str(caught.value)
    assert plugin.get("x/y").value.get_secret_value() == value


@pytest.mark.parametrize("path", ["", "a b", "env:x", "${x}"])
def test_paths_a_reference_cannot_name_are_refused(
    env_prefix: str, store: FileSecrets, path: str
) -> None:
    # Given both providers, then a path no reference could name is refused by each
    with pytest.raises(PermanentError):
        EnvSecrets(EnvSecretsConfig(prefix=env_prefix)).get(path)
    with pytest.raises(PermanentError):
        store.put(path, fresh_secret())


# -- file provider ----------------------------------------------------------------------------


def test_file_put_get_rotate_round_trip(store: FileSecrets, tmp_path: Path) -> None:
    # Given a value put in the store
    value = fresh_secret()
    ack = store.put("db/password", value)
    assert ack.ok and value not in ack.detail
    # When it is read back
    got = store.get("db/password")
    # Then the value is the same, as version 1, in <data_dir>/secrets.json
    assert got.value.get_secret_value() == value and got.version == "1"
    assert store.path == (tmp_path / "secrets.json").resolve()
    # And the file holds tokens only, in the documented format
    raw = store.path.read_text()
    assert value not in raw
    entry = json.loads(raw)["db/password"]
    assert set(entry) == {"token", "version", "updated_at"} and entry["version"] == 1
    # When it is rotated
    rotated = store.rotate("db/password")
    # Then a fresh random value is stored as the next version, and read back
    new_value = rotated.value.get_secret_value()
    assert new_value != value and len(new_value) >= 32 and rotated.version == "2"
    again = store.get("db/password")
    assert again.value.get_secret_value() == new_value and again.version == "2"
    # And the new value is masked in logs
    assert new_value not in redact_text(f"pw={new_value}")


def test_file_put_again_bumps_the_version(store: FileSecrets) -> None:
    store.put("a", fresh_secret())
    value = fresh_secret()
    store.put("a", value)
    got = store.get("a")
    assert got.version == "2" and got.value.get_secret_value() == value


def test_file_and_lock_are_private(store: FileSecrets) -> None:
    # Given a store written twice (a put and a rotate replace the file each time)
    store.put("a", fresh_secret())
    store.rotate("a")
    # Then the store and its lock file are readable by the owner only
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.lock_path.stat().st_mode) == 0o600
    # And no temporary file is left behind
    assert sorted(p.name for p in store.path.parent.iterdir() if p.name.endswith(".tmp")) == []


def test_file_missing_secret_and_missing_file(store: FileSecrets) -> None:
    # Given an empty store (no file yet), a read or rotate is NotFoundError
    with pytest.raises(NotFoundError, match="nothing/here"):
        store.get("nothing/here")
    with pytest.raises(NotFoundError, match="nothing/here"):
        store.rotate("nothing/here")
    # And with a file holding another path, still NotFoundError
    store.put("other", fresh_secret())
    with pytest.raises(NotFoundError):
        store.get("nothing/here")


def test_file_config_and_settings_choose_the_path(tmp_path: Path, key: str) -> None:
    # Given settings naming a secrets file, and a config naming another
    settings = Settings(
        data_dir=tmp_path, secrets_file=tmp_path / "s" / "a.json", secrets_key=SecretStr(key)
    )
    ctx = PluginContext(name="file", version="1", data_dir=tmp_path / "p", settings=settings)
    # Then the config wins over settings, which win over the data dir
    assert FileSecrets(None, ctx).path == (tmp_path / "s" / "a.json").resolve()
    assert (
        FileSecrets(FileSecretsConfig(path=tmp_path / "b.json"), ctx).path
        == (tmp_path / "b.json").resolve()
    )
    # And the folder is made on first write
    FileSecrets(None, ctx).put("x", fresh_secret())
    assert (tmp_path / "s" / "a.json").is_file()


def test_file_wrong_key_is_a_config_error_without_the_value(
    store: FileSecrets, tmp_path: Path
) -> None:
    # Given a value stored with one key
    value = fresh_secret()
    store.put("db/password", value)
    other_key = generate_key()
    # When the store is opened with another key
    other = FileSecrets(FileSecretsConfig(), context(tmp_path, other_key))
    # Then reading says the key does not match, and quotes neither value nor key
    with pytest.raises(ConfigError) as caught:
        other.get("db/password")
    message = str(caught.value)
    assert "does not match" in message and "CUL8ER_SECRETS_KEY" in message
    assert value not in message and other_key not in message
    # And writing with the wrong key is refused too, leaving the store as it was
    with pytest.raises(ConfigError):
        other.put("new", fresh_secret())
    assert set(json.loads(store.path.read_text())) == {"db/password"}
    assert store.get("db/password").value.get_secret_value() == value


def test_file_missing_key_says_how_to_make_one(tmp_path: Path) -> None:
    # Given settings without a key, the plugin is refused with the variable and the recipe
    with pytest.raises(ConfigError) as caught:
        FileSecrets(FileSecretsConfig(), context(tmp_path, None))
    assert "CUL8ER_SECRETS_KEY" in str(caught.value)
    assert "Fernet.generate_key()" in str(caught.value)


def test_file_invalid_key_is_a_config_error_without_the_key(tmp_path: Path) -> None:
    # Given a key that is not a Fernet key
    bad = "not-a-fernet-key-" + secrets.token_hex(8)
    # Then the plugin is refused, without quoting the key (nor chaining an error that does)
    with pytest.raises(ConfigError) as caught:
        FileSecrets(FileSecretsConfig(), context(tmp_path, bad))
    assert "CUL8ER_SECRETS_KEY" in str(caught.value) and bad not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_file_corrupt_store_is_a_config_error(store: FileSecrets) -> None:
    # Given a store file that is not the documented JSON
    store.path.write_text('{"a": {"token": 1}}')
    # Then reading names the file
    with pytest.raises(ConfigError, match="not a valid store"):
        store.get("a")


WRITER = textwrap.dedent(
    """
    import pathlib, sys, time
    from pydantic import SecretStr
    from plugins.secrets.file import FileSecrets, FileSecretsConfig
    from workers.plugin_api import PluginContext
    from workers.runtime.settings import Settings

    store, key, name, go = sys.argv[1:5]
    root = pathlib.Path(store).parent
    settings = Settings(data_dir=root, secrets_key=SecretStr(key))
    context = PluginContext(name="file", version="1", data_dir=root / name, settings=settings)
    plugin = FileSecrets(FileSecretsConfig(path=pathlib.Path(store)), context)
    plugin.put(f"{name}/rotated", "initial-value")
    while not pathlib.Path(go).exists():
        time.sleep(0.001)
    for i in range(20):
        plugin.put(f"{name}/{i}", f"{name}-value-{i}")
        last = plugin.rotate(f"{name}/rotated")
    print(last.value.get_secret_value())
    """
)


def test_two_processes_writing_concurrently_lose_nothing(tmp_path: Path, key: str) -> None:
    # Given two writer processes on one store, held at a start line
    path = tmp_path / "shared.json"
    go = tmp_path / "go"
    writers = {
        name: subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), key, name, str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("alpha", "beta")
    }
    # When both are released together, each putting 20 paths and rotating its own 20 times
    go.touch()
    outputs = {}
    for name, proc in writers.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        # structlog prints to stdout when unconfigured: the value is the last line.
        outputs[name] = out.strip().splitlines()[-1]
    # Then every put and every rotation of both processes is in the store
    store = FileSecrets(FileSecretsConfig(path=path), context(tmp_path, key))
    assert len(json.loads(path.read_text())) == 42
    for name in ("alpha", "beta"):
        for i in range(20):
            assert store.get(f"{name}/{i}").value.get_secret_value() == f"{name}-value-{i}"
        rotated = store.get(f"{name}/rotated")
        assert rotated.version == "21"
        assert rotated.value.get_secret_value() == outputs[name]


def test_threads_writing_concurrently_lose_nothing(store: FileSecrets) -> None:
    # Given eight threads, each putting ten paths into one store at once
    barrier = threading.Barrier(8)
    failures: list[BaseException] = []

    def write(n: int) -> None:
        try:
            barrier.wait()
            for i in range(10):
                store.put(f"t{n}/{i}", f"value-{n}-{i}")
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Then all eighty are stored
    assert failures == []
    assert len(json.loads(store.path.read_text())) == 80
    assert store.get("t7/9").value.get_secret_value() == "value-7-9"


# -- references -------------------------------------------------------------------------------


class Lookups:
    """A real lookup over a dict, recording each call."""

    def __init__(self, values: dict[tuple[str, str], str]) -> None:
        self.values = values
        self.calls: list[tuple[str, str]] = []

    def __call__(self, provider: str, path: str) -> str:
        self.calls.append((provider, path))
        try:
            return self.values[(provider, path)]
        except KeyError:
            raise NotFoundError(f"secret {path!r} not found in {provider}") from None


def test_find_refs_walks_nested_structures() -> None:
    # Given a config with references at every depth, one repeated
    config = {
        "url": "postgresql://app:${secret:db/pw}@db/app",
        "headers": [{"Authorization": "Bearer ${secret:file:api/token}"}],
        "pair": ("${secret:db/pw}", 3),
        "plain": "no ref, ${secret:Bad:x}, ${notsecret:y}",
        "n": 1,
    }
    # Then each is found once, in order, with its provider when named
    assert find_refs(config) == [(None, "db/pw"), ("file", "api/token")]
    assert find_refs("${secret:a}${secret:env:b}") == [(None, "a"), ("env", "b")]
    assert find_refs(42) == []


def test_resolve_uses_the_default_and_explicit_providers() -> None:
    # Given values in two providers
    pw, token = fresh_secret(), fresh_secret()
    lookup = Lookups({("env", "db/pw"): pw, ("file", "api/token"): token})
    # When whole-string references are resolved
    resolved = resolve(
        {"pw": "${secret:db/pw}", "token": "${secret:file:api/token}"},
        lookup=lookup,
        default_provider="env",
    )
    # Then the default provider answers unnamed ones, the named provider the others
    assert resolved == {"pw": pw, "token": token}
    assert lookup.calls == [("env", "db/pw"), ("file", "api/token")]


def test_resolve_embedded_and_nested_in_a_copy() -> None:
    # Given a nested config with embedded references
    pw = fresh_secret()
    lookup = Lookups({("env", "db/pw"): pw})
    config = {
        "dsn": "postgresql://app:${secret:db/pw}@db/app",
        "list": [{"again": "x${secret:db/pw}y${secret:db/pw}z"}, 5, None],
        "tuple": ("${secret:db/pw}", True),
    }
    # When it is resolved
    resolved = resolve(config, lookup=lookup, default_provider="env")
    # Then every reference is replaced, other values kept, and the input is untouched
    assert resolved == {
        "dsn": f"postgresql://app:{pw}@db/app",
        "list": [{"again": f"x{pw}y{pw}z"}, 5, None],
        "tuple": (pw, True),
    }
    assert config["dsn"] == "postgresql://app:${secret:db/pw}@db/app"
    assert resolved["list"] is not config["list"]
    # And the value was looked up once, and is masked in logs from now on
    assert lookup.calls == [("env", "db/pw")]
    assert redact(resolved) == {
        "dsn": f"postgresql://app:{MASK}@db/app",
        "list": [{"again": f"x{MASK}y{MASK}z"}, 5, None],
        "tuple": (MASK, True),
    }


def test_resolve_propagates_lookup_errors() -> None:
    # Given a lookup that knows nothing, then resolving a reference raises its error
    with pytest.raises(NotFoundError, match="db/pw"):
        resolve({"a": ["${secret:db/pw}"]}, lookup=Lookups({}), default_provider="env")


def test_resolve_with_real_providers(env_prefix: str, store: FileSecrets) -> None:
    # Given a value in the env provider and one in the file provider
    env = EnvSecrets(EnvSecretsConfig(prefix=env_prefix))
    env_value, file_value = fresh_secret(), fresh_secret()
    env.put("hello/token", env_value)
    store.put("db/pw", file_value)
    providers: dict[str, Secrets] = {"env": env, "file": store}

    def lookup(provider: str, path: str) -> str:
        return providers[provider].get(path).value.get_secret_value()

    # When a config naming both is resolved
    resolved = resolve(
        {"a": "${secret:hello/token}", "b": "${secret:file:db/pw}"},
        lookup=lookup,
        default_provider="env",
    )
    # Then each value comes from its provider
    assert resolved == {"a": env_value, "b": file_value}


# -- redaction --------------------------------------------------------------------------------


def test_redact_nested_structures() -> None:
    # Given a remembered value, and a short one that is ignored
    value = fresh_secret()
    remember(value)
    remember("abc")
    # When a nested structure carrying it is redacted
    event = {
        "msg": f"connect with {value}",
        value: "as a key",
        "items": [value, ("t", f"<{value}>"), {"deep": [value]}],
        "n": 3,
        "short": "abc",
    }
    # Then every occurrence is masked in a copy, and the original is untouched
    assert redact(event) == {
        "msg": f"connect with {MASK}",
        MASK: "as a key",
        "items": [MASK, ("t", f"<{MASK}>"), {"deep": [MASK]}],
        "n": 3,
        "short": "abc",
    }
    assert event["items"][0] == value


def test_a_longer_secret_is_masked_whole() -> None:
    # Given a secret that is a prefix of another
    short = fresh_secret()
    remember(short)
    remember(short + "-and-more")
    # Then the longer one leaves no tail in clear
    assert redact_text(f"[{short}-and-more] [{short}]") == f"[{MASK}] [{MASK}]"


def test_remember_from_many_threads() -> None:
    # Given values remembered from sixteen threads at once
    values = [fresh_secret() for _ in range(16)]
    barrier = threading.Barrier(16)

    def worker(value: str) -> None:
        barrier.wait()
        remember(value)

    threads = [threading.Thread(target=worker, args=(v,)) for v in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # Then every one of them is masked
    assert redact_text(" ".join(values)) == " ".join([MASK] * 16)


def test_redact_returns_its_input_when_nothing_is_remembered() -> None:
    # Given a fresh process (the registry is process-wide)
    code = (
        "from workers.runtime.redaction import redact, redact_text, remember\n"
        "x = {'a': ['b']}\n"
        "assert redact(x) is x and redact_text('abcd') == 'abcd'\n"
        "remember('abcd')\n"
        "assert redact(x) is not x and redact_text('abcd') == '**********'\n"
    )
    # When it redacts before and after remembering a value
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    # Then the input itself comes back until something is remembered
    assert done.returncode == 0, done.stderr


def test_structlog_processor_masks_rendered_lines() -> None:
    # Given a real structlog pipeline with the processor before the renderer
    value = fresh_secret()
    remember(value)
    out = io.StringIO()
    logger = structlog.wrap_logger(
        structlog.PrintLogger(out),
        processors=[redact_processor, structlog.processors.JSONRenderer()],
    )
    # When an event carries the value in its message and nested fields
    logger.info("connect", dsn=f"postgresql://app:{value}@db", extra={"k": [value]})
    # Then the line is masked
    line = json.loads(out.getvalue())
    assert value not in out.getvalue()
    assert line["dsn"] == f"postgresql://app:{MASK}@db" and line["extra"] == {"k": [MASK]}
    # And the processor answers an event dict
    assert redact_processor(None, "info", {"event": value}) == {"event": MASK}


def test_logging_filter_masks_stdlib_records() -> None:
    # Given a real stdlib logger whose handler writes to a buffer through the filter
    value = fresh_secret()
    remember(value)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(f"tests.secrets.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        # When the value is logged in the message, in %-args, in a mapping arg, in an
        # exception argument and in a traceback
        logger.info(f"plain {value}")
        logger.warning("args %s and %r", value, [value])
        logger.warning("mapping %(pw)s", {"pw": value})
        logger.error("exc arg %s", ValueError(f"bad {value}"))
        try:
            raise RuntimeError(f"failed with {value}")
        except RuntimeError:
            logger.exception("boom")
        logger.info({"event": "structlog-style", "pw": value})
    finally:
        logger.removeHandler(handler)
    # Then no line carries it, and each is masked
    text = out.getvalue()
    assert value not in text
    assert text.count(MASK) == 7
    assert "RuntimeError: failed with **********" in text


def test_logging_filter_is_a_no_op_without_secrets() -> None:
    # Given a record whose text is not a remembered value
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    # Then the filter keeps it and its rendering is unchanged
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "hello world"
