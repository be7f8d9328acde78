"""Where a plugin comes from: a folder, an archive, a git repository or a package index.

:func:`parse_source` tells them apart. A git source is cloned with the ``git`` command into a
scratch folder and its commit resolved (:func:`git_checkout`). Package indexes (registries) are
in ``indexes.py``. Nothing here imports or runs a plugin's code: the folder found is checked like
any other (``admin.install``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final

import structlog
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from workers.pluginhost.discovery import ARCHIVE_SUFFIXES
from workers.runtime.errors import (
    PluginRefusedError,
    ValidationFailedError,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "CREDENTIALS",
    "FolderSource",
    "GitSource",
    "PipSource",
    "RegistrySource",
    "Source",
    "TIMEOUT",
    "file_sha256",
    "git_checkout",
    "parse_source",
    "redact_url",
]

log = structlog.get_logger(__name__)

#: Seconds one index request or one git command may take.
TIMEOUT: Final = 60.0
#: Transports a git source may use; ``ext::`` and the like run commands, so they are refused.
_GIT_SCHEMES: Final = ("https", "http", "ssh", "file", "git")
#: ``scheme://user:password@rest``; the password may hold ``/`` and ``@`` (a secret reference).
CREDENTIALS: Final = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<password>.*)@(?P<rest>[^@]*)$"
)


# --- source strings --------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderSource:
    """A plugin folder, or a .zip/.tar.gz holding one (``archive``)."""

    path: Path
    archive: bool


@dataclass(frozen=True)
class GitSource:
    """``git+URL[@REF][#subdirectory=DIR]``; no ``ref`` is the remote's default branch."""

    url: str
    ref: str | None = None
    subdirectory: str | None = None


@dataclass(frozen=True)
class RegistrySource:
    """``NAME`` or ``NAME==V`` (any version range) to look up in the package indexes."""

    name: str
    specifier: SpecifierSet
    text: str


@dataclass(frozen=True)
class PipSource:
    """Anything else: handed to pip as it is (only when no index is configured)."""

    text: str


#: What :func:`parse_source` answers.
Source = FolderSource | GitSource | RegistrySource | PipSource


def parse_source(text: str) -> Source:
    """What ``text`` names: an existing path first, then ``git+…``, then a requirement.

    Raises:
        ValidationFailedError: a ``git+`` source without a URL, or an unsafe subdirectory.
    """
    stripped = text.strip()
    if stripped.startswith("git+"):
        return _parse_git(stripped[len("git+") :])
    path = Path(stripped).expanduser()
    if path.exists():
        archive = path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)
        return FolderSource(path=path, archive=archive)
    try:
        requirement = Requirement(stripped)
    except InvalidRequirement:
        return PipSource(text=stripped)
    if requirement.url or requirement.extras or requirement.marker:
        return PipSource(text=stripped)
    return RegistrySource(
        name=canonicalize_name(requirement.name), specifier=requirement.specifier, text=stripped
    )


def _invalid(text: str, why: str) -> ValidationFailedError:
    message = f"source {text!r}: {why}"
    return ValidationFailedError(message, errors=[{"field": "source", "message": message}])


def _parse_git(text: str) -> GitSource:
    """``URL[@REF][#subdirectory=DIR]`` (the part after ``git+``)."""
    location, _, fragment = text.partition("#")
    subdirectory = urllib.parse.parse_qs(fragment).get("subdirectory", [None])[0]
    if subdirectory is not None:
        parts = PurePosixPath(subdirectory).parts
        if PurePosixPath(subdirectory).is_absolute() or ".." in parts:
            raise _invalid(text, f"subdirectory {subdirectory!r} leaves the repository")
    scheme, sep, rest = location.partition("://")
    if not sep and "::" in location:
        raise _invalid(text, "git remote helpers (TRANSPORT::ADDRESS) are not allowed")
    if sep and scheme.lower() not in _GIT_SCHEMES:
        raise _invalid(text, f"git transport {scheme!r} is not one of {', '.join(_GIT_SCHEMES)}")
    # The ref follows the last '@' of the path: an '@' in the host part is a user name.
    head, slash, path = rest.partition("/") if sep else ("", "", location)
    url_path, at, ref = path.rpartition("@") if "@" in path else (path, "", "")
    url = f"{scheme}://{head}{slash}{url_path}" if sep else url_path
    if not url_path or (at and not ref):
        raise _invalid(text, "expected git+URL@REF (a tag, branch or commit)")
    if not sep:
        url = str(Path(url).expanduser().resolve())
    return GitSource(url=url, ref=ref or None, subdirectory=subdirectory)


def redact_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``****`` (for logs and answers)."""
    match = CREDENTIALS.match(url)
    if match is None:
        return url
    return f"{match['scheme']}{match['user']}:****@{match['rest']}"


def file_sha256(path: Path) -> str:
    """The sha256 of ``path``'s bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- git -------------------------------------------------------------------------------------


def _git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    command = ["git", "-c", "protocol.ext.allow=never", *args]
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PluginRefusedError(f"git {args[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise PluginRefusedError(f"git {args[0]} failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


def git_checkout(source: GitSource, into: Path) -> tuple[Path, str]:
    """Clone ``source`` into ``into`` at its ref; answer (the plugin folder, full commit sha).

    A tag or branch is cloned shallow; a commit needs the history, so it is cloned whole and
    checked out. The ``.git`` folder is removed after, since it is no part of the plugin.

    Raises:
        PluginRefusedError: git failed (no such repository or ref), with git's message.
    """
    shown = redact_url(source.url)
    log.info("plugin_git_clone", url=shown, ref=source.ref)
    if source.ref is None:
        _git("clone", "--quiet", "--depth", "1", "--", source.url, str(into))
    else:
        try:
            _git("clone", "--quiet", "--depth", "1", "--branch", source.ref, "--", source.url,
                 str(into))  # fmt: skip
        except PluginRefusedError:
            # Not a tag or branch name: a commit (or a prefix of one).
            shutil.rmtree(into, ignore_errors=True)
            _git("clone", "--quiet", "--no-checkout", "--", source.url, str(into))
            _git("checkout", "--quiet", "--detach", f"{source.ref}^{{commit}}", cwd=into)
    commit = _git("rev-parse", "HEAD", cwd=into)
    shutil.rmtree(into / ".git")
    root = into / source.subdirectory if source.subdirectory else into
    if not root.is_dir():
        raise PluginRefusedError(f"{shown}@{commit} has no folder {source.subdirectory!r}")
    return root, commit
