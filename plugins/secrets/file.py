"""The ``file`` secrets plugin: a JSON file of Fernet tokens, one per path.

The file is ``{path: {"token": ..., "version": n, "updated_at": iso}}``; only tokens are
stored, so the file is useless without ``CUL8ER_SECRETS_KEY``. Every write rereads the
file under an exclusive ``flock`` on ``<file>.lock`` and replaces it atomically, so
concurrent writers (threads or processes) never lose each other's changes, and readers,
which take no lock, always see a whole file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog
from pydantic import BaseModel, ConfigDict, SecretStr, TypeAdapter, ValidationError

from schemas.plugins import Ack, SecretValue
from workers.plugin_api import ConfigError, NotFoundError, check_path, remember

if TYPE_CHECKING:
    from collections.abc import Iterator

    from workers.plugin_api import PluginContext

__all__ = ["FileSecrets", "FileSecretsConfig", "generate_key"]

log = structlog.get_logger(__name__)

#: How to make a key, quoted in errors.
KEY_HINT: Final = (
    "set CUL8ER_SECRETS_KEY to a Fernet key; generate one with: "
    'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
)


class FileSecretsConfig(BaseModel):
    """Config of the ``file`` secrets plugin."""

    model_config = ConfigDict(extra="forbid")

    #: The store; ``None`` is ``secrets_file`` from settings, else ``<data_dir>/secrets.json``.
    path: Path | None = None


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str
    version: int
    updated_at: str


_STORE: Final = TypeAdapter(dict[str, _Entry])


def generate_key() -> str:
    """A fresh Fernet key, as ``CUL8ER_SECRETS_KEY`` takes it."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


class FileSecrets:
    """Secrets in a local file, each value encrypted with the key from settings."""

    def __init__(self, config: FileSecretsConfig | None, context: PluginContext) -> None:
        # Imported when the plugin is built, not when it loads: its ciphers are not free.
        from cryptography.fernet import Fernet

        settings = context.settings
        path = (config or FileSecretsConfig()).path or settings.secrets_file
        self.path: Path = (path or settings.data_dir / "secrets.json").expanduser().resolve()
        self.lock_path: Path = self.path.with_name(self.path.name + ".lock")
        if settings.secrets_key is None:
            raise ConfigError(f"the file secrets provider needs a key: {KEY_HINT}")
        try:
            self._fernet = Fernet(settings.secrets_key.get_secret_value())
        except (ValueError, TypeError):
            # Never chain: the underlying error may quote the key.
            raise ConfigError(f"CUL8ER_SECRETS_KEY is not a valid Fernet key: {KEY_HINT}") from None

    def get(self, path: str) -> SecretValue:
        """The decrypted secret at ``path``; ``NotFoundError`` when there is none."""
        entry = self._read().get(check_path(path))
        if entry is None:
            raise NotFoundError(f"secret {path!r} not found in {self.path}")
        value = self._decrypt(path, entry)
        remember(value)
        return SecretValue(path=path, value=SecretStr(value), version=str(entry.version))

    def put(self, path: str, value: str) -> Ack:
        """Store ``value`` at ``path`` encrypted, as the next version."""
        check_path(path)
        remember(value)
        with self._locked() as entries:
            version = self._store(entries, path, value)
        log.info("secret_put", provider="file", path=path, version=version)
        return Ack(ok=True, detail=f"stored {path} version {version}")

    def rotate(self, path: str) -> SecretValue:
        """Replace the secret at ``path`` by a fresh random value; ``NotFoundError`` if none."""
        check_path(path)
        value = secrets.token_urlsafe(32)
        remember(value)
        with self._locked() as entries:
            if path not in entries:
                # A typo in a path would otherwise quietly mint a secret nobody reads.
                raise NotFoundError(f"cannot rotate secret {path!r}: not found in {self.path}")
            version = self._store(entries, path, value)
        log.info("secret_rotated", provider="file", path=path, version=version)
        return SecretValue(path=path, value=SecretStr(value), version=str(version))

    # -- storage ----------------------------------------------------------------------------

    def _store(self, entries: dict[str, _Entry], path: str, value: str) -> int:
        previous = entries.get(path)
        version = previous.version + 1 if previous else 1
        entries[path] = _Entry(
            token=self._fernet.encrypt(value.encode()).decode(),
            version=version,
            updated_at=dt.datetime.now(dt.UTC).isoformat(),
        )
        return version

    def _decrypt(self, path: str, entry: _Entry) -> str:
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(entry.token.encode()).decode()
        except InvalidToken:
            raise ConfigError(
                f"secret {path!r} in {self.path} does not decrypt: CUL8ER_SECRETS_KEY does not "
                "match the key the file was written with"
            ) from None

    def _read(self) -> dict[str, _Entry]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read the secrets file {self.path}: {exc}") from exc
        try:
            return _STORE.validate_json(raw)
        except ValidationError as exc:
            # The error's summary holds no token text (tokens are not secrets anyway).
            raise ConfigError(
                f"the secrets file {self.path} is not a valid store: {exc.error_count()} errors"
            ) from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, _Entry]]:
        """The current entries, under the lock; written back when the block succeeds."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Reread under the lock: another writer may have replaced the file meanwhile.
            entries = self._read()
            if entries:
                # Refuse to mix keys in one file: check the key against an existing token.
                name, entry = next(iter(entries.items()))
                self._decrypt(name, entry)
            yield entries
            self._write(entries)
        finally:
            # Closing the descriptor releases the lock.
            os.close(fd)

    def _write(self, entries: dict[str, _Entry]) -> None:
        data = json.dumps(
            {name: entry.model_dump() for name, entry in sorted(entries.items())}, indent=2
        ).encode()
        # mkstemp creates the file 0600, and os.replace keeps that mode on the store.
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            # Make the rename itself durable.
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
