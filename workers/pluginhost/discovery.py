"""Find plugins (entry points, folders, archives) and read their manifests, importing nothing."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import stat
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from importlib.metadata import entry_points
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from schemas.manifest import Manifest
from workers.pluginhost.trust import MANIFEST_FILE, SIGNATURE_FILE
from workers.runtime.errors import PluginError

__all__ = ["Candidate", "discover", "discover_all", "read_candidate"]

#: The entry-point group installed packages register plugins under.
DEFAULT_GROUP = "cul8er.plugins"
#: Archive suffixes looked for in plugin folders.
ARCHIVE_SUFFIXES = (".zip", ".tar.gz")
#: Read archives in chunks of this many bytes when hashing.
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Candidate:
    """A plugin found on disk, its manifest validated but its code not imported."""

    manifest: Manifest
    #: The folder holding the plugin's files and its ``cul8er-plugin.json``.
    root: Path
    #: Where it came from: ``entry-point:<name>``, ``path:<folder>`` or ``archive:<file>``.
    source: str
    #: The content of ``cul8er-plugin.sig`` (whitespace stripped), if present.
    signature: str | None
    #: The manifest's raw bytes, for signature checks.
    manifest_bytes: bytes


def discover(
    *, plugin_path: list[Path], cache_dir: Path, group: str = DEFAULT_GROUP
) -> tuple[list[Candidate], list[str]]:
    """The chosen candidates (one per name, sorted by name) and notes on what was skipped.

    Entry points of ``group`` come first, then each folder of ``plugin_path`` in order.
    Archives are extracted under ``cache_dir``.

    Raises:
        PluginError: an archive is unreadable or holds unsafe members.
    """
    found, notes = discover_all(plugin_path=plugin_path, cache_dir=cache_dir, group=group)
    chosen = _choose(found, notes)
    return sorted(chosen.values(), key=lambda c: c.manifest.name), notes


def discover_all(
    *, plugin_path: list[Path], cache_dir: Path, group: str = DEFAULT_GROUP
) -> tuple[list[Candidate], list[str]]:
    """Every candidate found, every version of each name, in the order found; and notes.

    Raises:
        PluginError: an archive is unreadable or holds unsafe members.
    """
    notes: list[str] = []
    found: list[Candidate] = []
    for source, root in _locations(plugin_path, cache_dir, group, notes):
        candidate = _read(source, root, notes)
        if candidate is not None:
            found.append(candidate)
    return found, notes


def _locations(
    plugin_path: list[Path], cache_dir: Path, group: str, notes: list[str]
) -> Iterator[tuple[str, Path]]:
    """(source, folder expected to hold a manifest) for every place a plugin may live."""
    yield from _entry_point_locations(group, notes)
    for folder in plugin_path:
        if not folder.is_dir():
            notes.append(f"plugin folder {folder} does not exist; skipped")
            continue
        for child in sorted(folder.iterdir()):
            if child.is_dir() and (child / MANIFEST_FILE).is_file():
                yield f"path:{child}", child
            elif child.is_file() and child.name.endswith(ARCHIVE_SUFFIXES):
                try:
                    root = _archive_root(_extract(child, cache_dir))
                except PluginError as exc:
                    # One bad archive must not hide every other plugin.
                    notes.append(f"refused archive:{child}: {exc}")
                    continue
                if root is None:
                    notes.append(f"skipped archive:{child}: no {MANIFEST_FILE} inside")
                else:
                    yield f"archive:{child}", root


def _entry_point_locations(group: str, notes: list[str]) -> Iterator[tuple[str, Path]]:
    for ep in entry_points(group=group):
        source = f"entry-point:{ep.name}"
        try:
            folder = _module_folder(ep.module)
        except (ImportError, ValueError) as exc:
            notes.append(f"skipped {source}: cannot locate module {ep.module!r}: {exc}")
            continue
        if folder is None:
            notes.append(f"skipped {source}: module {ep.module!r} not found")
            continue
        if not (folder / MANIFEST_FILE).is_file():
            notes.append(f"skipped {source}: no {MANIFEST_FILE} in {folder}")
            continue
        yield source, folder


def _module_folder(module: str) -> Path | None:
    """The folder of ``module`` (a package's own folder, a module's parent), never importing it."""
    # importlib.util.find_spec("a.b") imports "a": resolve one level at a time instead, asking
    # the same finders the import system would.
    parts = module.split(".")
    spec = importlib.util.find_spec(parts[0])
    for depth in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = _find_child(".".join(parts[: depth + 1]), list(spec.submodule_search_locations))
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin and spec.has_location:
        return Path(spec.origin).parent
    return None


def _find_child(fullname: str, path: list[str]) -> ModuleSpec | None:
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        spec: ModuleSpec | None = find_spec(fullname, path)
        if spec is not None:
            return spec
    return None


def read_candidate(source: str, root: Path) -> Candidate:
    """The candidate in ``root``.

    Raises:
        PluginError: its manifest is missing, unreadable or invalid.
    """
    notes: list[str] = []
    candidate = _read(source, root, notes)
    if candidate is None:
        raise PluginError(notes[0], plugin_name=root.name)
    return candidate


def _read(source: str, root: Path, notes: list[str]) -> Candidate | None:
    """The candidate in ``root``, or None with a note when its manifest is unreadable."""
    try:
        raw = (root / MANIFEST_FILE).read_bytes()
        signature_file = root / SIGNATURE_FILE
        signature = signature_file.read_text().strip() if signature_file.is_file() else None
    except (OSError, UnicodeDecodeError) as exc:
        notes.append(f"skipped {source}: cannot read {MANIFEST_FILE}: {exc}")
        return None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        notes.append(f"skipped {source}: invalid {MANIFEST_FILE}: {_errors(exc)}")
        return None
    return Candidate(
        manifest=manifest, root=root, source=source, signature=signature, manifest_bytes=raw
    )


def _errors(exc: ValidationError) -> str:
    """A pydantic error on one line: ``field: message; …``."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '(root)'}: {error['msg']}"
        for error in exc.errors()
    )


def _choose(found: list[Candidate], notes: list[str]) -> dict[str, Candidate]:
    """One candidate per name: the highest version, the first found on a tie."""
    chosen: dict[str, Candidate] = {}
    for candidate in found:
        name = candidate.manifest.name
        kept = chosen.get(name)
        if kept is None:
            chosen[name] = candidate
            continue
        if kept.manifest.parsed_version == candidate.manifest.parsed_version:
            notes.append(
                f"plugin {name!r}: {kept.manifest.version} from {kept.source} kept; "
                f"the same version from {candidate.source} ignored"
            )
            continue
        win, lose = (
            (candidate, kept)
            if candidate.manifest.parsed_version > kept.manifest.parsed_version
            else (kept, candidate)
        )
        chosen[name] = win
        notes.append(
            f"plugin {name!r}: {win.manifest.version} from {win.source} chosen over "
            f"{lose.manifest.version} from {lose.source}"
        )
    return chosen


# --- archives -------------------------------------------------------------------------------


def _archive_root(folder: Path) -> Path | None:
    """Where the manifest sits: the extraction's top level or its one top-level folder."""
    if (folder / MANIFEST_FILE).is_file():
        return folder
    subfolders = [child for child in folder.iterdir() if child.is_dir()]
    if len(subfolders) == 1 and (subfolders[0] / MANIFEST_FILE).is_file():
        return subfolders[0]
    return None


def _stem(archive: Path) -> str:
    for suffix in ARCHIVE_SUFFIXES:
        if archive.name.endswith(suffix):
            return archive.name[: -len(suffix)]
    return archive.stem


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(archive: Path, cache_dir: Path) -> Path:
    """Extract ``archive`` once into ``cache_dir/<stem>-<sha256[:12]>/``; reuse it after."""
    target = cache_dir / f"{_stem(archive)}-{_sha256(archive)[:12]}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Extract beside the target and rename, so a crash or a refused archive never leaves a
    # half-written folder that a later run would reuse.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        if archive.name.endswith(".zip"):
            _extract_zip(archive, staging)
        else:
            _extract_tar(archive, staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process extracted the same archive meanwhile: use theirs.
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _refuse(archive: Path, why: str) -> PluginError:
    return PluginError(f"unsafe plugin archive {archive}: {why}", plugin_name=_stem(archive))


def _safe_name(archive: Path, name: str) -> PurePosixPath:
    """``name`` as a relative path inside the archive, or a refusal."""
    posix = name.replace("\\", "/")
    path = PurePosixPath(posix)
    if path.is_absolute() or posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise _refuse(archive, f"member {name!r} has an absolute path")
    if ".." in path.parts:
        raise _refuse(archive, f"member {name!r} leaves the archive ('..')")
    return path


def _extract_zip(archive: Path, into: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                _safe_name(archive, info.filename)
                # Unix file type bits, when the archiver set them (zip often leaves them 0).
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind == stat.S_IFLNK:
                    raise _refuse(archive, f"member {info.filename!r} is a symlink")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise _refuse(archive, f"member {info.filename!r} is a device or special file")
            for info in members:
                dest = into / _safe_name(archive, info.filename)
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PluginError(
            f"cannot read plugin archive {archive}: {exc}", plugin_name=_stem(archive)
        ) from exc


def _extract_tar(archive: Path, into: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tf:
            members = tf.getmembers()
            for member in members:
                _safe_name(archive, member.name)
                if member.issym() or member.islnk():
                    raise _refuse(archive, f"member {member.name!r} is a link")
                if not (member.isfile() or member.isdir()):
                    raise _refuse(archive, f"member {member.name!r} is a device or special file")
            # Write files ourselves rather than extractall: no owners, modes or times from the
            # archive, and nothing but regular files and folders.
            for member in members:
                dest = into / _safe_name(archive, member.name)
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                if src is None:
                    raise _refuse(archive, f"member {member.name!r} has no content")
                with src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PluginError(
            f"cannot read plugin archive {archive}: {exc}", plugin_name=_stem(archive)
        ) from exc
