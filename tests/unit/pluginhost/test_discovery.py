"""Plugin discovery on real folders, archives and entry points."""

from __future__ import annotations

import io
import json
import stat
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from workers.pluginhost.discovery import discover

#: A group no installed distribution uses, so only the plugin path is searched.
NO_GROUP = "cul8er.tests.no-such-group"


def manifest_json(name: str, version: str = "1.0.0", **extra: Any) -> bytes:
    data = {"name": name, "version": version, "type": "observer", "module": name, **extra}
    return json.dumps(data).encode()


def plugin_files(name: str, version: str = "1.0.0") -> dict[str, bytes]:
    return {
        "cul8er-plugin.json": manifest_json(name, version),
        f"{name}.py": b"raise RuntimeError('plugin code must not run during discovery')\n",
    }


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for rel, content in files.items():
        (folder / rel).write_bytes(content)
    return folder


def write_zip(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for rel, content in files.items():
            zf.writestr(prefix + rel, content)
    return path


def tar_member(name: str, content: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(content) if kind == tarfile.REGTYPE else 0
    return info, io.BytesIO(content) if kind == tarfile.REGTYPE else None


def write_tar(path: Path, files: dict[str, bytes], prefix: str = "", extra=()) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for rel, content in files.items():
            tf.addfile(*tar_member(prefix + rel, content))
        for info, data in extra:
            tf.addfile(info, data)
    return path


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    return folder


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def run(plugins: Path, cache: Path, group: str = NO_GROUP):
    return discover(plugin_path=[plugins], cache_dir=cache, group=group)


def refusal(plugins: Path, cache: Path) -> str:
    """Discover, expecting the one archive to be refused with a note (others still found)."""
    found, notes = run(plugins, cache)
    assert found == []
    refused = [note for note in notes if note.startswith("refused archive:")]
    assert len(refused) == 1, notes
    return refused[0]


def test_folder_plugin_is_found_with_its_signature(plugins: Path, cache: Path):
    # Given a plugin folder with a manifest, a module and a signature
    root = write_folder(plugins / "alpha", plugin_files("alpha"))
    (root / "cul8er-plugin.sig").write_text("c2lnbmF0dXJl\n")

    # When discovering
    found, notes = run(plugins, cache)

    # Then the folder is a candidate with its raw manifest and signature
    assert notes == []
    [candidate] = found
    assert candidate.manifest.name == "alpha"
    assert candidate.root == root
    assert candidate.source == f"path:{root}"
    assert candidate.signature == "c2lnbmF0dXJl"
    assert candidate.manifest_bytes == (root / "cul8er-plugin.json").read_bytes()


def test_folder_without_manifest_is_ignored(plugins: Path, cache: Path):
    # Given a subfolder with no manifest
    write_folder(plugins / "junk", {"readme.txt": b"hello"})

    # When discovering
    found, notes = run(plugins, cache)

    # Then nothing is found and nothing to say
    assert (found, notes) == ([], [])


@pytest.mark.parametrize("prefix", ["", "beta-1.0.0/"], ids=["top-level", "nested"])
def test_zip_plugin_is_extracted_into_the_cache(plugins: Path, cache: Path, prefix: str):
    # Given a zip holding the plugin at its top level or inside one folder
    archive = write_zip(plugins / "beta-1.0.0.zip", plugin_files("beta"), prefix)

    # When discovering
    found, notes = run(plugins, cache)

    # Then the plugin is found inside the extraction folder named by stem and hash
    assert notes == []
    [candidate] = found
    assert candidate.manifest.name == "beta"
    assert candidate.source == f"archive:{archive}"
    [extraction] = list(cache.iterdir())
    assert extraction.name.startswith("beta-1.0.0-") and len(extraction.name) == 23
    assert candidate.root == (extraction / prefix.rstrip("/") if prefix else extraction)
    assert (candidate.root / "beta.py").is_file()


@pytest.mark.parametrize("prefix", ["", "gamma/"], ids=["top-level", "nested"])
def test_tar_gz_plugin_is_extracted_and_reused(plugins: Path, cache: Path, prefix: str):
    # Given a .tar.gz plugin, discovered once already
    write_tar(plugins / "gamma-2.0.0.tar.gz", plugin_files("gamma", "2.0.0"), prefix)
    first, _ = run(plugins, cache)
    marker = first[0].root / "marker"
    marker.write_text("from the first run")

    # When discovering again
    found, notes = run(plugins, cache)

    # Then the same extraction is reused rather than written again
    assert notes == []
    [candidate] = found
    assert candidate.manifest.version == "2.0.0"
    assert candidate.root == first[0].root
    assert marker.exists()
    assert [p.name for p in cache.iterdir()] == [candidate.root.relative_to(cache).parts[0]]


def test_tar_with_parent_path_member_is_refused(plugins: Path, cache: Path, tmp_path: Path):
    # Given a tar whose member climbs out with '..'
    archive = write_tar(
        plugins / "evil-1.0.0.tar.gz",
        plugin_files("evil"),
        extra=[tar_member("../evil", b"owned")],
    )

    # When discovering (the bad archive is refused; discovery goes on)
    err = refusal(plugins, cache)

    # Then the archive is named, and nothing was written anywhere
    assert str(archive) in err
    assert "'..'" in err
    assert not (tmp_path / "evil").exists()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_tar_with_absolute_member_is_refused(plugins: Path, cache: Path):
    # Given a tar with an absolute member path
    archive = write_tar(
        plugins / "abs-1.0.0.tar.gz", plugin_files("abs"), extra=[tar_member("/tmp/x", b"x")]
    )

    # When discovering (the bad archive is refused; discovery goes on)
    err = refusal(plugins, cache)

    # Then the archive is named
    assert str(archive) in err
    assert "absolute" in err


def test_tar_with_symlink_member_is_refused(plugins: Path, cache: Path):
    # Given a tar holding a symlink to /etc/passwd
    link, _ = tar_member("delta/passwd", kind=tarfile.SYMTYPE)
    link.linkname = "/etc/passwd"
    archive = write_tar(
        plugins / "delta-1.0.0.tar.gz", plugin_files("delta"), "delta/", extra=[(link, None)]
    )

    # When discovering (the bad archive is refused; discovery goes on)
    err = refusal(plugins, cache)

    # Then the archive is named and nothing is left in the cache
    assert str(archive) in err
    assert "link" in err
    assert not cache.exists() or list(cache.iterdir()) == []


def test_tar_with_device_member_is_refused(plugins: Path, cache: Path):
    # Given a tar holding a character device
    device, _ = tar_member("null", kind=tarfile.CHRTYPE)
    archive = write_tar(plugins / "dev-1.0.0.tar.gz", plugin_files("dev"), extra=[(device, None)])

    # When discovering (the bad archive is refused; discovery goes on)
    err = refusal(plugins, cache)

    # Then the archive is named
    assert str(archive) in err


def test_zip_with_symlink_member_is_refused(plugins: Path, cache: Path):
    # Given a zip whose member is marked as a symlink
    archive = write_zip(plugins / "eps-1.0.0.zip", plugin_files("eps"))
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")

    # When discovering (the bad archive is refused; discovery goes on)
    err = refusal(plugins, cache)

    # Then the archive is named
    assert str(archive) in err
    assert "symlink" in err


def test_zip_with_parent_path_member_is_refused(plugins: Path, cache: Path):
    # Given a zip with a '..' member
    archive = write_zip(plugins / "zeta-1.0.0.zip", {**plugin_files("zeta"), "../x": b"x"})

    # When discovering (the bad archive is refused; discovery goes on)
    err = refusal(plugins, cache)

    # Then the archive is named
    assert str(archive) in err


def test_invalid_manifest_is_skipped_with_a_note(plugins: Path, cache: Path):
    # Given one good plugin and one whose version is not semantic
    write_folder(plugins / "good", plugin_files("good"))
    bad = write_folder(plugins / "bad", {"cul8er-plugin.json": manifest_json("bad", "1.0")})

    # When discovering
    found, notes = run(plugins, cache)

    # Then the good one is found and the bad one is skipped with a note naming it and the error
    assert [c.manifest.name for c in found] == ["good"]
    [note] = notes
    assert f"path:{bad}" in note
    assert "version" in note and "not semantic" in note


def test_duplicates_keep_the_highest_version(plugins: Path, cache: Path, tmp_path: Path):
    # Given the same plugin in 1.1.0 (first folder) and 1.2.0 (second folder)
    older = write_folder(tmp_path / "a" / "x", plugin_files("x", "1.1.0"))
    newer = write_folder(tmp_path / "b" / "x", plugin_files("x", "1.2.0"))

    # When discovering both folders
    found, notes = discover(
        plugin_path=[tmp_path / "a", tmp_path / "b"], cache_dir=cache, group=NO_GROUP
    )

    # Then 1.2.0 wins and a note says so
    [candidate] = found
    assert candidate.root == newer
    assert notes == [f"plugin 'x': 1.2.0 from path:{newer} chosen over 1.1.0 from path:{older}"]


def test_duplicates_of_the_same_version_keep_the_first(plugins: Path, cache: Path):
    # Given the same plugin version as a folder and as a zip (folder sorts first)
    first = write_folder(plugins / "x", plugin_files("x"))
    archive = write_zip(plugins / "y.zip", plugin_files("x"))

    # When discovering
    found, notes = run(plugins, cache)

    # Then the first found is kept, with a note
    [candidate] = found
    assert candidate.root == first
    assert notes == [
        f"plugin 'x': 1.0.0 from path:{first} kept; the same version from archive:{archive} ignored"
    ]


@pytest.fixture
def entry_point_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real installed distribution in a tmp site folder registering plugin ``epplug``."""
    site = tmp_path / "site"
    package = write_folder(
        site / "cul8er_ep_plugin",
        {
            "__init__.py": b"raise RuntimeError('imported during discovery')\n",
            "cul8er-plugin.json": manifest_json("epplug", "3.0.0"),
        },
    )
    write_folder(
        site / "cul8er_ep_plugin-3.0.0.dist-info",
        {
            "METADATA": b"Metadata-Version: 2.1\nName: cul8er-ep-plugin\nVersion: 3.0.0\n",
            "entry_points.txt": b"[cul8er.tests.ep]\nepplug = cul8er_ep_plugin\n",
        },
    )
    # syspath_prepend invalidates import caches and monkeypatch restores sys.path afterwards.
    monkeypatch.syspath_prepend(str(site))
    yield package
    sys.modules.pop("cul8er_ep_plugin", None)


def test_entry_point_plugin_is_found_without_importing(
    entry_point_dist: Path, plugins: Path, cache: Path
):
    # Given an installed distribution registering a plugin package, and an older copy in a folder
    older = write_folder(plugins / "epplug", plugin_files("epplug", "2.0.0"))

    # When discovering with its entry-point group
    found, notes = run(plugins, cache, group="cul8er.tests.ep")

    # Then the package folder is found, its code never imported, and it wins by version
    [candidate] = found
    assert candidate.source == "entry-point:epplug"
    assert candidate.root == entry_point_dist
    assert candidate.manifest.version == "3.0.0"
    assert "cul8er_ep_plugin" not in sys.modules
    assert notes == [
        f"plugin 'epplug': 3.0.0 from entry-point:epplug chosen over 2.0.0 from path:{older}"
    ]


def test_entry_point_to_a_missing_module_is_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
):
    # Given a distribution whose entry point names a module that does not exist
    site = tmp_path / "site2"
    write_folder(
        site / "ghost-1.0.0.dist-info",
        {
            "METADATA": b"Metadata-Version: 2.1\nName: ghost\nVersion: 1.0.0\n",
            "entry_points.txt": b"[cul8er.tests.ghost]\nghost = no_such_module_xyz.sub\n",
        },
    )
    monkeypatch.syspath_prepend(str(site))

    # When discovering
    found, notes = discover(plugin_path=[], cache_dir=cache, group="cul8er.tests.ghost")

    # Then it is skipped with a note naming the entry point
    assert found == []
    [note] = notes
    assert "entry-point:ghost" in note and "no_such_module_xyz.sub" in note
