"""Trust checks on a plugin's folder, done before any of its code is imported.

Three independent checks, each raising ``PluginError`` (with ``plugin_name``) on failure:

* ``verify_checksums``: every file hashes to what the manifest says, none is missing or extra.
* ``verify_signature``: the manifest is signed (ed25519) by a trusted key. Signing the manifest
  is enough, because the manifest carries every file's sha256.
* ``check_imports``: a static (``ast``) scan that refuses imports needing a permission the
  manifest does not declare. It is a tripwire for honest mistakes and lazy abuse, not a sandbox:
  ``getattr(os, "sys" + "tem")`` gets past it, which is why untrusted plugins also run sandboxed.
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.manifest import Permission
from workers.runtime.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from schemas.manifest import Manifest

__all__ = [
    "MANIFEST_FILE",
    "MODULE_PERMISSIONS",
    "SIGNATURE_FILE",
    "check_imports",
    "file_digests",
    "generate_keypair",
    "sign_manifest",
    "verify_checksums",
    "verify_signature",
]

#: The manifest at a plugin folder's root; not hashed, since it holds the hashes.
MANIFEST_FILE: Final = "cul8er-plugin.json"
#: The base64 ed25519 signature of the manifest's bytes, beside it; not hashed.
SIGNATURE_FILE: Final = "cul8er-plugin.sig"
#: Folders never hashed (bytecode caches are rebuilt from the hashed sources).
_SKIPPED_DIRS: Final = frozenset({"__pycache__"})
#: File suffixes never hashed.
_SKIPPED_SUFFIXES: Final = frozenset({".pyc"})
#: Hex digits of a sha256 shown in error messages.
_SHORT_HASH: Final = 12

#: ``os`` functions that start or clone processes: they need ``exec`` like ``subprocess``.
_OS_EXEC_NAMES: Final = (
    *("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp"),
    *(f"exec{suffix}" for suffix in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
    *(f"spawn{suffix}" for suffix in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
)

#: Module (or ``module.attribute``) → the permission its use needs; ``None`` is refused for
#: every plugin. The most specific dotted key wins: ``os.system`` needs ``exec``, ``os`` nothing.
MODULE_PERMISSIONS: Final[Mapping[str, Permission | None]] = {
    **dict.fromkeys(("subprocess", "pty", "multiprocessing"), Permission.EXEC),
    **{f"os.{name}": Permission.EXEC for name in _OS_EXEC_NAMES},
    **dict.fromkeys(
        ("socket", "ssl", "http", "urllib", "requests", "httpx", "aiohttp", "smtplib", "ftplib"),
        Permission.NETWORK,
    ),
    "shutil": Permission.FILESYSTEM,
    **dict.fromkeys(("sqlalchemy", "psycopg", "psycopg2", "sqlite3"), Permission.DATABASE),
    # Raw memory and foreign calls get past every other check, so no permission allows them.
    **dict.fromkeys(("ctypes", "cffi"), None),
}


# --- checksums -------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative POSIX path, path)`` of every entry that is hashed, symlinks included."""
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        here = Path(folder)
        # A symlinked folder is not descended into, but still yielded so it can be refused.
        entries = filenames + [d for d in dirnames if (here / d).is_symlink()]
        for name in sorted(entries):
            path = here / name
            relative = path.relative_to(root).as_posix()
            if relative in (MANIFEST_FILE, SIGNATURE_FILE) or path.suffix in _SKIPPED_SUFFIXES:
                continue
            yield relative, path


def file_digests(root: Path) -> dict[str, str]:
    """The sha256 of every regular file under ``root``, keyed by sorted relative POSIX path."""
    return {
        relative: _sha256(path)
        for relative, path in _walk(root)
        if path.is_file() and not path.is_symlink()
    }


def _short(digest: str) -> str:
    return f"{digest[:_SHORT_HASH]}…"


def verify_checksums(manifest: Manifest, root: Path) -> None:
    """Refuse the plugin unless its files are exactly those the manifest lists, unchanged.

    Raises:
        PluginError: naming every changed, missing, unlisted or symlinked file.
    """
    if not manifest.files:
        raise PluginError(
            f"plugin {manifest.name!r}: manifest lists no file hashes", plugin_name=manifest.name
        )
    # A symlink's target can change without the plugin folder changing, so none is trusted.
    links = sorted(relative for relative, path in _walk(root) if path.is_symlink())
    actual = file_digests(root)
    problems = [f"file {relative} is a symbolic link" for relative in links]
    for relative, expected in sorted(manifest.files.items()):
        found = actual.get(relative)
        if found is None:
            if relative not in links:
                problems.append(f"file {relative} is listed but missing")
        elif found != expected:
            problems.append(
                f"file {relative} changed (sha256 {_short(found)} expected {_short(expected)})"
            )
    problems += [
        f"file {relative} is not listed in the manifest"
        for relative in actual
        if relative not in manifest.files
    ]
    if problems:
        raise PluginError(
            f"plugin {manifest.name!r}: {'; '.join(problems)}", plugin_name=manifest.name
        )


# --- signatures ------------------------------------------------------------------------------


def generate_keypair() -> tuple[bytes, bytes]:
    """A new ed25519 key pair as ``(raw 32-byte private key, raw 32-byte public key)``."""
    private = Ed25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def sign_manifest(manifest_bytes: bytes, private_key: bytes) -> bytes:
    """The raw 64-byte ed25519 signature of the manifest's exact bytes.

    ``cul8er-plugin.sig`` holds it base64-encoded. Raises ``ValueError`` for a key that is not
    32 raw bytes.
    """
    return Ed25519PrivateKey.from_private_bytes(private_key).sign(manifest_bytes)


def _public_keys(trusted_keys: list[bytes]) -> list[Ed25519PublicKey]:
    keys = []
    for index, raw in enumerate(trusted_keys):
        try:
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:
            raise ConfigError(
                f"trusted plugin key #{index} is not a raw 32-byte ed25519 public key"
            ) from exc
    return keys


def verify_signature(
    name: str,
    manifest_bytes: bytes,
    signature_b64: str | None,
    trusted_keys: list[bytes],
    *,
    required: bool,
) -> bool:
    """Whether the manifest is signed by a trusted key (``False``: unsigned, and allowed).

    Raises:
        PluginError: unsigned while ``required``, or signed but by no trusted key.
        ConfigError: a trusted key is not a raw ed25519 public key.
    """
    if signature_b64 is None:
        if required:
            raise PluginError(
                f"plugin {name!r} is unsigned, and CUL8ER_REQUIRE_SIGNED_PLUGINS is on",
                plugin_name=name,
            )
        return False
    # A signature that is present but bad is refused even when signing is optional: it means
    # the manifest was altered after signing, or signed by someone we do not trust.
    refused = PluginError(
        f"plugin {name!r}: signature does not verify with any trusted key", plugin_name=name
    )
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except binascii.Error as exc:
        raise refused from exc
    for key in _public_keys(trusted_keys):
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return True
    raise refused


# --- static import check ---------------------------------------------------------------------


def _needed(dotted: str) -> tuple[str, Permission | None] | None:
    """The most specific ``MODULE_PERMISSIONS`` key covering ``dotted``, and its permission."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in MODULE_PERMISSIONS:
            return key, MODULE_PERMISSIONS[key]
    return None


class _ImportScanner(ast.NodeVisitor):
    """Collects ``(line, verb, dotted name)`` for every module or ``os`` attribute a file uses."""

    def __init__(self, tree: ast.Module) -> None:
        self.uses: list[tuple[int, str, str]] = []
        #: Local names bound to the ``os`` and ``importlib`` modules, and to ``import_module``.
        self.os_names: set[str] = set()
        self.importlib_names: set[str] = set()
        self.import_module_names: set[str] = {"__import__"}
        # Aliases first, so a use that comes before its (e.g. function-local) import is seen.
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    plain_os = alias.asname is None and alias.name.startswith("os.")
                    if alias.name == "os" or plain_os:
                        self.os_names.add(bound)
                    elif alias.name == "importlib":
                        self.importlib_names.add(bound)
            elif isinstance(node, ast.ImportFrom) and node.module == "importlib" and not node.level:
                for alias in node.names:
                    if alias.name in ("import_module", "__import__"):
                        self.import_module_names.add(alias.asname or alias.name)
        self.visit(tree)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.uses.append((node.lineno, "imports", alias.name))
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        # Relative imports reach the plugin's own modules, which are scanned themselves.
        if node.level == 0 and node.module:
            for alias in node.names:
                dotted = node.module if alias.name == "*" else f"{node.module}.{alias.name}"
                self.uses.append((node.lineno, "imports", dotted))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.os_names:
            self.uses.append((node.lineno, "uses", f"os.{node.attr}"))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        dynamic = (isinstance(func, ast.Name) and func.id in self.import_module_names) or (
            isinstance(func, ast.Attribute)
            and func.attr in ("import_module", "__import__")
            and isinstance(func.value, ast.Name)
            and func.value.id in self.importlib_names
        )
        if dynamic and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self.uses.append((node.lineno, "imports", first.value))
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id in self.os_names
        ):
            # Report ``os.system(...)`` once, as a call, not again as an attribute.
            self.uses.append((node.lineno, "calls", f"os.{func.attr}"))
            for child in [*node.args, *node.keywords]:
                self.visit(child)
            return
        self.generic_visit(node)


def _python_files(root: Path) -> list[tuple[str, Path]]:
    return [(rel, path) for rel, path in _walk(root) if path.suffix == ".py" and path.is_file()]


def check_imports(manifest: Manifest, root: Path) -> None:
    """Refuse the plugin if its code imports what its declared permissions do not allow.

    Raises:
        PluginError: listing each offence as ``path:line: imports 'x' which needs ...``.
    """
    offences: list[str] = []
    for relative, path in _python_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=relative)
        except (SyntaxError, ValueError) as exc:
            line = getattr(exc, "lineno", None) or 0
            offences.append(f"{relative}:{line}: cannot be parsed ({exc.__class__.__name__})")
            continue
        for line, verb, dotted in _ImportScanner(tree).uses:
            needed = _needed(dotted)
            if needed is None:
                continue
            key, permission = needed
            where = f"{relative}:{line}: {verb} {key!r}"
            if permission is None:
                offences.append(f"{where}, which no permission allows")
            elif permission not in manifest.permissions:
                offences.append(f"{where} which needs the {permission.value!r} permission")
    if offences:
        raise PluginError(
            f"plugin {manifest.name!r} uses what it has no permission for:\n  "
            + "\n  ".join(dict.fromkeys(offences)),
            plugin_name=manifest.name,
        )
