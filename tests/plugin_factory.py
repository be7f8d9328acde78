"""Third-party plugin folders for tests, built from cul8er's own plugin template.

``make_plugin(parent, name)`` writes ``parent/cul8er-<name>/cul8er_<name>/`` with
``write_plugin``: the package folder is the plugin root (it holds ``cul8er-plugin.json``) and
the project folder above it is what goes on ``CUL8ER_PLUGIN_PATH``. Edits to the module are
applied before the manifest is rehashed, so the plugin passes the checksum check unless a
test tampers with it afterwards.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from schemas.manifest import PluginType
from workers.pluginhost.template import write_plugin
from workers.pluginhost.trust import MANIFEST_FILE, SIGNATURE_FILE, file_digests, sign_manifest

__all__ = [
    "edit_module",
    "make_plugin",
    "module_path",
    "plugin_path",
    "plugin_root",
    "rewrite_manifest",
    "sign",
]


def plugin_root(parent: Path, name: str) -> Path:
    """Where ``make_plugin(parent, name)`` puts the plugin's root (it may not exist yet)."""
    return parent / f"cul8er-{name.replace('_', '-')}" / f"cul8er_{name}"


def module_path(root: Path) -> Path:
    """The plugin's one module (the template writes the whole plugin into ``__init__.py``)."""
    return root / "__init__.py"


def edit_module(root: Path, old: str, new: str) -> None:
    """Replace ``old`` (which must be there) by ``new`` in the plugin's module, once."""
    path = module_path(root)
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}: the plugin template changed"
    path.write_text(text.replace(old, new, 1))


def rewrite_manifest(root: Path, **changes: Any) -> bytes:
    """Apply ``changes`` to the manifest, rehash every file, write it; its new bytes."""
    path = root / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    data["files"] = file_digests(root)
    raw = (json.dumps(data, indent=2) + "\n").encode()
    path.write_bytes(raw)
    return raw


def make_plugin(
    parent: Path,
    name: str,
    *,
    version: str = "0.1.0",
    plugin_type: PluginType = PluginType.OBSERVER,
    trusted: bool = False,
    edits: Iterable[tuple[str, str]] = (),
    **manifest: Any,
) -> Path:
    """A plugin ``name`` under ``parent``, its module edited and its manifest changed; its root.

    ``manifest`` holds manifest fields to set (``requires=[{"name": "x"}]``, ``api=">=2"``).
    """
    write_plugin(parent, name=name, plugin_type=plugin_type, trusted=trusted)
    root = plugin_root(parent, name)
    for old, new in edits:
        edit_module(root, old, new)
    rewrite_manifest(root, version=version, **manifest)
    return root


def sign(root: Path, private_key: bytes) -> None:
    """Sign the manifest's exact bytes, as a publisher would, into ``cul8er-plugin.sig``."""
    signature = sign_manifest((root / MANIFEST_FILE).read_bytes(), private_key)
    (root / SIGNATURE_FILE).write_text(base64.b64encode(signature).decode() + "\n")


def plugin_path(*roots: Path) -> str:
    """``CUL8ER_PLUGIN_PATH`` listing the folders that hold ``roots`` (which may come later)."""
    return os.pathsep.join(str(root.parent) for root in roots)
