"""Plugin trust checks on real plugin folders: checksums, signatures, static imports."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from schemas.manifest import Manifest, Permission, PluginType
from workers.pluginhost.trust import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    check_imports,
    file_digests,
    generate_keypair,
    sign_manifest,
    verify_checksums,
    verify_signature,
)
from workers.runtime.errors import PluginError

CORE = "def run() -> int:\n    return 1\n"


def manifest(
    files: dict[str, str] | None = None, permissions: frozenset[Permission] = frozenset()
) -> Manifest:
    return Manifest(
        name="acme",
        version="1.0.0",
        type=PluginType.OBSERVER,
        module="acme.core",
        permissions=permissions,
        files=files or {},
    )


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    root = tmp_path / "acme"
    (root / "pkg").mkdir(parents=True)
    (root / "core.py").write_text(CORE)
    (root / "pkg" / "util.py").write_text("X = 1\n")
    (root / MANIFEST_FILE).write_text("{}")
    (root / SIGNATURE_FILE).write_text("c2ln\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"\0bytecode")
    (root / "pkg" / "stale.pyc").write_bytes(b"\0bytecode")
    return root


def listed(root: Path) -> Manifest:
    return manifest(file_digests(root))


def refusal(excinfo: pytest.ExceptionInfo[PluginError]) -> str:
    assert excinfo.value.plugin_name == "acme"
    return str(excinfo.value)


# --- checksums -------------------------------------------------------------------------------


def test_digests_are_stable_sorted_and_skip_manifest_signature_and_bytecode(plugin: Path) -> None:
    # Given a plugin folder with a manifest, a signature and bytecode caches
    # When its digests are taken twice
    first, second = file_digests(plugin), file_digests(plugin)

    # Then they are the same, keyed by sorted POSIX paths, and only the sources are hashed
    assert first == second
    assert list(first) == ["core.py", "pkg/util.py"]
    assert first["core.py"] == hashlib.sha256(CORE.encode()).hexdigest()


def test_unchanged_plugin_passes(plugin: Path) -> None:
    # Given a manifest listing the plugin's files as they are
    # When the checksums are verified
    # Then nothing is raised (the manifest, signature and caches may change freely)
    trusted = listed(plugin)
    (plugin / SIGNATURE_FILE).write_text("other\n")
    (plugin / "__pycache__" / "new.pyc").write_bytes(b"x")
    verify_checksums(trusted, plugin)


def test_changed_file_is_refused_by_name(plugin: Path) -> None:
    # Given a manifest taken before core.py was edited
    trusted = listed(plugin)
    (plugin / "core.py").write_text(CORE + "import os\n")

    # When the checksums are verified
    with pytest.raises(PluginError) as excinfo:
        verify_checksums(trusted, plugin)

    # Then the file is named with both hashes
    message = refusal(excinfo)
    assert "file core.py changed" in message
    assert f"expected {trusted.files['core.py'][:12]}" in message
    assert "pkg/util.py" not in message


def test_missing_file_is_refused_by_name(plugin: Path) -> None:
    # Given a manifest listing a file that has since been deleted
    trusted = listed(plugin)
    (plugin / "pkg" / "util.py").unlink()

    # When the checksums are verified
    with pytest.raises(PluginError) as excinfo:
        verify_checksums(trusted, plugin)

    # Then the missing file is named
    assert "file pkg/util.py is listed but missing" in refusal(excinfo)


def test_extra_file_is_refused_by_name(plugin: Path) -> None:
    # Given a file added after the manifest was made
    trusted = listed(plugin)
    (plugin / "pkg" / "backdoor.py").write_text("X = 2\n")

    # When the checksums are verified
    with pytest.raises(PluginError) as excinfo:
        verify_checksums(trusted, plugin)

    # Then the extra file is named
    assert "file pkg/backdoor.py is not listed" in refusal(excinfo)


def test_every_problem_is_reported_at_once(plugin: Path) -> None:
    # Given one changed, one missing and one extra file
    trusted = listed(plugin)
    (plugin / "core.py").write_text("changed\n")
    (plugin / "pkg" / "util.py").unlink()
    (plugin / "extra.txt").write_text("x")

    # When the checksums are verified
    with pytest.raises(PluginError) as excinfo:
        verify_checksums(trusted, plugin)

    # Then all three are in the one error
    message = refusal(excinfo)
    assert "core.py changed" in message
    assert "pkg/util.py is listed but missing" in message
    assert "extra.txt is not listed" in message


def test_symlink_is_refused(plugin: Path, tmp_path: Path) -> None:
    # Given a plugin file that is a symlink to a file outside the plugin
    outside = tmp_path / "outside.py"
    outside.write_text("X = 3\n")
    trusted = listed(plugin)
    (plugin / "link.py").symlink_to(outside)

    # When the checksums are verified
    with pytest.raises(PluginError) as excinfo:
        verify_checksums(trusted, plugin)

    # Then the link is named
    assert "file link.py is a symbolic link" in refusal(excinfo)


def test_empty_file_list_is_refused(plugin: Path) -> None:
    # Given a manifest with no file hashes
    # When the checksums are verified
    with pytest.raises(PluginError) as excinfo:
        verify_checksums(manifest({}), plugin)

    # Then the manifest is refused for that reason
    assert "manifest lists no file hashes" in refusal(excinfo)


# --- signatures ------------------------------------------------------------------------------

MANIFEST_BYTES = b'{"name": "acme", "version": "1.0.0"}'


def signed(private: bytes, data: bytes = MANIFEST_BYTES) -> str:
    return base64.b64encode(sign_manifest(data, private)).decode() + "\n"


def test_signature_round_trip_verifies() -> None:
    # Given a key pair and a manifest signed with it
    private, public = generate_keypair()
    signature = signed(private)

    # When the signature is checked against the public key among others
    other = generate_keypair()[1]
    ok = verify_signature("acme", MANIFEST_BYTES, signature, [other, public], required=True)

    # Then it verifies, and the raw forms have ed25519's sizes
    assert ok is True
    assert (len(private), len(public), len(base64.b64decode(signature))) == (32, 32, 64)


def test_tampered_manifest_fails() -> None:
    # Given a signed manifest with one byte changed afterwards
    private, public = generate_keypair()
    signature = signed(private)
    tampered = MANIFEST_BYTES.replace(b"1.0.0", b"1.0.1")

    # When the signature is checked, even with signing optional
    with pytest.raises(PluginError) as excinfo:
        verify_signature("acme", tampered, signature, [public], required=False)

    # Then it is refused
    assert "signature does not verify with any trusted key" in refusal(excinfo)


def test_unsigned_is_allowed_when_not_required() -> None:
    # Given no signature and signing optional
    # When the signature is checked
    # Then the plugin is reported unsigned, not refused
    assert verify_signature("acme", MANIFEST_BYTES, None, [], required=False) is False


def test_unsigned_is_refused_when_required() -> None:
    # Given no signature and signing required
    # When the signature is checked
    with pytest.raises(PluginError) as excinfo:
        verify_signature("acme", MANIFEST_BYTES, None, [generate_keypair()[1]], required=True)

    # Then the refusal names the setting
    assert "CUL8ER_REQUIRE_SIGNED_PLUGINS" in refusal(excinfo)


def test_wrong_key_is_refused() -> None:
    # Given a manifest signed by a key that is not trusted
    private, _ = generate_keypair()
    _, stranger = generate_keypair()

    # When the signature is checked against the trusted key only
    with pytest.raises(PluginError) as excinfo:
        verify_signature("acme", MANIFEST_BYTES, signed(private), [stranger], required=False)

    # Then it is refused
    assert "signature does not verify with any trusted key" in refusal(excinfo)


def test_garbage_signature_is_refused() -> None:
    # Given a signature file that is not base64
    # When the signature is checked
    with pytest.raises(PluginError) as excinfo:
        verify_signature(
            "acme", MANIFEST_BYTES, "not base64!", [generate_keypair()[1]], required=False
        )

    # Then it is refused like any bad signature
    assert "signature does not verify" in refusal(excinfo)


# --- static imports --------------------------------------------------------------------------


def scan(tmp_path: Path, source: str, *permissions: Permission) -> None:
    root = tmp_path / "acme"
    root.mkdir(exist_ok=True)
    (root / "core.py").write_text(source)
    check_imports(manifest(permissions=frozenset(permissions)), root)


@pytest.mark.parametrize(
    ("source", "offence", "permission"),
    [
        ("import json\nimport subprocess\n", "core.py:2: imports 'subprocess'", Permission.EXEC),
        ("from urllib import request\n", "core.py:1: imports 'urllib'", Permission.NETWORK),
        (
            "import importlib\n\nmod = importlib.import_module('socket')\n",
            "core.py:3: imports 'socket'",
            Permission.NETWORK,
        ),
        (
            "from importlib import import_module as load\nload('http.client')\n",
            "core.py:2: imports 'http'",
            Permission.NETWORK,
        ),
        ("ssl = __import__('ssl')\n", "core.py:1: imports 'ssl'", Permission.NETWORK),
        (
            "import os\n\n\ndef f():\n    os.system('x')\n",
            "core.py:5: calls 'os.system'",
            Permission.EXEC,
        ),
        ("import os as o\no.execvp('x', [])\n", "core.py:2: calls 'os.execvp'", Permission.EXEC),
        ("from os import fork\n", "core.py:1: imports 'os.fork'", Permission.EXEC),
        ("import shutil\n", "core.py:1: imports 'shutil'", Permission.FILESYSTEM),
        ("import sqlalchemy.orm\n", "core.py:1: imports 'sqlalchemy'", Permission.DATABASE),
    ],
)
def test_import_needing_a_missing_permission_is_refused_with_file_and_line(
    tmp_path: Path, source: str, offence: str, permission: Permission
) -> None:
    # Given code that needs a permission the manifest does not declare
    # When its imports are checked
    with pytest.raises(PluginError) as excinfo:
        scan(tmp_path, source)

    # Then the offence names file, line, module and permission
    assert f"{offence} which needs the {permission.value!r} permission" in refusal(excinfo)

    # And the same code with that permission passes
    scan(tmp_path, source, permission)


def test_ctypes_is_refused_whatever_the_permissions(tmp_path: Path) -> None:
    # Given code importing ctypes, with every permission declared
    # When its imports are checked
    with pytest.raises(PluginError) as excinfo:
        scan(tmp_path, "\nimport ctypes\n", *Permission)

    # Then it is refused, saying no permission allows it
    assert "core.py:2: imports 'ctypes', which no permission allows" in refusal(excinfo)


def test_harmless_code_passes(tmp_path: Path) -> None:
    # Given code using os.path, json and relative imports only
    source = "import os\nimport json\nfrom . import util\n\nP = os.path.join('a', 'b')\n"

    # When its imports are checked without permissions
    # Then nothing is raised
    scan(tmp_path, source)


def test_every_python_file_is_scanned_and_every_offence_listed(plugin: Path) -> None:
    # Given two files, in two folders, each with an offence
    (plugin / "core.py").write_text("import socket\n")
    (plugin / "pkg" / "util.py").write_text("\n\nimport subprocess\n")

    # When the imports are checked
    with pytest.raises(PluginError) as excinfo:
        check_imports(manifest(), plugin)

    # Then both are listed with their paths
    message = refusal(excinfo)
    assert "core.py:1: imports 'socket'" in message
    assert "pkg/util.py:3: imports 'subprocess'" in message


def test_unparsable_file_is_refused(tmp_path: Path) -> None:
    # Given a file that is not valid Python
    # When its imports are checked
    with pytest.raises(PluginError) as excinfo:
        scan(tmp_path, "def (:\n")

    # Then it is refused rather than skipped
    assert "core.py:1: cannot be parsed" in refusal(excinfo)
